"""Edit plugin ``reweight``: scale the attention of chosen words ("smiling" x 5).

``edit = A * e`` with an equalizer ``e[target, token]`` of ones, set to the given value at the
tokens of each given word in each target prompt. Placed after ``replace`` or ``refine`` in the
pipeline, it scales their result (``A`` is what they inject); alone, ``A`` is the source's
attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from pydantic import Field

from p2p_framework import (
    AttentionLayer,
    LinearCrossAttention,
    OptionError,
    PromptToPromptEdit,
    RunContext,
    SelfReplaceRun,
    Step,
    hookimpl,
)

Factor = Annotated[float, Field(allow_inf_nan=False)]


@dataclass(frozen=True)
class Reweight(PromptToPromptEdit):
    """Scale the attention of words by factors (values may be negative or large)."""

    name = "reweight"
    shortcuts = {"reweight": "weights"}  # --reweight WORD=FACTOR

    weights: Annotated[dict[str, Factor | list[Factor]], Field(min_length=1)] = field(
        metadata={"help": "word -> factor, or a list with one factor per target; e.g. smiling=5"},
    )

    def bind(self, run: RunContext) -> ReweightRun:
        equalizer = torch.ones(run.num_targets, run.max_tokens)
        for word, value in self.weights.items():
            if isinstance(value, list):
                if len(value) != run.num_targets:
                    raise OptionError(
                        self.name,
                        "weights",
                        f"{word!r} has {len(value)} factors for {run.num_targets} targets",
                    )
                factors = value
            else:
                factors = [value] * run.num_targets
            for target, factor in enumerate(factors):
                positions = run.word_positions(target + 1, word, plugin=self.name, option="weights")
                equalizer[target, positions] = factor
        return ReweightRun(run, self.self_replace, equalizer)


class ReweightRun(SelfReplaceRun):
    """``reweight`` for one run: the ``(targets, tokens)`` equalizer."""

    def __init__(self, run: RunContext, self_replace: bool, equalizer: torch.Tensor) -> None:
        super().__init__(run, self_replace)
        # (targets, 1, 1, tokens) to broadcast over heads and queries.
        self.equalizer = equalizer[:, None, None, :].to(run.device)
        # (targets, tokens, tokens): the same as a token map, diag(e) per target.
        self._linear = LinearCrossAttention(torch.diag_embed(self.equalizer[:, 0, 0]))

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        return injected * self.equalizer.to(injected.dtype)

    def linear_cross_attention(self, step: int) -> LinearCrossAttention:
        return self._linear


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(Reweight)
