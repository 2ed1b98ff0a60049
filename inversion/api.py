"""``invert``: one call shape for every inversion method."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from p2p_framework.errors import OptionError
from p2p_framework.model import StableDiffusionModel

from .ddim import (
    DDIMMath,
    UNetCounter,
    ddim_inversion,
    fresh_scheduler,
    scheduler_signature,
    unet_precision,
)
from .images import ImageInput, image_hash, image_to_tensor, parse_crop, prepare_image
from .methods import METHODS, InversionJob, method_options, resolve_options
from .result import Inversion

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


def _check_settings(num_steps: Any, guidance: Any) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise OptionError(
            "inversion", "num_steps", f"must be a positive integer, got {num_steps!r}"
        )
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not guidance >= 0
        or guidance == float("inf")
    ):
        raise OptionError("inversion", "guidance", f"must be a number >= 0, got {guidance!r}")


def invert(
    model: StableDiffusionModel,
    image: ImageInput | torch.Tensor,
    prompt: str,
    method: str = "null-text",
    *,
    num_steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    crop: Sequence[int] | str | None = None,
    scheduler: Any = None,
    progress: ProgressCallback | None = None,
    **method_options_: Any,
) -> Inversion:
    """Invert a real photo for editing with the source prompt ``prompt``.

    Args:
        model: from :func:`p2p_framework.load_model`.
        image: a path, a PIL image (prepared with :func:`prepare_image`: EXIF orientation,
            RGB, ``crop``, centre crop and resize) or an already prepared ``(1, 3, H, W)``
            tensor in [0, 1] of the run's size.
        prompt: the source prompt (the photo's description).
        method: ``null-text`` (default), ``negative-prompt``, ``direct`` or ``ddim``.
        num_steps, guidance: the DDIM steps and guidance scale of the edits to come.
        height, width: image size in pixels; default the model's own size.
        crop: ``(left, right, top, bottom)`` pixels to cut off the photo first.
        scheduler: a DDIM scheduler whose config to use; default
            ``model.make_scheduler("ddim")``. It is not modified.
        progress: ``progress(done, total, info)`` after each step; ``done`` counts on
            through both stages (``total`` is ``2 * num_steps`` for null-text); ``info``
            has ``phase`` (``ddim-inversion`` or ``null-text``) and, during null-text
            optimisation, ``loss`` and ``inner_steps``.
        **method_options_: the method's options; ``null-text``: ``num_inner_steps`` (10),
            ``early_stop_epsilon`` (1e-5), ``reuse_cond`` (False), ``batch_cond`` (False),
            ``unet_precision`` (``auto``: float16 for a model loaded in float16, else float32;
            recorded resolved).

    Returns:
        The :class:`Inversion` (float32 tensors on the CPU).

    Raises:
        OptionError: unknown method or option, bad value.
        ImageError: unreadable, truncated or too small an image, bad crop.
        InversionError: a scheduler other than DDIM.
    """
    began = time.perf_counter()
    options = method_options(method, method_options_)
    _check_settings(num_steps, guidance)
    if not isinstance(prompt, str) or not prompt.strip():
        raise OptionError("inversion", "prompt", "the source prompt must not be empty")
    height = height or model.default_size
    width = width or model.default_size
    model.latent_size(height, width)  # checks divisibility
    crop_offsets = parse_crop(crop)

    if isinstance(image, torch.Tensor):
        if tuple(image.shape) != (1, 3, height, width):
            raise OptionError(
                "inversion",
                "image",
                f"an image tensor must be (1, 3, {height}, {width}), got {tuple(image.shape)}",
            )
        pixels = image.detach().float().clamp(0, 1)
        digest = image_hash(pixels)
    else:
        prepared = prepare_image(image, height, width, crop_offsets)
        pixels = image_to_tensor(prepared)
        digest = image_hash(prepared)

    ddim = fresh_scheduler(model, scheduler, num_steps)
    entry = METHODS[method]
    total = num_steps * (2 if entry.extra_phase else 1)

    def reporter(offset: int) -> Callable[[int, dict[str, Any]], None]:
        def report(done: int, info: dict[str, Any]) -> None:
            if progress is not None:
                progress(offset + done, total, info)

        return report

    math = DDIMMath(ddim)
    options = resolve_options(options, model)
    precision = getattr(options, "unet_precision", "float32")
    # Both stages (DDIM inversion, then the method's) run the UNet in one precision.
    with unet_precision(model, precision) as autocast:
        unet = UNetCounter(model, autocast)
        z0 = model.encode_image(pixels).float()
        cond = model.encode_text([prompt]).float()
        null = model.encode_text([""]).float()
        latents = ddim_inversion(unet, math, z0, cond, reporter(0))
        job = InversionJob(unet, math, latents, cond, null, float(guidance), reporter(num_steps))
        output = entry.run(job, options)

    def cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to("cpu", torch.float32).contiguous()

    return Inversion(
        method=method,
        prompt=prompt,
        latent=cpu(latents[-1]),  # type: ignore[arg-type]
        image_latent=cpu(z0),  # type: ignore[arg-type]
        num_steps=num_steps,
        guidance=float(guidance),
        height=height,
        width=width,
        model_identity=dict(model.identity),
        scheduler_config=scheduler_signature(ddim),
        options=dataclasses.asdict(options),
        uncond_embeddings=cpu(output.uncond_embeddings),
        source_latents=cpu(output.source_latents),
        steps=output.steps,
        stats={
            "seconds": round(time.perf_counter() - began, 4),
            "unet_calls": unet.calls,
            "unet_forward_rows": unet.forward_rows,
            "unet_backward_rows": unet.backward_rows,
            "device": str(model.device),
        },
        image_hash=digest,
        crop=crop_offsets,
    )
