"""The inversion methods behind :func:`p2p_framework.inversion.invert`.

Every method starts from the same DDIM inversion (``z_0 .. z_T``, conditional prompt only)
and has the same call shape: ``method(job, options) -> MethodOutput``, where ``options`` is the
method's options dataclass. What a method adds is what each editing step needs to bring the
source row back to the photo:

- ``ddim``: nothing (the plain baseline: unconditional text ``""``).
- ``null-text``: one optimised unconditional embedding per step (Mokady et al. 2023).
- ``negative-prompt``: the source prompt's own embedding as the unconditional one at every
  step, no optimisation (Miyake et al. 2023).
- ``direct``: the inversion latents themselves, which the source row follows during the
  edit (Ju et al. 2024, "PnP Inversion").
"""

from __future__ import annotations

import dataclasses
import math as pymath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from p2p_framework.errors import OptionError

from .ddim import PRECISIONS, DDIMMath, UNetCounter, resolve_precision
from .errors import InversionError


@dataclass
class InversionJob:
    """What a method works with (everything float32, on the model's device).

    Attributes:
        unet: counting UNet caller (float32 outputs, whatever precision the UNet runs in).
        math: DDIM formulas of the run's scheduler (``set_timesteps`` done).
        latents: ``z_0 .. z_T`` from DDIM inversion.
        cond: ``(1, tokens, dim)`` embedding of the source prompt.
        null: ``(1, tokens, dim)`` embedding of ``""``.
        guidance: classifier-free guidance scale of the edits to come.
        report: ``report(done_in_this_phase, info)`` progress callback.
    """

    unet: UNetCounter
    math: DDIMMath
    latents: list[torch.Tensor]
    cond: torch.Tensor
    null: torch.Tensor
    guidance: float
    report: Callable[[int, dict[str, Any]], None]

    @property
    def num_steps(self) -> int:
        return len(self.latents) - 1


@dataclass
class MethodOutput:
    """What a method adds to the DDIM inversion.

    Attributes:
        uncond_embeddings: ``(T, tokens, dim)`` per-step unconditional embeddings, or None
            for ``""`` at every step.
        source_latents: ``(T, channels, h, w)``: the latent the source row must have after
            denoising step ``i`` (``z_{T-1-i}``), or None.
        steps: per outer step statistics (``inner_steps``, ``loss``).
    """

    uncond_embeddings: torch.Tensor | None = None
    source_latents: torch.Tensor | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class NoOptions:
    """The method has no options."""


@dataclass(frozen=True)
class NullTextOptions:
    """Options of null-text optimisation (defaults: the paper's).

    Attributes:
        num_inner_steps: Adam steps per diffusion step at most (10).
        early_stop_epsilon: stop a step's optimisation once the loss is below
            ``early_stop_epsilon + i * 2e-5`` (1e-5); a negative value never stops early.
        reuse_cond: speed-up: advance the reconstruction with the conditional prediction
            already computed for the step plus one unconditional pass, instead of the
            paper's fresh batched ``[uncond, cond]`` pass (one UNet row less per step).
        batch_cond: speed-up on GPUs: compute the step's conditional prediction in the same
            UNet call as the first unconditional one (batch of 2).
        unet_precision: ``auto`` (default: ``float16`` for a UNet loaded in float16, as on a
            GPU, else ``float32``), ``float32`` (the reference: a half UNet is cast up),
            ``bfloat16`` or ``float16``: the dtype the frozen UNet's forward and backward
            run in (see :func:`~p2p_framework.inversion.ddim.unet_precision`); the null
            embedding, the latents, the DDIM arithmetic, the loss and Adam stay float32.
            ``float16`` back-propagates through the UNet with a loss scale
            (:func:`scaled_gradient`). :func:`resolve_options` replaces ``auto`` by what it
            means for a model; inversions record that.
    """

    num_inner_steps: int = 10
    early_stop_epsilon: float = 1e-5
    reuse_cond: bool = False
    batch_cond: bool = False
    unet_precision: str = field(default="auto", metadata={"choices": ("auto", *PRECISIONS)})


def _ddim(job: InversionJob, options: NoOptions) -> MethodOutput:
    return MethodOutput()


