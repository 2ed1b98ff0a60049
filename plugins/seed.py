"""Source plugin ``seed``: fresh Gaussian noise, drawn exactly as diffusers draws it.

One ``(1, channels, height, width)`` latent is drawn from ``torch.Generator("cpu")`` seeded
with ``seed`` and shared by every prompt, so the source row is what diffusers'
``StableDiffusionPipeline`` makes for the same prompt, seed, steps, guidance and scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from diffusers.utils.torch_utils import randn_tensor
from pydantic import AfterValidator, Field

from p2p_framework import Source, SourceRequest, SourceStart, hookimpl


def _fits_64_bits(seed: int) -> int:
    if seed >= 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"must be below 2**64 = {2**64}")
    return seed


@dataclass(frozen=True)
class Seed(Source):
    """Start from Gaussian noise drawn with a seed (the paper's examples use 8888)."""

    name = "seed"
    shortcuts = {"seed": "seed"}  # --seed N
    chosen_by = {"*": True}  # the source of a job that names none and gives no photo

    seed: Annotated[int, Field(ge=0), AfterValidator(_fits_64_bits)] = field(
        default=8888, metadata={"help": "random seed of the initial noise"}
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
