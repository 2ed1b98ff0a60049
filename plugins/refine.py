"""Edit plugin ``refine``: add words to the prompt ("a house" -> "a house at fall").

Each target token takes the attention of its aligned source token (global alignment of the
token ids, :func:`p2p_framework.prompts.refinement_mapper`); new tokens keep their own:
``edit = A_src[..., mapper] * a + A_i * (1 - a)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2p_framework import AttentionLayer, Edit, OptionError, PromptError, RunContext, hookimpl
from p2p_framework.prompts import refinement_mapper


@dataclass
class Refine(Edit):
    """Add words: aligned tokens take the source's attention, new tokens keep their own."""

    name = "refine"

    def setup(self, run: RunContext) -> None:
        mappers, alphas = [], []
        for target in run.prompts[1:]:
            try:
                mapper, alpha = refinement_mapper(run.tokenizer, run.prompts[0], target)
            except PromptError as error:
                raise OptionError(self.name, "prompts", str(error)) from None
            mappers.append(mapper)
            alphas.append(alpha)
        if mappers:
            self._mapper = torch.stack(mappers).to(run.device)  # (targets, tokens)
            # (targets, 1, 1, tokens) to broadcast over heads and queries.
            self._alphas = torch.stack(alphas)[:, None, None, :].to(run.device)

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer
    ) -> torch.Tensor:
        index = self._mapper[:, None, None, :].expand_as(injected)
        gathered = torch.gather(injected, -1, index)
        alphas = self._alphas.to(injected.dtype)
        return gathered * alphas + targets * (1 - alphas)


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(Refine)