def _negative_prompt(job: InversionJob, options: NoOptions) -> MethodOutput:
    embeddings = job.cond.detach().expand(job.num_steps, -1, -1).clone()
    return MethodOutput(uncond_embeddings=embeddings)


def _direct(job: InversionJob, options: NoOptions) -> MethodOutput:
    # After denoising step i (timestep descending) the source row is at z_{T-1-i}.
    after = [job.latents[job.num_steps - 1 - i] for i in range(job.num_steps)]
    return MethodOutput(source_latents=torch.cat(after).detach().clone())


def null_text_learning_rate(step: int) -> float:
    """``1e-2 * (1 - i / 100)`` as in the paper, floored at 1e-4 (its value at step 99) so
    that runs of more than 100 steps keep a positive rate."""
    return max(1e-2 * (1.0 - step / 100.0), 1e-4)


#: float16 loss scale: the UNet output's gradient is scaled so that its largest element is
#: ``2 ** LOSS_SCALE_EXPONENT`` before it enters the float16 backward ...
LOSS_SCALE_EXPONENT = 8
#: ... and by ``2 ** -LOSS_SCALE_BACKOFF`` less on each retry after an overflow.
LOSS_SCALE_BACKOFF = 8
LOSS_SCALE_RETRIES = 3


def scaled_gradient(
    loss: torch.Tensor, output: torch.Tensor, leaf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d loss / d leaf`` where ``output`` (float32) came out of a float16 UNet fed ``leaf``.

    The null-text loss is an MSE of about 1e-5 over the latent, so the gradient reaching the
    UNet's output is about 1e-7 per element at SD's latent size (1e-9 and less late in the
    optimisation): below float16's smallest normal number (6e-5), it would lose its precision
    or flush to zero in the float16 backward. The gradient is split at the UNet's output: the
    float32 part (loss, DDIM step, guidance) gives the output's gradient, which is scaled by a
    power of two so that its largest element is ``2 ** LOSS_SCALE_EXPONENT``,
    back-propagated through the UNet, and unscaled in float32. A non-finite result (overflow
    inside the backward) is retried with a smaller scale. Powers of two make the scaling
    itself exact; the scale is a tensor, so choosing it does not wait for the device.

    Returns:
        The gradient (float32) and the loss scale used (a 0-d tensor).

    Raises:
        InversionError: the UNet's output is not finite, or the backward overflows even at
            the smallest scale tried.
    """
    (upstream,) = torch.autograd.grad(loss, [output], retain_graph=True)
    peak = upstream.abs().amax()
    exponent = LOSS_SCALE_EXPONENT - torch.ceil(torch.log2(peak))
    exponent = torch.where(peak > 0, exponent, torch.zeros_like(exponent))
    for attempt in range(LOSS_SCALE_RETRIES + 1):
        scale = torch.exp2(exponent)
        last = attempt == LOSS_SCALE_RETRIES
        (grad,) = torch.autograd.grad(
            output, [leaf], grad_outputs=upstream * scale, retain_graph=not last
        )
        if bool(torch.isfinite(grad).all()):
            return grad / scale, scale
        if not bool(torch.isfinite(peak)):
            raise InversionError(
                "null-text: the float16 UNet's output is not finite; use unet_precision "
                "bfloat16 or float32"
            )
        exponent = exponent - LOSS_SCALE_BACKOFF
    raise InversionError(
        "null-text: the float16 backward overflows even with a loss scale of "
        f"{float(scale):g}; use unet_precision bfloat16 or float32"
    )


def _null_text(job: InversionJob, options: NullTextOptions) -> MethodOutput:
    unet, math, latents = job.unet, job.math, job.latents
    scheduler = math.scheduler
    guidance = job.guidance
    total = job.num_steps
    z_bar = latents[-1]
    uncond = job.null.detach().clone()
    embeddings: list[torch.Tensor] = []
    steps: list[dict[str, Any]] = []
    guided = guidance > 1.0  # the editing loop ignores the unconditional text otherwise
    for i, t in enumerate(scheduler.timesteps):
        target = latents[total - i - 1]
        threshold = options.early_stop_epsilon + i * 2e-5
        inner, loss_item = 0, float("nan")
        out_cond: torch.Tensor | None = None
        uncond = uncond.detach().clone().requires_grad_(True)
        if guided and options.num_inner_steps > 0:
            optimizer = torch.optim.Adam([uncond], lr=null_text_learning_rate(i))
            if not options.batch_cond:
                with torch.no_grad():
                    out_cond = unet(z_bar, t, job.cond)
            for j in range(options.num_inner_steps):
                with torch.enable_grad():
                    if out_cond is None:  # batch_cond: first pass also gives eps_c
                        both = unet(torch.cat([z_bar, z_bar]), t, torch.cat([uncond, job.cond]))
                        out_uncond, out_cond = both[:1], both[1:].detach()
                    else:
                        out_uncond = unet(z_bar, t, uncond)
                    eps_uncond = math.to_epsilon(out_uncond, z_bar, t)
                    eps_cond = math.to_epsilon(out_cond, z_bar, t)
                    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                    reconstruction = math.prev_step(eps, t, z_bar)
                    loss = F.mse_loss(reconstruction, target)
                    if options.unet_precision == "float16":
                        grad, _ = scaled_gradient(loss, out_uncond, uncond)
                    else:
                        (grad,) = torch.autograd.grad(loss, [uncond])
                optimizer.zero_grad(set_to_none=True)
                uncond.grad = grad
                optimizer.step()
                loss_item = loss.item()
                inner = j + 1
                if loss_item < threshold:
                    break
        uncond = uncond.detach()
        embeddings.append(uncond.clone())
        with torch.no_grad():
            if options.reuse_cond and out_cond is not None:
                out_u = unet(z_bar, t, uncond)
                out_c = out_cond
            else:
                both = unet(torch.cat([z_bar, z_bar]), t, torch.cat([uncond, job.cond]))
                out_u, out_c = both.chunk(2)
            noise = out_u + guidance * (out_c - out_u)
            z_bar = scheduler.step(noise, t, z_bar, return_dict=False)[0]
        final_loss = loss_item if not pymath.isnan(loss_item) else None
        steps.append({"inner_steps": inner, "loss": final_loss})
        job.report(i + 1, {"phase": "null-text", "loss": final_loss, "inner_steps": inner})
    return MethodOutput(uncond_embeddings=torch.cat(embeddings), steps=steps)


@dataclass(frozen=True)
class Method:
    """One inversion method: its name, options dataclass and function."""

    name: str
    options: type
    run: Callable[[InversionJob, Any], MethodOutput]
    #: progress units per diffusion step after the DDIM inversion (0 or 1)
    extra_phase: bool = False


METHODS: dict[str, Method] = {
    "null-text": Method("null-text", NullTextOptions, _null_text, extra_phase=True),
    "negative-prompt": Method("negative-prompt", NoOptions, _negative_prompt),
    "direct": Method("direct", NoOptions, _direct),
    "ddim": Method("ddim", NoOptions, _ddim),
}


def resolve_options(options: Any, model: Any) -> Any:
    """``options`` (a method's options dataclass) with what depends on the model decided:
    ``unet_precision="auto"`` becomes the precision it means for ``model``."""
    if getattr(options, "unet_precision", None) == "auto":
        precision = resolve_precision("auto", model)
        return dataclasses.replace(options, unet_precision=precision)
    return options


def method_options(method: str, options: dict[str, Any]) -> Any:
    """The checked options dataclass of ``method``.

    Raises:
        OptionError: unknown method, unknown option or bad value (naming the method).
    """
    if method not in METHODS:
        raise OptionError(
            "inversion", "method", f"unknown method {method!r}; choose from {list(METHODS)}"
        )
    cls = METHODS[method].options
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in options:
        if key not in known:
            listed = ", ".join(known) or "none"
            raise OptionError(method, key, f"unknown option; {method} accepts: {listed}")
    for key, value in options.items():
        default = known[key].default
        choices = known[key].metadata.get("choices")
        if choices is not None:
            if value not in choices:
                listed = ", ".join(choices)
                raise OptionError(method, key, f"must be one of {listed}, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise OptionError(method, key, f"must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OptionError(method, key, f"must be a non-negative integer, got {value!r}")
        elif isinstance(default, float):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or pymath.isnan(value)
            ):
                raise OptionError(method, key, f"must be a number, got {value!r}")
            options = {**options, key: float(value)}
    return cls(**options)
