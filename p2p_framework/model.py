"""Model loading and the one adapter that knows a model family's specifics.

Everything outside this module talks to :class:`StableDiffusionModel`: text encoding, the
UNet call, VAE encode/decode, sizes. Stable Diffusion 1.x and 2.x (epsilon or v-prediction)
share it; SDXL, with two text encoders and added conditioning, is a subclass with the same
methods (:mod:`p2p_framework.model_sdxl`), chosen in :func:`load_model` from the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def check_size(height: int, width: int, factor: int) -> None:
    """Refuse an image size the VAE cannot take: each side a positive multiple of
    ``factor`` (the VAE's scale factor: 8 for SD, 4 for the demo model).

    Raises:
        OptionError: naming the side, the factor and the value.
    """
    for option, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
            raise OptionError(
                "pipeline",
                option,
                f"must be a positive multiple of {factor} (this model's VAE scale factor), "
                f"got {value}",
            )


def check_steps(steps: int, limit: int) -> None:
    """Refuse more diffusion steps than the scheduler was trained with (``limit``, its
    ``num_train_timesteps``: 1000 for SD); diffusers would fail inside ``set_timesteps``.

    Raises:
        OptionError: naming the limit.
    """
    if steps > limit:
        raise OptionError(
            "pipeline",
            "steps",
            f"must be at most {limit} (this model's scheduler was trained with {limit} "
            f"timesteps), got {steps}",
        )


#: Sentences of library errors that point at a traceback the one-line message does not show.
_TRACEBACK_HINT = re.compile(r"[^.]*\b(stack ?trace|traceback)\b[^.]*(above|below)[^.]*\.?", re.I)


def _error_summary(error: BaseException, model: str) -> str:
    """An exception's message as one clean line: its first line, without sentences that
    refer to a traceback above (which a one-line ``Error:`` does not show) and without a
    repeated "Cannot load model NAME:" prefix."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    cleaned = " ".join(_TRACEBACK_HINT.sub("", first).split())
    prefix = f"cannot load model {model}:"
    if cleaned.lower().startswith(prefix.lower()):
        cleaned = cleaned[len(prefix) :].strip()
    return cleaned or first


def _missing_components(path: Path) -> list[str]:
    """The subfolders ``model_index.json`` of a local pipeline folder names that are not
    there (e.g. ``["unet"]``); empty when the index cannot be read (diffusers says why)."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [
        name
        for name, entry in index.items()
        if not name.startswith("_")
        and isinstance(entry, list)
        and entry
        and entry[0] is not None
        and not (path / name).is_dir()
    ]


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

    @property
    def max_steps(self) -> int:
        """The most diffusion steps a run may take: the scheduler's training timesteps (1000
        for SD)."""
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent ``(height, width)`` for an image size in pixels, checked for divisibility.

        Raises:
            OptionError: a size that is not a positive multiple of :attr:`vae_scale_factor`.
        """
        check_size(height, width, self.vae_scale_factor)
        factor = self.vae_scale_factor
        return height // factor, width // factor

    def cross_attention_levels(self, latent_size: tuple[int, int]) -> tuple[int, ...]:
        """The ``downscale`` of every UNet level that has cross-attention layers, for a
        ``(height, width)`` latent, as :class:`~p2p_framework.store.AttentionLayer` names them
        at run time (1, 2, 4, 8 for SD 1.x; the demo model's 16x16 latent: 1, 2, 4, 8).

        Read from the UNet's attention processors' names: ``down_blocks.i`` works at
        ``2**i``, the mid block at the deepest level, ``up_blocks.i`` mirrored. A level
        whose grid equals a coarser one's (tiny latents) is named as the run would name it.
        """
        from .attention import grid_for
        from .store import level_grid

        depth = len(self.unet.config.block_out_channels) - 1
        found = set()
        for name in getattr(self.unet, "attn_processors", {}):
            if ".attn2." not in f".{name}":
                continue
            if name.startswith("down_blocks."):
                level = int(name.split(".")[1])
            elif name.startswith("up_blocks."):
                level = depth - int(name.split(".")[1])
            else:
                level = depth
            grid = level_grid(latent_size, 2**level)
            found.add(grid_for(grid[0] * grid[1], latent_size)[1])
        return tuple(sorted(found))

    @staticmethod
    def _tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """``(prompts, tokenizer.model_max_length)`` padded, truncated ids of ``tokenizer``."""
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(prompts, max_tokens)`` padded, truncated token ids."""
        return self._tokenize(self.tokenizer, prompts)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(prompts, max_tokens, dim)`` as the UNet's context."""
        ids = self.token_ids(prompts).to(self.text_encoder.device)
        embeddings = self.text_encoder(ids)[0]
        return embeddings.to(dtype=self.dtype, device=self.device)

    @property
    def context_tokens(self) -> int:
        """Rows of the UNet context per prompt (:meth:`encode_text`): the tokenizer's
        length here; adapters that pack more conditioning into the context add theirs."""
        return self.max_tokens

    @torch.no_grad()
    def uncond_context(self) -> torch.Tensor:
        """The ``(1, context_tokens, dim)`` unconditional context of classifier-free guidance
        (the encoding of ``""`` for SD 1.x/2.x)."""
        return self.encode_text([""])

    def predict(
        self,
        latents: torch.Tensor,
        timestep: Any,
        context: torch.Tensor,
        sizes: Any = None,
    ) -> torch.Tensor:
        """The UNet's raw output (noise or v, per ``prediction_type``).

        Args:
            latents: ``(batch, channels, height, width)``, already scaled by the scheduler.
            context: ``(batch, tokens, dim)`` text embeddings.
            sizes: SDXL's micro-conditioning
                (:class:`~p2p_framework.model_sdxl.SizeConditioning`); this family has none,
                so only None or the default is accepted.
        """
        self.check_size_conditioning(sizes)
        return self._call_unet(latents, timestep, context)

    def check_size_conditioning(self, sizes: Any) -> None:
        """Refuse SDXL's micro-conditioning (a non-default
        :class:`~p2p_framework.model_sdxl.SizeConditioning`) for a family without it.

        Raises:
            OptionError: ``sizes`` is not None or the default.
        """
        if sizes is not None and not sizes.is_default:
            raise OptionError(
                "pipeline",
                "original_size",
                "original_size, crop_top_left and target_size are SDXL's size conditioning; "
                f"this model ({self.family}) has none",
            )

    def _call_unet(
        self, latents: torch.Tensor, timestep: Any, context: torch.Tensor, **extra: Any
    ) -> torch.Tensor:
        """The UNet (compiled when :meth:`compile` was called) on ``(batch, tokens, dim)``
        hidden states and the family's ``extra`` keyword arguments."""
        if self._compiled_unet is None:
            return self.unet(
                latents, timestep, encoder_hidden_states=context, return_dict=False, **extra
            )[0]
        if self.compile_mode == "reduce-overhead":
            # Each call is a new CUDA-graph step; its output lives in the graph's memory pool,
            # which the next call overwrites, so hand back a copy the caller can keep.
            torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled_unet(
            latents, timestep, encoder_hidden_states=context, return_dict=False, **extra
        )[0]
        return out.clone() if self.compile_mode == "reduce-overhead" else out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, 3, H, W)`` in [0, 1], float32, from latents."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(scaled, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def decode_upcast(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with the VAE in float32 for this call (as diffusers' ``force_upcast``
        does): the SD 1.x / SDXL VAEs overflow in float16 on some latents. The VAE is put
        back in its own dtype afterwards."""
        with self._vae_in_float32():
            return self.decode(latents.float())

    @contextmanager
    def _vae_in_float32(self) -> Iterator[None]:
        """The VAE in float32 for the block, back in its own dtype afterwards."""
        dtype = self.vae.dtype
        self.vae.to(torch.float32)
        try:
            yield
        finally:
            self.vae.to(dtype)

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
    """Load a diffusers Stable Diffusion (1.x, 2.x or XL) pipeline from a hub id or a local
    folder; the adapter follows the pipeline's components (a second text encoder: SDXL).

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
    if looks_local:
        missing = _missing_components(path)
        if missing:
            folders = ", ".join(f"{name}/" for name in missing)
            raise ModelLoadError(
                f"model folder {text!r} has no {folders} subfolder (its model_index.json lists "
                f"{', '.join(missing)}); copy the whole diffusers pipeline folder"
            )
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            str(path) if looks_local else text,
            **{_dtype_keyword(diffusers.__version__): torch_dtype},
            revision=revision,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load model {text!r}: {_error_summary(error, text)}"
        ) from error
    components = pipe.components
    sdxl = "text_encoder_2" in components
    if not sdxl:
        missing = [
            c for c in ("unet", "vae", "text_encoder", "tokenizer") if components.get(c) is None
        ]
        if missing:
            raise ModelLoadError(f"{text!r} is not a Stable Diffusion pipeline (missing {missing})")
    identity: dict[str, Any]
    if looks_local:
        identity = {"model": str(path.resolve()), "folder_hash": folder_hash(path)}
    else:
        commit = getattr(pipe.config, "_commit_hash", None) or pipe.config.get("_commit_hash")
        identity = {"model": text, "revision": revision or "main", "commit": commit}
    loaded: StableDiffusionModel
    if sdxl:
        from .model_sdxl import sdxl_from_components

        loaded = sdxl_from_components(
            components,
            pipe.config,
            text,
            scheduler_config=dict(components["scheduler"].config),
            identity=identity,
        )
    else:
        loaded = StableDiffusionModel(
            unet=components["unet"],
            vae=components["vae"],
            text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"],
            scheduler_config=dict(components["scheduler"].config),
            identity=identity,
        )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = components.get(name)
        if module is None:
            continue
        module.to(torch_device)
        module.eval()
        module.requires_grad_(False)
    if compile:
        loaded.compile("auto" if compile is True else compile)
    return loaded
