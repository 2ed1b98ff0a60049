"""Stable Diffusion-sized pipelines with random weights from the published configs, for timing.

Benchmarks need the real architectures (speed and memory depend on the layer sizes, not on
the weights), and nothing here may download multi-GB checkpoints. This module builds them in
memory from their published configs:

* ``sd15``: Stable Diffusion 1.5 (UNet 859.5 M parameters, CLIP ViT-L/14 text encoder
  123.1 M, VAE 83.7 M), 512 px, epsilon prediction;
* ``sd21``: Stable Diffusion 2.1 (UNet 865.9 M, OpenCLIP ViT-H/14 text encoder as a
  ``CLIPTextModel`` 340.4 M, the same VAE), 768 px, v-prediction;
* ``sdxl``: Stable Diffusion XL base 1.0 (UNet 2,567.5 M, CLIP ViT-L/14 123.1 M plus
  OpenCLIP ViT-bigG/14 with projection 694.7 M, the VAE's layout), 1024 px, built as a
  :class:`~p2p_framework.model_sdxl.StableDiffusionXLModel`;
* ``sd15-small``, ``sd21-small`` and ``sdxl-small``: the same block layouts (levels, layers
  and transformer blocks per level, attention placement, head counts, linear or
  convolutional projections, prediction type) with narrow channels and 2-layer text encoders,
  for smoke runs on a CPU (:func:`narrow` makes other widths).

::

    from p2p_framework.testing import build_random_model, diffusers_pipeline

    model = build_random_model("sd15", device="cuda")   # a StableDiffusionModel (sdxl: XL)
    pipe = diffusers_pipeline(model)                    # diffusers' pipeline, same modules

The tokenizer is :func:`p2p_framework.testing.tiny_models.build_clip_tokenizer` (offline, a small
vocabulary in which :data:`~p2p_framework.testing.tiny_models.DEFAULT_WORDS` are single tokens); its
ids stay below the text encoders' published vocabulary size (49408). Images made with these
models are noise: use them for time and memory only.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..model import SD_DDIM_CONFIG, StableDiffusionModel, pick_device, pick_dtype
from ..model_sdxl import StableDiffusionXLModel
from .tiny_models import DEFAULT_WORDS, build_clip_tokenizer

__all__ = [
    "ARCHITECTURES",
    "CLIP_VOCAB_SIZE",
    "Architecture",
    "architecture",
    "build_random_model",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "diffusers_pipeline",
    "narrow",
    "parameter_counts",
]

#: CLIP's published vocabulary size (OpenAI CLIP and OpenCLIP share the BPE vocabulary).
CLIP_VOCAB_SIZE = 49408

# What every Stable Diffusion UNet config here shares (SD 1.5, 2.1 and XL).
_UNET_COMMON: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}

# SD 1.x/2.x: cross-attention at the first three levels.
_CROSS_ATTENTION_LAYOUT: dict[str, Any] = {
    **_UNET_COMMON,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}

# SD 1.5's UNet: https://huggingface.co/runwayml/stable-diffusion-v1-5/blob/main/unet/config.json
# (also the defaults of diffusers' UNet2DConditionModel; 859,520,964 parameters).
_SD15_UNET: dict[str, Any] = {
    **_CROSS_ATTENTION_LAYOUT,
    "block_out_channels": (320, 640, 1280, 1280),
    "norm_num_groups": 32,
    "attention_head_dim": 8,  # diffusers' legacy name: 8 heads per layer (40..160 wide)
    "cross_attention_dim": 768,
    "use_linear_projection": False,
    "upcast_attention": False,
    "sample_size": 64,
}

# SD 2.1 (768 px, v-prediction):
# https://huggingface.co/stabilityai/stable-diffusion-2-1/blob/main/unet/config.json.
# diffusers' single-file converter (create_unet_diffusers_config_from_ldm in
# diffusers/loaders/single_file_utils.py) derives the same from Stability's
# v2-inference-v.yaml: num_head_channels 64 -> attention_head_dim (heads) = 320 / 64 times the
# channel multipliers (1, 2, 4, 4) = (5, 10, 20, 20); use_linear_in_transformer -> linear
# projections; context_dim 1024. 865,910,724 parameters.
_SD21_UNET: dict[str, Any] = {
    **_CROSS_ATTENTION_LAYOUT,
    "block_out_channels": (320, 640, 1280, 1280),
    "norm_num_groups": 32,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
}

# The VAE of SD 1.x and 2.x (identical layout; SD 2.1's is configured for 768 px):
# https://huggingface.co/runwayml/stable-diffusion-v1-5/blob/main/vae/config.json
# (83,653,863 parameters).
_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# SD 1.5's text encoder, the text tower of OpenAI's CLIP ViT-L/14:
# https://huggingface.co/runwayml/stable-diffusion-v1-5/blob/main/text_encoder/config.json
# (= text_config of openai/clip-vit-large-patch14; 123,060,480 parameters).
_CLIP_L_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
}

# SD 2.x's text encoder, OpenCLIP ViT-H/14's text tower as a CLIPTextModel:
# https://huggingface.co/stabilityai/stable-diffusion-2-1/blob/main/text_encoder/config.json.
# SD 2 conditions on the penultimate layer of the 24-layer tower (layer: "penultimate" in
# v2-inference-v.yaml), so the converted model keeps 23 layers; 340,387,840 parameters.
_OPENCLIP_H_TEXT: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
}

# SDXL base 1.0's UNet:
# https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/unet/config.json.
# No attention at the first level; 2 and 10 transformer blocks per attention module below it
# (70 self- and 70 cross-attention layers); the added embedding takes the second text
# encoder's 1280-wide pooled output and 6 time ids of 256 each (2816). 2,567,463,684 parameters.
_SDXL_UNET: dict[str, Any] = {
    **_UNET_COMMON,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "norm_num_groups": 32,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}

# SDXL's VAE: the SD VAE's layout, its own scaling factor, and float32 decoding of float16
# weights (``force_upcast``, what SDXL pipelines honour):
# https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/vae/config.json.
_SDXL_VAE: dict[str, Any] = {
    **_SD_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# SDXL's second text encoder, OpenCLIP ViT-bigG/14's text tower with its projection:
# https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/text_encoder_2/config.json
# (a CLIPTextModelWithProjection; 694,659,840 parameters).
_OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class Architecture:
    """One model family's layer sizes.

    Attributes:
        name: ``sd15``, ``sd21``, ``sd15-small``, ``sd21-small``, or a :func:`narrow` one.
        title: how tables name it.
        unet: keyword arguments of ``UNet2DConditionModel``.
        vae: keyword arguments of ``AutoencoderKL``.
        text_encoder: keyword arguments of ``CLIPTextConfig`` (vocabulary and special token
            ids are added when building).
        prediction_type: ``epsilon`` or ``v_prediction`` (the scheduler's).
        parameters: the published parameter counts (``unet``, ``vae``, ``text_encoder``,
            SDXL's ``text_encoder_2``) of a full-size architecture; empty for narrow variants.
        text_encoder_2: SDXL's second text encoder (with projection), else None.
    """

    name: str
    title: str
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    prediction_type: str
    parameters: Mapping[str, int]
    text_encoder_2: Mapping[str, Any] | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        """The image size in pixels the architecture was trained at (512, 768 or 1024)."""
        return int(self.unet["sample_size"]) * self.vae_scale_factor

    @property
    def small(self) -> bool:
        """Whether this is a narrow variant (no published parameter counts)."""
        return not self.parameters


#: The VAE of the narrow variants (decoding cost is not what they are for).
SMALL_VAE: dict[str, Any] = {
    **_SD_VAE,
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def narrow(
    arch: Architecture,
    width: int,
    *,
    text_width: int | None = None,
    text_layers: int = 2,
    name: str | None = None,
    title: str | None = None,
) -> Architecture:
    """``arch``'s block layout with narrow channels, for runs on a CPU.

    The UNet keeps its levels, layers per block, attention placement, head counts,
    projections and prediction type; its level ``i`` gets ``width`` times SD's channel
    multiplier (1, 2, 4, 4). The text encoder keeps its head count and activation with
    ``text_width`` (default ``3 * width``, rounded up to a multiple of the heads) and
    ``text_layers`` layers; the VAE is :data:`SMALL_VAE`.

    Args:
        name: default ``"{arch.name}-w{width}"``.
        title: default ``"{arch.title} layout, width {width}"``.

    Raises:
        ValueError: a width that the heads do not divide.
    """
    multipliers = [c // arch.unet["block_out_channels"][0] for c in arch.unet["block_out_channels"]]
    # (SDXL: multipliers 1, 2, 4; both text encoders narrowed alike, the UNet's context is both.)
    channels = tuple(width * m for m in multipliers)
    heads = arch.unet["attention_head_dim"]
    per_level = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,) * len(channels)
    if any(c % h for c, h in zip(channels, per_level, strict=True)):
        raise ValueError(f"width {width}: channels {channels} do not split into {per_level} heads")

    def narrow_text(config: Mapping[str, Any], wanted: int | None) -> dict[str, Any]:
        heads = config["num_attention_heads"]
        size = -(-3 * width // heads) * heads if wanted is None else wanted
        if size % heads:
            raise ValueError(f"text width {size} does not split into {heads} heads")
        return {
            **config,
            "hidden_size": size,
            "intermediate_size": 4 * size,
            "num_hidden_layers": text_layers,
            "projection_dim": size,
        }

    text = narrow_text(arch.text_encoder, text_width)
    text_2 = None if arch.text_encoder_2 is None else narrow_text(arch.text_encoder_2, None)
    unet = {
        **arch.unet,
        "block_out_channels": channels,
        "norm_num_groups": math.gcd(32, *channels),
        "cross_attention_dim": text["hidden_size"] + (text_2 or {}).get("hidden_size", 0),
    }
    if text_2 is not None:  # SDXL: the pooled output of the second encoder and 6 time ids
        time_ids = 6 * int(arch.unet["addition_time_embed_dim"])
        unet["projection_class_embeddings_input_dim"] = text_2["projection_dim"] + time_ids
    vae = {**SMALL_VAE, "sample_size": arch.vae["sample_size"]}
    vae.update({k: arch.vae[k] for k in ("scaling_factor", "force_upcast") if k in arch.vae})
    name = name or f"{arch.name}-w{width}"
    title = title or f"{arch.title} layout, width {width}"
    return Architecture(name, title, unet, vae, text, arch.prediction_type, {}, text_2)


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture(
        "sd15",
        "SD 1.5",
        _SD15_UNET,
        _SD_VAE,
        _CLIP_L_TEXT,
        "epsilon",
        {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    ),
    "sd21": Architecture(
        "sd21",
        "SD 2.1",
        _SD21_UNET,
        {**_SD_VAE, "sample_size": 768},
        _OPENCLIP_H_TEXT,
        "v_prediction",
        {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    ),
    "sdxl": Architecture(
        "sdxl",
        "SDXL 1.0",
        _SDXL_UNET,
        _SDXL_VAE,
        _CLIP_L_TEXT,
        "epsilon",
        {
            "unet": 2_567_463_684,
            "vae": 83_653_863,
            "text_encoder": 123_060_480,
            "text_encoder_2": 694_659_840,
        },
        _OPENCLIP_BIGG_TEXT,
    ),
}

# Narrow copies for CPU smoke runs: heads keep their counts (8; 5/10/20/20; 5/10/20) and get
# narrower (4 to 16 channels; 8; 8), 2 text layers.
for _name, _width, _text_width in (("sd15", 32, 96), ("sd21", 40, 128), ("sdxl", 40, None)):
    _full = ARCHITECTURES[_name]
    ARCHITECTURES[f"{_name}-small"] = narrow(
        _full,
        _width,
        text_width=_text_width,
        name=f"{_name}-small",
        title=f"{_full.title} layout, small (width {_width})",
    )


def architecture(name: str) -> Architecture:
    """The architecture called ``name`` (a key of :data:`ARCHITECTURES`).

    Raises:
        ValueError: unknown name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _resolve(arch: Architecture | str) -> Architecture:
    return arch if isinstance(arch, Architecture) else architecture(arch)


def build_unet(arch: Architecture | str, *, sample_size: int | None = None) -> Any:
    """A randomly initialised ``UNet2DConditionModel`` of ``arch``, on torch's default device.

    Args:
        sample_size: latent size the config records (the model's default image size / 8);
            any multiple of 8 runs. Default: the architecture's (64, or 96 for SD 2.1).
    """
    from diffusers import UNet2DConditionModel

    config = dict(_resolve(arch).unet)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return UNet2DConditionModel(**config)


def build_vae(arch: Architecture | str) -> Any:
    """A randomly initialised ``AutoencoderKL`` of ``arch``, on torch's default device."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_resolve(arch).vae)


def build_text_encoder(
    arch: Architecture | str, tokenizer: Any = None, *, second: bool = False
) -> Any:
    """A randomly initialised ``CLIPTextModel`` of ``arch``, on torch's default device; with
    ``second``, SDXL's second encoder (a ``CLIPTextModelWithProjection``).

    The vocabulary is CLIP's published one (49408 entries); ``tokenizer`` (if given) supplies
    the special token ids and must have at most that many tokens.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special: dict[str, int] = {}
    if tokenizer is not None:
        if len(tokenizer) > CLIP_VOCAB_SIZE:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, over {CLIP_VOCAB_SIZE}")
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    arch = _resolve(arch)
    layout = arch.text_encoder_2 if second else arch.text_encoder
    if layout is None:
        raise ValueError(f"{arch.name} has one text encoder")
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **layout, **special)
    return CLIPTextModelWithProjection(config) if second else CLIPTextModel(config)


def parameter_counts(arch: Architecture | str) -> dict[str, int]:
    """Parameters of the UNet, VAE and text encoder, counted on the meta device (no memory)."""
    arch = _resolve(arch)
    with torch.device("meta"):
        modules = {
            "unet": build_unet(arch),
            "vae": build_vae(arch),
            "text_encoder": build_text_encoder(arch),
        }
        if arch.text_encoder_2 is not None:
            modules["text_encoder_2"] = build_text_encoder(arch, second=True)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def build_random_model(
    arch: Architecture | str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    sample_size: int | None = None,
    words: Iterable[str] = DEFAULT_WORDS,
) -> StableDiffusionModel:
    """A :class:`~p2p_framework.model.StableDiffusionModel` of ``arch`` with random weights
    (for SDXL a :class:`~p2p_framework.model_sdxl.StableDiffusionXLModel`, whose second
    tokenizer pads with ``!`` as SDXL's does).

    Built in memory, directly on ``device`` (nothing is saved), deterministic for a seed on a
    given device; the global random state is left alone. The scheduler is SD's DDIM
    (:data:`~p2p_framework.model.SD_DDIM_CONFIG`) with the architecture's prediction type.

    Args:
        arch: a name of :data:`ARCHITECTURES` or an :class:`Architecture`.
        device: ``auto`` (CUDA, then MPS, then CPU) or a torch device.
        dtype: ``auto`` (float16 on a GPU, float32 on CPU) or a dtype (name).
        seed: seed of the random weights.
        sample_size: the UNet's recorded latent size (default image size / 8); a run can use
            any size with ``EditSettings(height=..., width=...)``.
        words: words that are single tokens of the tokenizer.
    """
    from diffusers import DDIMScheduler

    arch = _resolve(arch)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, torch_device)
    with tempfile.TemporaryDirectory(prefix="p2p-tokenizer-") as folder:
        tokenizer = build_clip_tokenizer(words, folder)
    forked = [torch_device] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(torch_device):
        torch.manual_seed(seed)
        unet = build_unet(arch, sample_size=sample_size)
        vae = build_vae(arch)
        text_encoder = build_text_encoder(arch, tokenizer)
        text_encoder_2 = None
        if arch.text_encoder_2 is not None:
            text_encoder_2 = build_text_encoder(arch, tokenizer, second=True)
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            # nn.Module.to: diffusers' .to(dtype=...) warns about float32 modules it has none of
            torch.nn.Module.to(module, dtype=torch_dtype).eval().requires_grad_(False)
    scheduler = DDIMScheduler(**SD_DDIM_CONFIG, prediction_type=arch.prediction_type)
    common = dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(scheduler.config),
        identity={"model": f"random {arch.title} (timing only)", "architecture": arch.name},
    )
    if text_encoder_2 is None:
        return StableDiffusionModel(**common)
    tokenizer_2 = copy.deepcopy(tokenizer)
    tokenizer_2.pad_token = "!"
    return StableDiffusionXLModel(**common, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def diffusers_pipeline(model: StableDiffusionModel, scheduler: str = "ddim") -> Any:
    """diffusers' ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL)
    sharing ``model``'s modules (no copy).

    The scheduler is ``model.make_scheduler(scheduler)`` (DDIM with the papers' settings by
    default), so both run the same trajectory; no safety checker; progress bar off.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(model, StableDiffusionXLModel):
        xl = StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer,
            tokenizer_2=model.tokenizer_2,
            unet=model.unet,
            scheduler=model.make_scheduler(scheduler),
            force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        xl.set_progress_bar_config(disable=True)
        return xl
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=model.make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
