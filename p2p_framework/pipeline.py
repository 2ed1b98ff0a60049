"""The denoising loop that runs a source, edits and the attention controller together.

:func:`run_edit` is the Python API behind ``p2p-run edit`` and ``p2p-run generate``: the
source gives the starting latent, the edits are composed into one
:class:`~p2p_framework.attention.AttentionController`, and the loop tells the controller the
step index and the conditional rows before every UNet call.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .attention import AttentionController
from .edit import Edit, RunContext
from .errors import OptionError, PromptError
from .model import StableDiffusionModel
from .schedules import Bounds, CrossReplaceSteps, cross_replace_table, self_replace_window
from .source import Source, SourceRequest, SourceStart
from .store import AttentionStore

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


@dataclass
class EditSettings:
    """Settings of one run. Defaults are the published Prompt-to-Prompt ones.

    Attributes:
        steps: diffusion steps (50).
        guidance: classifier-free guidance scale (7.5); 1 or less turns guidance off.
        height, width: image size in pixels; None means the model's own size.
        cross_replace_steps: when cross-attention is injected: a fraction ``s`` of the steps
            (``(0, s)``), a pair ``(a, b)``, or a per-word dict such as
            ``{"default_": 0.8, "lion": 0.4}`` (0.8).
        self_replace_steps: fraction or pair of steps in which targets take the source's
            self-attention (0.4).
        self_replace_min_downscale: self-attention is replaced only in layers whose grid is
            the latent grid divided by at least this: 4 means the 16x16 layers of SD 1.x at
            512 px (the paper); 2 also takes the 32x32 ones (the null-text notebook).
        scheduler: ``ddim`` (default, as in the papers) or another name of
            :data:`p2p_framework.model.SCHEDULERS`.
        attention_maps: keep per-token cross-attention maps for :func:`attention_image`.
        attention_downscale: resolution of those maps, relative to the latent (4: 16x16 at
            512 px SD 1.x).
        separate_uncond_pass: run the unconditional and conditional halves as two UNet calls
            (less memory, same result).
    """

    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    cross_replace_steps: CrossReplaceSteps = 0.8
    self_replace_steps: Bounds = 0.4
    self_replace_min_downscale: int = 4
    scheduler: str = "ddim"
    attention_maps: bool = False
    attention_downscale: int = 4
    separate_uncond_pass: bool = False

    def check(self) -> None:
        """Raise :class:`OptionError` for values no run can use."""
        if not isinstance(self.steps, int) or self.steps < 1:
            raise OptionError(
                "pipeline", "steps", f"must be a positive integer, got {self.steps!r}"
            )
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise OptionError("pipeline", "guidance", f"must be >= 0, got {self.guidance!r}")
        for option in ("self_replace_min_downscale", "attention_downscale"):
            value = getattr(self, option)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise OptionError("pipeline", option, f"must be a power of two, got {value!r}")


@dataclass
class EditResult:
    """What a run produced.

    Attributes:
        prompts: source prompt, then targets.
        images: one PIL image per prompt (the source first).
        latents: ``(prompts, channels, height, width)`` final latents.
        attention_store: the maps that were tracked.
        settings: the settings used (sizes filled in).
        edits, source: the plugin objects used.
        source_info: what the source reported (seed, inversion statistics...).
        timings: seconds spent in ``source``, ``denoise`` and ``decode``.
    """

    prompts: list[str]
    images: list[Image.Image]
    latents: torch.Tensor
    attention_store: AttentionStore
    settings: EditSettings
    edits: list[Edit]
    source: Source
    source_info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from ``(batch, 3, H, W)`` floats in [0, 1], rounded as diffusers does."""
    array = images.detach().permute(0, 2, 3, 1).cpu().float().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"prompt {i} is empty")
    return prompts


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {"generator": generator} if "generator" in accepted else {}


