"""Checks of a run against its model that need the model's configs, not its weights.

``p2p-run`` calls :func:`check_before_load` before it loads a local model folder, so that a
prompt too long for the text encoder, more steps than the scheduler knows or a size the VAE
cannot take ends with a one-line error at once (not after seconds of loading), and words a
closed-vocabulary tokenizer does not know are warned about. The same checks run again on the
loaded model (:func:`p2p_framework.pipeline.run_edits`), which covers hub models and the
Python API; this module only makes them early.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .model import check_size, check_steps
from .prompts import check_prompt_lengths, unknown_words

#: Where the demo model's vocabulary is listed (named in the unknown-word warning).
DEMO_VOCABULARY_DOC = "docs/demo-model.md#vocabulary"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _folder(model: str) -> Path | None:
    """The local pipeline folder ``model`` names, or None (a hub id, or not a pipeline)."""
    path = Path(model).expanduser()
    return path if (path / "model_index.json").is_file() else None


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: Path, stamp: float) -> Any:
    """The tokenizer of a local pipeline folder (``stamp``: its modification time, so an
    edited folder is read again), or None when it cannot be loaded here."""
    index = _read_json(folder / "model_index.json") or {}
    entry = index.get("tokenizer")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers"):
        return None
    try:
        import transformers

        return getattr(transformers, entry[1]).from_pretrained(str(folder / "tokenizer"))
    except Exception:  # any loading problem is load_model's to report, with its message
        return None


def model_tokenizer(model: str) -> Any:
    """The tokenizer of a local model folder, loaded alone (cheap); None for a hub id or a
    folder whose tokenizer cannot be read."""
    folder = _folder(model)
    if folder is None:
        return None
    tokenizer_dir = folder / "tokenizer"
    stamp = tokenizer_dir.stat().st_mtime if tokenizer_dir.is_dir() else 0.0
    return _tokenizer(folder.resolve(), stamp)


def is_demo_model(model: str) -> bool:
    """Whether ``model`` is the embedded demo model's folder."""
    from .demo import DEMO_MODEL_DIR

    try:
        return Path(model).expanduser().resolve() == Path(DEMO_MODEL_DIR).resolve()
    except OSError:
        return False


def unknown_word_warning(tokenizer: Any, prompts: Sequence[str], model: str) -> str | None:
    """The warning for words a closed-vocabulary tokenizer does not know (see
    :func:`p2p_framework.prompts.unknown_words`), or None."""
    words: list[str] = []
    for prompt in prompts:
        words += [w for w in unknown_words(tokenizer, prompt) if w not in words]
    if not words:
        return None
    shown = ", ".join(repr(w) for w in words)
    where = (
        f"the demo model knows only the words listed in {DEMO_VOCABULARY_DOC}"
        if is_demo_model(model)
        else f"this model's tokenizer has only {len(tokenizer)} entries"
    )
    return (
        f"word(s) {shown} are not in the model's vocabulary and are read as letters, which "
        f"changes the image unpredictably; {where}"
    )


def check_before_load(
    model: str,
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> list[str]:
    """Check a run against a local model folder's configs and tokenizer, before loading it.

    Does nothing for a hub id (the loaded model is checked instead).

    Returns:
        Warnings for the user (words the model does not know).

    Raises:
        PromptError: a prompt longer than the text encoder reads.
        OptionError: more steps than the scheduler was trained with; a size that is not a
            multiple of the VAE's scale factor.
    """
    folder = _folder(model)
    if folder is None:
        return []
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") or {}
    if steps is not None and isinstance(scheduler.get("num_train_timesteps"), int):
        check_steps(steps, scheduler["num_train_timesteps"])
    vae = _read_json(folder / "vae" / "config.json") or {}
    channels = vae.get("block_out_channels")
    if isinstance(channels, list) and channels:
        factor = 2 ** (len(channels) - 1)
        sample = None
        unet = _read_json(folder / "unet" / "config.json") or {}
        if isinstance(unet.get("sample_size"), int):
            sample = unet["sample_size"] * factor
        if height is not None or width is not None:
            fallback = sample if sample is not None else factor
            check_size(
                height if height is not None else fallback,
                width if width is not None else fallback,
                factor,
            )
    tokenizer = model_tokenizer(model)
    if tokenizer is None:
        return []
    check_prompt_lengths(tokenizer, prompts)
    warning = unknown_word_warning(tokenizer, prompts, model)
    return [warning] if warning else []


__all__ = [
    "DEMO_VOCABULARY_DOC",
    "check_before_load",
    "is_demo_model",
    "model_tokenizer",
    "unknown_word_warning",
]
