"""Edit plugin ``replace``: word swap ("a cat ..." -> "a dog ...").

Targets take the source's cross-attention through a token mapper: ``edit = A_src @ M``, with
``M`` from :func:`p2p_framework.prompts.replacement_mapper`. Every target must have as many
words as the source.
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
from p2p_framework.prompts import replacement_mapper


@dataclass(frozen=True)
class Replace(PromptToPromptEdit):
    """Swap words: targets reuse the source's attention, mapped token to token."""

    name = "replace"
    default_for = staticmethod(lambda prompts: len({len(p.split()) for p in prompts}) == 1)

    def bind(self, run: RunContext) -> ReplaceRun:
        source, targets = run.prompts[0], run.prompts[1:]
        mappers = []
        for target in targets:
            try:
                mappers.append(replacement_mapper(run.tokenizer, source, target))
            except PromptError as error:
                raise OptionError(self.name, "prompts", str(error)) from None
        return ReplaceRun(run, self.self_replace, mappers)


class ReplaceRun(SelfReplaceRun):
    """``replace`` for one run: one ``(tokens, tokens)`` mapper per target."""

    def __init__(self, run: RunContext, self_replace: bool, mappers: list[torch.Tensor]) -> None:
        super().__init__(run, self_replace)
        # (targets, 1, tokens, tokens): one mapper per target, shared by heads.
        self.mapper = torch.stack(mappers)[:, None].to(run.device) if mappers else None

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        assert self.mapper is not None
        return torch.matmul(injected, self.mapper.to(injected.dtype))

    def linear_cross_attention(self, step: int) -> LinearCrossAttention:
        assert self.mapper is not None
        return LinearCrossAttention(self.mapper[:, 0])  # injected @ M, the same every step


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(Replace)
