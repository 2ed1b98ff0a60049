"""Example third-party invertible source: ``fixed-point`` inversion.

Fixed-point iterative inversion (Pan et al., ICCV 2023, "Effective Real Image Editing with
Accelerated Iterative Diffusion Inversion"; the idea of ReNoise too). DDIM inversion goes up
one noise level from ``z_{t-1}`` to ``z_t`` with the noise predicted at ``z_{t-1}``, an
approximation of the noise at ``z_t`` that the denoising step will use; the error grows with
the guidance scale. Here each inversion step solves the implicit equation

    z_t = next_step(eps_w(z_t, t), z_{t-1})

by a few fixed-point iterations, starting from DDIM's estimate, where ``eps_w`` is the guided
noise prediction at the run's guidance ``w`` with the unconditional embedding of ``""``:
exactly what the denoising loop computes at step ``t``, so denoising at the same guidance
retraces the inversion (the DDIM denoising step and ``next_step`` with the same noise are
inverses of each other). Without guidance (``w <= 1``) the conditional prediction alone.

It uses only the public API: :class:`p2p_framework.inversion.InvertingSource` gives it the
options ``image``/``inversion``/``crop``/``cache``/``cache_dir``, the ``.p2pinv`` file, the
cache, ``p2p-run invert --method fixed-point`` and ``p2p-run edit --inversion``; it
implements ``invert_latents`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import Field

from p2p_framework import hookimpl
from p2p_framework.inversion import InversionContext, InversionOutput, InvertingSource


@dataclass
class FixedPointSource(InvertingSource):
    """Start from a real photo by fixed-point iterative inversion (Pan et al. 2023)."""

    name = "fixed-point"

    iterations: Annotated[int, Field(ge=0)] = field(
        default=5,
        metadata={"help": "fixed-point iterations per inversion step (0: plain DDIM inversion)"},
    )

    def invert_latents(self, ctx: InversionContext) -> InversionOutput:
        math, guided = ctx.math, ctx.guidance > 1.0
        embeddings = torch.cat([ctx.null, ctx.cond]) if guided else ctx.cond

        def noise(sample: torch.Tensor, t: Any) -> torch.Tensor:
            """The loop's guided noise prediction at ``sample`` and timestep ``t``."""
            if guided:
                uncond, cond = ctx.unet(torch.cat([sample, sample]), t, embeddings).chunk(2)
                raw = uncond + ctx.guidance * (cond - uncond)
            else:
                raw = ctx.unet(sample, t, embeddings)
            return math.to_epsilon(raw, sample, t)

        z = ctx.image_latent
        steps: list[dict[str, Any]] = []
        # Inversion runs the timesteps upwards (the loop denoises them downwards).
        for i, t in enumerate(ctx.scheduler.timesteps.flip(0)):
            estimate = math.next_step(noise(z, t), t, z)  # DDIM's one-step approximation
            # Denoising from an estimate x lands at z + c * (x - f(x)) (c = sqrt(a_prev / a_t)):
            # its residual is the step's reconstruction error. Iterate while the residual
            # shrinks; once it grows the map does not contract there (as near the data at high
            # guidance, where plain iteration diverges): go back to the previous estimate.
            previous, previous_residual, residual, done = estimate, float("inf"), None, 0
            for _ in range(self.iterations):
                update = math.next_step(noise(estimate, t), t, z)
                residual = ((update - estimate).norm() / estimate.norm()).item()
                done += 1
                if residual >= previous_residual:
                    estimate, residual = previous, previous_residual
                    break
                previous, previous_residual = estimate, residual
                estimate = update
            z = estimate
            steps.append({"residual": residual, "iterations": done})
            ctx.report(i + 1, {"phase": "fixed-point", "residual": residual})
        return InversionOutput(latent=z, steps=steps)


@hookimpl
def register_sources(register):  # noqa: ANN001 - signature documented by p2p_framework.hookspecs
    register(FixedPointSource)
