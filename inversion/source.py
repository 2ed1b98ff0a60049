"""The invertible-source base class: every inversion method is a source plugin.

An inversion method is a dataclass subclassing :class:`InvertingSource` (its fields beyond
the common ``image``, ``inversion``, ``crop``, ``cache`` and ``cache_dir`` are the method's
options), registered with the ``register_sources`` hook like any source, built-in or
third-party. It implements one method, :meth:`InvertingSource.invert_latents`, which gets an
:class:`InversionContext` (model, scheduler, prompt, encoded photo, text embeddings, guidance,
a UNet caller, progress, the standard DDIM inversion) and returns an :class:`InversionOutput`
(final latent ``z_T`` plus optional per-step unconditional embeddings or source latents).

The base class does the rest, the same for every method: the photo's preparation, the
``.p2pinv`` file (:class:`~p2p_framework.inversion.Inversion`), the inversion cache, the
checks that a saved inversion fits the run, and the :class:`~p2p_framework.StepGuide` the
denoising loop follows. ``p2p-run invert --method NAME`` and
:func:`~p2p_framework.inversion.invert` work for every registered subclass.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BeforeValidator, Field

from p2p_framework.errors import OptionError, P2PWarning
from p2p_framework.model import StableDiffusionModel
from p2p_framework.source import (
    Source,
    SourceLatentGuide,
    SourceRequest,
    SourceStart,
    StepGuide,
    UncondEmbeddingGuide,
)

from .cache import InversionCache, cache_key
from .ddim import (
    DDIMMath,
    UNetCounter,
    check_ddim_scheduler,
    ddim_inversion,
    fresh_scheduler,
    scheduler_signature,
    unet_precision,
)
from .errors import InversionError
from .images import ImageInput, image_hash, image_to_tensor, parse_crop, prepare_image
from .result import Inversion

ProgressCallback = Callable[[int, int, dict[str, Any]], None]

#: A photo whose VAE round trip is below this PSNR (dB) gets a warning: the model cannot
#: represent it, so no inversion can bring it back (SD's VAE gives about 25-30 dB on photos,
#: the demo model's 35 dB on its own scenes and 12-13 dB on photos).
VAE_WARN_PSNR = 20.0


def vae_round_trip_psnr(
    model: StableDiffusionModel, pixels: torch.Tensor, latent: torch.Tensor
) -> float:
    """PSNR in dB of the VAE's reconstruction of ``pixels`` (``(1, 3, H, W)`` in [0, 1])
    from its encoding ``latent``: the best any inversion of the photo can reach."""
    decoded = model.decode(latent.to(model.dtype)).float().cpu()
    mse = float(torch.mean((decoded - pixels.float().cpu()) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _warn_if_unrepresentable(model: StableDiffusionModel, psnr: float) -> None:
    if psnr >= VAE_WARN_PSNR:
        return
    from p2p_framework.preflight import is_demo_model

    hint = (
        "; the demo model knows only 64 px scenes of coloured shapes (docs/demo-model.md): "
        "use real weights (--model) for photos"
        if is_demo_model(str(model.identity.get("model", "")))
        else ""
    )
    warnings.warn(
        P2PWarning(
            f"the model's VAE reproduces this photo at {psnr:.1f} dB (under "
            f"{VAE_WARN_PSNR:.0f} dB): it cannot represent photos like it, so the inversion "
            f"and its edits will look like that reconstruction, not like the photo{hint}"
        ),
        stacklevel=3,
    )


#: The options every invertible source has (the others are its method's options).
COMMON_OPTIONS = ("image", "inversion", "crop", "cache", "cache_dir")


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PathText = Annotated[str, BeforeValidator(_fspath)]
Offset = Annotated[int, Field(ge=0)]


@dataclass
class InversionContext:
    """What an inversion method works with (tensors float32, on the model's device).

    Attributes:
        model: the loaded model adapter.
        scheduler: a private DDIM scheduler with ``set_timesteps(num_steps)`` done; its
            ``timesteps`` run from the noisiest down (the denoising order).
        math: the DDIM step formulas of that scheduler (``next_step`` goes up one level,
            ``prev_step`` down one, ``to_epsilon`` converts a raw UNet output to noise).
        prompt: the source prompt.
        image_latent: ``(1, C, h, w)`` the encoded photo ``z_0``.
        cond: ``(1, tokens, dim)`` embedding of the source prompt.
        null: ``(1, tokens, dim)`` embedding of ``""``.
        guidance: classifier-free guidance scale of the edits to come.
        num_steps: diffusion steps ``T``.
        unet: ``unet(latents, t, embeddings) -> raw output`` (float32), running the UNet in
            the source's :meth:`InvertingSource.inversion_precision` and counting rows.
        total: progress units of the whole inversion (``num_steps *
            InvertingSource.progress_phases``).
        progress: the caller's ``progress(done, total, info)``, or None.
    """

    model: StableDiffusionModel
    scheduler: Any
    math: DDIMMath
    prompt: str
    image_latent: torch.Tensor
    cond: torch.Tensor
    null: torch.Tensor
    guidance: float
    num_steps: int
    unet: UNetCounter
    total: int
    progress: ProgressCallback | None = None

    def report(self, done: int, info: dict[str, Any]) -> None:
        """Tell the caller ``done`` of :attr:`total` units are done; ``info`` should have a
        ``phase`` (e.g. ``"ddim-inversion"``) and may have statistics such as ``loss``."""
        if self.progress is not None:
            self.progress(done, self.total, info)

    def ddim_inversion(self, *, report_offset: int | None = 0) -> list[torch.Tensor]:
        """The standard DDIM inversion of the photo with the source prompt only (no
        guidance), as in the null-text paper.

        Args:
            report_offset: progress units done before it (it reports ``offset + 1`` ..
                ``offset + num_steps`` with phase ``ddim-inversion``); None: no reports.

        Returns:
            The ``T + 1`` latents ``z_0 .. z_T`` (``z_0`` is :attr:`image_latent`).
        """
        report = None
        if report_offset is not None:
            offset = report_offset

            def report(done: int, info: dict[str, Any]) -> None:
                self.report(offset + done, info)

        return ddim_inversion(self.unet, self.math, self.image_latent, self.cond, report)


@dataclass
class InversionOutput:
    """What an inversion method gives.

    Attributes:
        latent: ``(1, C, h, w)`` the starting latent ``z_T``.
        uncond_embeddings: ``(T, tokens, dim)`` unconditional embedding of each denoising
            step (step 0 first), used for every row; None for ``""``.
        source_latents: ``(T, C, h, w)``: the latent the source row must have after each
            denoising step (``z_{T-1-i}`` after step ``i``), or None.
        steps: per-step statistics (JSON-ready dicts, e.g. ``inner_steps``, ``loss``),
            recorded in the ``.p2pinv`` file and the run record.
    """

    latent: torch.Tensor
    uncond_embeddings: torch.Tensor | None = None
    source_latents: torch.Tensor | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)


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


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float32).contiguous()


@dataclass
class InvertingSource(Source):
    """Base class of the sources that start an edit from a real photo by inverting it.

    Give ``image`` (the photo, inverted with the run's source prompt, steps, guidance and
    size, and cached) or ``inversion`` (a ``.p2pinv`` file made by this source). Subclasses
    are dataclasses whose further fields are the method's options, and implement
    :meth:`invert_latents`.
    """

    # --image, --inversion and --no-cache set these options; a job with --inversion and no
    # --source uses the source the file was made with (its method), looked up in the registry.
    shortcuts = {"image": "image", "inversion": "inversion", "no_cache": "cache"}
    chosen_by = {"inversion": lambda path: Inversion.load(path).method}
    # A job with --inversion and no --prompt edits the prompt the file was inverted with
    # (its embeddings and latents belong to it); another --prompt is refused.
    prompt_from = {"inversion": lambda path: Inversion.load(path).prompt}

    #: progress units per diffusion step of a whole inversion (2 for a method that runs the
    #: DDIM inversion and then a second pass over the steps, as null-text does).
    progress_phases: ClassVar[int] = 1
    #: whether an inversion fits only the guidance scale it was made for (a run at another
    #: guidance is refused); False for methods whose result does not depend on it.
    guidance_specific: ClassVar[bool] = True

    image: PathText | None = field(
        default=None,
        metadata={"help": "photo to invert (path); or give inversion", "path": True},
    )
    inversion: PathText | None = field(
        default=None,
        metadata={"help": "saved .p2pinv file to use instead of an image", "path": True},
    )
    crop: tuple[Offset, Offset, Offset, Offset] | None = field(
        default=None,
        metadata={"help": "pixels cut off the photo's left, right, top, bottom edges first"},
    )
    cache: bool = field(default=True, metadata={"help": "reuse and store cached inversions"})
    cache_dir: PathText | None = field(
        default=None,
        metadata={
            "help": "cache folder (default $XDG_CACHE_HOME/p2p-framework/inversions)",
            "path": True,
        },
    )

    def __post_init__(self) -> None:
        if (self.image is None) == (self.inversion is None):
            raise OptionError(self.name, "image", "give either image or inversion (not both)")

    # -- what a method implements ---------------------------------------------------------
    def invert_latents(self, ctx: InversionContext) -> InversionOutput:
        """Invert the encoded photo ``ctx.image_latent`` (the method itself).

        Runs with gradients off (enable them inside for an optimisation) and the UNet in
        :meth:`inversion_precision`. Report progress with ``ctx.report(done, info)``, up to
        ``ctx.total``.
        """
        raise NotImplementedError

    def inversion_precision(self, model: StableDiffusionModel) -> str:
        """The dtype the UNet runs in during the inversion: ``float32`` (default),
        ``bfloat16`` or ``float16`` (see :func:`~p2p_framework.inversion.ddim.unet_precision`)."""
        return "float32"

    def method_options(self) -> dict[str, Any]:
        """The method's options (every option but :data:`COMMON_OPTIONS`), as set."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and f.name not in COMMON_OPTIONS
        }

    def resolved_options(self, model: StableDiffusionModel) -> dict[str, Any]:
        """The method's options as an inversion records them and the cache keys them, with
        what depends on the model decided (e.g. ``unet_precision="auto"``). Default: as set."""
        return self.method_options()

    def guide(self, inversion: Inversion) -> StepGuide | None:
        """The :class:`~p2p_framework.StepGuide` that makes the denoising loop retrace
        ``inversion`` (its tensors float32, on the run's device). Default: the per-step
        unconditional embeddings if it has them, else its source latents if it has them,
        else None (plain guidance with ``""``)."""
        if inversion.uncond_embeddings is not None:
            return UncondEmbeddingGuide(inversion.uncond_embeddings)
        if inversion.source_latents is not None:
            return SourceLatentGuide(inversion.source_latents)
        return None

    # -- inverting ------------------------------------------------------------------------
    def invert(
        self,
        model: StableDiffusionModel,
        image: ImageInput | torch.Tensor,
        prompt: str,
        *,
        num_steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        scheduler: Any = None,
        progress: ProgressCallback | None = None,
    ) -> Inversion:
        """Invert ``image`` with this source's method and options (``self.image`` and
        ``self.inversion`` are not used; ``self.crop`` is). See
        :func:`p2p_framework.inversion.invert` for the arguments."""
        _check_settings(num_steps, guidance)
        if not isinstance(prompt, str) or not prompt.strip():
            raise OptionError("inversion", "prompt", "the source prompt must not be empty")
        if num_steps > model.max_steps:
            raise OptionError(
                "inversion",
                "num_steps",
                f"must be at most {model.max_steps} (this model's scheduler was trained with "
                f"{model.max_steps} timesteps), got {num_steps}",
            )
        # None means the model's size; 0 is refused by latent_size, not replaced.
        height = model.default_size if height is None else height
        width = model.default_size if width is None else width
        model.latent_size(height, width)  # checks divisibility
        crop = parse_crop(self.crop)
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
            prepared = prepare_image(image, height, width, crop)
            pixels = image_to_tensor(prepared)
            digest = image_hash(prepared)
        return self._invert_pixels(
            model, pixels, digest, prompt, num_steps, guidance, height, width, scheduler, progress
        )

    def _invert_pixels(
        self,
        model: StableDiffusionModel,
        pixels: torch.Tensor,
        digest: str,
        prompt: str,
        num_steps: int,
        guidance: float,
        height: int,
        width: int,
        scheduler: Any,
        progress: ProgressCallback | None,
    ) -> Inversion:
        began = time.perf_counter()
        ddim = fresh_scheduler(model, scheduler, num_steps)
        options = self.resolved_options(model)
        with torch.no_grad(), unet_precision(model, self.inversion_precision(model)) as autocast:
            unet = UNetCounter(model, autocast)
            ctx = InversionContext(
                model=model,
                scheduler=ddim,
                math=DDIMMath(ddim),
                prompt=prompt,
                image_latent=model.encode_image(pixels).float(),
                cond=model.encode_text([prompt]).float(),
                null=model.uncond_context().float(),
                guidance=float(guidance),
                num_steps=num_steps,
                unet=unet,
                total=num_steps * self.progress_phases,
                progress=progress,
            )
            output = self.invert_latents(ctx)
        # Outside the UNet's precision context: the VAE decodes as it does for the run.
        psnr = vae_round_trip_psnr(model, pixels, ctx.image_latent)
        _warn_if_unrepresentable(model, psnr)
        return Inversion(
            method=self.name,
            prompt=prompt,
            latent=_cpu(output.latent),  # type: ignore[arg-type]
            image_latent=_cpu(ctx.image_latent),  # type: ignore[arg-type]
            num_steps=num_steps,
            guidance=float(guidance),
            height=height,
            width=width,
            model_identity=dict(model.identity),
            model_family=model.family,
            scheduler_config=scheduler_signature(ddim),
            options=options,
            uncond_embeddings=_cpu(output.uncond_embeddings),
            source_latents=_cpu(output.source_latents),
            steps=list(output.steps),
            stats={
                "seconds": round(time.perf_counter() - began, 4),
                "unet_calls": unet.calls,
                "unet_forward_rows": unet.forward_rows,
                "unet_backward_rows": unet.backward_rows,
                "device": str(model.device),
                "vae_psnr": round(psnr, 2) if math.isfinite(psnr) else None,
            },
            image_hash=digest,
            crop=parse_crop(self.crop),
        )

    # -- as a source ----------------------------------------------------------------------
    def _inversion(self, request: SourceRequest) -> tuple[Inversion, dict[str, Any]]:
        model, prompt = request.model, request.prompts[0]
        settings = {
            "scheduler": request.scheduler,
            "num_steps": request.num_steps,
            "height": request.height,
            "width": request.width,
            "prompt": prompt,
            "guidance": request.guidance if self.guidance_specific else None,
        }
        if self.inversion is not None:
            path = Path(self.inversion).expanduser()
            inversion = Inversion.load(path)
            if inversion.method != self.name:
                raise InversionError(
                    f"inversion {str(path)!r} was made with method {inversion.method!r}; "
                    f"use source {inversion.method!r} for it, not {self.name!r}"
                )
            inversion.check(model, name=f"inversion {str(path)!r}", **settings)
            return inversion, {"cache": "file", "path": str(path)}

        crop = parse_crop(self.crop)
        prepared = prepare_image(self.image, request.height, request.width, crop)  # type: ignore[arg-type]
        key = cache_key(
            image_hash=image_hash(prepared),
            prompt=prompt,
            model_identity=model.identity,
            scheduler_config=scheduler_signature(request.scheduler),
            method=self.name,
            options=self.resolved_options(model),
            num_steps=request.num_steps,
            guidance=request.guidance,
            height=request.height,
            width=request.width,
        )
        store = InversionCache(self.cache_dir) if self.cache else None
        if store is not None:
            cached = store.get(key)
            if cached is not None:
                cached.check(model, name="cached inversion", **settings)
                return cached, {"cache": "hit", "path": str(store.path(key)), "key": key}
        inversion = self._invert_pixels(
            model,
            image_to_tensor(prepared),
            image_hash(prepared),
            prompt,
            request.num_steps,
            request.guidance,
            request.height,
            request.width,
            request.scheduler,
            request.progress,
        )
        if store is None:
            return inversion, {"cache": "off"}
        path = store.put(key, inversion)
        return inversion, {"cache": "miss", "path": str(path), "key": key}

    def prepare(self, request: SourceRequest) -> SourceStart:
        """Invert ``image`` (or load the cached inversion, or ``inversion``) for the run and
        start from its final latent with its :meth:`guide`."""
        check_ddim_scheduler(request.scheduler)
        inversion, where = self._inversion(request)
        device = request.model.device
        latent = inversion.latent.to(device=device, dtype=request.model.dtype)
        # The guide's per-step tensors on the run's device once, not at every step.
        on_device = dataclasses.replace(
            inversion,
            **{
                key: getattr(inversion, key).to(device)
                for key in ("uncond_embeddings", "source_latents")
                if getattr(inversion, key) is not None
            },
        )
        return SourceStart(
            latent=latent * request.scheduler.init_noise_sigma,
            guide=self.guide(on_device),
            info={"source": self.name, "inversion": {**where, **inversion.summary()}},
        )
