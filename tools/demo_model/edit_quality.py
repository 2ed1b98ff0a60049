"""Measure Prompt-to-Prompt edits on the demo domain, judged by the domain scorer.

Edit kinds (:data:`KINDS`), each made from a held-out scene (sampled here, not in training) and
its caption, with one noise seed per scene:

* ``colour``: replace the object's colour word ("a red circle ..." -> "a blue circle ...");
* ``shape``: replace its shape word (circle -> square);
* ``background``: replace the background colour word;
* ``refine``: add a texture word to a plain background ("... on a yellow background" ->
  "... on a striped yellow background", or ``dotted``), with the refine edit;
* ``reweight-down`` / ``reweight-up``: scale the colour word's attention by
  :data:`REWEIGHT_DOWN` / :data:`REWEIGHT_UP` (target prompt = source prompt);
* ``blend``: a two-object scene, one object's colour replaced, with and without local blend on
  that object's words; the other object and the background should stay put.

Each edit is compared with the *naive* baseline: the target prompt generated alone from the
same seed (no attention control). For ``reweight-down`` the naive prompt drops the colour word
("a circle on a yellow background"); ``reweight-up`` has no prompt-only counterpart.

Per edit and method (:class:`Measure`):

* ``valid``: the source generation shows what its caption asks for where the edit needs it:
  background colour right and an object of every captioned colour found (``refine`` also needs
  the source's texture to differ from the one to add). Edit metrics are meant for valid
  sources only.
* ``success``: the target attribute is present, judged by :mod:`~tools.demo_model.scoring`:
  an object of the target colour (``colour``, ``blend``), the target shape for the object of
  the source colour (``shape``), the target background colour (``background``), the target
  texture (``refine``); for ``reweight-down`` the pixels of the object's colour at most
  :data:`REWEIGHT_DOWN_RATIO` of the source's, for ``reweight-up`` at least
  :data:`REWEIGHT_UP_RATIO` of them with the background colour unchanged.
* ``iou`` / ``shift``: IoU and centroid distance (pixels) of the edited object's mask in the
  source and in the edit (the scorer's segmentation of both; IoU 0 and no shift when the edit
  has no such object).
* ``psnr``: PSNR between source and edit over the region the edit should leave alone: outside
  both object masks (dilated by one pixel) for object edits, inside the source's object mask
  (eroded by one pixel) for background edits (``background``, ``refine``).
* ``other_iou`` (``blend``): IoU of the other object's masks in source and edit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from p2p_framework.demo.shapes import (
    COLOR_NAMES,
    SHAPES,
    TEXTURES,
    Scene,
    caption,
    sample_scene_batch,
)
from p2p_framework.edit import Edit
from p2p_framework.model import StableDiffusionModel
from p2p_framework.pipeline import EditSettings, run_edit

from . import scoring

__all__ = [
    "ATTENTION_TIMESTEPS",
    "BACKGROUND_EDITS",
    "BLEND_VARIANTS",
    "KINDS",
    "Measure",
    "PHOTO_METHODS",
    "PhotoCase",
    "PhotoMeasure",
    "REWEIGHT_DOWN",
    "REWEIGHT_DOWN_RATIO",
    "REWEIGHT_UP",
    "REWEIGHT_UP_RATIO",
    "SceneEdits",
    "TwoObjectEdit",
    "WordAttention",
    "color_area",
    "dilate",
    "erode",
    "mask_iou",
    "measure",
    "psnr",
    "run_photo",
    "run_scene",
    "run_two_object_scene",
    "sample_cases",
    "sample_photo_cases",
    "sample_two_object_cases",
    "vae_round_trip",
    "word_attention",
]

KINDS: tuple[str, ...] = (
    "colour",
    "shape",
    "background",
    "refine",
    "reweight-down",
    "reweight-up",
    "blend",
)
#: Edits whose target attribute is the background (their preserved region is the object).
BACKGROUND_EDITS = frozenset({"background", "refine"})

#: Factor on the colour word's attention for ``reweight-down`` / ``reweight-up``.
REWEIGHT_DOWN = 0.0
REWEIGHT_UP = 2.0
#: Success of ``reweight-down``: colour pixels at most this share of the source's.
REWEIGHT_DOWN_RATIO = 0.5
#: Success of ``reweight-up``: colour pixels at least this multiple of the source's.
REWEIGHT_UP_RATIO = 1.2

#: Root of the random streams of the held-out scenes (training used seed 0's stream).
EVAL_SEED = 20261127
#: Noise seed of scene ``i`` is ``NOISE_SEED + i``.
NOISE_SEED = 10_000


# -- measures ---------------------------------------------------------------------------------


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(a: Image.Image, b: Image.Image, region: np.ndarray | None = None) -> float:
    """PSNR (dB, 8-bit) between two images, over ``region`` (a boolean mask) if given."""
    diff = (_array(a) - _array(b)) ** 2
    if region is not None:
        if not region.any():
            return float("nan")
        diff = diff[region]
    mse = float(diff.mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def dilate(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Binary dilation by a ``(2 * pixels + 1)`` square."""
    out = np.asarray(mask, dtype=bool)
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def erode(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Binary erosion by a ``(2 * pixels + 1)`` square (the image border counts as outside)."""
    inverse = np.pad(~np.asarray(mask, dtype=bool), 1, constant_values=True)
    return ~dilate(inverse, pixels)[1:-1, 1:-1]


def mask_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """IoU of two masks; 0 when either is missing."""
    if a is None or b is None:
        return 0.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


def _shift(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    return float(np.linalg.norm(_centroid(a) - _centroid(b)))


def color_area(image: Image.Image, color: str) -> int:
    """Pixels the scorer labels with ``color`` (every component, tone pixels included)."""
    return int((scoring.color_labels(image) == COLOR_NAMES.index(color)).sum())


def _mask(image: Image.Image, color: str) -> np.ndarray | None:
    found = scoring.find_object(image, color)
    return None if found is None else found.mask


@dataclass
class Measure:
    """One edit (or naive baseline) of one source, measured; see the module docstring."""

    kind: str
    method: str
    index: int
    valid: bool
    success: bool
    iou: float
    shift: float | None
    psnr: float
    other_iou: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Spec:
    """What one edit of a source asks for."""

    kind: str
    source_color: str  # the edited object's colour in the source
    target_color: str  # its colour in the target
    shape: str | None = None  # target shape (``shape``)
    background: str | None = None  # expected background of the target
    texture: str | None = None  # target texture (``refine``)
    other_color: str | None = None  # the object to leave alone (``blend``)


def measure(
    spec: _Spec,
    method: str,
    index: int,
    source: Image.Image,
    edited: Image.Image,
    *,
    source_background: str,
    source_colors: Sequence[str],
) -> Measure:
    """Measure ``edited`` against ``source`` for the edit ``spec`` (see the module docstring)."""
    src_bg, _ = scoring.detect_objects(source)
    valid = src_bg == source_background and all(
        scoring.find_object(source, c) is not None for c in source_colors
    )
    if spec.kind == "refine":
        valid = valid and scoring.classify_texture(source, source_background) != spec.texture
    src_mask = _mask(source, spec.source_color)
    edit_mask = _mask(edited, spec.target_color)
    edit_bg = scoring.detect_objects(edited)[0]
    detail: dict[str, Any] = {"background": edit_bg}
    if spec.kind in ("colour", "blend"):
        success = edit_mask is not None
    elif spec.kind == "shape":
        found = scoring.find_object(edited, spec.target_color)
        detail["shape"] = None if found is None else found.shape
        success = found is not None and found.shape == spec.shape
    elif spec.kind == "background":
        success = edit_bg == spec.background
    elif spec.kind == "refine":
        texture = scoring.classify_texture(edited, spec.background)
        detail["texture"] = texture
        success = texture == spec.texture
    elif spec.kind.startswith("reweight"):
        before = color_area(source, spec.source_color)
        after = color_area(edited, spec.source_color)
        ratio = after / before if before else float("nan")
        detail["area_ratio"] = ratio
        if spec.kind == "reweight-down":
            success = bool(ratio <= REWEIGHT_DOWN_RATIO)
        else:
            success = bool(ratio >= REWEIGHT_UP_RATIO) and edit_bg == spec.background
    else:
        raise ValueError(f"unknown edit kind {spec.kind!r}")
    if src_mask is None:
        region_psnr = float("nan")
    elif spec.kind in BACKGROUND_EDITS:
        region_psnr = psnr(source, edited, erode(src_mask))
    else:
        union = src_mask if edit_mask is None else src_mask | edit_mask
        region_psnr = psnr(source, edited, ~dilate(union))
    other_iou = None
    if spec.other_color is not None:
        other_iou = mask_iou(_mask(source, spec.other_color), _mask(edited, spec.other_color))
    return Measure(
        kind=spec.kind,
        method=method,
        index=index,
        valid=bool(valid),
        success=bool(success),
        iou=mask_iou(src_mask, edit_mask),
        shift=_shift(src_mask, edit_mask),
        psnr=region_psnr,
        other_iou=other_iou,
        detail=detail,
    )


# -- cases ------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str], exclude: Sequence[str]) -> str:
    left = [o for o in options if o not in exclude]
    return left[int(rng.integers(len(left)))]


def _swap(words: list[str], old: str, new: str, occurrence: int = 0) -> str:
    """The words with the ``occurrence``-th ``old`` replaced by ``new``, joined."""
    out, seen = list(words), 0
    for i, word in enumerate(out):
        if word == old:
            if seen == occurrence:
                out[i] = new
                return " ".join(out)
            seen += 1
    raise ValueError(f"{old!r} not in {' '.join(words)!r}")


@dataclass(frozen=True)
class SceneEdits:
    """A one-object held-out scene, its noise seed and every one-object edit of it."""

    index: int
    seed: int
    scene: Scene
    source: str
    colour: str  # target prompts
    shape: str
    background: str
    refine_source: str  # the source with a plain background
    refine: str
    naive_down: str  # the source without its colour word
    specs: dict[str, _Spec]


@dataclass(frozen=True)
class TwoObjectEdit:
    """A two-object held-out scene with one object's colour replaced."""

    index: int
    seed: int
    scene: Scene
    source: str
    target: str
    edited: int  # which object (0 or 1, caption order)
    blend_words: tuple[tuple[str, ...], tuple[str, ...]]
    spec: _Spec


def _one_object_scene(index: int) -> tuple[Scene, np.random.Generator]:
    rng = np.random.default_rng([EVAL_SEED, 1, index])
    return sample_scene_batch(rng, 1, p_two=0.0).scene(0), rng


def sample_cases(n: int, start: int = 0) -> list[SceneEdits]:
    """``n`` one-object scenes (indices ``start`` ...) with their edits (deterministic)."""
    cases = []
    for index in range(start, start + n):
        scene, rng = _one_object_scene(index)
        obj = scene.objects[0]
        words = caption(scene).split()
        new_color = _pick(rng, COLOR_NAMES, (obj.color, scene.background))
        new_shape = _pick(rng, SHAPES, (obj.shape,))
        new_bg = _pick(rng, COLOR_NAMES, (obj.color, scene.background))
        texture = _pick(rng, TEXTURES[1:], ())
        plain = caption(replace(scene, texture="plain")).split()
        at = plain.index(scene.background)
        refine = " ".join(plain[:at] + [texture] + plain[at:])
        specs = {
            "colour": _Spec("colour", obj.color, new_color, background=scene.background),
            "shape": _Spec("shape", obj.color, obj.color, shape=new_shape),
            "background": _Spec("background", obj.color, obj.color, background=new_bg),
            "refine": _Spec(
                "refine", obj.color, obj.color, background=scene.background, texture=texture
            ),
            "reweight-down": _Spec(
                "reweight-down", obj.color, obj.color, background=scene.background
            ),
            "reweight-up": _Spec("reweight-up", obj.color, obj.color, background=scene.background),
        }
        cases.append(
            SceneEdits(
                index=index,
                seed=NOISE_SEED + index,
                scene=scene,
                source=" ".join(words),
                colour=_swap(words, obj.color, new_color),
                shape=_swap(words, obj.shape, new_shape),
                background=_swap(words, scene.background, new_bg),
                refine_source=" ".join(plain),
                refine=refine,
                naive_down=" ".join(w for w in words if w != obj.color),
                specs=specs,
            )
        )
    return cases


def sample_two_object_cases(n: int, start: int = 0) -> list[TwoObjectEdit]:
    """``n`` two-object scenes with one object's colour replaced (deterministic)."""
    cases = []
    for index in range(start, start + n):
        rng = np.random.default_rng([EVAL_SEED, 2, index])
        scene = sample_scene_batch(rng, 1, p_two=1.0).scene(0)
        words = caption(scene).split()
        edited = int(rng.integers(2))
        obj, other = scene.objects[edited], scene.objects[1 - edited]
        new_color = _pick(rng, COLOR_NAMES, (obj.color, other.color, scene.background))
        # The edited object's words; its shape word only when the other object's differs.
        src_words: tuple[str, ...] = (obj.color,)
        tgt_words: tuple[str, ...] = (new_color,)
        if obj.shape != other.shape:
            src_words, tgt_words = (obj.color, obj.shape), (new_color, obj.shape)
        cases.append(
            TwoObjectEdit(
                index=index,
                seed=NOISE_SEED + index,
                scene=scene,
                source=" ".join(words),
                target=_swap(words, obj.color, new_color),
                edited=edited,
                blend_words=(src_words, tgt_words),
                spec=_Spec(
                    "blend",
                    obj.color,
                    new_color,
                    background=scene.background,
                    other_color=other.color,
                ),
            )
        )
    return cases


# -- running ----------------------------------------------------------------------------------


def _seed(seed: int):
    from p2p_framework.plugins.seed import Seed

    return Seed(seed=seed)


def _edit(name: str, **options: Any) -> Edit:
    from p2p_framework.plugins.local_blend import LocalBlend
    from p2p_framework.plugins.refine import Refine
    from p2p_framework.plugins.replace import Replace
    from p2p_framework.plugins.reweight import Reweight

    classes = {
        "replace": Replace,
        "refine": Refine,
        "reweight": Reweight,
        "local-blend": LocalBlend,
    }
    return classes[name](**options)


def run_scene(
    model: StableDiffusionModel,
    case: SceneEdits,
    settings: EditSettings | None = None,
    kinds: Sequence[str] = KINDS,
) -> tuple[list[Measure], dict[str, Image.Image]]:
    """Run the one-object edits of ``kinds`` (P2P and naive) on one scene and measure them.

    Returns the measures and the images by name (``source``, ``refine-source``, ``p2p:KIND``,
    ``naive:KIND``).
    """
    settings = settings or EditSettings()
    source = _seed(case.seed)
    images: dict[str, Image.Image] = {}
    swaps = [k for k in ("colour", "shape", "background") if k in kinds]
    naive_prompts: dict[str, str] = {k: getattr(case, k) for k in swaps}
    if swaps or any(k.startswith("reweight") for k in kinds):
        prompts = [case.source, *(getattr(case, k) for k in swaps)]
        result = run_edit(model, prompts, [_edit("replace")], source=source, settings=settings)
        images["source"] = result.images[0]
        for k, image in zip(swaps, result.images[1:]):
            images[f"p2p:{k}"] = image
    reweights = [k for k in ("reweight-down", "reweight-up") if k in kinds]
    if reweights:
        factors = [REWEIGHT_DOWN if k == "reweight-down" else REWEIGHT_UP for k in reweights]
        color = case.scene.objects[0].color
        edit = _edit("reweight", weights={color: factors})
        prompts = [case.source] * (1 + len(reweights))
        result = run_edit(model, prompts, [edit], source=source, settings=settings)
        for k, image in zip(reweights, result.images[1:]):
            images[f"p2p:{k}"] = image
        if "reweight-down" in reweights:
            naive_prompts["reweight-down"] = case.naive_down
    if "refine" in kinds:
        prompts = [case.refine_source, case.refine]
        result = run_edit(model, prompts, [_edit("refine")], source=source, settings=settings)
        images["refine-source"], images["p2p:refine"] = result.images
        naive_prompts["refine"] = case.refine
    if naive_prompts:
        result = run_edit(model, list(naive_prompts.values()), source=source, settings=settings)
        for k, image in zip(naive_prompts, result.images):
            images[f"naive:{k}"] = image

    measures = []
    scene = case.scene
    colors = [o.color for o in scene.objects]
    for kind in kinds:
        if kind == "blend":
            continue
        spec = case.specs[kind]
        src = images["refine-source" if kind == "refine" else "source"]
        for method in ("p2p", "naive"):
            if f"{method}:{kind}" in images:
                measures.append(
                    measure(
                        spec,
                        method,
                        case.index,
                        src,
                        images[f"{method}:{kind}"],
                        source_background=scene.background,
                        source_colors=colors,
                    )
                )
    return measures, images


#: Local-blend options of the ``p2p+blend`` method of :func:`run_two_object_scene`: the
#: plugin's (the paper's) defaults.
BLEND_VARIANTS: dict[str, dict[str, Any]] = {"p2p+blend": {}}


def run_two_object_scene(
    model: StableDiffusionModel,
    case: TwoObjectEdit,
    settings: EditSettings | None = None,
    blends: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[Measure], dict[str, Image.Image]]:
    """Replace one object's colour with P2P (``p2p``), P2P + local blend (one method per entry
    of ``blends``: name -> local-blend options; default :data:`BLEND_VARIANTS`) and naively
    (``naive``), and measure them all.

    Returns the measures and the images by name (``source`` and each method's).
    """
    settings = settings or EditSettings()
    blends = BLEND_VARIANTS if blends is None else blends
    source = _seed(case.seed)
    prompts = [case.source, case.target]
    plain = run_edit(model, prompts, [_edit("replace")], source=source, settings=settings)
    images = {"source": plain.images[0], "p2p": plain.images[1]}
    words = [list(w) for w in case.blend_words]
    for name, options in blends.items():
        edits = [_edit("replace"), _edit("local-blend", words=words, **options)]
        images[name] = run_edit(model, prompts, edits, source=source, settings=settings).images[1]
    images["naive"] = run_edit(model, [case.target], source=source, settings=settings).images[0]
    colors = [o.color for o in case.scene.objects]
    measures = [
        measure(
            case.spec,
            method,
            case.index,
            images["source"],
            images[method],
            source_background=case.scene.background,
            source_colors=colors,
        )
        for method in ("p2p", *blends, "naive")
    ]
    return measures, images


# -- real photos (renders the model did not generate) ----------------------------------------

#: Inversion methods of :func:`run_photo`: label -> (source plugin name, guidance or None
#: for the run's).
PHOTO_METHODS: dict[str, tuple[str, float | None]] = {
    "ddim (guidance 1)": ("ddim", 1.0),
    "ddim": ("ddim", None),
    "negative-prompt": ("negative-prompt", None),
    "direct": ("direct", None),
    "null-text": ("null-text", None),
}


@dataclass(frozen=True)
class PhotoCase:
    """A rendered scene (a "real photo" to the model), its caption and a colour swap."""

    index: int
    scene: Scene
    source: str
    target: str
    source_color: str
    target_color: str


def sample_photo_cases(n: int, start: int = 0) -> list[PhotoCase]:
    """``n`` scenes to render and invert, the first object's colour to be replaced."""
    cases = []
    for index in range(start, start + n):
        rng = np.random.default_rng([EVAL_SEED, 3, index])
        scene = sample_scene_batch(rng, 1).scene(0)
        used = [o.color for o in scene.objects] + [scene.background]
        old = scene.objects[0].color
        new = _pick(rng, COLOR_NAMES, used)
        words = caption(scene).split()
        cases.append(PhotoCase(index, scene, " ".join(words), _swap(words, old, new), old, new))
    return cases


@dataclass
class PhotoMeasure:
    """One inversion method on one rendered scene: reconstruction and colour swap.

    Attributes:
        psnr_input: reconstruction (the edit's source row) vs the render, dB.
        psnr_vae: reconstruction vs the VAE round trip of the render, dB.
        recon_ok: the scorer finds the caption's background and colours in the reconstruction.
        success: the colour swap shows an object of the target colour.
        iou, shift: the swapped object's mask in the edit vs the object's in the render.
        psnr_outside: edit vs render outside both masks (dilated by one pixel), dB.
        seconds, unet_calls: the inversion's cost.
    """

    method: str
    index: int
    psnr_input: float
    psnr_vae: float
    recon_ok: bool
    success: bool
    iou: float
    shift: float | None
    psnr_outside: float
    seconds: float
    unet_calls: int


def vae_round_trip(model: StableDiffusionModel, image: Image.Image) -> Image.Image:
    """``decode(encode(image))``: the best any inversion can reconstruct."""
    import torch

    from p2p_framework.inversion import image_to_tensor
    from p2p_framework.pipeline import to_pil

    with torch.no_grad():
        return to_pil(model.decode(model.encode_image(image_to_tensor(image))))[0]


def run_photo(
    model: StableDiffusionModel,
    case: PhotoCase,
    folder: str,
    methods: Sequence[str] = tuple(PHOTO_METHODS),
    settings: EditSettings | None = None,
) -> tuple[list[PhotoMeasure], dict[str, Image.Image]]:
    """Render ``case``, invert it with each method and swap its colour (replace).

    ``folder`` receives the render as a PNG (the inversion sources read files). Inversions are
    not cached. Returns the measures and the images (``input``, ``vae``, ``METHOD:recon``,
    ``METHOD:edit``).
    """
    from pathlib import Path

    from p2p_framework.demo.shapes import render
    from p2p_framework.registry import PluginRegistry

    settings = settings or EditSettings()
    image, _ = render(case.scene, size=settings.height or model.default_size)
    path = Path(folder) / f"photo-{case.index}.png"
    image.save(path)
    round_trip = vae_round_trip(model, image)
    images = {"input": image, "vae": round_trip}
    registry = PluginRegistry(entry_points=False)
    src_mask = _mask(image, case.source_color)
    measures = []
    for label in methods:
        name, guidance = PHOTO_METHODS[label]
        run_settings = replace(
            settings, guidance=settings.guidance if guidance is None else guidance
        )
        source = registry.build("source", name, {"image": str(path), "cache": False})
        result = run_edit(
            model,
            [case.source, case.target],
            [_edit("replace")],
            source=source,
            settings=run_settings,
        )
        recon, edited = result.images
        images[f"{label}:recon"], images[f"{label}:edit"] = recon, edited
        info = result.source_info["inversion"]
        background, _ = scoring.detect_objects(recon)
        recon_ok = background == case.scene.background and all(
            scoring.find_object(recon, o.color) is not None for o in case.scene.objects
        )
        edit_mask = _mask(edited, case.target_color)
        union = src_mask if edit_mask is None else src_mask | edit_mask
        measures.append(
            PhotoMeasure(
                method=label,
                index=case.index,
                psnr_input=psnr(recon, image),
                psnr_vae=psnr(recon, round_trip),
                recon_ok=bool(recon_ok),
                success=edit_mask is not None,
                iou=mask_iou(src_mask, edit_mask),
                shift=_shift(src_mask, edit_mask),
                psnr_outside=psnr(edited, image, ~dilate(union)),
                seconds=float(info["seconds"]),
                unet_calls=int(info["unet_calls"]),
            )
        )
    return measures, images


# -- word attention ---------------------------------------------------------------------------

#: Timesteps (of 1000) at which :func:`word_attention` noises the renders: early, middle and
#: late in a 50-step generation.
ATTENTION_TIMESTEPS: tuple[int, ...] = (800, 500, 200)


@dataclass
class WordAttention:
    """How much of a word's cross-attention falls on what it names, on one layer grid.

    Attributes:
        grid: the layers' grid side (16: the latent's own grid).
        object_share: mean share of an object word's (colour, shape) attention mass (summed
            over the grid, averaged over heads, layers and timesteps) inside its object.
        object_area: mean share of the image that object covers (the share of flat maps).
        background_share, background_area: the same for the background's colour and texture
            words and the area outside every object.
    """

    grid: int
    object_share: float
    object_area: float
    background_share: float
    background_area: float

    @property
    def object_enrichment(self) -> float:
        """``object_share / object_area``: 1 for flat maps."""
        return self.object_share / self.object_area


def word_attention(
    model: StableDiffusionModel,
    n: int = 64,
    timesteps: Sequence[int] = ATTENTION_TIMESTEPS,
    seed: int = 0,
) -> list[WordAttention]:
    """Measure how well the model's cross-attention localises caption words (finest grid first).

    ``n`` held-out scenes are rendered, encoded and noised to each of ``timesteps``; the UNet
    sees their captions, and each named word's attention (see
    :func:`tools.demo_model.train.word_regions`) is compared with the ground-truth region,
    area-averaged to each layer grid. Prompt-to-Prompt injects these maps, and local blend
    thresholds them, so flat maps (share = area) leave both with little to work with.
    """
    import torch
    from diffusers import DDPMScheduler

    from p2p_framework.demo.shapes import render_batch

    from .train import (
        REGION_BACKGROUND,
        CrossAttentionProbe,
        region_shares,
        scene_regions,
        word_regions,
    )

    scenes = sample_scene_batch(np.random.default_rng([EVAL_SEED, 3]), n)
    images, masks, _ = render_batch(scenes, model.default_size)
    regions = scene_regions(masks)
    token_region = torch.as_tensor(word_regions(scenes, model.max_tokens))
    named_object = (token_region >= 0) & (token_region < REGION_BACKGROUND)
    named_background = token_region == REGION_BACKGROUND
    schedule = DDPMScheduler.from_config(model.scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    latents = model.encode_image(images.float().div(255).to(model.device))
    context = model.encode_text(scenes.captions())

    probe = CrossAttentionProbe()
    saved = probe.attach(model.unet)
    shares: dict[int, list[torch.Tensor]] = {}
    try:
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = schedule.add_noise(latents, noise, torch.tensor([t]))
            probe.maps.clear()
            with torch.no_grad():
                model.unet(noisy, torch.full((n,), t, device=model.device), context)
            for probs in probe.maps:
                share = region_shares(probs.cpu(), regions, token_region)
                shares.setdefault(math.isqrt(probs.shape[2]), []).append(share)
    finally:
        model.unet.set_attn_processor(saved)

    area = regions.flatten(2).mean(dim=2).gather(1, token_region.clamp_min(0))
    found = []
    for grid in sorted(shares, reverse=True):
        share = torch.stack(shares[grid]).mean(dim=0)  # over layers and timesteps
        found.append(
            WordAttention(
                grid=grid,
                object_share=float(share[named_object].mean()),
                object_area=float(area[named_object].mean()),
                background_share=float(share[named_background].mean()),
                background_area=float(area[named_background].mean()),
            )
        )
    return found
