"""Edit plugin ``refine``: add words to the prompt ("a house" -> "a house at fall").

Each target token takes the attention of its aligned source token (global alignment of the
token ids, :func:`p2p_framework.prompts.refinement_mapper`); new tokens keep their own:
``edit = A_src[..., mapper] * a + A_i * (1 - a)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2p_framework import (
    AttentionLayer,
    LinearCrossAttention,
    OptionError,
    PromptError,
    PromptToPromptEdit,
    RunContext,
    SelfReplaceRun,
    Step,
    hookimpl,
)
from p2p_framework.prompts import refinement_mapper


@dataclass(frozen=True)
class Refine(PromptToPromptEdit):
    """Add words: aligned tokens take the source's attention, new tokens keep their own."""

    name = "refine"
    default_for = staticmethod(lambda prompts: len({len(p.split()) for p in prompts}) > 1)

    def bind(self, run: RunContext) -> RefineRun:
        mappers, alphas = [], []
        for target in run.prompts[1:]:
            try:
                mapper, alpha = refinement_mapper(run.tokenizer, run.prompts[0], target)
            except PromptError as error:
                raise OptionError(self.name, "prompts", str(error)) from None
            mappers.append(mapper)
            alphas.append(alpha)
        return RefineRun(run, self.self_replace, mappers, alphas)


class RefineRun(SelfReplaceRun):
    """``refine`` for one run: per target, the aligned source token of each token and whether
    it has one."""

    def __init__(
        self,
        run: RunContext,
        self_replace: bool,
        mappers: list[torch.Tensor],
        alphas: list[torch.Tensor],
    ) -> None:
        super().__init__(run, self_replace)
        self.mapper = torch.stack(mappers).to(run.device) if mappers else None  # (targets, tokens)
        # (targets, 1, 1, tokens) to broadcast over heads and queries.
        self.alphas = torch.stack(alphas)[:, None, None, :].to(run.device) if alphas else None
        self._linear = None
        if self.mapper is not None and self.alphas is not None:
            # As token maps: gathering source token mapper[j] into token j is a one-hot
            # matrix G[mapper[j], j] = 1; the aligned tokens' weight a scales its columns and
            # the new tokens keep their own maps: injected @ (G diag(a)) + targets @ diag(1-a).
            alpha = self.alphas[:, 0, 0]  # (targets, tokens)
            gather = torch.zeros(*alpha.shape, alpha.shape[-1], device=alpha.device)
            gather.scatter_(1, self.mapper[:, None, :].long(), 1.0)
            self._linear = LinearCrossAttention(
                gather * alpha[:, None, :], torch.diag_embed(1 - alpha)
            )

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        assert self.mapper is not None and self.alphas is not None
        index = self.mapper[:, None, None, :].expand_as(injected)
        gathered = torch.gather(injected, -1, index)
        alphas = self.alphas.to(injected.dtype)
        return gathered * alphas + targets * (1 - alphas)

    def linear_cross_attention(self, step: int) -> LinearCrossAttention | None:
        return self._linear


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(Refine)
