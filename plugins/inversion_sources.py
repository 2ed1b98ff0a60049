"""Source plugins that start an edit from a real photo: ``null-text``, ``negative-prompt``,
``direct`` and ``ddim``.

Each inverts the photo ``image`` with the run's source prompt (``prompts[0]``), step count,
guidance and size (see :mod:`p2p_framework.inversion`), or loads a saved ``.p2pinv`` file given
as ``inversion`` after checking that it fits the run. Inversions are cached (``cache``,
``cache_dir``): a second run on the same photo, prompt, model, method, options, steps,
guidance and size skips the inversion. ``SourceStart.info["inversion"]`` says whether the
cache was hit (``cache``: ``hit``, ``miss``, ``off`` or ``file``) and gives the inversion's
statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from p2p_framework import OptionError, Source, SourceRequest, SourceStart, hookimpl
from p2p_framework.inversion import (
    ImageError,
    Inversion,
    InversionCache,
    InversionError,
    cache_key,
    check_ddim_scheduler,
    image_hash,
    invert,
    method_options,
    parse_crop,
    prepare_image,
    resolve_options,
    scheduler_signature,
)

_COMMON = ("image", "inversion", "crop", "cache", "cache_dir")


@dataclass
class InversionSource(Source):
    """Shared options and behaviour of the inversion sources (not registered itself)."""

    method: ClassVar[str] = ""
    shortcuts = {"image": "image", "inversion": "inversion", "no_cache": "cache"}
    chosen_by = {"inversion": lambda path: Inversion.load(path).method}  # the file's method

    image: str | None = field(
        default=None, metadata={"help": "photo to invert (path); or give inversion"}
    )
    inversion: str | None = field(
        default=None, metadata={"help": "saved .p2pinv file to use instead of an image"}
    )
    crop: tuple[int, int, int, int] | None = field(
        default=None,
        metadata={"help": "pixels cut off the photo's left, right, top, bottom edges first"},
    )
    cache: bool = field(default=True, metadata={"help": "reuse and store cached inversions"})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "cache folder (default $XDG_CACHE_HOME/p2p-framework/inversions)"},
    )

    def __post_init__(self) -> None:
        if (self.image is None) == (self.inversion is None):
            raise OptionError(self.name, "image", "give either image or inversion (not both)")
        for option in ("image", "inversion", "cache_dir"):
            value = getattr(self, option)
            if value is not None and not isinstance(value, (str, Path)):
                raise OptionError(self.name, option, f"must be a path, got {value!r}")
        if not isinstance(self.cache, bool):
            raise OptionError(self.name, "cache", f"must be true or false, got {self.cache!r}")
        try:
            self.crop = None if self.crop is None else parse_crop(self.crop)
        except ImageError as error:
            raise OptionError(self.name, "crop", str(error)) from None
        try:
            method_options(self.method, self.method_options())
        except OptionError as error:
            raise OptionError(self.name, error.option, error.message) from None

    def method_options(self) -> dict[str, Any]:
        """The options of the inversion method (every field but the common ones)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _COMMON
        }

    def _inversion(self, request: SourceRequest) -> tuple[Inversion, dict[str, Any]]:
        model, prompt = request.model, request.prompts[0]
        settings = {
            "scheduler": request.scheduler,
            "num_steps": request.num_steps,
            "height": request.height,
            "width": request.width,
            "prompt": prompt,
            "guidance": request.guidance,
        }
        if self.inversion is not None:
            path = Path(self.inversion).expanduser()
            inversion = Inversion.load(path)
            if inversion.method != self.method:
                raise InversionError(
                    f"inversion {str(path)!r} was made with method {inversion.method!r}; "
                    f"use source {inversion.method!r} for it, not {self.method!r}"
                )
            inversion.check(model, name=f"inversion {str(path)!r}", **settings)
            return inversion, {"cache": "file", "path": str(path)}

        prepared = prepare_image(self.image, request.height, request.width, self.crop)  # type: ignore[arg-type]
        # Options as the inversion records them (unet_precision "auto" decided for the model).
        options = dataclasses.asdict(
            resolve_options(method_options(self.method, self.method_options()), model)
        )
        key = cache_key(
            image_hash=image_hash(prepared),
            prompt=prompt,
            model_identity=model.identity,
            scheduler_config=scheduler_signature(request.scheduler),
            method=self.method,
            options=options,
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
        inversion = invert(
            model,
            prepared,
            prompt,
            self.method,
            num_steps=request.num_steps,
            guidance=request.guidance,
            height=request.height,
            width=request.width,
            scheduler=request.scheduler,
            progress=request.progress,
            **self.method_options(),
        )
        inversion.crop = self.crop or (0, 0, 0, 0)
        if store is None:
            return inversion, {"cache": "off"}
        path = store.put(key, inversion)
        return inversion, {"cache": "miss", "path": str(path), "key": key}

    def prepare(self, request: SourceRequest) -> SourceStart:
        check_ddim_scheduler(request.scheduler)
        inversion, where = self._inversion(request)
        device = request.model.device

        def on_device(tensors: Any) -> Any:
            return None if tensors is None else [t.to(device) for t in tensors]

        latent = inversion.latent.to(device=device, dtype=request.model.dtype)
        return SourceStart(
            latent=latent * request.scheduler.init_noise_sigma,
            uncond_embeddings=on_device(inversion.uncond_embedding_list()),
            source_latents=on_device(inversion.source_latent_list()),
            info={"source": self.name, "inversion": {**where, **inversion.summary()}},
        )


@dataclass
class NullTextSource(InversionSource):
    """Start from a real photo by null-text inversion (the paper's; slow, faithful)."""

    name = "null-text"
    chosen_by = {"image": True}  # --image without --source
    method: ClassVar[str] = "null-text"

    num_inner_steps: int = field(
        default=10, metadata={"help": "Adam steps per diffusion step at most"}
    )
    early_stop_epsilon: float = field(
        default=1e-5, metadata={"help": "stop a step early once loss < this + step * 2e-5"}
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


@dataclass
class NegativePromptSource(InversionSource):
    """Start from a real photo, the source prompt as negative prompt (fast, no optimisation)."""

    name = "negative-prompt"
    method: ClassVar[str] = "negative-prompt"


@dataclass
class DirectSource(InversionSource):
    """Start from a real photo; the source row follows the DDIM inversion (PnP inversion)."""

    name = "direct"
    method: ClassVar[str] = "direct"


@dataclass
class DDIMSource(InversionSource):
    """Start from a real photo by plain DDIM inversion (baseline; drifts under guidance)."""

    name = "ddim"
    method: ClassVar[str] = "ddim"


@hookimpl
def register_sources(register):  # noqa: ANN001 - the hook's signature is documented in hookspecs
    for source in (NullTextSource, NegativePromptSource, DirectSource, DDIMSource):
        register(source)
