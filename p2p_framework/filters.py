"""The filter-plugin API: score a before/after pair and decide whether to keep it.

Filters are the third plugin kind (after edits and sources), registered with the
``register_filters`` hook. ``p2p-run dataset`` scores every sample with the spec's filters:
a sample is kept when every filter accepts each of its pairs (the source image and one
target's image), and with ``keep = K`` only the K best samples of an item (by the ``rank``
filter's score) are kept. A filter is a dataclass of options like any plugin; every filter
has ``min`` and ``max`` (a pair scoring outside them is dropped) and computes one number per
pair in :meth:`Filter.score`, higher meaning better.

The built-ins (``plugins/filters.py``) need no downloaded weights; a package can add a
CLIP-direction filter where weights exist (docs/plugins.md, "Filters").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from .options import Plugin


@dataclass
class EditPair:
    """One before/after pair of a dataset sample: what a filter scores.

    Attributes:
        source_prompt, target_prompt: the prompts of the two images.
        source, target: the two images (RGB, same size).
        target_index: the target's row in its run (1 for the first target).
        changed_tokens: token positions of ``target_prompt`` (as the text encoder reads it,
            0 being the start token) holding tokens the source prompt lacks: the words the
            edit changed (``yellow`` in "a yellow circle" against "a blue circle").
        attention: the target's cross-attention maps averaged over heads, layers and steps,
            ``(height, width, tokens)`` float32 at ``1/attention_downscale`` of the latent
            grid; only when a filter of the run sets ``needs_attention`` (else None).
        result: the whole run (an :class:`~p2p_framework.EditResult`: latents, edit runs such
            as local blend's mask, the source's info), for filters that need more.
    """

    source_prompt: str
    target_prompt: str
    source: Image.Image
    target: Image.Image
    target_index: int
    changed_tokens: list[int]
    attention: torch.Tensor | None = None
    result: Any = None


@dataclass(frozen=True)
class Filter(Plugin):
    """Base of filter plugins: :meth:`score` one pair, keep it if ``min <= score <= max``.

    Subclasses are dataclasses whose fields are their options (after ``min`` and ``max``);
    set ``needs_attention = True`` when :meth:`score` reads :attr:`EditPair.attention`
    (the run then keeps its cross-attention maps, which may route some layers off the fused
    kernel: same images up to float rounding).
    """

    #: Whether :meth:`score` reads :attr:`EditPair.attention`.
    needs_attention: ClassVar[bool] = False

    min: float | None = field(
        default=None, metadata={"help": "drop a pair scoring below this (none: no limit)"}
    )
    max: float | None = field(
        default=None, metadata={"help": "drop a pair scoring above this (none: no limit)"}
    )

    def score(self, pair: EditPair) -> float:
        """The pair's score, higher meaning better (its range is the filter's own)."""
        raise NotImplementedError(f"filter {type(self).name!r} does not define score()")

    def accepts(self, score: float) -> bool:
        """Whether a pair with ``score`` is kept: within ``min`` and ``max`` (a NaN is not)."""
        if score != score:
            return False
        if self.min is not None and score < self.min:
            return False
        return self.max is None or score <= self.max


def sample_scores(
    filters: Sequence[Filter], pairs: Sequence[EditPair]
) -> tuple[dict[str, float], bool]:
    """Score a sample's pairs with every filter: each filter's score is its worst pair's
    (the lowest), and the sample is accepted when every filter accepts every pair.

    Returns:
        ``({filter name: score}, accepted)``.
    """
    scores: dict[str, float] = {}
    accepted = True
    for item in filters:
        values = [float(item.score(pair)) for pair in pairs]
        accepted = accepted and all(item.accepts(value) for value in values)
        scores[type(item).name] = min(values) if values else float("nan")
    return scores, accepted


__all__ = ["EditPair", "Filter", "sample_scores"]
