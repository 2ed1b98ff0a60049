"""Edit plugin ``reweight``: scale the attention of chosen words ("smiling" x 5).

``edit = A * e`` with an equalizer ``e[target, token]`` of ones, set to the given value at the
tokens of each given word in each target prompt. Placed after ``replace`` or ``refine`` in the
pipeline, it scales their result (``A`` is what they inject); alone, ``A`` is the source's
attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from p2p_framework import AttentionLayer, Edit, OptionError, RunContext, hookimpl

Weight = float | Sequence[float]


@dataclass
class Reweight(Edit):
    """Scale the attention of words by factors (values may be negative or large)."""

    name = "reweight"

    weights: dict[str, Weight] = field(
        metadata={"help": "word -> factor, or a list with one factor per target; e.g. smiling=5"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise OptionError(self.name, "weights", "give at least one word=factor")
        for word, value in self.weights.items():
            values = (
                value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
            )
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise OptionError(self.name, "weights", f"{word!r}: {v!r} is not a number")

    def setup(self, run: RunContext) -> None:
        equalizer = torch.ones(run.num_targets, run.max_tokens)
        for word, value in self.weights.items():
            if isinstance(value, Sequence) and not isinstance(value, str):
                if len(value) != run.num_targets:
                    raise OptionError(
                        self.name,
                        "weights",
                        f"{word!r} has {len(value)} factors for {run.num_targets} targets",
                    )
                factors = [float(v) for v in value]
            else:
                factors = [float(value)] * run.num_targets
            for target, factor in enumerate(factors):
                positions = run.word_positions(target + 1, word, plugin=self.name, option="weights")
                equalizer[target, positions] = factor
        # (targets, 1, 1, tokens) to broadcast over heads and queries.
        self._equalizer = equalizer[:, None, None, :].to(run.device)

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer
    ) -> torch.Tensor:
        return injected * self._equalizer.to(injected.dtype)


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(Reweight)
