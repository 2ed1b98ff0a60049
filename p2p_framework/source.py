"""The source-plugin API: where the starting latent of an edit comes from.

A source plugin is a dataclass subclassing :class:`Source` (its fields are its options),
registered with the ``register_sources`` hook. ``seed`` draws fresh noise; inversion sources
turn a real photo into a starting latent plus a :class:`StepGuide`: what each step needs to
reconstruct it.
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


class StepGuide:
    """What a source tells the denoising loop at each step of its job.

    A source that needs more than a starting latent returns one in
    :attr:`SourceStart.guide`; the loop asks it at every step ``step`` (``0`` is the first,
    noisiest step, ``num_steps - 1`` the last). The base class changes nothing; override
    what your method needs. The built-in inversion sources use the two subclasses
    :class:`UncondEmbeddingGuide` (null-text, negative-prompt) and
    :class:`SourceLatentGuide` (direct), exactly as a third-party source would.
    """

    def uncond_embedding(self, step: int) -> torch.Tensor | None:
        """The ``(1, tokens, dim)`` unconditional text embedding for every row of this job at
        ``step``, or None for the embedding of ``""`` (the default).

        Asked only when guidance is on (``guidance > 1``), before the step's UNet call. The
        loop casts it to the model's device and dtype.
        """
        return None

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """Correct this job's latents after ``scheduler.step`` of ``step``.

        Args:
            latents: ``(prompts, channels, height, width)`` of this job, source row first,
                in the model's dtype; called after the scheduler's step and before the edits'
                ``after_step``. It may be changed in place.
            step: the step index.

        Returns:
            The latents to go on with (same shape, dtype and device).
        """
        return latents


class UncondEmbeddingGuide(StepGuide):
    """Per-step unconditional embeddings for every row (null-text, negative-prompt).

    Args:
        embeddings: one ``(1, tokens, dim)`` embedding per step (a ``(T, tokens, dim)``
            tensor or a sequence of ``T`` tensors).
    """

    def __init__(self, embeddings: torch.Tensor | Sequence[torch.Tensor]) -> None:
        if isinstance(embeddings, torch.Tensor):
            embeddings = [embeddings[i : i + 1] for i in range(embeddings.shape[0])]
        self.embeddings = list(embeddings)

    def uncond_embedding(self, step: int) -> torch.Tensor | None:
        return self.embeddings[step]


class SourceLatentGuide(StepGuide):
    """The source row follows given latents (direct inversion: Ju et al. 2024).

    Args:
        latents: per step, the ``(1, channels, height, width)`` latent the source row must
            have after that step (a ``(T, C, h, w)`` tensor or a sequence of ``T`` tensors).
    """

    def __init__(self, latents: torch.Tensor | Sequence[torch.Tensor]) -> None:
        if isinstance(latents, torch.Tensor):
            latents = [latents[i : i + 1] for i in range(latents.shape[0])]
        self.latents = list(latents)

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        latents[:1] = self.latents[step].to(latents)
        return latents


@dataclass
class SourceStart:
    """What a source gives the denoising loop.

    Attributes:
        latent: ``(1, channels, height, width)`` starting latent, shared by all prompts and
            already scaled by the scheduler's ``init_noise_sigma``.
        guide: what the source tells the loop at each step (per-step unconditional
            embeddings, corrections of the latents...; see :class:`StepGuide`), or None.
        info: facts for the run record (seed, inversion statistics...).
    """

    latent: torch.Tensor
    guide: StepGuide | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Source(Plugin):
    """Base class of source plugins. Subclasses are dataclasses whose fields are options."""

    def prepare(self, request: SourceRequest) -> SourceStart:
        """Produce the starting latent (and the per-step :class:`StepGuide`) for a run."""
        raise NotImplementedError
