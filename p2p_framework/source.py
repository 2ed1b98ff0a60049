"""The source-plugin API: where the starting latent of an edit comes from.

A source plugin is a dataclass subclassing :class:`Source` (its fields are its options),
registered with the ``register_sources`` hook. ``seed`` draws fresh noise; inversion sources
turn a real photo into a starting latent plus what each step needs to reconstruct it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import StableDiffusionModel
from .options import Plugin


@dataclass
class SourceRequest:
    """What a source is told about the run it starts.

    Attributes:
        model: the loaded model adapter.
        scheduler: the run's scheduler, with ``set_timesteps(num_steps)`` already called.
        prompts: source prompt first, then targets.
        num_steps: diffusion steps.
        guidance: classifier-free guidance scale.
        height, width: image size in pixels.
        progress: optional ``progress(done, total, info)`` callback for long work.
    """

    model: StableDiffusionModel
    scheduler: Any
    prompts: list[str]
    num_steps: int
    guidance: float
    height: int
    width: int
    progress: Callable[[int, int, dict[str, Any]], None] | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(1, channels, height, width)`` of one starting latent."""
        h, w = self.model.latent_size(self.height, self.width)
        return (1, self.model.latent_channels, h, w)


@dataclass
class SourceStart:
    """What a source gives the denoising loop.

    Attributes:
        latent: ``(1, channels, height, width)`` starting latent, shared by all prompts and
            already scaled by the scheduler's ``init_noise_sigma``.
        uncond_embeddings: per step ``(1, tokens, dim)`` unconditional embedding used for every
            row (null-text inversion), or None for the embedding of ``""``.
        source_latents: per step ``(1, channels, height, width)`` latent the source row must
            have after that step (direct inversion), or None.
        info: facts for the run record (seed, inversion statistics...).
    """

    latent: torch.Tensor
    uncond_embeddings: Sequence[torch.Tensor] | None = None
    source_latents: Sequence[torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Source(Plugin):
    """Base class of source plugins. Subclasses are dataclasses whose fields are options."""

    def prepare(self, request: SourceRequest) -> SourceStart:
        """Produce the starting latent (and per-step extras) for a run."""
        raise NotImplementedError
