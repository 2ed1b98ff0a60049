"""Source plugin ``seed``: fresh Gaussian noise, drawn exactly as diffusers draws it.

One ``(1, channels, height, width)`` latent is drawn from ``torch.Generator("cpu")`` seeded
with ``seed`` and shared by every prompt, so the source row is what diffusers'
``StableDiffusionPipeline`` makes for the same prompt, seed, steps, guidance and scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from p2p_framework import OptionError, Source, SourceRequest, SourceStart, hookimpl


@dataclass
class Seed(Source):
    """Start from Gaussian noise drawn with a seed (the paper's examples use 8888)."""

    name = "seed"

    seed: int = field(default=8888, metadata={"help": "random seed of the initial noise"})

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise OptionError(
                self.name, "seed", f"must be a non-negative integer, got {self.seed!r}"
            )

    def prepare(self, request: SourceRequest) -> SourceStart:
        model = request.model
        generator = torch.Generator("cpu").manual_seed(self.seed)
        noise = randn_tensor(
            request.latent_shape, generator=generator, device=model.device, dtype=model.dtype
        )
        latent = noise * request.scheduler.init_noise_sigma
        return SourceStart(latent=latent, info={"seed": self.seed})


@hookimpl
def register_sources(register):  # noqa: ANN001 - the hook's signature is documented in hookspecs
    register(Seed)
