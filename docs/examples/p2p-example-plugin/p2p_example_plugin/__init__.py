"""Example third-party p2p-framework plugin: the edits ``suppress-word`` and ``masactrl``
(:mod:`p2p_example_plugin.masactrl`).

``suppress-word`` multiplies the cross-attention of the given words in every target prompt by
``factor`` (0 removes them), optionally renormalising each query's attention to sum to 1
again, and optionally only in some places of the UNet (``down``, ``mid``, ``up``). Like the
built-in ``reweight`` it acts on what is injected, so it composes after ``replace`` or
``refine``; alone, the targets take the source's attention with the words suppressed. It is a
Prompt-to-Prompt edit (it shares their ``self_replace`` option).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

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

from .masactrl import MasaCtrl

__version__ = "0.2.0"

Place = Literal["down", "mid", "up"]


@dataclass(frozen=True)
class SuppressWord(PromptToPromptEdit):
    """Scale down (or remove) the attention of words in the target prompts."""

    name = "suppress-word"

    words: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = field(
        metadata={"help": "words of the target prompts to suppress; e.g. hat or hat,scarf"}
    )
    factor: Annotated[float, Field(allow_inf_nan=False)] = field(
        default=0.0, metadata={"help": "attention multiplier for those words (0 removes them)"}
    )
    renormalize: bool = field(
        default=False, metadata={"help": "rescale each query's attention to sum to 1 again"}
    )
    places: Annotated[list[Place], Field(min_length=1)] = field(
        default_factory=lambda: ["down", "mid", "up"],
        metadata={"help": "UNet places where it applies: down, mid, up"},
    )

    def bind(self, run: RunContext) -> SuppressWordRun:
        scale = torch.ones(run.num_targets, run.max_tokens)
        found = False
        for target in range(run.num_targets):
            for word in self.words:
                # A word may be in some targets only; one found in none is an error below.
                positions = run.find_word(target + 1, word)
                scale[target, positions] = self.factor
                found = found or bool(positions)
        if run.num_targets and not found:
            raise OptionError(
                self.name,
                "words",
                f"none of {self.words!r} is a word of the target prompts {run.prompts[1:]!r}",
            )
        return SuppressWordRun(run, self, scale)


class SuppressWordRun(SelfReplaceRun):
    """``suppress-word`` for one run: the ``(targets, tokens)`` attention multipliers."""

    def __init__(self, run: RunContext, options: SuppressWord, scale: torch.Tensor) -> None:
        super().__init__(run, options.self_replace)
        self.places = set(options.places)
        self.renormalize = options.renormalize
        # (targets, 1, 1, tokens) to broadcast over heads and queries.
        self.scale = scale[:, None, None, :].to(run.device)

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        if layer.place not in self.places:
            return injected
        scaled = injected * self.scale.to(injected.dtype)
        if self.renormalize:
            scaled = scaled / scaled.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return scaled

    def linear_cross_attention(self, step: int) -> LinearCrossAttention | None:
        # Optional, for speed: without renormalising (a division by the maps' own sum) and
        # acting everywhere (the declaration holds at every layer of the step), the edit is
        # injected @ diag(scale), so the controller may keep its layers on the fused kernel.
        if self.renormalize or self.places != {"down", "mid", "up"}:
            return None
        return LinearCrossAttention(torch.diag_embed(self.scale[:, 0, 0]))


@hookimpl
def register_edits(register):  # noqa: ANN001 - signature documented by p2p_framework.hookspecs
    register(SuppressWord)
    register(MasaCtrl)
