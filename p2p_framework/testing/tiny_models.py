"""Tiny, randomly initialised Stable-Diffusion-shaped models, built fully offline.

The test-suite (and anyone without network access to a model hub) needs a real
:class:`diffusers.StableDiffusionPipeline` folder to exercise the Prompt-to-Prompt code paths.
This module builds one from configs only:

* :func:`build_clip_tokenizer` writes a small CLIP byte-level BPE tokenizer (``vocab.json`` +
  ``merges.txt``) in which every word of a given list is a single token while any other text
  still tokenizes (it falls back to byte-level characters);
* :func:`save_tiny_pipeline` builds a tiny UNet / VAE / CLIP text encoder with exactly the block
  structure of Stable Diffusion 1.x (attention grids at latent/1, /2, /4 and /8, VAE scale
  factor 8) and saves the whole pipeline with ``save_pretrained``.

The weights are random, so images are meaningless, but they are deterministic for a seed and
depend on the prompt, which is all the tests need.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..model import SD_DDIM_CONFIG

__all__ = [
    "BOS_TOKEN",
    "CROSS_ATTENTION_OUT_GAIN",
    "CROSS_ATTENTION_QK_GAIN",
    "DEFAULT_WORDS",
    "EOS_TOKEN",
    "END_OF_WORD",
    "TEXT_HIDDEN_SIZE",
    "UNET_ATTENTION_HEADS",
    "UNET_BLOCK_OUT_CHANNELS",
    "VAE_BLOCK_OUT_CHANNELS",
    "build_clip_tokenizer",
    "prefix_text_encoder_keys",
    "bytes_to_unicode",
    "save_tiny_pipeline",
    "save_tiny_sdxl_pipeline",
]

#: Beginning-of-text token of the CLIP tokenizer.
BOS_TOKEN = "<|startoftext|>"
#: End-of-text token of the CLIP tokenizer (also used for padding, as in Stable Diffusion).
EOS_TOKEN = "<|endoftext|>"
#: Suffix CLIP's BPE appends to the last symbol of every word.
END_OF_WORD = "</w>"

#: Output channels of the tiny UNet's four levels.
UNET_BLOCK_OUT_CHANNELS: tuple[int, ...] = (32, 32, 64, 64)
#: Number of attention heads of the tiny UNet (diffusers' legacy ``attention_head_dim``).
UNET_ATTENTION_HEADS = 4
#: Factor applied to the random query and key weights of the UNet's cross-attention layers:
#: it makes cross-attention maps peaked (normalised entropy ~0.55 instead of ~1.0, uniform).
CROSS_ATTENTION_QK_GAIN = 5.0
#: Factor applied to the random output weights of the UNet's cross-attention layers, so the
#: prompt clearly changes the image.
CROSS_ATTENTION_OUT_GAIN = 2.0
#: Output channels of the tiny VAE's four levels.
VAE_BLOCK_OUT_CHANNELS: tuple[int, ...] = (8, 16, 32, 32)
#: Hidden size of the tiny CLIP text encoder, also the UNet's ``cross_attention_dim``.
TEXT_HIDDEN_SIZE = 32

#: Words that are single tokens in the default tiny tokenizer (words used in tests and docs).
DEFAULT_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "and",
    "with",
    "next",
    "to",
    "painting",
    "photo",
    "squirrel",
    "lion",
    "cat",
    "tiger",
    "dog",
    "eating",
    "burger",
    "sitting",
    "mirror",
    "house",
    "mountain",
    "fall",
    "smiling",
    "bunny",
    "doll",
    "soup",
    "pea",
    "croutons",
    "red",
    "blue",
    "green",
    "yellow",
    "circle",
    "square",
    "triangle",
    "star",
    "background",
    "car",
    "tree",
    "big",
    "small",
    "white",
    "black",
    "sunset",
    "snowy",
    "forest",
    "beach",
)


def bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible byte -> printable unicode character table (256 entries).

    This is the table CLIP's (and GPT-2's) byte-level BPE uses, in the same order, so the
    first 256 vocabulary entries match the real CLIP vocabulary.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _word_symbols(word: str, byte_encoder: dict[int, str]) -> list[str]:
    """Byte-level symbols of ``word`` as CLIP's BPE sees them (last one ends with ``</w>``)."""
    symbols = [byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def _normalize_word(word: str) -> str:
    """Normalise a word like the CLIP tokenizer does (NFC, lowercase) and validate it."""
    normalized = unicodedata.normalize("NFC", word).lower()
    if not normalized or not normalized.isalpha():
        raise ValueError(
            f"tiny tokenizer words must be non-empty and made of letters only, got {word!r}"
        )
    return normalized


def build_clip_tokenizer(
    words: Iterable[str], save_dir: str | Path, max_length: int = 77
) -> CLIPTokenizer:
    """Build a small CLIP BPE tokenizer offline in which every word of ``words`` is one token.

    The tokenizer behaves like Stable Diffusion's: it lowercases, wraps the ids in
    ``<|startoftext|>`` / ``<|endoftext|>``, pads with ``<|endoftext|>`` and has
    ``model_max_length == max_length``. Its vocabulary holds the 256 byte-level base characters
    and their ``</w>`` (end-of-word) variants, so any text tokenizes; a word that is not listed
    falls back to several sub-word tokens.

    Each listed word gets a chain of merges built from its *end*: for ``"cat"`` the merges are
    ``a t</w>`` then ``c at</w>``. Every merge has a ``</w>`` symbol on its right, and the only
    ``</w>`` symbol of a word is its last one, so while a word is being merged it is always
    "single characters + one suffix token" and the only applicable merge extends that suffix by
    one character. Merges added for one word therefore can never stop another listed word from
    collapsing to one token (which a left-to-right chain such as ``c a``, ``ca t</w>`` can: the
    merge ``t i`` of "tiger" would break "sitting"). This is verified before returning.

    ``vocab.json`` and ``merges.txt`` are written to ``save_dir``, which is then completed with
    ``save_pretrained`` so that ``CLIPTokenizer.from_pretrained(save_dir)`` (and
    ``AutoTokenizer``) load it.

    Args:
        words: Words that must each be a single token (letters only; case-insensitive).
        save_dir: Folder to write the tokenizer files to (created if needed).
        max_length: ``model_max_length`` of the tokenizer (77 for Stable Diffusion).

    Returns:
        The tokenizer, loaded back from ``save_dir``.

    Raises:
        ValueError: If a word is empty or contains non-letters.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    byte_encoder = bytes_to_unicode()

    base = list(byte_encoder.values())
    vocab_tokens: list[str] = base + [ch + END_OF_WORD for ch in base]
    known = set(vocab_tokens)
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    normalized_words = list(dict.fromkeys(_normalize_word(w) for w in words))
    for word in normalized_words:
        symbols = _word_symbols(word, byte_encoder)
        suffix = symbols[-1]
        for symbol in reversed(symbols[:-1]):
            pair = (symbol, suffix)
            suffix = symbol + suffix
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
            if suffix not in known:
                known.add(suffix)
                vocab_tokens.append(suffix)
    vocab_tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_tokens)}

    with open(save_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=1)
    with open(save_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)

    tokenizer = CLIPTokenizer.from_pretrained(save_dir, model_max_length=max_length)
    tokenizer.save_pretrained(save_dir)
    tokenizer = CLIPTokenizer.from_pretrained(save_dir)

    for word in normalized_words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:  # pragma: no cover - guaranteed by the merge construction
            raise RuntimeError(f"word {word!r} is not a single token: {ids}")
    return tokenizer


def _sharpen_cross_attention(unet: UNet2DConditionModel) -> None:
    """With PyTorch's default init, cross-attention is almost uniform over the 77 tokens, so
    the prompt barely matters; sharpen it and strengthen its output so it does."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                module.to_q.weight.mul_(CROSS_ATTENTION_QK_GAIN)
                module.to_k.weight.mul_(CROSS_ATTENTION_QK_GAIN)
                module.to_out[0].weight.mul_(CROSS_ATTENTION_OUT_GAIN)


def _tiny_unet(sample_size: int, prediction_type: str) -> UNet2DConditionModel:
    """Tiny UNet with Stable Diffusion 1.x's block structure (2.x-style for v-prediction)."""
    sd2_style = prediction_type == "v_prediction"
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=UNET_ATTENTION_HEADS,
        use_linear_projection=sd2_style,
        upcast_attention=sd2_style,
    )
    _sharpen_cross_attention(unet)
    return unet


