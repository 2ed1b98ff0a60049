"""Edit ``masactrl``: MasaCtrl's mutual self-attention (Cao et al., ICCV 2023).

From step ``start_step`` on, in the self-attention layers of the transformer blocks from
``start_layer`` on (forward order, 0-based; SD 1.x has 16 blocks, so the paper's 10 means the
decoder's last six), each target's queries attend to the **source's** keys and values instead
of its own: the target keeps its layout from its own prompt but takes its content (identity,
texture) from the source image. This uses the ``attention_inputs`` hook: the keys and values
are swapped before attention, so the layer still runs on the fused attention kernel.

With ``mask_words`` (one word per prompt, source first: the object in each), the paper's
masked variant: the objects' masks are made from those words' cross-attention (averaged over
heads, layers and the steps so far, at ``1 / mask_downscale`` of the latent grid, divided by
the maximum, thresholded at ``mask_threshold``), and in the ``self_attention`` hook a target
query inside its object attends only to the source's object and one outside only to the
source's background: ``A' = m_t * norm(A * m_s) + (1 - m_t) * norm(A * (1 - m_s))`` over the
keys, which equals the paper's two masked softmaxes blended by the target's mask.

Only the conditional rows are changed (the framework never edits the unconditional half; the
paper's code also swaps in the unconditional half).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from p2p_framework import AttentionLayer, Edit, EditRun, OptionError, RunContext, Step

Fraction = Annotated[float, Field(ge=0, le=1)]


@dataclass(frozen=True)
class MasaCtrl(Edit):
    """Mutual self-attention: targets query the source's keys and values (MasaCtrl)."""

    name = "masactrl"

    start_step: Annotated[int, Field(ge=0)] = field(
        default=4, metadata={"help": "first step (0-based) of mutual self-attention (paper: 4)"}
    )
    start_layer: Annotated[int, Field(ge=0)] = field(
        default=10, metadata={"help": "first transformer block (forward order; paper: 10)"}
    )
    mask_words: list[str] | None = field(
        default=None,
        metadata={"help": "one word per prompt (source first) naming the object: masked variant"},
    )
    mask_threshold: Fraction = field(
        default=0.1, metadata={"help": "threshold of the object masks, relative to their max"}
    )
    mask_downscale: Annotated[int, Field(ge=1)] = field(
        default=4, metadata={"help": "cross-attention maps for the masks at latent size / this"}
    )

    def bind(self, run: RunContext) -> MasaCtrlRun:
        weights = None
        if self.mask_words is not None:
            if len(self.mask_words) != len(run.prompts):
                raise OptionError(
                    self.name,
                    "mask_words",
                    f"give one word per prompt ({len(run.prompts)}), got {self.mask_words!r}",
                )
            weights = torch.zeros(len(run.prompts), run.max_tokens)
            for index, word in enumerate(self.mask_words):
                positions = run.word_positions(index, word, plugin=self.name, option="mask_words")
                weights[index, positions] = 1.0
            run.attention_store.track(downscale=self.mask_downscale, cross=True)
        return MasaCtrlRun(self, run, weights)


class MasaCtrlRun(EditRun):
    """``masactrl`` for one run.

    Attributes:
        masks: ``(prompts, 1, h, w)`` float object masks made after the last step (masked
            variant only; None before the first step).
    """

    def __init__(self, options: MasaCtrl, run: RunContext, weights: torch.Tensor | None) -> None:
        self.options = options
        self.run = run
        # (prompts, 1, 1, tokens) to sum each prompt's map over its word's tokens.
        self.weights = None if weights is None else weights[:, None, None, :].to(run.device)
        self.masks: torch.Tensor | None = None

    def _active(self, layer: AttentionLayer, step: int | None) -> bool:
        if layer.is_cross or layer.index < self.options.start_layer:
            return False
        return step is None or step >= self.options.start_step

    # -- the mutual self-attention ------------------------------------------------------------
    def uses_attention_inputs(self, layer: AttentionLayer, step: int | None) -> bool:
        return self._active(layer, step)

    def attention_inputs(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer: AttentionLayer,
        step: Step,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Targets (rows 1..) take the source's (row 0) keys and values.
        shared_key = key[:1].expand_as(key)
        shared_value = value[:1].expand_as(value)
        if isinstance(step, torch.Tensor):  # compiled: the start step is read on the device
            on = step >= self.options.start_step
            shared_key = torch.where(on, shared_key, key)
            shared_value = torch.where(on, shared_value, value)
        return query, shared_key, shared_value

    # -- the masked variant -----------------------------------------------------------------
    def uses_self_attention(self, layer: AttentionLayer, step: int | None) -> bool:
        return self.weights is not None and self._active(layer, step)

    def self_attention(
        self, source: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        if self.masks is None:
            return targets
        grid = F.interpolate(self.masks, size=layer.grid)  # (prompts, 1, h, w) at this layer
        flat = grid.flatten(1).to(targets.dtype)  # (prompts, queries)
        source_keys = flat[:1, None, None, :]  # over the keys: the source's object
        target_queries = flat[1:, None, :, None]  # over the queries: each target's object
        inside = targets * source_keys
        outside = targets * (1 - source_keys)
        inside = inside / inside.sum(-1, keepdim=True).clamp_min(1e-12)
        outside = outside / outside.sum(-1, keepdim=True).clamp_min(1e-12)
        return target_queries * inside + (1 - target_queries) * outside

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        if self.weights is not None:
            options = self.options
            try:
                maps = self.run.attention_store.average(
                    downscale=options.mask_downscale, cross=True
                )
            except KeyError:
                raise OptionError(
                    options.name,
                    "mask_downscale",
                    f"this model has no cross-attention layer at 1/{options.mask_downscale} "
                    "of the latent grid",
                ) from None
            word_maps = (maps * self.weights).sum(-1)[:, None]  # (prompts, 1, h, w)
            peak = word_maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
            self.masks = ((word_maps / peak) > options.mask_threshold).float()
        return latents
