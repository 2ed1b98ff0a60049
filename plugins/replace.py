"""Edit plugin ``replace``: word swap ("a cat ..." -> "a dog ...").

Targets take the source's cross-attention through a token mapper: ``edit = A_src @ M``, with
``M`` from :func:`p2p_framework.prompts.replacement_mapper`. Every target must have as many
words as the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2p_framework import AttentionLayer, Edit, OptionError, PromptError, RunContext, hookimpl
from p2p_framework.prompts import replacement_mapper


@dataclass
class Replace(Edit):
    """Swap words: targets reuse the source's attention, mapped token to token."""

    name = "replace"

    def setup(self, run: RunContext) -> None:
        source, targets = run.prompts[0], run.prompts[1:]
        mappers = []
        for target in targets:
            try:
                mappers.append(replacement_mapper(run.tokenizer, source, target))
            except PromptError as error:
                raise OptionError(self.name, "prompts", str(error)) from None
        # (targets, 1, tokens, tokens): one mapper per target, shared by heads.
        self._mapper = torch.stack(mappers)[:, None].to(run.device) if mappers else None

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer
    ) -> torch.Tensor:
        return torch.matmul(injected, self._mapper.to(injected.dtype))


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(Replace)
