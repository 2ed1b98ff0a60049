"""Domain-aware scoring of demo images: find objects by colour and classify their shape.

Every pixel is labelled with the nearest reference colour, the references being the
:data:`~p2p_framework.demo.shapes.COLORS` palette and the darker texture tones of each colour
(a tone pixel is labelled with its base colour). Pixels farther than ``max_distance`` (RGB
euclidean) from every reference stay unlabelled. The background colour is the most frequent
label; objects are the 8-connected components of every other colour of at least ``min_area``
pixels.

A mask's shape is classified by template matching: the mask's bounding box is mapped onto each
shape's canonical box (:func:`~p2p_framework.demo.shapes.canonical_bbox`), the shape is
rasterised there, and the shape with the highest IoU with the mask wins. Shapes are upright in
the domain, so the bounding box fixes the template up to the shape's kind. This is exact on
clean renders (see ``tests/test_demo_domain.py``) and degrades gracefully on generated images.

The background texture is classified from the background pixels alone (:func:`classify_texture`):
the share of them nearer the colour's darker tone than the colour itself tells plain from
textured, and stripes (constant along the anti-diagonal) from dots (no preferred direction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from p2p_framework.demo.shapes import (
    COLOR_NAMES,
    COLORS,
    SHAPES,
    CaptionSpec,
    Scene,
    canonical_bbox,
    inside_shape,
    parse_caption,
    tone_rgb,
)

__all__ = [
    "DetectedObject",
    "SceneScore",
    "background_color",
    "classify_shape",
    "classify_texture",
    "color_labels",
    "connected_components",
    "detect_objects",
    "find_object",
    "has_object",
    "score_image",
    "shape_scores",
    "texture_scores",
]

#: Default largest RGB distance of a labelled pixel to its reference colour.
MAX_DISTANCE = 100.0
#: Default smallest object, in pixels at 64 px (scaled by area for other sizes).
MIN_AREA = 20

_REFERENCES = np.array(
    [COLORS[c] for c in COLOR_NAMES] + [tone_rgb(c) for c in COLOR_NAMES], dtype=np.float32
)
_REFERENCE_BASE = np.array(list(range(len(COLOR_NAMES))) * 2)

#: Smallest share of tone pixels in the background for it to count as textured.
TEXTURE_MIN_TONE = 0.08
#: Smallest anisotropy (see :func:`texture_scores`) for a textured background to be striped.
STRIPE_MIN_ANISOTROPY = 0.2


def _as_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float32 RGB in 0..255 from a PIL image, array or tensor.

    Arrays/tensors may be ``(H, W, 3)`` or ``(3, H, W)``; float values in ``[0, 1]`` are
    scaled to 0..255, other floats and integers are taken as 0..255.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.max()) <= 1.0:
        arr = arr * 255.0
    return arr.astype(np.float32)


def color_labels(
    image: Image.Image | np.ndarray | torch.Tensor, max_distance: float = MAX_DISTANCE
) -> np.ndarray:
    """``(H, W)`` int labels: index into :data:`COLORS` of the nearest colour or tone, -1 if none
    is within ``max_distance``."""
    arr = _as_array(image)
    d = np.linalg.norm(arr[:, :, None, :] - _REFERENCES[None, None], axis=-1)
    nearest = d.argmin(-1)
    labels = _REFERENCE_BASE[nearest]
    labels[np.take_along_axis(d, nearest[..., None], -1)[..., 0] > max_distance] = -1
    return labels


def background_color(labels: np.ndarray) -> str | None:
    """Most frequent colour of a label map (``None`` if nothing is labelled)."""
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(COLOR_NAMES))
    return COLOR_NAMES[int(counts.argmax())] if counts.any() else None


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, largest first."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    # Union-find over runs would be faster; a label-propagation loop is plenty for 64-256 px.
    labels = np.where(mask, np.arange(h * w).reshape(h, w), -1)
    big = h * w
    while True:
        cur = np.where(mask, labels, big)
        new = cur.copy()
        new[1:] = np.minimum(new[1:], cur[:-1])
        new[:-1] = np.minimum(new[:-1], cur[1:])
        new[:, 1:] = np.minimum(new[:, 1:], cur[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], cur[:, 1:])
        new[1:, 1:] = np.minimum(new[1:, 1:], cur[:-1, :-1])
        new[1:, :-1] = np.minimum(new[1:, :-1], cur[:-1, 1:])
        new[:-1, 1:] = np.minimum(new[:-1, 1:], cur[1:, :-1])
        new[:-1, :-1] = np.minimum(new[:-1, :-1], cur[1:, 1:])
        new = np.where(mask, new, big)
        # Pointer jumping: follow each label to its own label to speed up propagation.
        flat = new.ravel()
        jumped = np.where(mask.ravel(), flat[np.minimum(flat, big - 1)], big)
        new = np.minimum(new, jumped.reshape(h, w))
        if np.array_equal(new, cur):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [labels == ids[i] for i in order]


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of a mask with each shape's template fitted to the mask's bounding box."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if not len(rows):
        return {s: 0.0 for s in SHAPES}
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Pixel centres of the box plus a one pixel border.
    ys = np.arange(max(y0 - 1, 0), min(y1 + 1, mask.shape[0]))
    xs = np.arange(max(x0 - 1, 0), min(x1 + 1, mask.shape[1]))
    sub = mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    scores: dict[str, float] = {}
    for shape in SHAPES:
        u0, u1, v0, v1 = canonical_bbox(shape)
        u = u0 + (xs + 0.5 - x0) / (x1 - x0) * (u1 - u0)
        v = v0 + (ys + 0.5 - y0) / (y1 - y0) * (v1 - v0)
        tmpl = inside_shape(shape, torch.as_tensor(u)[None, :], torch.as_tensor(v)[:, None])
        tmpl = tmpl.numpy()
        union = np.logical_or(tmpl, sub).sum()
        scores[shape] = float(np.logical_and(tmpl, sub).sum() / union) if union else 0.0
    return scores


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose fitted template best matches the mask (see :func:`shape_scores`)."""
    scores = shape_scores(mask)
    return max(scores, key=scores.__getitem__)


