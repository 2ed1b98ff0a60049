"""Image preparation for inversion: the paper's ``load_512``, for any size and aspect.

:func:`prepare_image` loads a photo (a path or a PIL image), applies its EXIF orientation,
turns it into 8-bit RGB, cuts the optional crop offsets ``(left, right, top, bottom)`` off its
edges, centre-crops it to the requested aspect ``height:width`` and resizes it (bicubic, as
PIL's default in the paper's code) to ``width x height`` pixels.

Transparent images are **composited on white** (the paper's code dropped the alpha channel,
which shows whatever colour transparent pixels happen to store). Grayscale, palette, CMYK and
16-bit images become RGB.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from p2p_framework.errors import P2PWarning

from .errors import ImageError

#: Smallest accepted side, in pixels, of an input image and of what the crop leaves of it.
MIN_SIDE = 16

ImageInput = str | os.PathLike[str] | Image.Image
Crop = tuple[int, int, int, int]


def _name(image: ImageInput) -> str:
    if isinstance(image, Image.Image):
        filename = getattr(image, "filename", "")
        return f"image {filename!r}" if filename else "the given image"
    return f"image {os.fspath(image)!r}"


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on white; 16-bit and float images rescaled."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            top = 1.0 if array.size and np.nanmax(array) <= 1.0 else 255.0
        else:
            top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        gray = np.clip(np.nan_to_num(array) / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def _open_large(path: Path, name: str) -> Image.Image:
    """Open an image above Pillow's warning size, saying so once as a :class:`P2PWarning`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)
    megapixels = opened.width * opened.height / 1e6
    warnings.warn(
        P2PWarning(
            f"{name} is {opened.width}x{opened.height} px ({megapixels:.0f} MP); decoding it "
            "takes several GB of memory, and it is resized to the model's size anyway"
        ),
        stacklevel=3,
    )
    return opened


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path or a PIL image, EXIF orientation applied.

    Raises:
        ImageError: the file does not exist, cannot be decoded, is truncated, or is smaller
            than :data:`MIN_SIDE` pixels on a side; the message names the file.
    """
    name = _name(image)
    try:
        if isinstance(image, Image.Image):
            opened = image
            opened.load()
            rgb = _to_rgb(ImageOps.exif_transpose(opened) or opened)
        else:
            path = Path(image).expanduser()
            if not path.is_file():
                what = "is a folder" if path.is_dir() else "does not exist"
                raise ImageError(f"{name} {what}")
            with warnings.catch_warnings():
                # Pillow warns (with its own source line) above MAX_IMAGE_PIXELS: one line.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                try:
                    opened = Image.open(path)
                except Image.DecompressionBombWarning:
                    opened = _open_large(path, name)
            with opened:
                opened.load()
                rgb = _to_rgb(ImageOps.exif_transpose(opened) or opened)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name} is too large to decode safely: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        detail = str(error) or type(error).__name__
        raise ImageError(f"cannot read {name}: {detail}") from None
    width, height = rgb.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{name} is {width}x{height} px; at least {MIN_SIDE} px per side is needed"
        )
    return rgb


def parse_crop(crop: Sequence[int] | str | None) -> Crop:
    """Crop offsets ``(left, right, top, bottom)`` in pixels from a sequence or ``"l,r,t,b"``.

    Raises:
        ImageError: not four non-negative integers.
    """
    if crop is None:
        return (0, 0, 0, 0)
    values: Sequence[object]
    if isinstance(crop, str):
        values = [part.strip() for part in crop.replace(" ", ",").split(",") if part.strip()]
    else:
        values = list(crop)
    try:
        numbers = [int(v) for v in values]  # type: ignore[call-overload]
        exact = all(
            not isinstance(v, bool) and (not isinstance(v, float) or v.is_integer()) for v in values
        )
    except (TypeError, ValueError):
        numbers, exact = [], False
    if len(numbers) != 4 or not exact or min(numbers) < 0:
        raise ImageError(
            f"crop must be four non-negative pixel offsets (left, right, top, bottom), got {crop!r}"
        )
    return (numbers[0], numbers[1], numbers[2], numbers[3])


def prepare_image(
    image: ImageInput,
    height: int,
    width: int,
    crop: Sequence[int] | str | None = None,
) -> Image.Image:
    """The photo as the model sees it: ``width x height`` RGB.

    Args:
        image: a path or a PIL image.
        height, width: the size to produce, in pixels.
        crop: pixels to cut off the ``(left, right, top, bottom)`` edges first, as in the
            paper's ``load_512``.

    Raises:
        ImageError: unreadable or too small an image, bad crop offsets, or a crop that
            leaves less than :data:`MIN_SIDE` pixels on a side.
    """
    rgb = load_image(image)
    left, right, top, bottom = parse_crop(crop)
    full_w, full_h = rgb.size
    box_w, box_h = full_w - left - right, full_h - top - bottom
    if min(box_w, box_h) < MIN_SIDE:
        raise ImageError(
            f"crop (left={left}, right={right}, top={top}, bottom={bottom}) leaves "
            f"{max(box_w, 0)}x{max(box_h, 0)} px of the {full_w}x{full_h} px {_name(image)}; "
            f"at least {MIN_SIDE} px per side is needed"
        )
    # Centre-crop to the aspect width:height (the paper: a square on the short side).
    if box_w * height > box_h * width:
        keep_w, keep_h = max(1, round(box_h * width / height)), box_h
    else:
        keep_w, keep_h = box_w, max(1, round(box_w * height / width))
    x0 = left + (box_w - keep_w) // 2
    y0 = top + (box_h - keep_h) // 2
    cropped = rgb.crop((x0, y0, x0 + keep_w, y0 + keep_h))
    return cropped.resize((width, height), Image.Resampling.BICUBIC)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 in [0, 1] from an RGB PIL image."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def image_hash(image: Image.Image | torch.Tensor) -> str:
    """SHA-256 of the pixels (and size) of a prepared image or image tensor."""
    digest = hashlib.sha256()
    if isinstance(image, torch.Tensor):
        data = image.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"tensor:{tuple(data.shape)}\n".encode())
        digest.update(data.numpy().tobytes())
    else:
        rgb = image.convert("RGB")
        digest.update(f"rgb:{rgb.size[0]}x{rgb.size[1]}\n".encode())
        digest.update(rgb.tobytes())
    return digest.hexdigest()
