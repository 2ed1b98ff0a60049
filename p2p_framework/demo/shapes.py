"""A procedural image domain: one or two coloured shapes on a plain or textured background.

Scenes live in a 64 x 64 coordinate frame (x to the right, y down, pixel ``(row, col)`` covers
``[col, col + 1] x [row, row + 1]``) and render at any size (``size=64`` by default; 128 scales
every coordinate by 2). A scene holds

* one or two objects, each a :data:`SHAPES` shape in a :data:`COLORS` colour, upright, centred
  at ``(cx, cy)`` and fitting the box ``[cx - size, cx + size] x [cy - size, cy + size]``;
  two objects have different colours, their boxes never overlap (they are at least
  :data:`MARGIN` apart) and they are listed left to right (by ``cx``);
* a background colour (different from the objects' colours) and texture: ``"plain"``,
  ``"striped"`` (diagonal stripes) or ``"dotted"`` (a grid of dots), the pattern drawn in a
  darker tone of the background colour (:func:`tone_rgb`).

Captions name colours, shapes and the background, never positions or sizes:
``"a red circle on a yellow background"``,
``"a red circle and a blue square on a striped yellow background"``. Every caption word is in
:data:`VOCABULARY`. Objects are mentioned in the scene's order (left to right for sampled
scenes), which gives the model a consistent way to bind words to objects.

There is no anti-aliasing: a pixel belongs to a shape when its centre does, so the ground-truth
masks are exactly the pixels painted in the object's colour.

Sampling is vectorised (:func:`sample_scene_batch`) and rendering is done with torch
(:func:`render_batch`, on any device) so the trainer can make thousands of scenes a second;
:func:`sample_scene` / :func:`render` are the single-scene front ends with ground truth. Both
are deterministic: the same generator state gives the same scene, the same scene the same
pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BACKGROUND_WORD",
    "COLORS",
    "FRAME",
    "GroundTruth",
    "MARGIN",
    "SHAPES",
    "SIZE_RANGE",
    "Scene",
    "SceneBatch",
    "SceneObject",
    "TEXTURES",
    "VOCABULARY",
    "CaptionSpec",
    "canonical_bbox",
    "caption",
    "caption_words",
    "color_rgb",
    "inside_shape",
    "parse_caption",
    "render",
    "render_batch",
    "sample_scene",
    "sample_scene_batch",
    "to_device",
    "tone_rgb",
]

#: Size of the scene coordinate frame (renders at ``size`` scale it by ``size / FRAME``).
FRAME = 64

#: Object and background colours: name -> RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "pink": (250, 140, 200),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

#: Shapes, in index order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")

#: Background textures, in index order; ``"plain"`` is not mentioned in captions.
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
#: Sampling probabilities of :data:`TEXTURES`.
TEXTURE_PROBS: tuple[float, ...] = (0.5, 0.25, 0.25)

#: Range of an object's half-extent ``size`` (frame units: 9 -> 18 px wide at 64 px).
SIZE_RANGE: tuple[float, float] = (9.0, 15.0)
#: Minimum gap between the bounding boxes of two objects (frame units).
MARGIN = 3.0
#: Probability that a sampled scene has two objects.
P_TWO_OBJECTS = 0.5

#: Fraction of black mixed into the background colour for its texture tone.
TONE_DARKEN = 0.35
#: Stripe period / dot grid period (frame units).
TEXTURE_PERIOD = 8.0
#: Dot radius (frame units).
DOT_RADIUS = 2.0

#: The word after the background colour.
BACKGROUND_WORD = "background"

#: Word swaps in the demo domain as ``(source prompt, target prompt)``: colour and shape
#: edits of one object on a textured background, captioned as the model was trained (the
#: dataset benchmark cycles through them; the Ray tests take the first five).
EDIT_PROMPTS: list[tuple[str, str]] = [
    (f"a {source} on a {background} background", f"a {target} on a {background} background")
    for source, target, background in [
        ("blue circle", "yellow circle", "striped green"),
        ("purple square", "red square", "dotted orange"),
        ("green triangle", "green circle", "striped blue"),
        ("red circle", "red circle", "striped yellow"),
        ("yellow square", "blue square", "dotted purple"),
        ("red triangle", "red square", "dotted blue"),
        ("green circle", "purple circle", "striped orange"),
        ("blue square", "blue triangle", "dotted green"),
    ]
]

#: Every word a caption can contain.
VOCABULARY: tuple[str, ...] = (
    "a",
    "and",
    "on",
    BACKGROUND_WORD,
    *TEXTURES[1:],
    *COLOR_NAMES,
    *SHAPES,
)

# Shape geometry in normalised coordinates u = (x - cx) / size, v = (y - cy) / size (v down).
SQUARE_HALF = 0.86
CROSS_ARM = 0.34
STAR_INNER = 0.45
# Heart curve (X^2 + Y^2 - 1)^3 - X^2 Y^3 <= 0 (Y up) spans X in [-1.139, 1.139] and
# Y in [-1, 1.236]; X = u * HEART_X, Y = HEART_Y0 - HEART_Y1 * v maps it onto [-1, 1]^2.
HEART_X = 1.139
HEART_Y0 = 0.118
HEART_Y1 = 1.118


def color_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a colour name of :data:`COLORS`."""
    return COLORS[name]


