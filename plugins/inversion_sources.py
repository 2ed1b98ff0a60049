"""Source plugins that start an edit from a real photo: ``null-text``, ``negative-prompt``,
``direct`` and ``ddim``.

Each is an :class:`~p2p_framework.inversion.InvertingSource`, registered like any
third-party source: it inverts the photo ``image`` with the run's source prompt
(``prompts[0]``), step count, guidance and size, or loads a saved ``.p2pinv`` file given as
``inversion`` after checking that it fits the run. Inversions are cached (``cache``,
``cache_dir``): a second run on the same photo, prompt, model, method, options, steps,
guidance and size skips the inversion. ``SourceStart.info["inversion"]`` says whether the
cache was hit (``cache``: ``hit``, ``miss``, ``off`` or ``file``) and gives the inversion's
statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from p2p_framework import hookimpl
from p2p_framework.inversion import (
    InversionContext,
    InversionOutput,
    InvertingSource,
    null_text_optimisation,
    resolve_precision,
)
from p2p_framework.model import StableDiffusionModel


@dataclass
class NullTextSource(InvertingSource):
    """Start from a real photo by null-text inversion (the paper's; slow, faithful)."""

    name = "null-text"
    chosen_by = {"image": True}  # --image without --source
    progress_phases: ClassVar[int] = 2  # the DDIM inversion, then the optimisation

    num_inner_steps: Annotated[int, Field(ge=0)] = field(
        default=10, metadata={"help": "Adam steps per diffusion step at most"}
    )
    early_stop_epsilon: float = field(
        default=1e-5,
        metadata={"help": "stop a step early once loss < this + step * 2e-5 (< 0: never)"},
    )
    reuse_cond: bool = field(
        default=False,
        metadata={"help": "speed-up: reuse the step's conditional prediction to advance"},
    )
    batch_cond: bool = field(
        default=False,
        metadata={"help": "speed-up (GPU): batch the conditional with the first uncond pass"},
    )
    unet_precision: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "dtype of the UNet's forward and backward; auto: float16 for a model "
            "loaded in float16 (not cast up: faster on a GPU), else float32"
        },
    )

    def inversion_precision(self, model: StableDiffusionModel) -> str:
        """``unet_precision`` with ``auto`` decided for ``model``."""
        return resolve_precision(self.unet_precision, model)

    def resolved_options(self, model: StableDiffusionModel) -> dict[str, Any]:
        return {**self.method_options(), "unet_precision": self.inversion_precision(model)}

    def invert_latents(self, ctx: InversionContext) -> InversionOutput:
        latents = ctx.ddim_inversion()
        embeddings, steps = null_text_optimisation(
            ctx,
            latents,
            num_inner_steps=self.num_inner_steps,
            early_stop_epsilon=self.early_stop_epsilon,
            reuse_cond=self.reuse_cond,
            batch_cond=self.batch_cond,
            unet_precision=self.inversion_precision(ctx.model),
        )
        return InversionOutput(latent=latents[-1], uncond_embeddings=embeddings, steps=steps)


@dataclass
class NegativePromptSource(InvertingSource):
    """Start from a real photo, the source prompt as negative prompt (fast, no optimisation)."""

    name = "negative-prompt"
    guidance_specific: ClassVar[bool] = False

    def invert_latents(self, ctx: InversionContext) -> InversionOutput:
        latents = ctx.ddim_inversion()
        embeddings = ctx.cond.detach().expand(ctx.num_steps, -1, -1).clone()
        return InversionOutput(latent=latents[-1], uncond_embeddings=embeddings)


@dataclass
class DirectSource(InvertingSource):
    """Start from a real photo; the source row follows the DDIM inversion (PnP inversion)."""

    name = "direct"
    guidance_specific: ClassVar[bool] = False

    def invert_latents(self, ctx: InversionContext) -> InversionOutput:
        latents = ctx.ddim_inversion()
        # After denoising step i (timestep descending) the source row is at z_{T-1-i}.
        after = [latents[ctx.num_steps - 1 - i] for i in range(ctx.num_steps)]
        return InversionOutput(latent=latents[-1], source_latents=torch.cat(after).detach().clone())


@dataclass
class DDIMSource(InvertingSource):
    """Start from a real photo by plain DDIM inversion (baseline; drifts under guidance)."""

    name = "ddim"
    guidance_specific: ClassVar[bool] = False

    def invert_latents(self, ctx: InversionContext) -> InversionOutput:
        return InversionOutput(latent=ctx.ddim_inversion()[-1])


@hookimpl
def register_sources(register):  # noqa: ANN001 - the hook's signature is documented in hookspecs
    for source in (NullTextSource, NegativePromptSource, DirectSource, DDIMSource):
        register(source)