def texture_scores(
    image: Image.Image | np.ndarray | torch.Tensor,
    background: str | None = None,
    *,
    max_distance: float = MAX_DISTANCE,
) -> tuple[float, float]:
    """``(tone, anisotropy)`` of the background of an image.

    ``background`` is the background colour (default: the image's dominant colour). Background
    pixels are those labelled with that colour (its tone included); ``tone`` is the share of
    them nearer the darker tone than the colour itself (0 on a plain background, about 0.5
    striped, 0.2 dotted). ``anisotropy`` compares how often a tone pixel's neighbour along the
    anti-diagonal ``(+1, -1)`` is tone too with the same along the diagonal ``(+1, +1)``:
    about 0.5 for the domain's diagonal stripes (constant along the anti-diagonal), about 0 for
    dots. Both are 0 when nothing is labelled with ``background``.
    """
    arr = _as_array(image)
    labels = color_labels(arr, max_distance)
    if background is None:
        background = background_color(labels)
        if background is None:
            return 0.0, 0.0
    region = labels == COLOR_NAMES.index(background)
    if not region.any():
        return 0.0, 0.0
    base = np.array(COLORS[background], dtype=np.float32)
    tone_rgb_ = np.array(tone_rgb(background), dtype=np.float32)
    nearer_tone = np.linalg.norm(arr - tone_rgb_, axis=-1) < np.linalg.norm(arr - base, axis=-1)
    tone = region & nearer_tone
    share = float(tone.sum() / region.sum())
    if not tone.any():
        return share, 0.0
    # Pairs (p, p + offset) with p a tone pixel and both in the background region.
    head = tone[:-1]
    anti = head[:, 1:] & region[1:, :-1]
    diag = head[:, :-1] & region[1:, 1:]
    along_anti = float((anti & tone[1:, :-1]).sum() / max(anti.sum(), 1))
    along_diag = float((diag & tone[1:, 1:]).sum() / max(diag.sum(), 1))
    return share, along_anti - along_diag


def classify_texture(
    image: Image.Image | np.ndarray | torch.Tensor,
    background: str | None = None,
    *,
    max_distance: float = MAX_DISTANCE,
) -> str:
    """``"plain"``, ``"striped"`` or ``"dotted"``: the background's texture (see
    :func:`texture_scores`; ``background`` defaults to the image's dominant colour)."""
    tone, anisotropy = texture_scores(image, background, max_distance=max_distance)
    if tone < TEXTURE_MIN_TONE:
        return "plain"
    return "striped" if anisotropy >= STRIPE_MIN_ANISOTROPY else "dotted"