def tone_rgb(name: str) -> tuple[int, int, int]:
    """RGB of the texture tone of a background colour (the colour darkened)."""
    return tuple(int(round(c * (1.0 - TONE_DARKEN))) for c in COLORS[name])  # type: ignore[return-value]


_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.uint8)
_TONES = np.array([tone_rgb(c) for c in COLOR_NAMES], dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape: its kind, colour, centre and half-extent (frame units)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLOR_NAMES}")


@dataclass(frozen=True)
class Scene:
    """A scene: objects (in caption order), background colour and texture."""

    objects: tuple[SceneObject, ...]
    background: str
    texture: str = "plain"

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        if self.background not in COLORS:
            raise ValueError(f"unknown background colour {self.background!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {TEXTURES}")
        object.__setattr__(self, "objects", tuple(self.objects))


@dataclass(frozen=True)
class GroundTruth:
    """What :func:`render` drew.

    Attributes:
        masks: one boolean ``(size, size)`` mask per object, in ``scene.objects`` order: exactly
            the pixels painted in that object's colour.
        shapes, colors: the objects' shapes and colours, in the same order.
        background: background colour name.
        texture: background texture name.
        background_mask: pixels not covered by any object.
        texture_mask: background pixels painted in the texture tone.
    """

    masks: tuple[np.ndarray, ...]
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    background: str
    texture: str
    background_mask: np.ndarray
    texture_mask: np.ndarray


@dataclass
class SceneBatch:
    """A batch of scenes as arrays (two object slots; slot 1 is empty for one-object scenes).

    Attributes:
        n_objects: ``(B,)`` 1 or 2.
        shape, color: ``(B, 2)`` indices into :data:`SHAPES` / :data:`COLORS` (-1: no object).
        cx, cy, size: ``(B, 2)`` float geometry, frame units (0 for empty slots).
        background: ``(B,)`` colour index; texture: ``(B,)`` index into :data:`TEXTURES`.
    """

    n_objects: np.ndarray
    shape: np.ndarray
    color: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    size: np.ndarray
    background: np.ndarray
    texture: np.ndarray

    def __len__(self) -> int:
        return len(self.n_objects)

    def scene(self, i: int) -> Scene:
        """The ``i``-th scene as a :class:`Scene`."""
        objects = tuple(
            SceneObject(
                shape=SHAPES[int(self.shape[i, k])],
                color=COLOR_NAMES[int(self.color[i, k])],
                cx=float(self.cx[i, k]),
                cy=float(self.cy[i, k]),
                size=float(self.size[i, k]),
            )
            for k in range(int(self.n_objects[i]))
        )
        return Scene(
            objects=objects,
            background=COLOR_NAMES[int(self.background[i])],
            texture=TEXTURES[int(self.texture[i])],
        )

    def scenes(self) -> list[Scene]:
        """All scenes of the batch."""
        return [self.scene(i) for i in range(len(self))]

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> SceneBatch:
        """Pack scenes into arrays."""
        n = len(scenes)
        batch = cls(
            n_objects=np.zeros(n, np.int64),
            shape=np.full((n, 2), -1, np.int64),
            color=np.full((n, 2), -1, np.int64),
            cx=np.zeros((n, 2)),
            cy=np.zeros((n, 2)),
            size=np.zeros((n, 2)),
            background=np.zeros(n, np.int64),
            texture=np.zeros(n, np.int64),
        )
        for i, scene in enumerate(scenes):
            batch.n_objects[i] = len(scene.objects)
            batch.background[i] = COLOR_NAMES.index(scene.background)
            batch.texture[i] = TEXTURES.index(scene.texture)
            for k, obj in enumerate(scene.objects):
                batch.shape[i, k] = SHAPES.index(obj.shape)
                batch.color[i, k] = COLOR_NAMES.index(obj.color)
                batch.cx[i, k], batch.cy[i, k], batch.size[i, k] = obj.cx, obj.cy, obj.size
        return batch

    def captions(self) -> list[str]:
        """Captions of all scenes (same as :func:`caption` of each)."""
        return [" ".join(self.caption_words(i)) for i in range(len(self))]

    def caption_words(self, i: int) -> list[str]:
        """Caption words of the ``i``-th scene."""
        return _caption_words(
            [
                (COLOR_NAMES[int(self.color[i, k])], SHAPES[int(self.shape[i, k])])
                for k in range(int(self.n_objects[i]))
            ],
            COLOR_NAMES[int(self.background[i])],
            TEXTURES[int(self.texture[i])],
        )