def run_edit(
    model: StableDiffusionModel,
    prompts: Sequence[str],
    edits: Sequence[Edit] = (),
    *,
    source: Source | None = None,
    settings: EditSettings | None = None,
    progress: ProgressCallback | None = None,
) -> EditResult:
    """Generate the source prompt's image and its edits in one batch.

    Args:
        model: from :func:`p2p_framework.load_model`.
        prompts: source prompt first, then target prompts (one image each).
        edits: edit plugin objects, applied in order (e.g. refine then reweight).
        source: where the starting latent comes from; default ``Seed()`` (seed 8888).
        settings: run settings; default :class:`EditSettings`.
        progress: called as ``progress(done, total, info)``: by the source during its own
            work (``info["phase"] == "source"``, e.g. an inversion, with its ``loss``), then
            after each denoising step (``info["phase"] == "denoise"``).

    Returns:
        An :class:`EditResult`; ``images[0]`` is the source, ``images[i]`` target ``i``.
    """
    from .plugins.seed import Seed

    prompts = _check_prompts(prompts)
    settings = settings or EditSettings()
    settings.check()
    source = source if source is not None else Seed()
    edits = list(edits)
    height = settings.height or model.default_size
    width = settings.width or model.default_size
    latent_size = model.latent_size(height, width)
    settings = EditSettings(**{**settings.__dict__, "height": height, "width": width})
    device = model.device
    steps = settings.steps

    scheduler = model.make_scheduler(settings.scheduler)
    scheduler.set_timesteps(steps, device=device)
    store = AttentionStore()
    if settings.attention_maps:
        store.track(downscale=settings.attention_downscale, cross=True)
    run = RunContext(prompts, model.tokenizer, steps, latent_size, store, device)
    for edit in edits:
        edit.setup(run)

    injecting = len(prompts) > 1 and any(edit.injects_cross_attention for edit in edits)
    cross_table = (
        cross_replace_table(settings.cross_replace_steps, prompts, steps, model.tokenizer)
        if injecting
        else None
    )
    self_window = self_replace_window(settings.self_replace_steps, steps)
    controller = AttentionController(
        edits,
        store=store,
        cross_table=cross_table,
        self_window=self_window,
        self_replace_min_downscale=settings.self_replace_min_downscale,
        latent_size=latent_size,
    ).to(device)

    timings: dict[str, float] = {}
    began = time.perf_counter()
    source_progress = None
    if progress is not None:

        def source_progress(done: int, total: int, info: dict[str, Any]) -> None:
            progress(done, total, {**info, "phase": "source"})

    start: SourceStart = source.prepare(
        SourceRequest(
            model, scheduler, prompts, steps, settings.guidance, height, width, source_progress
        )
    )
    timings["source"] = time.perf_counter() - began

    began = time.perf_counter()
    latents = _denoise(model, scheduler, prompts, start, edits, controller, run, settings, progress)
    timings["denoise"] = time.perf_counter() - began

    began = time.perf_counter()
    images = to_pil(model.decode(latents))
    timings["decode"] = time.perf_counter() - began
    return EditResult(
        prompts, images, latents, store, settings, edits, source, dict(start.info), timings
    )


@torch.no_grad()
def _denoise(
    model: StableDiffusionModel,
    scheduler: Any,
    prompts: list[str],
    start: SourceStart,
    edits: list[Edit],
    controller: AttentionController,
    run: RunContext,
    settings: EditSettings,
    progress: ProgressCallback | None,
) -> torch.Tensor:
    batch = len(prompts)
    guided = settings.guidance > 1.0
    cond = model.encode_text(prompts)
    empty = model.encode_text([""]) if guided else None
    latents = start.latent.to(device=model.device, dtype=model.dtype).expand(batch, -1, -1, -1)
    latents = latents.clone()
    step_kwargs = _step_kwargs(scheduler, torch.Generator("cpu").manual_seed(0))
    timesteps = scheduler.timesteps
    with controller.installed(model.unet):
        for step, t in enumerate(timesteps):
            if guided:
                null = empty if start.uncond_embeddings is None else start.uncond_embeddings[step]
                uncond = null.to(device=model.device, dtype=model.dtype).expand(batch, -1, -1)
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                if settings.separate_uncond_pass:
                    controller.begin_call(step, None)
                    out_uncond = model.predict(model_input[:batch], t, uncond)
                    controller.begin_call(step, slice(0, batch))
                    out_cond = model.predict(model_input[batch:], t, cond)
                else:
                    controller.begin_call(step, slice(batch, 2 * batch))
                    out = model.predict(model_input, t, torch.cat([uncond, cond]))
                    out_uncond, out_cond = out.chunk(2)
                noise = out_uncond + settings.guidance * (out_cond - out_uncond)
            else:
                controller.begin_call(step, slice(0, batch))
                noise = model.predict(scheduler.scale_model_input(latents, t), t, cond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if start.source_latents is not None:
                latents[:1] = start.source_latents[step].to(latents)
            for edit in edits:
                latents = edit.after_step(latents, step, run)
            if progress is not None:
                progress(step + 1, len(timesteps), {"phase": "denoise"})
    return latents
