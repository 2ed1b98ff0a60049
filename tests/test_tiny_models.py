"""Tests of the tiny offline Stable-Diffusion-shaped models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTokenizer

from p2p_framework.testing import (
    BOS_TOKEN,
    DEFAULT_WORDS,
    END_OF_WORD,
    EOS_TOKEN,
    build_clip_tokenizer,
    bytes_to_unicode,
    save_tiny_pipeline,
)

TEXTS = (
    "A photo of a Cat sitting next to a mirror",
    "a painting of a squirrel eating a burger",
    "a lionfish and a zebra, café ☃ 1234!",
    "  Snowy   FOREST\tat sunset  ",
    "",
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: StableDiffusionPipeline, prompts: list[str], seed: int, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 3)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, generator=generator, output_type="np", **kwargs).images


# --------------------------------------------------------------------------- tokenizer


def test_every_default_word_is_one_token(tokenizer: CLIPTokenizer) -> None:
    not_single = {
        word: tokenizer.tokenize(word)
        for word in DEFAULT_WORDS
        if tokenizer.tokenize(word) != [word + END_OF_WORD]
    }
    assert not not_single
    sentence = " ".join(DEFAULT_WORDS)
    assert tokenizer.tokenize(sentence) == [word + END_OF_WORD for word in DEFAULT_WORDS]


def test_tokenizer_lowercases(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer("A Photo of a CAT").input_ids == tokenizer("a photo of a cat").input_ids


@pytest.mark.parametrize("word", ["lionfish", "zebra"])
def test_unlisted_word_splits_into_several_tokens(tokenizer: CLIPTokenizer, word: str) -> None:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) > 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == word


def test_vocab_has_all_byte_level_characters(tokenizer: CLIPTokenizer) -> None:
    vocab = tokenizer.get_vocab()
    for char in bytes_to_unicode().values():
        assert char in vocab
        assert char + END_OF_WORD in vocab
    # Any text tokenizes without falling back to the unknown token (which is EOS for CLIP).
    ids = tokenizer("café ☃ 1234 <>{}", add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids


def test_special_tokens_and_padding(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == EOS_TOKEN
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    cat, dog = tokenizer.convert_tokens_to_ids(["cat</w>", "dog</w>"])

    ids = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == bos and ids[2] == cat
    assert ids[3:] == [eos] * 74

    long = tokenizer("dog " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77
    assert long[0] == bos and long[-1] == eos and long[1:-1] == [dog] * 75


def test_all_loaders_tokenize_identically(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tiny_model_dir / "tokenizer"
    pipe_tokenizer = StableDiffusionPipeline.from_pretrained(tiny_model_dir).tokenizer
    auto = AutoTokenizer.from_pretrained(folder)
    clip = CLIPTokenizer.from_pretrained(folder)
    # Only the BPE files, as an older/other loader would read them.
    shutil.copy(folder / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(folder / "merges.txt", tmp_path / "merges.txt")
    from_files = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    for text in TEXTS:
        expected = clip(text, padding="max_length", max_length=77, truncation=True).input_ids
        for other in (pipe_tokenizer, auto, from_files):
            assert (
                other(text, padding="max_length", max_length=77, truncation=True).input_ids
                == expected
            ), (type(other).__name__, text)


def test_custom_words_with_shared_prefixes_and_suffixes(tmp_path: Path) -> None:
    words = ["sitting", "tiger", "sit", "ting", "tit", "in", "i", "ingot", "Zoë"]
    tokenizer = build_clip_tokenizer(words, tmp_path, max_length=32)
    assert tokenizer.model_max_length == 32
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tokenizer("sittingtiger", add_special_tokens=False).input_ids) > 1
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("sitting tiger zoë").input_ids == tokenizer("sitting tiger zoë").input_ids
    # every merge result is in the vocabulary
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert all("".join(merge.split(" ")) in vocab for merge in merges)


@pytest.mark.parametrize("bad", ["", "two words", "cat's", "r2d2"])
def test_build_clip_tokenizer_rejects_non_words(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        build_clip_tokenizer([bad], tmp_path)


# --------------------------------------------------------------------------- pipeline


def test_pipeline_folder_components(pipe: StableDiffusionPipeline, tiny_model_dir: Path) -> None:
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.vae_scale_factor == 8
    assert pipe.safety_checker is None
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.sample_size == 16
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]


def test_cross_attention_grids_match_sd1(pipe: StableDiffusionPipeline) -> None:
    """Cross-attention runs at latent/1, /2, /4 (down and up) and latent/8 (mid)."""
    seen: list[tuple[str, int]] = []

    def record(name: str):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            seen.append((name.split(".")[0], hidden_states.shape[1]))

        return hook

    handles = [
        module.register_forward_pre_hook(record(name), with_kwargs=True)
        for name, module in pipe.unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        _generate(pipe, ["a cat"], seed=0, num_inference_steps=1, guidance_scale=1.0)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [
        ("down_blocks", 16 * 16),
        ("down_blocks", 8 * 8),
        ("down_blocks", 4 * 4),
        ("mid_block", 2 * 2),
        *[("up_blocks", 4 * 4)] * 2,  # up blocks have layers_per_block + 1 transformers
        *[("up_blocks", 8 * 8)] * 2,
        *[("up_blocks", 16 * 16)] * 2,
    ]


def test_generation_is_deterministic_square(pipe: StableDiffusionPipeline) -> None:
    first = _generate(pipe, ["a photo of a cat"], seed=3)
    second = _generate(pipe, ["a photo of a cat"], seed=3)
    assert first.shape == (1, 128, 128, 3)
    np.testing.assert_array_equal(first, second)
    assert first.std() > 0.05  # not a flat image


def test_generation_non_square(pipe: StableDiffusionPipeline) -> None:
    images = _generate(pipe, ["a photo of a cat"], seed=0, height=128, width=96)
    assert images.shape == (1, 128, 96, 3)
    assert np.isfinite(images).all()


def test_prompt_changes_the_image(pipe: StableDiffusionPipeline) -> None:
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = pipe(
        ["a photo of a cat", "a photo of a dog", "a photo of a cat"],
        latents=latents.repeat(3, 1, 1, 1),
        num_inference_steps=3,
        output_type="np",
    ).images
    np.testing.assert_allclose(images[0], images[2], atol=1e-5)
    assert np.abs(images[0] - images[1]).mean() > 0.02


def test_building_is_deterministic_and_keeps_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(1)
    torch.manual_seed(1234)
    first = save_tiny_pipeline(tmp_path / "first", seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = save_tiny_pipeline(tmp_path / "second", seed=7)
    other = save_tiny_pipeline(tmp_path / "other", seed=8)
    for sub, name in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ]:
        a, b, c = (load_file(d / sub / name) for d in (first, second, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_vpred_pipeline(tiny_vpred_model_dir: Path) -> None:
    scheduler_config = json.loads(
        (tiny_vpred_model_dir / "scheduler" / "scheduler_config.json").read_text()
    )
    assert scheduler_config["prediction_type"] == "v_prediction"
    assert scheduler_config["beta_schedule"] == "scaled_linear"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_vpred_model_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.upcast_attention is True
    images = _generate(pipe, ["a photo of a cat"], seed=0, height=96, width=128)
    assert images.shape == (1, 96, 128, 3)
    assert np.isfinite(images).all()


def test_rejects_unknown_prediction_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        save_tiny_pipeline(tmp_path, prediction_type="sample")


def test_saved_text_encoders_load_on_transformers_4_too(tiny_model_dir) -> None:
    """transformers 4 finds a CLIP text encoder's weights only under ``text_model.``; without
    the prefix it silently starts from random weights (the demo model's words lost)."""
    from safetensors import safe_open

    from p2p_framework.demo import DEMO_MODEL_DIR

    for folder in (Path(DEMO_MODEL_DIR), Path(tiny_model_dir)):
        with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as weights:
            names = list(weights.keys())
        assert names and all(name.startswith("text_model.") for name in names), folder