def _boxes_apart(batch_cx: np.ndarray, batch_cy: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Whether the two objects' boxes are at least :data:`MARGIN` apart (per row)."""
    gap = size[:, 0] + size[:, 1] + MARGIN
    dx = np.abs(batch_cx[:, 0] - batch_cx[:, 1])
    dy = np.abs(batch_cy[:, 0] - batch_cy[:, 1])
    return (dx >= gap) | (dy >= gap)


def sample_scene_batch(
    rng: np.random.Generator, n: int, *, p_two: float = P_TWO_OBJECTS
) -> SceneBatch:
    """Sample ``n`` scenes (vectorised; deterministic for the generator's state).

    Objects are uniformly random shapes; the (one or two) object colours and the background
    colour are distinct; sizes are uniform in :data:`SIZE_RANGE`; positions are uniform with
    each object inside the frame (0.5 units from its border) and two objects' boxes at least
    :data:`MARGIN` apart (rejection sampling of sizes and positions together, so two-object
    scenes lean towards smaller objects). Two objects are ordered left to right.
    """
    n_obj = 1 + (rng.random(n) < p_two).astype(np.int64)
    background = rng.integers(0, len(COLORS), n)
    texture = rng.choice(len(TEXTURES), size=n, p=TEXTURE_PROBS)
    keys = rng.random((n, len(COLORS)))
    keys[np.arange(n), background] = np.inf
    color = np.argsort(keys, axis=1)[:, :2]
    shape = rng.integers(0, len(SHAPES), (n, 2))

    lo, hi = SIZE_RANGE
    size = np.empty((n, 2))
    cx = np.empty((n, 2))
    cy = np.empty((n, 2))
    todo = np.arange(n)
    while len(todo):
        m = len(todo)
        s = lo + (hi - lo) * rng.random((m, 2))
        span = FRAME - 1.0 - 2.0 * s
        x = s + 0.5 + span * rng.random((m, 2))
        y = s + 0.5 + span * rng.random((m, 2))
        size[todo], cx[todo], cy[todo] = s, x, y
        ok = (n_obj[todo] == 1) | _boxes_apart(x, y, s)
        todo = todo[~ok]

    swap = (n_obj == 2) & (cx[:, 1] < cx[:, 0])
    for arr in (shape, color, size, cx, cy):
        arr[swap] = arr[swap][:, ::-1]
    one = n_obj == 1
    shape[one, 1] = -1
    color[one, 1] = -1
    for arr in (size, cx, cy):
        arr[one, 1] = 0.0
    return SceneBatch(
        n_objects=n_obj,
        shape=shape,
        color=color,
        cx=cx,
        cy=cy,
        size=size,
        background=background,
        texture=texture,
    )


def sample_scene(rng: np.random.Generator) -> Scene:
    """Sample one scene (see :func:`sample_scene_batch`)."""
    return sample_scene_batch(rng, 1).scene(0)


# --------------------------------------------------------------------------------------------
# Captions


def _caption_words(objects: Sequence[tuple[str, str]], background: str, texture: str) -> list[str]:
    words: list[str] = []
    for k, (color, shape) in enumerate(objects):
        if k:
            words.append("and")
        words += ["a", color, shape]
    words += ["on", "a"]
    if texture != "plain":
        words.append(texture)
    words += [background, BACKGROUND_WORD]
    return words


def caption_words(scene: Scene) -> list[str]:
    """The words of :func:`caption`."""
    return _caption_words(
        [(o.color, o.shape) for o in scene.objects], scene.background, scene.texture
    )


def caption(scene: Scene) -> str:
    """Caption of a scene: ``"a red circle and a blue square on a striped yellow background"``."""
    return " ".join(caption_words(scene))


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: objects ``(colour, shape)`` in order, background and texture."""

    objects: tuple[tuple[str, str], ...]
    background: str
    texture: str = "plain"


def parse_caption(text: str) -> CaptionSpec:
    """Parse a caption of the domain's grammar (as :func:`caption` writes them).

    Grammar: ``a COLOR SHAPE [and a COLOR SHAPE] on a [striped|dotted] COLOR background``
    (case and surrounding whitespace ignored). Useful to derive what an edited prompt expects.

    Raises:
        ValueError: If ``text`` does not follow the grammar.
    """
    words = text.lower().split()

    def fail(why: str) -> ValueError:
        return ValueError(f"not a demo-domain caption ({why}): {text!r}")

    objects: list[tuple[str, str]] = []
    i = 0
    while True:
        if words[i : i + 1] != ["a"] or i + 2 >= len(words):
            raise fail("expected 'a COLOR SHAPE'")
        color, shape = words[i + 1], words[i + 2]
        if color not in COLORS or shape not in SHAPES:
            raise fail(f"unknown colour or shape {color!r} {shape!r}")
        objects.append((color, shape))
        i += 3
        if words[i : i + 1] == ["and"]:
            i += 1
            continue
        break
    if len(objects) > 2:
        raise fail("more than two objects")
    if words[i : i + 2] != ["on", "a"]:
        raise fail("expected 'on a'")
    i += 2
    texture = "plain"
    if i < len(words) and words[i] in TEXTURES[1:]:
        texture = words[i]
        i += 1
    if words[i:] == [] or len(words[i:]) != 2 or words[i + 1] != BACKGROUND_WORD:
        raise fail("expected 'COLOR background' at the end")
    if words[i] not in COLORS:
        raise fail(f"unknown background colour {words[i]!r}")
    return CaptionSpec(objects=tuple(objects), background=words[i], texture=texture)


# --------------------------------------------------------------------------------------------
# Rendering


def inside_shape(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether normalised points ``(u, v)`` (v down, shape box ``[-1, 1]^2``) are inside."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= SQUARE_HALF
    if shape == "triangle":
        # Apex (0, -1), base corners (+-1, 0.8).
        return (v <= 0.8) & (1.8 * u.abs() <= v + 1.0)
    if shape == "star":
        # Five points, one pointing up; fold the angle into one half-spike [0, 36 deg] and
        # test against the edge from the outer point (0, 1) to the inner corner.
        r = torch.sqrt(u * u + v * v)
        phi = torch.atan2(u, -v)  # 0 straight up
        sector = 2.0 * math.pi / 5.0
        phi = torch.remainder(phi, sector)
        phi = torch.minimum(phi, sector - phi)
        a = r * torch.sin(phi)  # across the spike axis
        b = r * torch.cos(phi)  # along it
        ia, ib = STAR_INNER * math.sin(sector / 2.0), STAR_INNER * math.cos(sector / 2.0)
        # Inside when on the origin's side of the line (0, 1) -> (ia, ib).
        return ia * (b - 1.0) - (ib - 1.0) * a <= 0.0
    if shape == "heart":
        x = u * HEART_X
        y = HEART_Y0 - HEART_Y1 * v
        q = x * x + y * y - 1.0
        return q * q * q - x * x * y * y * y <= 0.0
    if shape == "cross":
        au, av = u.abs(), v.abs()
        return ((au <= 1.0) & (av <= CROSS_ARM)) | ((au <= CROSS_ARM) & (av <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


@cache
def canonical_bbox(shape: str) -> tuple[float, float, float, float]:
    """Extent ``(u0, u1, v0, v1)`` of a shape in normalised coordinates (measured finely)."""
    n = 2001
    t = torch.linspace(-1.05, 1.05, n, dtype=torch.float64)
    inside = inside_shape(shape, t[None, :], t[:, None])
    cols = inside.any(0).nonzero().flatten()
    rows = inside.any(1).nonzero().flatten()
    step = float(t[1] - t[0])
    return (
        float(t[cols[0]]) - step / 2,
        float(t[cols[-1]]) + step / 2,
        float(t[rows[0]]) - step / 2,
        float(t[rows[-1]]) + step / 2,
    )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; to CUDA through pinned memory without blocking (a
    pageable copy would wait for the GPU to finish its queued work)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@lru_cache(maxsize=8)
def _palette_tensors(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(_PALETTE, device=device), torch.as_tensor(_TONES, device=device)


@lru_cache(maxsize=16)
def _texture_patterns(size: int, device: torch.device) -> torch.Tensor:
    """``(len(TEXTURES), size, size)`` bool patterns (True: texture tone)."""
    scale = FRAME / size
    c = (torch.arange(size, dtype=torch.float32) + 0.5) * scale
    x, y = c[None, :], c[:, None]
    p = TEXTURE_PERIOD
    stripes = torch.remainder(x + y, p) < p / 2
    dx = torch.remainder(x, p) - p / 2
    dy = torch.remainder(y, p) - p / 2
    dots = dx * dx + dy * dy <= DOT_RADIUS**2
    return torch.stack([torch.zeros_like(stripes), stripes, dots]).to(device)


def render_batch(
    batch: SceneBatch, size: int = 64, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render a batch of scenes with torch.

    Returns:
        ``images`` ``(B, 3, size, size)`` uint8, ``masks`` ``(B, 2, size, size)`` bool (one per
        object slot, empty for a missing second object) and ``texture`` ``(B, size, size)``
        bool (pixels of the background painted in the texture tone, objects included).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = len(batch)
    scale = FRAME / size
    coords = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) * scale
    xs, ys = coords.view(1, 1, size), coords.view(1, size, 1)

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return to_device(torch.as_tensor(np.ascontiguousarray(a)), device).to(dtype)

    palette, tones = _palette_tensors(device)
    bg = t(batch.background, torch.long)
    texture = _texture_patterns(size, device)[t(batch.texture, torch.long)]
    images = torch.where(
        texture[:, None], tones[bg][:, :, None, None], palette[bg][:, :, None, None]
    ).contiguous()

    shape_idx = t(batch.shape, torch.long)
    color_idx = t(batch.color, torch.long)
    cx, cy, sz = (t(a, torch.float32) for a in (batch.cx, batch.cy, batch.size))
    masks = torch.zeros(n, 2, size, size, dtype=torch.bool, device=device)
    for k in range(2):
        valid = shape_idx[:, k] >= 0
        s = sz[:, k].clamp_min(1e-6).view(n, 1, 1)
        u = (xs - cx[:, k].view(n, 1, 1)) / s
        v = (ys - cy[:, k].view(n, 1, 1)) / s
        for j, name in enumerate(SHAPES):
            m = inside_shape(name, u, v) & (valid & (shape_idx[:, k] == j)).view(n, 1, 1)
            masks[:, k] |= m
        rgb = palette[color_idx[:, k].clamp_min(0)][:, :, None, None]
        images = torch.where(masks[:, k, None], rgb, images)
    return images, masks, texture


def render(scene: Scene, size: int = 64) -> tuple[Image.Image, GroundTruth]:
    """Render one scene (on the CPU) and return the image with its ground truth."""
    images, masks, texture = render_batch(SceneBatch.from_scenes([scene]), size=size)
    image = Image.fromarray(images[0].permute(1, 2, 0).numpy(), mode="RGB")
    n = len(scene.objects)
    object_masks = tuple(masks[0, k].numpy().copy() for k in range(n))
    background_mask = ~masks[0, :n].any(0).numpy()
    truth = GroundTruth(
        masks=object_masks,
        shapes=tuple(o.shape for o in scene.objects),
        colors=tuple(o.color for o in scene.objects),
        background=scene.background,
        texture=scene.texture,
        background_mask=background_mask,
        texture_mask=texture[0].numpy() & background_mask,
    )
    return image, truth
