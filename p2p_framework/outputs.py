"""What a run writes: images, the side-by-side grid, the attention-map image and ``run.json``.

Everything here is Python API as well as the back end of ``p2p-run``::

    from p2p_framework import load_model, run_edit, get_registry
    from p2p_framework.outputs import write_run

    model = load_model("CompVis/stable-diffusion-v1-4")
    result = run_edit(model, ["a cat on a mat", "a dog on a mat"],
                      [get_registry().build("edit", "replace")])
    write_run(result, "out/dog", model=model)   # source.png, target-1.png, grid.png, run.json

A run's files appear together or not at all: :class:`RunFolder` claims the output folder
before the run (a lock beside it, and a fresh hidden staging folder), the files are written
into the staging folder (each atomically), and the staging folder is renamed into place when
all are written. An error, a full disk or Ctrl-C leaves the output folder as it was. A folder
that holds another run is refused unless ``overwrite`` is given; then it is replaced whole.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .errors import P2PError

#: ``format`` field of every run record.
RECORD_FORMAT = "p2p-framework/run@2"
#: Earlier record formats that are still read (``run@1``: ``cross_replace_steps`` named its
#: default window ``"default_"``; version 2 writes ``"default"``).
READ_FORMATS = ("p2p-framework/run@1", RECORD_FORMAT)


def json_ready(value: Any) -> Any:
    """A JSON-serialisable copy of a value: objects with ``to_json()`` (schedules, settings)
    by it, tuples as lists, paths as strings, tensor/array scalars as numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if hasattr(value, "to_json"):
        return json_ready(value.to_json())
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return json_ready(item())
    if hasattr(value, "tolist"):
        return json_ready(value.tolist())
    return repr(value)


class OutputError(P2PError):
    """An output folder or file cannot be written."""


# -- atomic files ---------------------------------------------------------------------------


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file gets the usual permissions (``0o666`` less the umask). On any error, or
    KeyboardInterrupt, the temporary file is removed and ``path`` is left as it was.

    Raises:
        OutputError: the folder is missing or not writable, the disk is full...
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise OutputError(f"cannot write {str(path)!r}: {error.strerror or error}") from error
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {str(path)!r}: {error.strerror or error}") from error
        raise
    return path


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of ``image``, without metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save ``image`` as PNG atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, png_bytes(image))


