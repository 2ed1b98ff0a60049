"""The algorithms behind the built-in invertible sources (``plugins/inversion_sources.py``).

Every built-in method starts from the same DDIM inversion (``z_0 .. z_T``, conditional prompt
only: :meth:`~p2p_framework.inversion.InversionContext.ddim_inversion`). What a method adds is
what each editing step needs to bring the source row back to the photo:

- ``ddim``: nothing (the plain baseline: unconditional text ``""``).
- ``null-text``: one optimised unconditional embedding per step (Mokady et al. 2023):
  :func:`null_text_optimisation`.
- ``negative-prompt``: the source prompt's own embedding as the unconditional one at every
  step, no optimisation (Miyake et al. 2023).
- ``direct``: the inversion latents themselves, which the source row follows during the
  edit (Ju et al. 2024, "PnP Inversion").
"""

from __future__ import annotations

import math as pymath
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import InversionError

if TYPE_CHECKING:
    from .source import InversionContext


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


def null_text_optimisation(
    ctx: InversionContext,
    latents: list[torch.Tensor],
    *,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    reuse_cond: bool = False,
    batch_cond: bool = False,
    unet_precision: str = "float32",
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Null-text optimisation (Mokady et al. 2023) along the DDIM inversion ``latents``.

    For each denoising step ``i`` (timestep descending) the unconditional embedding, warm-
    started from the previous step's (from ``""`` at the first), is optimised by Adam
    (:func:`null_text_learning_rate`) for at most ``num_inner_steps`` steps on the MSE between
    the guided DDIM step from the reconstruction so far and ``z_{T-1-i}``, stopping early
    once the loss is below ``early_stop_epsilon + i * 2e-5``; the reconstruction then
    advances with it. Progress: ``ctx.report(num_steps + i + 1, {"phase": "null-text",
    "loss", "inner_steps"})``.

    Args:
        ctx: the inversion's context.
        latents: ``z_0 .. z_T`` from :meth:`InversionContext.ddim_inversion`.
        num_inner_steps, early_stop_epsilon, reuse_cond, batch_cond: see ``NullTextSource``.
        unet_precision: the resolved precision the UNet runs in (``float16`` back-propagates
            with a loss scale: :func:`scaled_gradient`).

    Returns:
        ``(T, tokens, dim)`` embeddings and per-step ``{"inner_steps", "loss"}``.
    """
    unet, math = ctx.unet, ctx.math
    scheduler = ctx.scheduler
    guidance = ctx.guidance
    total = ctx.num_steps
    z_bar = latents[-1]
    uncond = ctx.null.detach().clone()
    embeddings: list[torch.Tensor] = []
    steps: list[dict[str, Any]] = []
    guided = guidance > 1.0  # the editing loop ignores the unconditional text otherwise
    for i, t in enumerate(scheduler.timesteps):
        target = latents[total - i - 1]
        threshold = early_stop_epsilon + i * 2e-5
        inner, loss_item = 0, float("nan")
        out_cond: torch.Tensor | None = None
        uncond = uncond.detach().clone().requires_grad_(True)
        if guided and num_inner_steps > 0:
            optimizer = torch.optim.Adam([uncond], lr=null_text_learning_rate(i))
            if not batch_cond:
                with torch.no_grad():
                    out_cond = unet(z_bar, t, ctx.cond)
            for j in range(num_inner_steps):
                with torch.enable_grad():
                    if out_cond is None:  # batch_cond: first pass also gives eps_c
                        both = unet(torch.cat([z_bar, z_bar]), t, torch.cat([uncond, ctx.cond]))
                        out_uncond, out_cond = both[:1], both[1:].detach()
                    else:
                        out_uncond = unet(z_bar, t, uncond)
                    eps_uncond = math.to_epsilon(out_uncond, z_bar, t)
                    eps_cond = math.to_epsilon(out_cond, z_bar, t)
                    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                    reconstruction = math.prev_step(eps, t, z_bar)
                    loss = F.mse_loss(reconstruction, target)
                    if unet_precision == "float16":
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
            if reuse_cond and out_cond is not None:
                out_u = unet(z_bar, t, uncond)
                out_c = out_cond
            else:
                both = unet(torch.cat([z_bar, z_bar]), t, torch.cat([uncond, ctx.cond]))
                out_u, out_c = both.chunk(2)
            noise = out_u + guidance * (out_c - out_u)
            z_bar = scheduler.step(noise, t, z_bar, return_dict=False)[0]
        final_loss = loss_item if not pymath.isnan(loss_item) else None
        steps.append({"inner_steps": inner, "loss": final_loss})
        ctx.report(total + i + 1, {"phase": "null-text", "loss": final_loss, "inner_steps": inner})
    return torch.cat(embeddings), steps
