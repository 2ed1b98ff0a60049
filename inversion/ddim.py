"""DDIM arithmetic shared by the inversion methods, as the null-text paper's code does it.

The scheduler is diffusers' :class:`~diffusers.DDIMScheduler` with the papers' settings
(``clip_sample=False``, ``set_alpha_to_one=False``); a step at timestep ``t`` goes between
``t`` and ``t - num_train_timesteps // num_steps``, where a negative timestep means the
scheduler's ``final_alpha_cumprod``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from p2p_framework.model import StableDiffusionModel

from .errors import InversionError

#: Scheduler config keys that decide the DDIM trajectory (what an inversion must match).
SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "clip_sample",
    "set_alpha_to_one",
    "steps_offset",
    "prediction_type",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def scheduler_signature(scheduler: Any) -> dict[str, Any]:
    """The class name and the trajectory-deciding config values of a scheduler (JSON-ready)."""
    config = scheduler.config
    signature: dict[str, Any] = {"class": type(scheduler).__name__}
    for key in SCHEDULER_KEYS:
        if key in config:
            signature[key] = _plain(config[key])
    return signature


def check_ddim_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler that is not the papers' DDIM (inversion runs DDIM backwards).

    Raises:
        InversionError: another scheduler class, or ``clip_sample`` on.
    """
    import diffusers

    if not isinstance(scheduler, diffusers.DDIMScheduler):
        raise InversionError(
            f"inversion needs the ddim scheduler, the run uses {type(scheduler).__name__}; "
            "choose scheduler ddim"
        )
    if scheduler.config.get("clip_sample", False):
        raise InversionError("inversion needs a DDIM scheduler with clip_sample=False")


def fresh_scheduler(model: StableDiffusionModel, scheduler: Any, num_steps: int) -> Any:
    """A private copy of ``scheduler`` (default: ``model.make_scheduler("ddim")``), set to
    ``num_steps`` on the model's device."""
    if scheduler is None:
        scheduler = model.make_scheduler("ddim")
    check_ddim_scheduler(scheduler)
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(num_steps, device=model.device)
    return copy


#: ``unet_precision`` values: the dtype the UNet's forward and backward run in.
PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_precision(precision: str, model: StableDiffusionModel) -> str:
    """``auto``: ``float16`` for a UNet loaded in float16 (the GPU default), else
    ``float32``; any other value as it is.

    Measured on the demo model (docs/benchmarks.md), a float16-loaded UNet run natively
    reconstructs as well as the float32 reference (+0.03 dB on average, -0.01 to +0.06 dB per
    photo); a bfloat16-loaded one run natively does not (-0.46 to +0.25 dB per photo), so
    ``auto`` casts it up as before.
    """
    if precision != "auto":
        return precision
    return "float16" if model.unet.dtype == torch.float16 else "float32"


def _refuse_quantised(unet: Any) -> None:
    if getattr(unet, "is_quantized", False) or getattr(unet, "hf_quantizer", None) is not None:
        raise InversionError(
            "inversion runs the UNet in float32 or a half precision and cannot cast a "
            "quantised UNet; load the model unquantised"
        )


@contextmanager
def float32_unet(model: StableDiffusionModel):
    """Run the UNet in float32 inside the block (the reference behaviour: null-text
    optimisation in plain float16 loses its tiny gradients); a float16 or bfloat16 UNet is
    cast up and back, which is lossless.

    Raises:
        InversionError: a quantised UNet, which cannot be cast.
    """
    unet = model.unet
    original = unet.dtype
    if original == torch.float32:
        yield
        return
    _refuse_quantised(unet)
    # torch's own Module.to: diffusers' override warns about casting on every call.
    torch.nn.Module.to(unet, torch.float32)
    try:
        yield
    finally:
        torch.nn.Module.to(unet, original)


@contextmanager
def unet_precision(model: StableDiffusionModel, precision: str = "float32") -> Iterator[Any]:
    """Prepare the UNet to run its forward and backward in ``precision`` inside the block.

    Yields the dtype :class:`UNetCounter` must autocast its UNet calls to, or None:

    - ``float32``: :func:`float32_unet` (a half UNet is cast up and back); None.
    - ``bfloat16`` / ``float16``: a UNet already in that dtype runs as it is (None; no
      cast: the saving on a GPU, where models load in half precision); a float32 UNet runs
      under ``torch.autocast`` to that dtype (its weights are not touched); a UNet in the
      other half dtype is cast up to float32 (lossless) and runs under autocast.

    Only the UNet calls are autocast (the VAE and the text encoder are not), and
    :class:`UNetCounter` hands back float32 outputs, so the DDIM arithmetic, the loss and
    the optimiser stay float32.

    Raises:
        InversionError: an unknown precision, or a quantised UNet.
    """
    if precision not in PRECISIONS:
        raise InversionError(
            f"unknown unet_precision {precision!r}; choose from {list(PRECISIONS)}"
        )
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        with float32_unet(model):
            yield None
        return
    unet = model.unet
    _refuse_quantised(unet)
    if unet.dtype == dtype:
        yield None
        return
    with float32_unet(model):
        yield dtype