@dataclass
class DetectedObject:
    """An object found in an image: colour, classified shape, mask and shape scores."""

    color: str
    shape: str
    mask: np.ndarray = field(repr=False)
    area: int
    bbox: tuple[int, int, int, int]  # (row0, col0, row1, col1), exclusive ends
    scores: dict[str, float] = field(repr=False)


def _detect(labels: np.ndarray, color: str, min_area: int) -> list[DetectedObject]:
    found = []
    for comp in connected_components(labels == COLOR_NAMES.index(color)):
        area = int(comp.sum())
        if area < min_area:
            break
        rows = np.flatnonzero(comp.any(1))
        cols = np.flatnonzero(comp.any(0))
        scores = shape_scores(comp)
        found.append(
            DetectedObject(
                color=color,
                shape=max(scores, key=scores.__getitem__),
                mask=comp,
                area=area,
                bbox=(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1),
                scores=scores,
            )
        )
    return found


def _min_area(labels: np.ndarray, min_area: int | None) -> int:
    if min_area is not None:
        return min_area
    return max(4, round(MIN_AREA * labels.size / 64**2))


def detect_objects(
    image: Image.Image | np.ndarray | torch.Tensor,
    *,
    min_area: int | None = None,
    max_distance: float = MAX_DISTANCE,
) -> tuple[str | None, list[DetectedObject]]:
    """Background colour and all objects (components of any other colour), largest first."""
    labels = color_labels(image, max_distance)
    background = background_color(labels)
    area = _min_area(labels, min_area)
    objects = [
        obj for color in COLOR_NAMES if color != background for obj in _detect(labels, color, area)
    ]
    objects.sort(key=lambda o: -o.area)
    return background, objects


def find_object(
    image: Image.Image | np.ndarray | torch.Tensor,
    color: str,
    *,
    min_area: int | None = None,
    max_distance: float = MAX_DISTANCE,
) -> DetectedObject | None:
    """Largest object of colour ``color`` (``None`` when there is none, or when ``color`` is the
    image's background colour)."""
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}")
    labels = color_labels(image, max_distance)
    if background_color(labels) == color:
        return None
    found = _detect(labels, color, _min_area(labels, min_area))
    return found[0] if found else None


def has_object(
    image: Image.Image | np.ndarray | torch.Tensor, color: str, shape: str, **kwargs
) -> bool:
    """Whether the largest ``color`` object of the image is a ``shape``."""
    obj = find_object(image, color, **kwargs)
    return obj is not None and obj.shape == shape


@dataclass
class SceneScore:
    """How well an image matches what was asked for.

    Attributes:
        background_ok: the dominant colour is the expected background colour.
        color_found: per expected object, an object of its colour exists.
        shape_ok: per expected object, the largest object of its colour has the right shape.
        extra_objects: number of detected objects whose colour was not asked for.
        exact: background right, every object found with the right shape, nothing extra.
        background: detected background colour; objects: detected objects.
    """

    background_ok: bool
    color_found: list[bool]
    shape_ok: list[bool]
    extra_objects: int
    exact: bool
    background: str | None
    objects: list[DetectedObject] = field(repr=False)


def score_image(
    image: Image.Image | np.ndarray | torch.Tensor,
    expected: str | Scene | CaptionSpec,
    *,
    min_area: int | None = None,
    max_distance: float = MAX_DISTANCE,
) -> SceneScore:
    """Score an image against a caption, scene or :class:`CaptionSpec` (texture is ignored)."""
    if isinstance(expected, str):
        expected = parse_caption(expected)
    if isinstance(expected, Scene):
        wanted: Sequence[tuple[str, str]] = [(o.color, o.shape) for o in expected.objects]
    else:
        wanted = expected.objects
    background, objects = detect_objects(image, min_area=min_area, max_distance=max_distance)
    color_found, shape_ok = [], []
    for color, shape in wanted:
        mine = [o for o in objects if o.color == color]
        color_found.append(bool(mine))
        shape_ok.append(bool(mine) and mine[0].shape == shape)
    wanted_colors = {c for c, _ in wanted}
    extra = sum(o.color not in wanted_colors for o in objects)
    extra += sum(max(0, sum(o.color == c for o in objects) - 1) for c in wanted_colors)
    background_ok = background == expected.background
    return SceneScore(
        background_ok=background_ok,
        color_found=color_found,
        shape_ok=shape_ok,
        extra_objects=extra,
        exact=background_ok and all(shape_ok) and extra == 0,
        background=background,
        objects=objects,
    )
