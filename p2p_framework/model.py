"""Model loading and the one adapter that knows a model family's specifics.

Everything outside this module talks to :class:`StableDiffusionModel`: text encoding, the
UNet call, VAE encode/decode, sizes. Stable Diffusion 1.x and 2.x (epsilon or v-prediction)
share it; SDXL, with two text encoders and added conditioning, would be a second adapter with
the same methods, chosen in :func:`load_model`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, OptionError

#: Stable Diffusion's noise schedule with the DDIM settings of the papers' code
#: (``DDIMScheduler(**SD_DDIM_CONFIG)``); what built models are saved with.
SD_DDIM_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

#: ``torch.compile`` modes of :meth:`StableDiffusionModel.compile`; ``auto`` picks
#: ``reduce-overhead`` (CUDA graphs) on a GPU and ``default`` elsewhere.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune")

SCHEDULERS = ("ddim", "model", "pndm", "euler", "euler-ancestral", "dpm-solver", "lms")


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; anything else is passed to ``torch.device``.

    Raises:
        OptionError: not a device, or one this machine does not have (``cuda`` without CUDA,
            ``cuda:7`` with fewer GPUs, ``mps`` off a Mac).
    """
    if device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError as error:
            raise OptionError("pipeline", "device", str(error)) from None
        if chosen.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise OptionError("pipeline", "device", f"{device!r}: CUDA is not available here")
            if chosen.index is not None and chosen.index >= count:
                raise OptionError(
                    "pipeline",
                    "device",
                    f"{device!r}: there is no CUDA device {chosen.index} (found {count})",
                )
        elif chosen.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise OptionError("pipeline", "device", f"{device!r}: MPS is not available here")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: The weights' precisions ``load_model`` takes by name, ``auto`` first.
DTYPES = ("auto", "float32", "float16", "bfloat16")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on CUDA and MPS, float32 on CPU; half precision only on a GPU."""
    names = {name: getattr(torch, name) for name in DTYPES[1:]}
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in names:
        raise OptionError("pipeline", "dtype", f"expected auto, {', '.join(names)}; got {dtype!r}")
    if names[dtype] != torch.float32 and device.type == "cpu":
        raise OptionError("pipeline", "dtype", f"{dtype} needs a GPU; use float32 on the CPU")
    return names[dtype]


def folder_hash(path: Path) -> str:
    """SHA-256 over the names, sizes and modification times of a model folder's files.

    Cheap (no file contents are read) and enough to tell two folders or two trainings apart.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{int(stat.st_mtime)}\n".encode())
    return digest.hexdigest()


