"""What a run writes: images, the side-by-side grid, the attention-map image and ``run.json``.

Everything here is Python API as well as the back end of ``p2p-run``::

    from p2p_framework import load_model, run_edit, get_registry
    from p2p_framework.outputs import write_run

    model = load_model("CompVis/stable-diffusion-v1-4")
    result = run_edit(model, ["a cat on a mat", "a dog on a mat"],
                      [get_registry().build("edit", "replace")])
    write_run(result, "out/dog", model=model)   # source.png, target-1.png, grid.png, run.json

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so an
error or Ctrl-C never leaves a half-written PNG or ``run.json``; ``run.json`` is written last.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import secrets
import sys
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
        "options": json_ready(plugin.option_values()),
    }


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
    out_dir: str | os.PathLike[str],
    model: Any,
    *,
    mode: str = "edit",
    save_attention: bool = False,
    registry: Any = None,
    timings: dict[str, float] | None = None,
    command: Sequence[str] | None = None,
    name: str | None = None,
    started: float | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Write a run's files into ``out_dir`` and return ``(record, paths)``.

    Writes one PNG per prompt (:func:`output_names`), ``grid.png`` (all images side by side,
    captioned with their prompts; for ``generate`` only when there are several),
    ``attention.png`` when ``save_attention`` (:func:`attention_image`), and ``run.json``
    (:func:`run_record`), last. Every file is written atomically. ``started`` (a
    ``time.perf_counter()`` value) adds the ``total`` timing.

    Raises:
        OutputError: a file cannot be written.
    """
    import time

    began = time.perf_counter()
    out = prepare_output_dir(out_dir)
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
    return record, paths
