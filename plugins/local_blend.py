"""Edit plugin ``local-blend``: confine the change to where the blend words attend.

After every scheduler step from ``start_blend`` on, each target latent becomes
``x_src + mask * (x_target - x_src)``. The mask is the union of the source's and the target's
word masks, each made from the cross-attention maps at ``1 / mask_downscale`` of the latent
grid (16x16 at 512 px SD 1.x), averaged over heads, layers and the steps so far, summed over
the blend words' tokens, max-pooled 3x3, resized to the latent, divided by its maximum and
thresholded. ``substruct_words`` remove their own (unpooled) mask from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field

from p2p_framework import Edit, EditRun, OptionError, RunContext, hookimpl

#: One word, or several words, per prompt (source first).
Words = Annotated[list[str | list[str]], Field(min_length=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def _power_of_two(value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError("must be a power of two")
    return value


@dataclass(frozen=True)
class LocalBlend(Edit):
    """Keep everything outside the blend words' attention identical to the source."""

    name = "local-blend"
    shortcuts = {"blend": "words"}  # --blend WORDS

    words: Words = field(
        metadata={"help": "one word (or list of words) per prompt, source first; e.g. cat dog"},
    )
    threshold: Fraction = field(default=0.3, metadata={"help": "mask threshold, relative to max"})
    start_blend: Fraction = field(
        default=0.2, metadata={"help": "fraction of the steps before blending starts"}
    )
    substruct_words: Words | None = field(
        default=None, metadata={"help": "words per prompt whose mask is removed from the blend"}
    )
    substruct_threshold: Fraction = field(
        default=0.3, metadata={"help": "threshold of the substruct mask"}
    )
    mask_downscale: Annotated[int, AfterValidator(_power_of_two)] = field(
        default=4, metadata={"help": "attention maps at latent size / this (4: 16x16 at 512 px)"}
    )

    def _token_weights(
        self, run: RunContext, words: list[str | list[str]], option: str
    ) -> torch.Tensor:
        if len(words) != len(run.prompts):
            raise OptionError(
                self.name,
                option,
                f"give one entry per prompt ({len(run.prompts)}), got {len(words)}: {words!r}",
            )
        weights = torch.zeros(len(run.prompts), run.max_tokens)
        for index, entry in enumerate(words):
            for word in [entry] if isinstance(entry, str) else entry:
                positions = run.word_positions(index, word, plugin=self.name, option=option)
                weights[index, positions] = 1.0
        # (prompts, 1, 1, tokens) to broadcast over the map's height and width.
        return weights[:, None, None, :].to(run.device)

    def _check_level(self, run: RunContext) -> None:
        """Refuse, before the first step, a ``mask_downscale`` at which the model has no
        cross-attention layer (the masks could not be made), naming the levels it has."""
        levels = run.cross_attention_levels
        if levels is None or self.mask_downscale in levels:
            return
        height, width = run.latent_size
        message = (
            f"this model has no cross-attention layer at 1/{self.mask_downscale} of the "
            f"{height}x{width} latent grid"
        )
        if levels:
            nearest = min(levels, key=lambda level: (abs(level - self.mask_downscale), level))
            have = ", ".join(f"1/{level}" for level in levels)
            message += f"; it has them at {have} (e.g. --set {self.name}.mask_downscale={nearest})"
        raise OptionError(self.name, "mask_downscale", message)

    def bind(self, run: RunContext) -> LocalBlendRun:
        self._check_level(run)
        weights = self._token_weights(run, self.words, "words")
        substruct = (
            self._token_weights(run, self.substruct_words, "substruct_words")
            if self.substruct_words
            else None
        )
        run.attention_store.track(downscale=self.mask_downscale, cross=True)
        return LocalBlendRun(self, run, weights, substruct)


class LocalBlendRun(EditRun):
    """``local-blend`` for one run.

    Attributes:
        mask: ``(prompts, 1, height, width)`` bool mask of the last blended step (row 0 is the
            source's own), or None before blending starts.
    """

    def __init__(
        self,
        options: LocalBlend,
        run: RunContext,
        weights: torch.Tensor,
        substruct: torch.Tensor | None,
    ) -> None:
        self.options = options
        self.run = run
        self.weights = weights
        self.substruct = substruct
        self.start = int(options.start_blend * run.num_steps)
        self.mask: torch.Tensor | None = None

    def _word_mask(
        self,
        maps: torch.Tensor,
        weights: torch.Tensor,
        threshold: float,
        pool: bool,
        size: tuple[int, int],
    ) -> torch.Tensor:
        word_maps = (maps * weights).sum(-1)[:, None]  # (prompts, 1, h, w)
        if pool:
            word_maps = F.max_pool2d(word_maps, kernel_size=3, stride=1, padding=1)
        word_maps = F.interpolate(word_maps, size=size)
        peak = word_maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        mask = (word_maps / peak) > threshold
        return mask[:1] | mask  # each target's mask united with the source's

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        options, run = self.options, self.run
        if step < self.start or latents.shape[0] < 2:
            return latents
        try:
            maps = run.attention_store.average(downscale=options.mask_downscale, cross=True)
        except KeyError:
            raise OptionError(
                options.name,
                "mask_downscale",
                f"this model has no cross-attention layer at 1/{options.mask_downscale} of the "
                f"{run.latent_size[0]}x{run.latent_size[1]} latent grid",
            ) from None
        size = (latents.shape[2], latents.shape[3])
        mask = self._word_mask(maps, self.weights, options.threshold, True, size)
        if self.substruct is not None:
            mask = mask & ~self._word_mask(
                maps, self.substruct, options.substruct_threshold, False, size
            )
        self.mask = mask
        mask = mask.to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(LocalBlend)
