"""The inversion cache: one ``.p2pinv`` file per key, written atomically.

The key is a SHA-256 over the prepared image's pixels, the prompt, the model identity, the
scheduler, the method and its options, the step count, the guidance scale and the size; any
change of one of them is another file. The default folder is
``$P2P_FRAMEWORK_CACHE_DIR``, else ``$XDG_CACHE_HOME/p2p-framework/inversions``, else
``~/.cache/p2p-framework/inversions``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import InversionFileError
from .result import SUFFIX, Inversion

#: Bumped when the inversion code changes what it produces for the same key.
CACHE_VERSION = 1
CACHE_DIR_ENV = "P2P_FRAMEWORK_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where inversions are cached unless told otherwise."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "p2p-framework" / "inversions"


def cache_key(
    *,
    image_hash: str,
    prompt: str,
    model_identity: dict[str, Any],
    scheduler_config: dict[str, Any],
    method: str,
    options: dict[str, Any],
    num_steps: int,
    guidance: float,
    height: int,
    width: int,
) -> str:
    """Hex SHA-256 naming one inversion."""
    parts = {
        "version": CACHE_VERSION,
        "image": image_hash,
        "prompt": prompt,
        "model": model_identity,
        "scheduler": scheduler_config,
        "method": method,
        "options": options,
        "num_steps": int(num_steps),
        "guidance": float(guidance),
        "size": [int(height), int(width)],
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class InversionCache:
    """A folder of cached inversions.

    Args:
        folder: the cache folder (created on the first write); default
            :func:`default_cache_dir`.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        """The file of ``key``."""
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str) -> Inversion | None:
        """The cached inversion, or None when absent or unreadable (it is then replaced on
        the next :meth:`put`)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return Inversion.load(path)
        except InversionFileError:
            return None

    def put(self, key: str, inversion: Inversion) -> Path:
        """Store ``inversion`` under ``key`` (atomic: temporary file, then ``os.replace``)."""
        return inversion.save(self.path(key))