@dataclass
class UNetCounter:
    """Calls the model's UNet and counts latent rows through it.

    Inputs are cast to the UNet's dtype (a no-op for the float32 reference); outputs are
    float32 whatever the UNet computed in. With ``autocast`` set (see
    :func:`unet_precision`) each call runs under ``torch.autocast`` to that dtype; the
    backward then runs in the dtypes the forward chose.

    Attributes:
        forward_rows: latents evaluated (a batch of 2 counts 2).
        backward_rows: latents back-propagated through.
        calls: UNet calls.
    """

    model: StableDiffusionModel
    autocast: torch.dtype | None = None
    forward_rows: int = 0
    backward_rows: int = 0
    calls: int = 0

    def __call__(self, latents: torch.Tensor, t: Any, context: torch.Tensor) -> torch.Tensor:
        """The raw model output (noise or v), float32."""
        self.calls += 1
        self.forward_rows += latents.shape[0]
        if torch.is_grad_enabled() and context.requires_grad:
            self.backward_rows += latents.shape[0]
        dtype = self.model.unet.dtype
        latents, context = latents.to(dtype), context.to(dtype)
        if self.autocast is None:
            return self.model.predict(latents, t, context).float()
        with torch.autocast(self.model.device.type, dtype=self.autocast):
            return self.model.predict(latents, t, context).float()


class DDIMMath:
    """The DDIM step formulas for one scheduler with ``set_timesteps`` called."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.final_alpha = torch.as_tensor(scheduler.final_alpha_cumprod).float()
        self.ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        #: the last training timestep (999 for SD), the cap of an inversion step's level
        self.last_timestep = scheduler.config.num_train_timesteps - 1

    def alpha(self, timestep: int) -> torch.Tensor:
        """``alphas_cumprod[timestep]``, or the final alpha for a negative timestep."""
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha

    def to_epsilon(self, output: torch.Tensor, sample: torch.Tensor, t: Any) -> torch.Tensor:
        """Noise from the model's raw output at timestep ``t`` (v and x0 are converted)."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alpha(int(t)).to(output.device)
        if self.prediction_type == "v_prediction":
            return a**0.5 * output + (1 - a) ** 0.5 * sample
        if self.prediction_type == "sample":
            return (sample - a**0.5 * output) / (1 - a) ** 0.5
        raise InversionError(f"unsupported prediction_type {self.prediction_type!r}")

    def next_step(self, eps: torch.Tensor, t: Any, sample: torch.Tensor) -> torch.Tensor:
        """One inversion step: from level ``t - ratio`` up to level ``t`` (paper's
        ``next_step``)."""
        t_next = int(t)
        t_cur = min(t_next - self.ratio, self.last_timestep)
        a_cur = self.alpha(t_cur).to(sample.device)
        a_next = self.alpha(t_next).to(sample.device)
        x0 = (sample - (1 - a_cur) ** 0.5 * eps) / a_cur**0.5
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps

    def prev_step(self, eps: torch.Tensor, t: Any, sample: torch.Tensor) -> torch.Tensor:
        """One differentiable DDIM denoising step (eta 0) from ``t`` to ``t - ratio``
        (paper's ``prev_step``)."""
        t_cur = int(t)
        a_t = self.alpha(t_cur).to(sample.device)
        a_prev = self.alpha(t_cur - self.ratio).to(sample.device)
        x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


ProgressFn = Callable[[int, dict[str, Any]], None]


@torch.no_grad()
def ddim_inversion(
    unet: UNetCounter,
    math: DDIMMath,
    latent: torch.Tensor,
    cond: torch.Tensor,
    report: ProgressFn | None = None,
) -> list[torch.Tensor]:
    """DDIM inversion with the conditional prompt only (no guidance).

    Returns:
        The ``T + 1`` latents ``z_0 .. z_T`` (``z_0`` is ``latent``), float32.
    """
    latents = [latent]
    z = latent
    ascending = math.scheduler.timesteps.flip(0)
    for i, t in enumerate(ascending):
        eps = math.to_epsilon(unet(z, t, cond), z, t)
        z = math.next_step(eps, t, z)
        latents.append(z)
        if report is not None:
            report(i + 1, {"phase": "ddim-inversion"})
    return latents
