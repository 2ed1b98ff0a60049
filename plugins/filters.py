"""Built-in filter plugins: scores of a before/after pair that need no downloaded weights.

- ``pixel-change``: how much the image changed at all (drop edits that did nothing);
- ``structure``: whether the layout survived (edges of the two images correlate);
- ``edit-locality``: whether the change happened where the edited words attend.

InstructPix2Pix filtered its generated pairs with CLIP directions; a package with CLIP
weights can register such a filter the same way (docs/plugins.md, "Filters").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from p2p_framework import hookimpl
from p2p_framework.filters import EditPair, Filter


def _pixels(image) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """``(H, W, 3)`` float32 in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _change(pair: EditPair) -> np.ndarray:
    """``(H, W)`` mean absolute difference over the colour channels, in [0, 1]."""
    return np.abs(_pixels(pair.target) - _pixels(pair.source)).mean(axis=2)


@dataclass(frozen=True)
class PixelChange(Filter):
    """Mean absolute pixel difference between source and target, in [0, 1]."""

    name = "pixel-change"

    def score(self, pair: EditPair) -> float:
        return float(_change(pair).mean())


def _edges(image) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """Gradient magnitude of the grey image (central differences), ``(H, W)``."""
    grey = _pixels(image).mean(axis=2)
    dy, dx = np.gradient(grey)
    return np.hypot(dx, dy)


@dataclass(frozen=True)
class Structure(Filter):
    """Correlation of the two images' edge maps, in [-1, 1]: 1 when the layout is kept."""

    name = "structure"

    def score(self, pair: EditPair) -> float:
        a, b = _edges(pair.source).ravel(), _edges(pair.target).ravel()
        a, b = a - a.mean(), b - b.mean()
        norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
        # Two flat images have the same (no) structure.
        return float((a * b).sum() / norm) if norm > 1e-12 else 1.0


@dataclass(frozen=True)
class EditLocality(Filter):
    """Share of the change inside the edited words' attention mask, in [0, 1].

    0.5 when the change is spread evenly, 1 when it all lies where the edited words attend,
    0 when the target has no edited word or nothing changed."""

    name = "edit-locality"
    needs_attention = True

    threshold: Annotated[float, Field(gt=0, lt=1)] = field(
        default=0.3,
        metadata={"help": "mask = the edited words' attention above this fraction of its peak"},
    )

    def score(self, pair: EditPair) -> float:
        if pair.attention is None or not pair.changed_tokens:
            return 0.0  # no edited word: nothing to be local to
        maps = pair.attention[..., pair.changed_tokens].sum(dim=-1).float()
        maps = maps / maps.max().clamp_min(1e-12)
        size = (pair.target.height, pair.target.width)
        mask = torch.nn.functional.interpolate(maps[None, None], size=size, mode="bilinear")
        inside = mask[0, 0].numpy() > self.threshold
        change = _change(pair)
        if inside.all() or not inside.any() or change.sum() < 1e-9:
            return 0.0
        mean_in, mean_out = change[inside].mean(), change[~inside].mean()
        return float(mean_in / (mean_in + mean_out))


@hookimpl
def register_filters(register):  # noqa: ANN001 - the hook's signature is in hookspecs
    register(PixelChange)
    register(Structure)
    register(EditLocality)