def save_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Save ``data`` as indented UTF-8 JSON atomically (values made JSON-ready first)."""
    text = json.dumps(json_ready(data), indent=2, ensure_ascii=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def prepare_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) and check that files can be written in it.

    Called before a run starts, so a bad ``--out`` fails at once, not after the model ran.

    Raises:
        OutputError: it is a file, or cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {str(path)!r} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create output folder {str(path)!r}: {error.strerror or error}"
        ) from error
    probe = path / f".p2p-write-test-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputError(
            f"output folder {str(path)!r} is not writable: {error.strerror or error}"
        ) from error
    return path


# -- run folders ----------------------------------------------------------------------------

#: Names a run writes into its folder (and the atomic writer's leftovers): a folder holding
#: only these holds a run, which ``overwrite`` may replace.
RUN_FILE = re.compile(
    r"(run\.json|grid\.png|attention\.png|source\.png|target-\d+\.png|image-\d+\.png"
    r"|\..+\.tmp)"
)


class OutputLockedError(OutputError):
    """Another process is writing a run into the same output folder."""


def _block_signals() -> Any:
    """Block SIGINT and SIGTERM in the main thread (the handlers run once unblocked): the two
    renames of a swap are not split by Ctrl-C. A no-op where it cannot be done."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def blocked() -> Any:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    return blocked()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class RunFolder:
    """An output folder claimed for one run: the run writes into :attr:`staging` and
    :meth:`commit` swaps it in whole.

    :meth:`claim` (before the model loads, so a bad ``--out`` fails at once):

    - takes a lock beside the folder (``.NAME.p2p-lock``, an ``flock``); a second run on the
      same folder is refused at once (:class:`OutputLockedError`), not queued;
    - refuses a folder that holds another run (``run.json`` or a run's images) unless
      ``overwrite``, and always refuses a folder holding other files (nothing of the user's
      is ever deleted); an empty folder is fine;
    - creates the hidden staging folder ``.NAME.p2p-new-XXXX`` beside it (the write test),
      after removing the staging folders of runs that were killed.

    :meth:`commit` renames the staging folder to the target (an existing target is first
    renamed aside and removed after, so a folder with the earlier run's files never shows a
    mix), :meth:`abort` removes it; both release the lock. Until :meth:`commit`, the target
    is untouched: an error, a full disk, Ctrl-C or SIGTERM leave it as it was (an earlier run
    stays whole; a new folder is never created).

    Args:
        target: the output folder.
        overwrite: replace a folder that holds another run.

    Attributes:
        target: the output folder (as given).
        staging: where the run writes its files until :meth:`commit`.
    """

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self._absolute = Path(os.path.abspath(self.target))
        self._lock_fd: int | None = None
        self.staging = self._absolute  # set by claim()

    @classmethod
    def claim(cls, target: str | os.PathLike[str], *, overwrite: bool = False) -> RunFolder:
        """Lock, check and stage ``target`` (see the class docstring).

        Raises:
            OutputError: it is a file, holds another run (without ``overwrite``) or other
                files, or cannot be created or written; :class:`OutputLockedError`: another
                run holds it.
        """
        folder = cls(target, overwrite=overwrite)
        folder._lock()
        try:
            folder._check()
            folder._stage()
        except BaseException:
            folder._unlock()
            raise
        return folder

    # -- claim ---------------------------------------------------------------------------
    def _sibling(self, kind: str) -> Path:
        return self._absolute.with_name(f".{self._absolute.name}.p2p-{kind}")

    def _shown(self) -> str:
        return repr(str(self.target))

    def _lock(self) -> None:
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"output folder {self._shown()} is a file")
        try:
            self._absolute.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(
                f"cannot create output folder {self._shown()}: {error.strerror or error}"
            ) from error
        path = self._sibling("lock")
        for _ in range(10):  # the holder may unlink the file between our open and lock
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise OutputError(
                    f"output folder {self._shown()} is not writable: {error.strerror or error}"
                ) from error
            try:
                if not _try_lock(descriptor):
                    holder = os.read(descriptor, 32).decode(errors="replace").strip()
                    by = f" (pid {holder})" if holder.isdigit() else ""
                    raise OutputLockedError(
                        f"output folder {self._shown()} is in use by another p2p-run{by}; "
                        "wait for it to finish or choose another --out"
                    )
                if os.fstat(descriptor).st_ino != os.stat(path).st_ino:
                    os.close(descriptor)
                    continue
                os.ftruncate(descriptor, 0)
                os.write(descriptor, str(os.getpid()).encode())
            except FileNotFoundError:
                os.close(descriptor)
                continue
            except BaseException:
                os.close(descriptor)
                raise
            self._lock_fd = descriptor
            return
        raise OutputLockedError(f"output folder {self._shown()}: cannot take its lock")

    def _check(self) -> None:
        parent, name = self._absolute.parent, self._absolute.name
        # Leftovers of killed runs (we hold the lock, so none is in use): an earlier run
        # renamed aside but not replaced comes back; staging folders go.
        olds = sorted(parent.glob(f".{glob_escape(name)}.p2p-old-*"))
        for old in olds:
            if not self._absolute.exists():
                with contextlib.suppress(OSError):
                    os.rename(old, self._absolute)
                continue  # restored, or kept if it could not be
            shutil.rmtree(old, ignore_errors=True)
        for stale in parent.glob(f".{glob_escape(name)}.p2p-new-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if not self._absolute.is_dir():
            return
        try:
            entries = sorted(os.listdir(self._absolute))
        except OSError as error:
            raise OutputError(
                f"cannot read output folder {self._shown()}: {error.strerror or error}"
            ) from error
        if not entries:
            return
        foreign = [e for e in entries if not RUN_FILE.fullmatch(e)]
        if foreign:
            listed = ", ".join(repr(e) for e in foreign[:3]) + (", ..." if foreign[3:] else "")
            raise OutputError(
                f"output folder {self._shown()} is not empty and holds files that are not a "
                f"run's ({listed}); choose a new or empty folder (--overwrite replaces only a "
                "folder holding a run)"
            )
        if not self.overwrite:
            what = "run.json" if "run.json" in entries else "a run's images, no run.json"
            raise OutputError(
                f"output folder {self._shown()} holds another run ({what}); pass --overwrite "
                "to replace it, or choose another --out"
            )

    def _stage(self) -> None:
        staging = self._sibling(f"new-{secrets.token_hex(4)}")
        try:
            staging.mkdir()
            probe = staging / ".p2p-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(
                f"output folder {self._shown()} is not writable: {error.strerror or error}"
            ) from error
        self.staging = staging

    # -- end -----------------------------------------------------------------------------
    def commit(self) -> Path:
        """Swap the staging folder in as the target (replacing an earlier run there) and
        release the lock; returns the target.

        Raises:
            OutputError: the rename failed (the target is then as it was).
        """
        from .signals import raise_pending

        try:
            raise_pending()  # a signal swallowed since the last check ends the run here
            _fsync_dir(self.staging)
            with _block_signals():
                self._swap()
            _fsync_dir(self._absolute.parent)
        except BaseException:
            self.abort()
            raise
        self._unlock()
        return self.target

    def _swap(self) -> None:
        old = None
        try:
            if self._absolute.exists():
                # Only an empty folder or (with overwrite) a run's folder gets here; it was
                # checked under the lock, and is removed only once the new run is in place.
                old = self._sibling(f"old-{secrets.token_hex(4)}")
                os.rename(self._absolute, old)
            try:
                os.rename(self.staging, self._absolute)
            except BaseException:
                if old is not None:
                    os.rename(old, self._absolute)
                raise
        except OSError as error:
            raise OutputError(
                f"cannot move the run into {self._shown()}: {error.strerror or error}"
            ) from error
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the staging folder and release the lock; the target stays as it was."""
        if self.staging != self._absolute:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._sibling("lock"))  # while still holding it (see _lock)
        os.close(self._lock_fd)
        self._lock_fd = None


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike[str]) -> Any:
    """Hold the lock of output folder ``target`` (the ``flock`` :class:`RunFolder` takes,
    ``.NAME.p2p-lock`` beside it) for the block, for writers that manage the folder's files
    themselves (``p2p-run dataset``).

    Raises:
        OutputLockedError: another process holds it; OutputError: ``target`` is a file.
    """
    folder = RunFolder(target)
    folder._lock()
    try:
        yield Path(target)
    finally:
        folder._unlock()


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters quoted."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _try_lock(descriptor: int) -> bool:
    """Take an exclusive ``flock`` without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock; the other checks still apply
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# -- drawing --------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The caption font: the shipped DejaVu Sans (accents, Greek, Cyrillic; Pillow's own
    font draws them as boxes), else Pillow's default."""
    from .fonts import CAPTION_FONT

    try:
        return ImageFont.truetype(str(CAPTION_FONT), size)
    except (OSError, ImportError):  # Pillow without FreeType
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # the bitmap font
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else len(text) * 6


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels (long words are cut)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _text_width(font, word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


def _line_height(font: Any) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int(bottom - min(top, 0)) + 2


def captioned(image: Image.Image, caption: str, *, font_size: int | None = None) -> Image.Image:
    """``image`` with ``caption`` wrapped to its width in a white band below it."""
    width = image.width
    size = font_size or max(10, min(24, width // 16))
    font = _font(size)
    lines = _wrap(caption, font, max(width - 4, 8))
    line_height = _line_height(font)
    band = line_height * len(lines) + 4
    out = Image.new("RGB", (width, image.height + band), "white")
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        x = max(2, (width - _text_width(font, line)) / 2)
        draw.text((x, image.height + 2 + i * line_height), line, fill="black", font=font)
    return out


def grid_image(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    *,
    gap: int = 4,
    font_size: int | None = None,
) -> Image.Image:
    """Images side by side, each captioned (e.g. with its prompt), on a white background."""
    if not images:
        raise ValueError("grid_image needs at least one image")
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    size = font_size or max(10, min(24, max(i.width for i in images) // 16))
    cells = [captioned(img, text, font_size=size) for img, text in zip(images, captions)]
    height = max(cell.height for cell in cells)
    width = sum(cell.width for cell in cells) + gap * (len(cells) - 1)
    grid = Image.new("RGB", (width, height), "white")
    x = 0
    for cell in cells:
        grid.paste(cell, (x, 0))
        x += cell.width + gap
    return grid


def token_texts(tokenizer: Any, prompt: str) -> list[str]:
    """Text of each token of ``prompt`` as the text encoder sees it, from the start token to the
    end token (``<start>`` and ``<end>``), cut at the tokenizer's length."""
    from .prompts import token_ids

    ids = token_ids(tokenizer, prompt)
    limit = int(tokenizer.model_max_length)
    if len(ids) > limit:
        ids = ids[: limit - 1] + [ids[-1]]
    texts = []
    for position, token in enumerate(ids):
        if position == 0 and token == tokenizer.bos_token_id:
            texts.append("<start>")
        elif position == len(ids) - 1 and token == tokenizer.eos_token_id:
            texts.append("<end>")
        else:
            texts.append(tokenizer.decode([token]).strip() or "?")
    return texts


def attention_image(
    result: Any,
    tokenizer: Any,
    *,
    downscale: int | None = None,
    cell_size: int = 128,
) -> Image.Image:
    """Per-token cross-attention maps of every prompt of a run, as one image.

    One row per prompt (captioned with the prompt), one cell per token from the start token to
    the end token; each map is the cross-attention at ``1/downscale`` of the latent grid,
    averaged over heads, layers and steps, divided by its own maximum, upscaled to
    ``cell_size`` and captioned with the token's text.

    Args:
        result: an :class:`~p2p_framework.EditResult` of a run made with
            ``EditSettings(attention_maps=True)`` (``p2p-run --save-attention``).
        tokenizer: the model's tokenizer, or the model itself.
        downscale: resolution of the maps (default: ``result.settings.attention_downscale``).
        cell_size: pixels per map.

    Raises:
        P2PError: no maps were kept at that resolution.
    """
    import torch

    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    downscale = downscale or result.settings.attention_downscale
    try:
        maps = result.attention_store.average(downscale=downscale, cross=True)
    except KeyError as error:
        raise P2PError(
            f"{error.args[0]}; run with EditSettings(attention_maps=True) "
            "(p2p-run --save-attention) to keep them"
        ) from None
    font = _font(max(10, min(20, cell_size // 8)))
    line_height = _line_height(font)
    rows = []
    for index, prompt in enumerate(result.prompts):
        texts = token_texts(tokenizer, prompt)
        cells = []
        for position, text in enumerate(texts):
            plane = maps[index, :, :, position].float()
            plane = plane / plane.max().clamp_min(1e-12)
            pixels = (plane.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            cell = Image.fromarray(pixels, mode="L").convert("RGB")
            cell = cell.resize((cell_size, cell_size), Image.Resampling.BICUBIC)
            cells.append(
                captioned(cell, text, font_size=font.size if hasattr(font, "size") else None)
            )
        rows.append((prompt, cells))
    gap = 2
    width = max(len(cells) for _, cells in rows) * (cell_size + gap) - gap
    heights = [max(c.height for c in cells) + line_height + 4 for _, cells in rows]
    sheet = Image.new("RGB", (max(width, cell_size), sum(heights) + gap * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (prompt, cells), height in zip(rows, heights):
        label = _wrap(prompt, font, sheet.width - 4)[0]
        draw.text((2, y + 2), label, fill="black", font=font)
        x = 0
        for cell in cells:
            sheet.paste(cell, (x, y + line_height + 4))
            x += cell_size + gap
        y += height + gap
    return sheet


# -- the run record -------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide a run's pixels."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in ("p2p-framework", "torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def plugin_record(plugin: Any, kind: str, registry: Any = None) -> dict[str, Any]:
    """Name, kind, package, version, registering module and every option of a plugin object.

    The name comes from the registry entry whose class is ``type(plugin)`` (falling back to
    the class's ``name``), so a record can be turned back into plugins by name.
    """
    from .registry import get_registry

    registry = registry if registry is not None else get_registry()
    info = next(
        (i for i in registry.plugins(kind) if i.plugin_class is type(plugin)),
        None,
    )
    return {
        "name": info.name if info else getattr(plugin, "name", type(plugin).__name__),
        "kind": kind,
        "package": info.package if info else "unknown",
        "version": info.version if info else "unknown",
        "plugin": info.plugin if info else type(plugin).__module__,
        "options": json_ready(absolute_paths(plugin, plugin.option_values())),
    }


def absolute_paths(plugin: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every relative path made absolute (against the current folder), so a
    record reruns from any folder. A path option is a dataclass field declared with
    ``metadata={"path": True}`` (e.g. a source's ``image`` and ``inversion``)."""
    import dataclasses

    if not dataclasses.is_dataclass(plugin):
        return options
    options = dict(options)
    for item in dataclasses.fields(plugin):
        value = options.get(item.name)
        if item.metadata.get("path") and isinstance(value, str) and value:
            options[item.name] = os.path.abspath(value)
    return options


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def run_record(
    result: Any,
    model: Any,
    *,
    mode: str = "edit",
    registry: Any = None,
    outputs: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    command: Sequence[str] | None = None,
    name: str | None = None,
    save_attention: bool = False,
) -> dict[str, Any]:
    """The record of a run, as written to ``run.json`` (see docs/cli.md for every field).

    It holds everything needed to run it again (``p2p-run rerun``): the model's identity,
    device and dtype, the prompts, the source and edits by name with all their options, and
    every setting, plus plugin packages and versions, library versions and timings.

    Args:
        result: the :class:`~p2p_framework.EditResult`.
        model: the :class:`~p2p_framework.StableDiffusionModel` it ran on.
        mode: ``"edit"`` (source + targets) or ``"generate"`` (independent prompts).
        registry: where plugin names and versions are looked up (default: the global one).
        outputs: file names written, relative to the run folder.
        timings: extra timings (seconds) merged with ``result.timings``.
        command: the command line's arguments (default ``sys.argv``).
        name: the job's name in a pipeline file.
        save_attention: whether ``attention.png`` was asked for.
    """
    import shlex

    argv = list(command) if command is not None else ["p2p-run", *sys.argv[1:]]
    seed = result.source_info.get("seed", getattr(result.source, "seed", None))
    return {
        "format": RECORD_FORMAT,
        "status": "ok",
        "name": name,
        "mode": mode,
        "command": shlex.join(argv),
        "argv": argv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cwd": os.getcwd(),
        "model": {
            **json_ready(dict(model.identity)),
            "device": str(model.device),
            "dtype": dtype_name(model.dtype),
            "compile": getattr(model, "compile_mode", None),
            "family": getattr(model, "family", "stable-diffusion"),
        },
        "prompts": list(result.prompts),
        "source": plugin_record(result.source, "source", registry),
        "edits": [plugin_record(edit, "edit", registry) for edit in result.edits],
        "settings": result.settings.to_json(),
        "seed": json_ready(seed),
        "source_info": json_ready(result.source_info),
        "save_attention": bool(save_attention),
        "outputs": dict(outputs or {}),
        "versions": library_versions(),
        "timings": {k: round(v, 4) for k, v in {**result.timings, **(timings or {})}.items()},
    }


def output_names(mode: str, count: int) -> list[str]:
    """Image file names: ``source.png, target-1.png, ...`` for an edit, ``image-1.png, ...``
    for plain generation."""
    if mode == "generate":
        return [f"image-{i}.png" for i in range(1, count + 1)]
    return ["source.png", *(f"target-{i}.png" for i in range(1, count))]


def write_run(
    result: Any,
    out_dir: str | os.PathLike[str] | RunFolder,
    model: Any,
    *,
    mode: str = "edit",
    save_attention: bool = False,
    registry: Any = None,
    timings: dict[str, float] | None = None,
    command: Sequence[str] | None = None,
    name: str | None = None,
    started: float | None = None,
    overwrite: bool = False,
) -> tuple[dict[str, Any], list[Path]]:
    """Write a run's files into ``out_dir`` and return ``(record, paths)``.

    Writes one PNG per prompt (:func:`output_names`), ``grid.png`` (all images side by side,
    captioned with their prompts; for ``generate`` only when there are several),
    ``attention.png`` when ``save_attention`` (:func:`attention_image`), and ``run.json``
    (:func:`run_record`), last. The files appear together or not at all (a
    :class:`RunFolder`: written into a staging folder beside ``out_dir``, then swapped in).
    ``started`` (a ``time.perf_counter()`` value) adds the ``total`` timing.

    Args:
        out_dir: the folder, or a :class:`RunFolder` claimed before the run (committed here).
        overwrite: replace a folder that holds another run (when ``out_dir`` is a path).

    Raises:
        OutputError: ``out_dir`` holds another run (without ``overwrite``), is locked by
            another run, or a file cannot be written; ``out_dir`` is then as it was.
    """
    folder = (
        out_dir if isinstance(out_dir, RunFolder) else RunFolder.claim(out_dir, overwrite=overwrite)
    )
    try:
        record, names = _write_files(
            result,
            folder.staging,
            model,
            mode=mode,
            save_attention=save_attention,
            registry=registry,
            timings=timings,
            command=command,
            name=name,
            started=started,
        )
    except BaseException:
        folder.abort()
        raise
    target = folder.commit()
    return record, [target / file for file in names]


def _write_files(
    result: Any,
    out: Path,
    model: Any,
    *,
    mode: str,
    save_attention: bool,
    registry: Any,
    timings: dict[str, float] | None,
    command: Sequence[str] | None,
    name: str | None,
    started: float | None,
) -> tuple[dict[str, Any], list[str]]:
    """Write the run's files into ``out``; returns the record and the file names written."""
    import time

    began = time.perf_counter()
    names = output_names(mode, len(result.images))
    paths = [save_png(image, out / file) for image, file in zip(result.images, names)]
    outputs: dict[str, Any] = {"images": names, "grid": None, "attention": None}
    if mode != "generate" or len(result.images) > 1:
        grid = grid_image(result.images, result.prompts)
        paths.append(save_png(grid, out / "grid.png"))
        outputs["grid"] = "grid.png"
    if save_attention:
        paths.append(save_png(attention_image(result, model.tokenizer), out / "attention.png"))
        outputs["attention"] = "attention.png"
    outputs["record"] = "run.json"
    extra = dict(timings or {})
    extra["write"] = time.perf_counter() - began
    if started is not None:
        extra["total"] = time.perf_counter() - started
    record = run_record(
        result,
        model,
        mode=mode,
        registry=registry,
        outputs=outputs,
        timings=extra,
        command=command,
        name=name,
        save_attention=save_attention,
    )
    paths.append(save_json(record, out / "run.json"))
    return record, [path.name for path in paths]