def _tiny_vae(sample_size: int, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """Tiny VAE with 4 levels, hence Stable Diffusion's scale factor of 8."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=sample_size * 8,
        scaling_factor=scaling_factor,
    )


def _tiny_text_encoder(
    tokenizer: CLIPTokenizer, *, projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Tiny CLIP text encoder whose vocabulary and special ids match ``tokenizer``; with
    ``projection``, SDXL's second encoder (a projected pooled output)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Drawn before construction: building the model consumes random numbers differently in
    # transformers 4 and 5.
    seed = int(torch.randint(0, 2**62, ()))
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    _initialise_clip_text(model, config, torch.Generator().manual_seed(seed))
    return model


def _initialise_clip_text(
    model: CLIPTextModel | CLIPTextModelWithProjection,
    config: CLIPTextConfig,
    generator: torch.Generator,
) -> None:
    """Draw the text encoder's weights ourselves, in parameter-name order.

    CLIP's own initialisation (these standard deviations) draws its tensors in an order that
    changed between transformers 4 and 5, so the same seed gave another tiny model on each
    and weight-sensitive tests passed on one only. Drawing in a fixed order from ``generator``
    gives the same model on every supported release.
    """
    hidden = config.hidden_size
    in_proj = hidden**-0.5 * (2 * config.num_hidden_layers) ** -0.5
    stds = {
        "token_embedding.weight": config.initializer_range,
        "position_embedding.weight": config.initializer_range,
        "q_proj.weight": in_proj,
        "k_proj.weight": in_proj,
        "v_proj.weight": in_proj,
        "out_proj.weight": hidden**-0.5,
        "fc1.weight": (2 * hidden) ** -0.5,
        "fc2.weight": in_proj,
        "text_projection.weight": hidden**-0.5,  # CLIPTextModelWithProjection (SDXL's second)
    }
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            suffix = ".".join(name.split(".")[-2:])
            if suffix in stds:
                parameter.normal_(
                    0.0, stds[suffix] * config.initializer_factor, generator=generator
                )
            elif "layer_norm" in name and name.endswith(".weight"):
                parameter.fill_(1.0)
            elif name.endswith(".bias"):
                parameter.zero_()
            else:  # pragma: no cover - a parameter a new transformers release added
                raise RuntimeError(f"no initialisation rule for text encoder parameter {name}")


def save_tiny_pipeline(
    save_dir: str | Path,
    *,
    prediction_type: str = "epsilon",
    sample_size: int = 16,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
) -> Path:
    """Build a tiny random Stable Diffusion pipeline and save it as a standard diffusers folder.

    The folder loads offline with ``StableDiffusionPipeline.from_pretrained(save_dir)``. The UNet
    has SD 1.x's blocks (three cross-attention down blocks, one plain down block, a
    cross-attention mid block and the mirrored up blocks), so cross-attention maps come at
    latent/1, /2, /4 and /8 like SD 1.x's 64, 32, 16 and 8; the VAE has 4 levels (scale
    factor 8); the text encoder is a 2-layer CLIP; the scheduler is SD's DDIM configuration.
    The random query/key/output weights of the UNet's cross-attention layers are scaled up
    (:data:`CROSS_ATTENTION_QK_GAIN`, :data:`CROSS_ATTENTION_OUT_GAIN`) so that cross-attention
    maps are peaked rather than uniform and the prompt visibly changes the image.

    Args:
        save_dir: Folder to write the pipeline to (created if needed).
        prediction_type: ``"epsilon"`` (SD 1.x) or ``"v_prediction"`` (SD 2.x; the UNet then
            also uses linear projections and upcast attention, like SD 2.1).
        sample_size: Latent size of the UNet (16 means 128 px images).
        seed: Seed of the random weights; building is deterministic for a seed and does not
            change the global torch random state.
        words: Words that are single tokens of the tokenizer.

    Returns:
        ``save_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``prediction_type`` is not supported or a word is invalid.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    save_dir = Path(save_dir)
    tokenizer = build_clip_tokenizer(words, save_dir / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(sample_size, prediction_type)
        vae = _tiny_vae(sample_size)
        text_encoder = _tiny_text_encoder(tokenizer)
    scheduler = DDIMScheduler(**SD_DDIM_CONFIG, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(save_dir)
    prefix_text_encoder_keys(save_dir)
    return save_dir


def prefix_text_encoder_keys(pipeline_dir: str | Path) -> None:
    """Rewrite ``text_encoder/model.safetensors`` with ``text_model.``-prefixed keys.

    transformers 5 saves a ``CLIPTextModel`` without the prefix; transformers 4 then finds none
    of its weights and, with only a logged warning, initialises the encoder at random. Every
    release loads the prefixed names (Stable Diffusion checkpoints on the hub have them), so a
    folder written this way means the same model everywhere. Files already prefixed, and
    sharded encoders, are left as they are.
    """
    from safetensors.torch import load_file, save_file

    path = Path(pipeline_dir) / "text_encoder" / "model.safetensors"
    if not path.is_file():
        return
    weights = load_file(path)
    if all(name.startswith("text_model.") for name in weights):
        return
    prefixed = {
        name if name.startswith("text_model.") else f"text_model.{name}": tensor
        for name, tensor in weights.items()
    }
    save_file(prefixed, path, metadata={"format": "pt"})


#: The tiny SDXL UNet's levels: no attention at the full latent size (as SDXL), then one and
#: two transformer blocks per attention module (SDXL: 2 and 10).
SDXL_BLOCK_OUT_CHANNELS: tuple[int, ...] = (32, 32, 64)
SDXL_TRANSFORMER_LAYERS: tuple[int, ...] = (1, 1, 2)
#: Width of each tiny SDXL text encoder (SDXL: 768 and 1280); the UNet's context is both.
SDXL_TEXT_HIDDEN_SIZE = TEXT_HIDDEN_SIZE
#: Width of each of the six time ids' embedding (SDXL: 256).
SDXL_TIME_EMBED_DIM = 8


def _tiny_sdxl_unet(sample_size: int) -> UNet2DConditionModel:
    """Tiny UNet with SDXL's structure: no attention at latent/1, cross-attention at latent/2
    and /4 with several transformer blocks per module, ``text_time`` added conditioning."""
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=SDXL_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        transformer_layers_per_block=SDXL_TRANSFORMER_LAYERS,
        norm_num_groups=8,
        cross_attention_dim=2 * SDXL_TEXT_HIDDEN_SIZE,
        attention_head_dim=UNET_ATTENTION_HEADS,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_TEXT_HIDDEN_SIZE + 6 * SDXL_TIME_EMBED_DIM,
    )
    _sharpen_cross_attention(unet)
    return unet


def save_tiny_sdxl_pipeline(
    save_dir: str | Path,
    *,
    sample_size: int = 16,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    force_zeros_for_empty_prompt: bool = True,
) -> Path:
    """Build a tiny random Stable Diffusion XL pipeline and save it as a diffusers folder.

    It loads with ``StableDiffusionXLPipeline.from_pretrained(save_dir)`` and has SDXL's
    layout: two tokenizers (the second pads with ``!``), a CLIP text encoder and a CLIP text
    encoder with projection, a UNet without attention at the full latent size and with several
    transformer blocks per attention module, ``text_time`` added conditioning (pooled text plus
    six time ids), a 4-level VAE (scale factor 8, SDXL's scaling factor 0.13025, float16
    upcast), SD's DDIM scheduler.

    Args:
        save_dir: folder to write the pipeline to (created if needed).
        sample_size: latent size of the UNet (16 means 128 px images).
        seed: seed of the random weights (the global random state is left as it was).
        words: words that are single tokens of both tokenizers.
        force_zeros_for_empty_prompt: the pipeline's unconditional rule (SDXL base: True).

    Returns:
        ``save_dir`` as a :class:`~pathlib.Path`.
    """
    from diffusers import StableDiffusionXLPipeline

    save_dir = Path(save_dir)
    tokenizer = build_clip_tokenizer(words, save_dir / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(save_dir / "tokenizer", pad_token="!")
    tokenizer_2.save_pretrained(save_dir / "tokenizer_2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_sdxl_unet(sample_size)
        vae = _tiny_vae(sample_size, scaling_factor=0.13025)
        text_encoder = _tiny_text_encoder(tokenizer)
        text_encoder_2 = _tiny_text_encoder(tokenizer, projection=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(**SD_DDIM_CONFIG),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(save_dir)
    prefix_text_encoder_keys(save_dir)
    return save_dir