@dataclass
class StableDiffusionModel:
    """Adapter for diffusers Stable Diffusion 1.x / 2.x pipelines.

    Attributes:
        unet, vae, text_encoder, tokenizer: the diffusers / transformers components.
        scheduler_config: the model's own scheduler config.
        identity: how to name this model in records: ``{"model": ..., "revision": ...}`` for a
            hub id, ``{"model": path, "folder_hash": ...}`` for a local folder.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)
    family: str = "stable-diffusion"
    compile_mode: str | None = None
    _compiled_unet: Any = field(default=None, repr=False)

    @property
    def compiled(self) -> bool:
        """Whether UNet calls go through ``torch.compile`` (see :meth:`compile`)."""
        return self._compiled_unet is not None

    def compile(
        self, mode: str = "auto", *, backend: str = "inductor", fullgraph: bool = False
    ) -> None:
        """Run the UNet under ``torch.compile`` from now on.

        The first calls of each kind (editing, inversion's forward and backward) compile and
        are slow; later calls with the same shapes reuse the compiled code, across runs. The
        edit loop then switches the attention controller to its static mode, whose per-step
        schedules are tensors, so the whole UNet is one graph for every step.

        Args:
            mode: one of :data:`COMPILE_MODES`; ``auto`` is ``reduce-overhead`` (CUDA graphs)
                on a GPU and ``default`` elsewhere.
            backend: ``torch.compile`` backend; ``eager`` or ``aot_eager`` only trace (quick,
                for checking that nothing breaks the graph).
            fullgraph: raise on a graph break instead of running that part eagerly (the
                built-in edits never break the graph; a third-party edit might).

        Raises:
            OptionError: an unknown mode.
        """
        if mode not in COMPILE_MODES:
            raise OptionError(
                "model", "compile", f"unknown mode {mode!r}; choose from {', '.join(COMPILE_MODES)}"
            )
        if mode == "auto":
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        # Static shapes: a run's shapes never change, and CUDA graphs need them fixed.
        # Every UNet shares diffusers' forward, whose graphs Dynamo caches together: an edit
        # is one graph, an inversion three per precision, and more models or sizes add theirs.
        # Torch's default of 8 would silently fall back to eager after a few of those.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": False}
        if backend == "inductor":
            options["mode"] = mode
        self._compiled_unet = torch.compile(self.unet, **options)
        self.compile_mode = mode

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The size in pixels the model was trained at (512 for SD 1.x)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def prediction_type(self) -> str:
        """``"epsilon"`` or ``"v_prediction"``."""
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent ``(height, width)`` for an image size in pixels, checked for divisibility."""
        factor = self.vae_scale_factor
        for option, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise OptionError(
                    "pipeline", option, f"must be a positive multiple of {factor}, got {value}"
                )
        return height // factor, width // factor

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(prompts, max_tokens)`` padded, truncated token ids."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(prompts, max_tokens, dim)`` as the UNet's context."""
        ids = self.token_ids(prompts).to(self.text_encoder.device)
        embeddings = self.text_encoder(ids)[0]
        return embeddings.to(dtype=self.dtype, device=self.device)

    def predict(self, latents: torch.Tensor, timestep: Any, context: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (noise or v, per ``prediction_type``).

        Args:
            latents: ``(batch, channels, height, width)``, already scaled by the scheduler.
            context: ``(batch, tokens, dim)`` text embeddings.
        """
        if self._compiled_unet is None:
            return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]
        if self.compile_mode == "reduce-overhead":
            # Each call is a new CUDA-graph step; its output lives in the graph's memory pool,
            # which the next call overwrites, so hand back a copy the caller can keep.
            torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled_unet(
            latents, timestep, encoder_hidden_states=context, return_dict=False
        )[0]
        return out.clone() if self.compile_mode == "reduce-overhead" else out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, 3, H, W)`` in [0, 1], float32, from latents."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(scaled, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Latents from images ``(batch, 3, H, W)`` in [0, 1]: posterior mean times scaling."""
        pixels = (images * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    def make_scheduler(self, name: str = "ddim") -> Any:
        """A fresh scheduler built from the model's config.

        ``ddim`` (the default, as in the papers) forces ``clip_sample=False`` and
        ``set_alpha_to_one=False``; ``model`` is the scheduler the model was saved with.
        """
        import diffusers

        config = dict(self.scheduler_config)
        classes = {
            "ddim": diffusers.DDIMScheduler,
            "pndm": diffusers.PNDMScheduler,
            "euler": diffusers.EulerDiscreteScheduler,
            "euler-ancestral": diffusers.EulerAncestralDiscreteScheduler,
            "dpm-solver": diffusers.DPMSolverMultistepScheduler,
            "lms": diffusers.LMSDiscreteScheduler,
        }
        if name == "model":
            cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"))
            return cls.from_config(config)
        if name not in classes:
            raise OptionError(
                "pipeline", "scheduler", f"unknown scheduler {name!r}; choose from {SCHEDULERS}"
            )
        if name == "ddim":
            return classes[name].from_config(config, clip_sample=False, set_alpha_to_one=False)
        return classes[name].from_config(config)


def _dtype_keyword(diffusers_version: str) -> str:
    """The name ``from_pretrained`` takes the dtype by in this diffusers release.

    diffusers 0.40 renamed ``torch_dtype`` to ``dtype`` (the old name warns); releases before
    it ignore ``dtype`` silently, which would load a float16 request in float32.
    """
    major, minor = (int(part) for part in re.findall(r"\d+", diffusers_version)[:2])
    return "dtype" if (major, minor) >= (0, 40) else "torch_dtype"


def load_model(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    compile: bool | str = False,
) -> StableDiffusionModel:
    """Load a diffusers Stable Diffusion pipeline from a hub id or a local folder.

    Args:
        model: hub id (``"CompVis/stable-diffusion-v1-4"``) or a folder saved with
            ``save_pretrained``.
        device: ``"auto"`` (CUDA, then MPS, then CPU) or a torch device.
        dtype: ``"auto"`` (float16 on a GPU, float32 on CPU), ``"float32"``, ``"float16"``,
            ``"bfloat16"``, or a torch dtype.
        revision: hub revision (branch, tag or commit).
        compile: True or a mode of :data:`COMPILE_MODES`: run the UNet under
            ``torch.compile`` (:meth:`StableDiffusionModel.compile`).

    Raises:
        ModelLoadError: the folder is missing or is not a supported pipeline.
    """
    import diffusers

    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, torch_device)
    text = os.fspath(model)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local and not (path / "model_index.json").is_file():
        what = "does not exist" if not path.exists() else "has no model_index.json"
        raise ModelLoadError(f"model folder {text!r} {what}; pass a diffusers pipeline folder")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            str(path) if looks_local else text,
            **{_dtype_keyword(diffusers.__version__): torch_dtype},
            revision=revision,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model {text!r}: {first}") from error
    components = pipe.components
    if "text_encoder_2" in components:
        raise ModelLoadError(f"{text!r} is an SDXL-style pipeline, which is not supported yet")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if components.get(c) is None]
    if missing:
        raise ModelLoadError(f"{text!r} is not a Stable Diffusion pipeline (missing {missing})")
    identity: dict[str, Any]
    if looks_local:
        identity = {"model": str(path.resolve()), "folder_hash": folder_hash(path)}
    else:
        commit = getattr(pipe.config, "_commit_hash", None) or pipe.config.get("_commit_hash")
        identity = {"model": text, "revision": revision or "main", "commit": commit}
    for name in ("unet", "vae", "text_encoder"):
        module = components[name]
        module.to(torch_device)
        module.eval()
        module.requires_grad_(False)
    loaded = StableDiffusionModel(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        scheduler_config=dict(components["scheduler"].config),
        identity=identity,
    )
    if compile:
        loaded.compile("auto" if compile is True else compile)
    return loaded
