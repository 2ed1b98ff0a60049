"""Edit plugin ``local-blend``: confine the change to where the blend words attend.

After every scheduler step from ``start_blend`` on, each target latent becomes
``x_src + mask * (x_target - x_src)``. The mask is the union of the source's and the target's
word masks, each made from the cross-attention maps at ``1 / mask_downscale`` of the latent
grid (16x16 at 512 px SD 1.x), averaged over heads, layers and the steps so far, summed over
the blend words' tokens, max-pooled 3x3, resized to the latent, divided by its maximum and
thresholded. ``substruct_words`` remove their own (unpooled) mask from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from p2p_framework import Edit, OptionError, RunContext, hookimpl

Words = str | Sequence[str]


def _fraction(plugin: str, option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise OptionError(plugin, option, f"must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class LocalBlend(Edit):
    """Keep everything outside the blend words' attention identical to the source."""

    name = "local-blend"

    words: list[Words] = field(
        metadata={"help": "one word (or list of words) per prompt, source first; e.g. cat dog"},
    )
    threshold: float = field(default=0.3, metadata={"help": "mask threshold, relative to max"})
    start_blend: float = field(
        default=0.2, metadata={"help": "fraction of the steps before blending starts"}
    )
    substruct_words: list[Words] | None = field(
        default=None, metadata={"help": "words per prompt whose mask is removed from the blend"}
    )
    substruct_threshold: float = field(
        default=0.3, metadata={"help": "threshold of the substruct mask"}
    )
    mask_downscale: int = field(
        default=4, metadata={"help": "attention maps at latent size / this (4: 16x16 at 512 px)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.words, str):
            self.words = self.words.split()
        if not self.words:
            raise OptionError(self.name, "words", "give one word per prompt, e.g. 'cat dog'")
        if isinstance(self.substruct_words, str):
            self.substruct_words = self.substruct_words.split()
        self.threshold = _fraction(self.name, "threshold", self.threshold)
        self.start_blend = _fraction(self.name, "start_blend", self.start_blend)
        self.substruct_threshold = _fraction(
            self.name, "substruct_threshold", self.substruct_threshold
        )
        value = self.mask_downscale
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < 1
            or value & (value - 1)
        ):
            raise OptionError(self.name, "mask_downscale", f"must be a power of two, got {value!r}")
        self.mask: torch.Tensor | None = None

    def _token_weights(self, run: RunContext, words: list[Words], option: str) -> torch.Tensor:
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

    def setup(self, run: RunContext) -> None:
        self._weights = self._token_weights(run, list(self.words), "words")
        self._substruct = (
            self._token_weights(run, list(self.substruct_words), "substruct_words")
            if self.substruct_words
            else None
        )
        self._start = int(self.start_blend * run.num_steps)
        run.attention_store.track(downscale=self.mask_downscale, cross=True)
        self.mask = None

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

    def after_step(self, latents: torch.Tensor, step: int, run: RunContext) -> torch.Tensor:
        if step < self._start or latents.shape[0] < 2:
            return latents
        try:
            maps = run.attention_store.average(downscale=self.mask_downscale, cross=True)
        except KeyError:
            raise OptionError(
                self.name,
                "mask_downscale",
                f"this model has no cross-attention layer at 1/{self.mask_downscale} of the "
                f"{run.latent_size[0]}x{run.latent_size[1]} latent grid",
            ) from None
        size = (latents.shape[2], latents.shape[3])
        mask = self._word_mask(maps, self._weights, self.threshold, True, size)
        if self._substruct is not None:
            mask = mask & ~self._word_mask(
                maps, self._substruct, self.substruct_threshold, False, size
            )
        self.mask = mask
        mask = mask.to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(LocalBlend)
