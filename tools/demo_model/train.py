"""Train the embedded demo model: a small Stable Diffusion 1.x-shaped model on coloured shapes.

``python -m tools.demo_model.train --out DIR`` trains, from fixed seeds and on scenes rendered
on the fly by :mod:`p2p_framework.demo.shapes` (no dataset on disk),

1. an :class:`~diffusers.AutoencoderKL` (stage ``vae``), then
2. a CLIP text encoder and a :class:`~diffusers.UNet2DConditionModel` jointly (stage ``unet``),

and saves a standard diffusers :class:`~diffusers.StableDiffusionPipeline` folder (DDIM
scheduler, no safety checker) that ``StableDiffusionPipeline.from_pretrained`` loads. Training
is resumable (``--resume``) from a single checkpoint file in ``--work-dir``, written every
``--ckpt-every`` steps / ``--ckpt-minutes`` minutes and when a stage or the time budget
(``--max-minutes``) ends, so it can span several runs, on a GPU or (slowly) on a CPU.

Design choices
--------------

*Resolution: 64 px images, VAE scale factor 4, 16 x 16 latents.* SD's factor 8 would give 8 x 8
latents at 64 px and cross-attention grids of 8, 4, 2 and 1 — too coarse to localise a word on
an object of 18-30 px. Factor 8 at 128 px would give the same 16 x 16 grids but renders, VAE
passes and scoring four times the pixels for no extra information (the shapes are drawn without
anti-aliasing). With factor 4 the UNet's cross-attention maps are 16 x 16, 8 x 8 and 4 x 4 (mid
block 2 x 2), like SD 1.x's 64/32/16/8 maps of a 512 px image, and an object covers 4-8 latent
pixels across. The pipeline derives the factor from the VAE config, so its default output is
64 x 64 (``unet.config.sample_size * 4``).

*VAE: three levels (32, 64, 64 channels, one layer per block, 8 norm groups), 4 latent
channels, ~0.95 M parameters*, trained with L1 + MSE and a small KL term (1e-4 per latent
element), its posterior's log-variance starting at -8 so the decoder sees clean latents from the
first step.

*UNet: SD 1.x blocks, small channels.* Three ``CrossAttnDownBlock2D`` + ``DownBlock2D``,
``UNetMidBlock2DCrossAttn``, ``UpBlock2D`` + three ``CrossAttnUpBlock2D``, two layers per block
(16 cross-attention layers, like SD), 4 heads, channels (64, 64, 96, 96): ~6.8 M parameters.

*Text encoder: an embedding-only CLIP (``CLIPTextModel`` with 0 transformer layers) trained
jointly with the UNet.* Its output at each position is ``LayerNorm(token + position
embedding)``: the end/padding tokens carry no information about the caption, so the only way
for the UNet to know that the object is a red circle is to attend to the "red" and "circle"
tokens *where the object is* — cross-attention has to localise words, which is what
Prompt-to-Prompt needs. In a contextual (causal) encoder trained from scratch the end and
padding tokens summarise the whole caption, and a small UNet could read everything from them
with spatially uniform attention. ``--text-layers N`` trains a causal CLIP with N layers
instead. Captions mention objects left to right, which gives the UNet a consistent rule to bind
the first colour/shape words to the left object.

*Grounding loss (``--grounding-weight``, default 0.02).* The renderer knows which pixels each
caption word names (an object's colour and shape words: its mask; the background's colour and
texture words: the rest), so training adds TokenCompose's token loss (Wang et al., CVPR 2024):
for every named word and every cross-attention layer of grid 4 x 4 or finer, ``(1 - m)^2``
where ``m`` is the share of the word's attention mass inside its region
(:func:`grounding_loss`, through :class:`CrossAttentionProbe`). Without it this small model's
word maps stay nearly flat (a word put 10-13 % of its attention on an object covering 8 % of
the image after 681 GPU steps), which leaves Prompt-to-Prompt's injected maps little layout to
carry and local blend no mask; SD's maps localise by scale, which a 7 M-parameter model trained
for minutes does not have. The loss changes no architecture and no saved weight format; the
exported model is an ordinary diffusers pipeline.

*Diffusion:* SD's noise schedule (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon
prediction), uniform timesteps, min-SNR-5 loss weighting (faster convergence), captions
dropped to ``""`` 10 % of the time for classifier-free guidance, AdamW with warm-up and a
linear cool-down over the last 20 % of each run's budget (so the weights are in a cooled-down
state whenever a run ends), and an EMA of the weights, which is what gets exported. The VAE's
``scaling_factor`` is set to 1 / std of its latents.

*Throughput:* scenes are sampled vectorised with numpy and rendered with torch on the training
device; token ids are looked up per word (every caption word is one token). On a GPU the step
runs under bf16 autocast with TF32 and fused AdamW, and data goes to the GPU through pinned
memory without blocking. A model this small is bound by per-step overhead (Python, kernel
launches) rather than FLOPs, so the default GPU batch is large (512, learning rate 8e-4, scaled
by sqrt(batch / 512) for other batches): a step should take a few tens of milliseconds, so ~5
minutes of UNet training give several thousand steps.

``--max-minutes`` counts from the start of :func:`main` (after the imports) to the saved and
evaluated pipeline: the VAE stage gets ``--vae-fraction`` of it, the UNet the rest, less
``--reserve-seconds`` for the final checkpoint, export and evaluation (``--eval-samples``
captions generated with 50 DDIM steps and scored with :mod:`tools.demo_model.scoring`, written
to ``OUT/eval.json`` and ``OUT/samples.png``).

``--smoke`` runs a tiny end-to-end check (a few steps of each stage, export, load, sample; the
tests use ``--device cpu``) in well under a minute. ``--init-from PIPELINE_DIR`` continues
training from an exported pipeline's weights with a fresh optimizer and fresh scenes (for when
the checkpoint, ~110 MiB with optimizer state and EMA, is too big to carry between machines).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from p2p_framework.demo.shapes import (
    TEXTURES,
    VOCABULARY,
    SceneBatch,
    render_batch,
    sample_scene_batch,
    to_device,
)
from p2p_framework.model import SD_DDIM_CONFIG
from p2p_framework.testing import prefix_text_encoder_keys

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

#: Resolution of the training renders and pipeline outputs.
IMAGE_SIZE = 64
#: Hidden size of the text encoder (= the UNet's cross_attention_dim).
TEXT_HIDDEN_SIZE = 128

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [64, 64, 96, 96],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": TEXT_HIDDEN_SIZE,
    "attention_head_dim": 4,
}

#: Initial log-variance of the VAE posterior (see build_models).
VAE_INIT_LOGVAR = -8.0

NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

# Seeds of the independent random streams (offset by --seed).
_MODEL_SEED = 0
_VAE_DATA_SEED = 1
_UNET_DATA_SEED = 2
_EVAL_SEED = 12345


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Models


def text_config(tokenizer: Any, layers: int) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 4 * TEXT_HIDDEN_SIZE,
        "projection_dim": TEXT_HIDDEN_SIZE,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.model_max_length,
        "hidden_act": "quick_gelu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_models(configs: dict[str, dict[str, Any]], seed: int) -> tuple[Any, Any, Any]:
    """VAE, UNet and text encoder from configs, initialised deterministically from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**configs["vae"])
        # Start with a nearly deterministic posterior (std e^-4): with logvar ~ 0 the sampled
        # latents are mostly noise and the decoder learns very slowly at first.
        latent = configs["vae"]["latent_channels"]
        with torch.no_grad():
            vae.encoder.conv_out.bias[latent:] = VAE_INIT_LOGVAR
        unet = UNet2DConditionModel(**configs["unet"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text"]))
    return vae, unet, text


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Data


#: Region indices of :func:`word_regions`: object slots 0 and 1, and the background.
REGION_BACKGROUND = 2


def word_regions(scenes: SceneBatch, max_length: int) -> np.ndarray:
    """Which image region each token of each caption names: ``(B, max_length)`` int64.

    The colour and shape words of object ``k`` name region ``k`` (its mask), the background's
    colour and texture words name :data:`REGION_BACKGROUND` (outside every object); every other
    token (start, "a", "on", end, padding) is ``-1``. Token ``i + 1`` is caption word ``i``
    (every caption word is one token, after the start token).
    """
    regions = np.full((len(scenes), max_length), -1, dtype=np.int64)
    for i in range(len(scenes)):
        words = scenes.caption_words(i)
        for k in range(int(scenes.n_objects[i])):
            # Object k's words are "a COLOUR SHAPE", preceded by "and" after the first.
            colour_word = 1 + 4 * k
            regions[i, colour_word + 1 : colour_word + 3] = k
        # "... on a [TEXTURE] COLOUR background": the last two words before "background".
        regions[i, len(words) - 1] = REGION_BACKGROUND
        if TEXTURES[int(scenes.texture[i])] != "plain":
            regions[i, len(words) - 2] = REGION_BACKGROUND
    return regions


def scene_regions(masks: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` float regions from :func:`render_batch`'s ``(B, 2, H, W)`` object masks:
    the two object slots, then the background (:data:`REGION_BACKGROUND`, outside both)."""
    objects = masks.float()
    return torch.cat([objects, 1.0 - objects.amax(dim=1, keepdim=True)], dim=1)


@dataclass
class TrainingBatch:
    """One UNet training batch.

    Attributes:
        images: ``(B, 3, H, W)`` renders in ``[-1, 1]``.
        ids: ``(B, max_length)`` caption token ids (the empty caption where dropped).
        regions: ``(B, 3, H, W)`` float masks: object slots 0 and 1 (empty when absent) and
            the background (:data:`REGION_BACKGROUND`).
        token_region: ``(B, max_length)`` the region each token names, ``-1`` for none
            (:func:`word_regions`; all ``-1`` where the caption was dropped).
    """

    images: torch.Tensor
    ids: torch.Tensor
    regions: torch.Tensor
    token_region: torch.Tensor


class SceneStream:
    """Batches of rendered scenes (in ``[-1, 1]``) and their caption token ids."""

    def __init__(
        self, seed: int | list[int], tokenizer: Any, device: torch.device, size: int = IMAGE_SIZE
    ):
        self.rng = np.random.default_rng(seed)
        self.device = device
        self.size = size
        self.max_length = tokenizer.model_max_length
        self.word_ids: dict[str, int] = {}
        for word in VOCABULARY:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise RuntimeError(f"caption word {word!r} is not a single token: {ids}")
            self.word_ids[word] = ids[0]
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.uncond = np.array(
            tokenizer("", padding="max_length", max_length=self.max_length).input_ids
        )
        # The fast path must agree with the tokenizer.
        probe = sample_scene_batch(np.random.default_rng(0), 16)
        expected = tokenizer(
            probe.captions(), padding="max_length", max_length=self.max_length
        ).input_ids
        if not np.array_equal(self.token_ids(probe), np.array(expected)):
            raise RuntimeError("caption token ids disagree with the tokenizer")

    def token_ids(self, batch: SceneBatch) -> np.ndarray:
        ids = np.full((len(batch), self.max_length), self.pad, dtype=np.int64)
        for i in range(len(batch)):
            row = [self.bos, *(self.word_ids[w] for w in batch.caption_words(i)), self.eos]
            ids[i, : len(row)] = row
        return ids

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state

    def images(self, n: int) -> torch.Tensor:
        batch = sample_scene_batch(self.rng, n)
        return self._to_float(render_batch(batch, self.size, self.device)[0])

    def batch(self, n: int, uncond_prob: float) -> TrainingBatch:
        """``n`` rendered scenes, their token ids (``uncond_prob`` of them the empty caption)
        and where each caption word is in the image (see :class:`TrainingBatch`)."""
        scenes = sample_scene_batch(self.rng, n)
        ids = self.token_ids(scenes)
        dropped = self.rng.random(n) < uncond_prob
        ids[dropped] = self.uncond
        token_region = word_regions(scenes, self.max_length)
        token_region[dropped] = -1
        images, masks, _ = render_batch(scenes, self.size, self.device)
        return TrainingBatch(
            images=self._to_float(images),
            ids=to_device(torch.as_tensor(ids), self.device),
            regions=scene_regions(masks),
            token_region=to_device(torch.as_tensor(token_region), self.device),
        )

    @staticmethod
    def _to_float(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Training helpers


class EMA:
    """Exponential moving average of named parameters (fp32), with the usual warm-up."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s for n, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for s, n in zip(self.shadow, self.names, strict=True):
            s.copy_(state[n])


def lr_factor(step: int, warmup: int, progress: float, cooldown: float) -> float:
    """Warm-up over ``warmup`` steps, constant, then linear cool-down over the last
    ``cooldown`` fraction of ``progress`` (0..1)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    cool = 1.0 if progress < 1.0 - cooldown else max(0.0, (1.0 - progress) / cooldown)
    return warm * max(cool, 0.01)


class Budget:
    """Time and step budget of one stage of one run."""

    def __init__(self, seconds: float | None, max_steps: int):
        self.seconds = seconds
        self.max_steps = max_steps
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def progress(self, step: int) -> float:
        p = step / max(1, self.max_steps)
        if self.seconds is not None:
            p = max(p, self.elapsed() / max(1e-6, self.seconds))
        return min(1.0, p)

    def done(self, step: int) -> bool:
        return step >= self.max_steps or (
            self.seconds is not None and self.elapsed() >= self.seconds
        )


class CrossAttentionProbe:
    """Cross-attention processor for training that also keeps each layer's probabilities.

    It computes what diffusers' default processor computes (softmax(q k^T * scale) v), but
    explicitly, so that the probabilities ``(batch, heads, queries, tokens)`` can be supervised
    by :func:`grounding_loss`; they are appended to ``maps`` (cleared by the caller).
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def attach(self, unet: Any) -> dict[str, Any]:
        """Serve every cross-attention layer (``attn2``) of ``unet``, keeping the other
        layers' processors; returns the processors it replaced, for ``set_attn_processor``."""
        saved = unet.attn_processors
        unet.set_attn_processor(
            {name: self if name.endswith("attn2.processor") else p for name, p in saved.items()}
        )
        return saved

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            raise RuntimeError("CrossAttentionProbe serves unmasked cross-attention only")
        batch, queries, _ = hidden_states.shape
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        k = split(attn.to_k(encoder_hidden_states))
        v = split(attn.to_v(encoder_hidden_states))
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(dim=-1)
        self.maps.append(probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, queries, -1)
        return attn.to_out[1](attn.to_out[0](out))


def region_shares(
    probs: torch.Tensor, regions: torch.Tensor, token_region: torch.Tensor
) -> torch.Tensor:
    """Share of each token's attention mass inside the region it names: ``(batch, tokens)``.

    ``probs`` ``(batch, heads, queries, tokens)`` on a square grid (averaged over heads);
    ``regions`` ``(batch, regions, H, W)``, area-averaged to that grid; ``token_region``
    ``(batch, tokens)`` region indices (entries for ``-1`` tokens are meaningless).
    """
    grid = math.isqrt(probs.shape[2])
    area = F.adaptive_avg_pool2d(regions, grid).flatten(2)  # (batch, regions, queries)
    per_token = probs.float().mean(dim=1)  # (batch, queries, tokens)
    inside = torch.einsum("bqt,brq->btr", per_token, area)  # mass in each region
    total = per_token.sum(dim=1).clamp_min(1e-8)  # (batch, tokens)
    return inside.gather(2, token_region.clamp_min(0).unsqueeze(-1)).squeeze(-1) / total


def grounding_loss(
    maps: list[torch.Tensor],
    regions: torch.Tensor,
    token_region: torch.Tensor,
    min_grid: int = 4,
) -> torch.Tensor:
    """How much of each named word's cross-attention falls outside what it names.

    For every layer's probabilities ``(batch, heads, queries, tokens)`` on a square grid of at
    least ``min_grid`` (coarser grids cannot place an 18 px object), every token ``t`` with
    ``token_region[b, t] = r >= 0`` contributes ``(1 - m)^2``, where ``m`` is the share of the
    token's attention mass (summed over queries, averaged over heads) that lies in region ``r``
    of ``regions`` ``(batch, regions, H, W)`` (area-averaged to the layer's grid). This is the
    token loss of TokenCompose (Wang et al., CVPR 2024). Returns the mean over tokens and
    layers (0 when no token names a region).
    """
    named = token_region >= 0
    if not maps or not bool(named.any()):
        return regions.new_zeros(())
    losses = []
    for probs in maps:
        grid = math.isqrt(probs.shape[2])
        if grid < min_grid or grid * grid != probs.shape[2]:
            continue
        share = region_shares(probs, regions, token_region)
        losses.append(((1.0 - share) ** 2)[named].mean())
    if not losses:
        return regions.new_zeros(())
    return torch.stack(losses).mean()


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, args: argparse.Namespace, device: torch.device, bf16: bool):
        from diffusers import DDPMScheduler

        from p2p_framework.testing import build_clip_tokenizer

        self.args = args
        self.device = device
        self.bf16 = bf16
        self.work_dir = Path(args.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.work_dir / CHECKPOINT_NAME
        self.tokenizer = build_clip_tokenizer(VOCABULARY, self.work_dir / "tokenizer")

        self.configs = {
            "vae": dict(VAE_CONFIG),
            "unet": dict(UNET_CONFIG),
            "text": text_config(self.tokenizer, args.text_layers),
        }
        self.state: dict[str, Any] = {
            "vae_step": 0,
            "vae_done": False,
            "unet_step": 0,
            "scaling_factor": None,
            "history": [],
            "train_seconds": {"vae": 0.0, "unet": 0.0},
            "samples_seen": {"vae": 0, "unet": 0},
        }
        ckpt = None
        if args.resume and self.ckpt_path.exists():
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            if ckpt.get("format") != CHECKPOINT_FORMAT:
                raise SystemExit(f"{self.ckpt_path}: unsupported checkpoint format")
            self.configs = ckpt["configs"]
            log(f"resuming from {self.ckpt_path}")
        elif args.resume:
            log(f"--resume: no checkpoint at {self.ckpt_path}, starting from scratch")
        elif self.ckpt_path.exists():
            log(f"warning: {self.ckpt_path} exists and will be overwritten (use --resume)")

        seed = args.seed
        self.vae, self.unet, self.text = build_models(self.configs, seed + _MODEL_SEED)
        self.vae_data = SceneStream(seed + _VAE_DATA_SEED, self.tokenizer, device)
        self.unet_data = SceneStream(seed + _UNET_DATA_SEED, self.tokenizer, device)
        self.noise = DDPMScheduler(**NOISE_SCHEDULE)
        self.alphas_cumprod = self.noise.alphas_cumprod.to(device=device, dtype=torch.float32)

        if args.init_from and ckpt is None:
            self._init_from_pipeline(Path(args.init_from))

        for m in (self.vae, self.unet, self.text):
            m.to(device)
        self.vae_opt = self._adamw(self.vae.parameters(), args.vae_lr)
        self.unet_params = [p for p in self.unet.parameters()] + [p for p in self.text.parameters()]
        self.unet_opt = self._adamw(self.unet_params, args.lr)
        named = [(f"unet.{n}", p) for n, p in self.unet.named_parameters()]
        named += [(f"text.{n}", p) for n, p in self.text.named_parameters()]
        self.ema = EMA(named, args.ema_decay)

        if ckpt is not None:
            self._load_checkpoint(ckpt)
        self.last_ckpt_time = time.monotonic()

        sizes = {
            "vae": count_parameters(self.vae),
            "unet": count_parameters(self.unet),
            "text_encoder": count_parameters(self.text),
        }
        self.state["parameters"] = sizes
        log(
            "parameters: "
            + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items())
            + f"; device {device}, bf16 {bf16}"
        )
        # Cross-attention supervision (--grounding-weight): the probe replaces the processors
        # of the cross-attention layers (attn2) during training only; export saves weights.
        self.probe: CrossAttentionProbe | None = None
        if args.grounding_weight > 0:
            self.probe = CrossAttentionProbe()
            self.probe.attach(self.unet)
        # The modules that run the training steps (compiled or not); the plain modules are
        # kept for saving, export and the VAE's encode/decode methods.
        self.unet_fwd = torch.compile(self.unet) if args.compile else self.unet

    # -- persistence ------------------------------------------------------------------------

    def _adamw(self, params, lr: float) -> torch.optim.Optimizer:
        kwargs: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.99), "weight_decay": 0.01}
        if self.device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW(params, **kwargs)

    def _init_from_pipeline(self, path: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        log(f"initialising from pipeline {path}")
        self.vae = AutoencoderKL.from_pretrained(path / "vae")
        self.unet = UNet2DConditionModel.from_pretrained(path / "unet")
        self.text = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32)
        self.configs = {
            "vae": {k: v for k, v in self.vae.config.items() if not k.startswith("_")},
            "unet": {k: v for k, v in self.unet.config.items() if not k.startswith("_")},
            "text": self.text.config.to_dict(),
        }
        self.state["vae_done"] = True
        self.state["scaling_factor"] = float(self.vae.config.scaling_factor)
        info_path = path / "training_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        previous = int(info.get("unet_step", 0)) + int(
            (info.get("init_from") or {}).get("unet_step", 0)
        )
        self.state["init_from"] = {"path": str(path), "unet_step": previous}
        # Fresh scenes: do not replay the data stream the exported model was trained on.
        self.unet_data = SceneStream(
            [self.args.seed + _UNET_DATA_SEED, previous], self.tokenizer, self.device
        )

    def save_checkpoint(self) -> None:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "configs": self.configs,
            "state": self.state,
            "vae": self.vae.state_dict(),
            "vae_opt": None if self.state["vae_done"] else self.vae_opt.state_dict(),
            "unet": self.unet.state_dict(),
            "text": self.text.state_dict(),
            "ema": self.ema.state_dict(),
            "unet_opt": self.unet_opt.state_dict() if self.state["unet_step"] else None,
            "rng": {
                "vae_data": self.vae_data.state(),
                "unet_data": self.unet_data.state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            },
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, self.ckpt_path)
        self.last_ckpt_time = time.monotonic()
        size = self.ckpt_path.stat().st_size / 2**20
        log(
            f"checkpoint: {self.ckpt_path} ({size:.0f} MiB; vae step {self.state['vae_step']}, "
            f"unet step {self.state['unet_step']})"
        )

    def _load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        self.state.update(ckpt["state"])
        self.vae.load_state_dict(ckpt["vae"])
        self.unet.load_state_dict(ckpt["unet"])
        self.text.load_state_dict(ckpt["text"])
        self.ema.load_state_dict({k: v.to(self.device) for k, v in ckpt["ema"].items()})
        if ckpt.get("vae_opt") is not None:
            self.vae_opt.load_state_dict(ckpt["vae_opt"])
        if ckpt.get("unet_opt") is not None:
            self.unet_opt.load_state_dict(ckpt["unet_opt"])
        for opt in (self.vae_opt, self.unet_opt):  # the checkpoint may come from another device
            for group in opt.param_groups:
                group["fused"] = True if self.device.type == "cuda" else None
        rng = ckpt["rng"]
        self.vae_data.set_state(rng["vae_data"])
        self.unet_data.set_state(rng["unet_data"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            try:
                torch.cuda.set_rng_state_all(rng["cuda"])
            except (RuntimeError, IndexError):
                log("warning: could not restore the CUDA random state")

    def maybe_checkpoint(self, step: int) -> None:
        a = self.args
        due_steps = a.ckpt_every > 0 and step % a.ckpt_every == 0
        due_time = (
            a.ckpt_minutes > 0 and time.monotonic() - self.last_ckpt_time >= a.ckpt_minutes * 60
        )
        if due_steps or due_time:
            self.save_checkpoint()

    # -- stages -----------------------------------------------------------------------------

    def train_vae(self, budget: Budget) -> None:
        a = self.args
        vae, opt = self.vae, self.vae_opt
        vae.train()
        latent_elems = None
        step = self.state["vae_step"]
        log(f"[vae] training from step {step} (max {a.vae_steps}, batch {a.vae_batch_size})")
        window_loss = torch.zeros((), device=self.device)
        window_rec = torch.zeros((), device=self.device)
        window_n = 0
        t_log = time.monotonic()
        run_t0 = time.monotonic()
        while not budget.done(step):
            for g in opt.param_groups:
                g["lr"] = a.vae_lr * lr_factor(step, a.vae_warmup, budget.progress(step), 0.2)
            images = self.vae_data.images(a.vae_batch_size)
            with _autocast(self.device, self.bf16):
                posterior = self.vae.encode(images).latent_dist
                z = posterior.sample()
                rec = self.vae.decode(z).sample
            if latent_elems is None:
                latent_elems = z[0].numel()
            rec = rec.float()
            l1 = (rec - images).abs().mean()
            mse = F.mse_loss(rec, images)
            kl = posterior.kl().float().mean() / latent_elems
            loss = l1 + mse + a.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            self.state["vae_step"] = step
            self.state["samples_seen"]["vae"] += a.vae_batch_size
            window_loss += loss.detach()
            window_rec += l1.detach()
            window_n += 1
            if step % a.log_every == 0 or budget.done(step):
                now = time.monotonic()
                rate = window_n / max(1e-9, now - t_log)
                entry = {
                    "stage": "vae",
                    "step": step,
                    "loss": float(window_loss) / window_n,
                    "l1": float(window_rec) / window_n,
                    "lr": opt.param_groups[0]["lr"],
                    "steps_per_s": rate,
                }
                self.state["history"].append(entry)
                log(
                    f"[vae] step {step} loss {entry['loss']:.4f} l1 {entry['l1']:.4f} "
                    f"lr {entry['lr']:.2e} {rate:.2f} steps/s "
                    f"({rate * a.vae_batch_size:.0f} img/s) t {budget.elapsed():.0f}s"
                )
                window_loss.zero_()
                window_rec.zero_()
                window_n = 0
                t_log = now
            self.maybe_checkpoint(step)
        self.state["train_seconds"]["vae"] += time.monotonic() - run_t0

    @torch.no_grad()
    def finish_vae(self) -> None:
        """Freeze the VAE and set its scaling factor to 1 / std of its latents."""
        self.vae.eval()
        if self.state["scaling_factor"] is None:
            rng_state = self.vae_data.state()
            latents = []
            for _ in range(8):
                images = self.vae_data.images(self.args.vae_batch_size)
                with _autocast(self.device, self.bf16):
                    latents.append(self.vae.encode(images).latent_dist.sample().float())
            self.vae_data.set_state(rng_state)
            z = torch.cat(latents)
            self.state["scaling_factor"] = float(1.0 / z.std())
            log(
                f"[vae] latents mean {float(z.mean()):.3f} std {float(z.std()):.3f}: "
                f"scaling_factor {self.state['scaling_factor']:.4f}"
            )
        self.state["vae_done"] = True
        self.vae.requires_grad_(False)

    def train_unet(self, budget: Budget) -> None:
        a = self.args
        unet, text, opt = self.unet, self.text, self.unet_opt
        unet.train()
        text.train()
        self.vae.eval()
        scale = self.state["scaling_factor"]
        step = self.state["unet_step"]
        log(f"[unet] training from step {step} (max {a.steps}, batch {a.batch_size})")
        window_loss = torch.zeros((), device=self.device)
        window_grounding = torch.zeros((), device=self.device)
        window_n = 0
        t_log = time.monotonic()
        run_t0 = time.monotonic()
        while not budget.done(step):
            for g in opt.param_groups:
                g["lr"] = a.lr * lr_factor(step, a.warmup, budget.progress(step), 0.2)
            batch = self.unet_data.batch(a.batch_size, a.uncond_prob)
            with torch.no_grad(), _autocast(self.device, self.bf16):
                latents = self.vae.encode(batch.images).latent_dist.sample().float() * scale
            noise = torch.randn_like(latents)
            t = torch.randint(0, len(self.alphas_cumprod), (len(latents),), device=self.device)
            ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = ac.sqrt() * latents + (1.0 - ac).sqrt() * noise
            with _autocast(self.device, self.bf16):
                context = text(batch.ids).last_hidden_state
                pred = self.unet_fwd(noisy, t, context).sample
            per_sample = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
            snr = ac.view(-1) / (1.0 - ac.view(-1))
            weight = torch.clamp(snr, max=a.min_snr_gamma) / snr
            loss = (weight * per_sample).mean()
            if self.probe is not None:
                grounding = grounding_loss(self.probe.maps, batch.regions, batch.token_region)
                self.probe.maps.clear()
                loss = loss + a.grounding_weight * grounding
                window_grounding += grounding.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet_params, 1.0)
            opt.step()
            self.ema.update(step)
            step += 1
            self.state["unet_step"] = step
            self.state["samples_seen"]["unet"] += a.batch_size
            window_loss += per_sample.detach().mean()
            window_n += 1
            if step % a.log_every == 0 or budget.done(step):
                now = time.monotonic()
                rate = window_n / max(1e-9, now - t_log)
                entry = {
                    "stage": "unet",
                    "step": step,
                    "mse": float(window_loss) / window_n,
                    "lr": opt.param_groups[0]["lr"],
                    "steps_per_s": rate,
                }
                grounding_note = ""
                if self.probe is not None:
                    entry["grounding"] = float(window_grounding) / window_n
                    grounding_note = f" grounding {entry['grounding']:.4f}"
                self.state["history"].append(entry)
                log(
                    f"[unet] step {step} eps-mse {entry['mse']:.4f}{grounding_note} "
                    f"lr {entry['lr']:.2e} {rate:.2f} steps/s ({rate * a.batch_size:.0f} img/s) "
                    f"t {budget.elapsed():.0f}s"
                )
                window_loss.zero_()
                window_grounding.zero_()
                window_n = 0
                t_log = now
            self.maybe_checkpoint(step)
        self.state["train_seconds"]["unet"] += time.monotonic() - run_t0

    # -- export -----------------------------------------------------------------------------

    def export(self, out: Path) -> Path:
        """Save a StableDiffusionPipeline folder with the EMA weights."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        vae = copy.deepcopy(self.vae).cpu().float().eval()
        vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        unet = copy.deepcopy(self.unet).cpu().float().eval()
        text = copy.deepcopy(self.text).cpu().float().eval()
        ema = self.ema.state_dict()
        with torch.no_grad():
            for name, p in unet.named_parameters():
                p.copy_(ema[f"unet.{name}"])
            for name, p in text.named_parameters():
                p.copy_(ema[f"text.{name}"])
        scheduler = DDIMScheduler(**{**SD_DDIM_CONFIG, **NOISE_SCHEDULE})
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        if self.args.save_dtype == "float16":
            # Trained in float32 (EMA); saved in half the size. Loading casts back as asked.
            pipe.to(torch.float16)
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out)
        prefix_text_encoder_keys(out)  # transformers 4 loads the encoder too
        info = {
            "description": "demo model trained on p2p_framework.demo.shapes scenes",
            "image_size": IMAGE_SIZE,
            "vocabulary": list(VOCABULARY),
            "vae_step": self.state["vae_step"],
            "unet_step": self.state["unet_step"],
            "samples_seen": self.state["samples_seen"],
            "init_from": self.state.get("init_from"),
            "train_seconds": self.state["train_seconds"],
            "parameters": self.state.get("parameters"),
            "scaling_factor": self.state["scaling_factor"],
            "text_layers": self.configs["text"]["num_hidden_layers"],
            "device": str(self.device),
            "args": {k: v for k, v in vars(self.args).items() if k not in ("out", "work_dir")},
            "history_tail": self.state["history"][-20:],
        }
        (out / "training_info.json").write_text(json.dumps(info, indent=2, default=str))
        log(f"saved pipeline to {out}")
        return out


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    out: Path,
    device: torch.device,
    n: int,
    steps: int,
    guidance: float,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Load the saved pipeline, generate ``n`` captions' images and score them.

    Writes ``eval.json`` and ``samples.png`` (a grid) into ``out``. Also scores the VAE's
    reconstructions of the same scenes (an upper bound on what generation can reach).
    """
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from .scoring import score_image

    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    scenes = sample_scene_batch(np.random.default_rng(_EVAL_SEED), n)
    captions = scenes.captions()
    images: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        chunk = captions[start : start + batch_size]
        gen = torch.Generator(device="cpu").manual_seed(_EVAL_SEED + start)
        result = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="np",
        )
        images.extend(np.clip(result.images * 255.0 + 0.5, 0, 255).astype(np.uint8))
    rendered = render_batch(scenes, IMAGE_SIZE, device)[0].float() / 127.5 - 1.0
    with torch.no_grad():
        vae = pipe.vae
        rec = vae.decode(vae.encode(rendered).latent_dist.mode()).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def rate(flags: list[bool]) -> float | None:
        return float(np.mean(flags)) if flags else None

    def summary(imgs: list[np.ndarray]) -> dict[str, Any]:
        scores = [score_image(img, scenes.scene(i)) for i, img in enumerate(imgs)]
        objects = sum(len(s.shape_ok) for s in scores)
        return {
            "background": float(np.mean([s.background_ok for s in scores])),
            "color_found": sum(sum(s.color_found) for s in scores) / objects,
            "shape_correct": sum(sum(s.shape_ok) for s in scores) / objects,
            "exact": float(np.mean([s.exact for s in scores])),
            "exact_1obj": rate([s.exact for s in scores if len(s.shape_ok) == 1]),
            "exact_2obj": rate([s.exact for s in scores if len(s.shape_ok) == 2]),
        }

    report = {
        "n": n,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generated": summary(images),
        "vae_reconstruction": summary(list(rec)),
        "captions": captions,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    cols = min(8, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * IMAGE_SIZE, cols * IMAGE_SIZE, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * IMAGE_SIZE : (r + 1) * IMAGE_SIZE, c * IMAGE_SIZE : (c + 1) * IMAGE_SIZE] = img
    Image.fromarray(grid).save(out / "samples.png")
    g, v = report["generated"], report["vae_reconstruction"]
    log(
        f"[eval] {n} samples, {steps} DDIM steps, cfg {guidance}: background {g['background']:.2f}"
        f", colour found {g['color_found']:.2f}, shape correct {g['shape_correct']:.2f}, exact "
        f"{g['exact']:.2f} (1 obj {g['exact_1obj']}, 2 obj {g['exact_2obj']}); "
        f"VAE reconstructions exact {v['exact']:.2f}"
    )
    return report


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.demo_model.train",
        description="Train the demo Stable-Diffusion-shaped model on procedural shape scenes "
        "and save it as a diffusers StableDiffusionPipeline folder.",
    )
    p.add_argument("--out", default="demo-model", help="pipeline folder to write")
    p.add_argument(
        "--work-dir", default=None, help="checkpoint folder (default: OUT-work next to OUT)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="bf16 autocast (auto: on CUDA only)",
    )
    p.add_argument("--stage", choices=["vae", "unet", "all"], default="all")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-clock budget of this run, from start-up to the saved pipeline",
    )
    p.add_argument(
        "--vae-fraction",
        type=float,
        default=0.25,
        help="share of the time budget for the VAE stage (stage all, VAE not done yet)",
    )
    p.add_argument(
        "--reserve-seconds",
        type=float,
        default=None,
        help="part of --max-minutes kept for export and evaluation (default 30 on CUDA, 60 on CPU)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="UNet steps, total over runs (50000; smoke 4)"
    )
    p.add_argument(
        "--vae-steps", type=int, default=None, help="VAE steps, total over runs (6000; smoke 4)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="UNet batch (512 CUDA, 16 CPU)")
    p.add_argument("--vae-batch-size", type=int, default=None, help="VAE batch (128 CUDA, 8 CPU)")
    p.add_argument(
        "--lr", type=float, default=None, help="UNet/text learning rate (8e-4 * sqrt(batch / 512))"
    )
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--vae-warmup", type=int, default=100)
    p.add_argument("--kl-weight", type=float, default=1e-4, help="per-element KL weight")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--uncond-prob", type=float, default=0.1, help="caption dropout for CFG")
    p.add_argument("--text-layers", type=int, default=0, help="CLIP transformer layers")
    p.add_argument(
        "--grounding-weight",
        type=float,
        default=0.02,
        help="weight of the cross-attention grounding loss (each caption word's attention "
        "inside what it names; 0: off)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/checkpoint.pt")
    p.add_argument(
        "--init-from", default=None, help="start from an exported pipeline folder's weights"
    )
    p.add_argument("--ckpt-every", type=int, default=2000, help="checkpoint every N steps")
    p.add_argument("--ckpt-minutes", type=float, default=3.0, help="and every M minutes")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="images to generate and score at the end (64 CUDA, 8 CPU; 0: none)",
    )
    p.add_argument(
        "--save-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="precision of the saved weights (the shipped demo model: float16)",
    )
    p.add_argument("--eval-steps", type=int, default=50, help="DDIM steps of the evaluation")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument(
        "--smoke", action="store_true", help="tiny end-to-end run (a few steps of each stage)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
    cuda = device.type == "cuda"
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    if args.smoke:
        args.steps = args.steps or 4
        args.vae_steps = args.vae_steps or 4
        args.batch_size = args.batch_size or 4
        args.vae_batch_size = args.vae_batch_size or 4
        args.warmup = args.vae_warmup = 2
        args.log_every = 1
        args.ckpt_every = 0
        args.ckpt_minutes = 0
        args.eval_samples = 2 if args.eval_samples is None else args.eval_samples
        args.eval_steps = min(args.eval_steps, 3)
    args.steps = args.steps or 50_000
    args.vae_steps = args.vae_steps or 6_000
    args.batch_size = args.batch_size or (512 if cuda else 16)
    args.lr = args.lr or 8e-4 * math.sqrt(args.batch_size / 512)
    args.vae_batch_size = args.vae_batch_size or (128 if cuda else 8)
    if args.eval_samples is None:
        args.eval_samples = 64 if cuda else 8
    if args.reserve_seconds is None:
        args.reserve_seconds = 30.0 if cuda else 60.0
    out = Path(args.out)
    args.work_dir = args.work_dir or str(out.parent / f"{out.name}-work")

    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    trainer = Trainer(args, device, bf16)
    deadline = None if args.max_minutes is None else t_start + args.max_minutes * 60.0

    def remaining() -> float | None:
        if deadline is None:
            return None
        return deadline - time.monotonic() - args.reserve_seconds

    if args.stage in ("vae", "all") and not trainer.state["vae_done"]:
        seconds = remaining()
        if seconds is not None and args.stage == "all":
            seconds *= args.vae_fraction
        trainer.train_vae(Budget(seconds, args.vae_steps))
        if args.stage == "all" or trainer.state["vae_step"] >= args.vae_steps:
            trainer.finish_vae()
        trainer.save_checkpoint()
    if args.stage in ("unet", "all"):
        if not trainer.state["vae_done"]:
            log("[unet] the VAE stage was not finished: freezing the VAE as it is")
        trainer.finish_vae()
        trainer.train_unet(Budget(remaining(), args.steps))
        trainer.save_checkpoint()
        trainer.export(out)
        if args.eval_samples > 0:
            evaluate(out, device, args.eval_samples, args.eval_steps, args.guidance_scale)
    log(f"done in {time.monotonic() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
