"""Stable Diffusion XL: loading, generation equal to diffusers' pipeline, every edit, every
source, saved inversions, guidance-free few-step runs, and the command line.

The model is the tiny SDXL of ``p2p_framework.testing`` (two tokenizers and text encoders,
no attention at the full latent size, two transformer blocks per module at the deepest level,
``text_time`` added conditioning), built offline and loaded through ``load_model``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from p2p_framework import EditSettings, OptionError, load_model, run_edit
from p2p_framework.inversion import InversionMismatchError, invert
from p2p_framework.model_sdxl import SDXL_FAMILY, StableDiffusionXLModel
from p2p_framework.plugins.inversion_sources import (
    DDIMSource,
    DirectSource,
    NegativePromptSource,
    NullTextSource,
)
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.refine import Refine
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.reweight import Reweight
from p2p_framework.testing import build_clip_tokenizer

SOURCE = "a photo of a cat on a mat"
TARGET = "a photo of a dog on a mat"
STEPS = 4


def settings(**overrides) -> EditSettings:
    return EditSettings(**{"steps": STEPS, **overrides})


def _diffusers_pipeline(model_dir: Path, model: StableDiffusionXLModel):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.scheduler = model.make_scheduler("ddim")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- loading


def test_loads_the_sdxl_adapter_from_the_folder(tiny_sdxl_model) -> None:
    model = tiny_sdxl_model
    assert isinstance(model, StableDiffusionXLModel) and model.family == SDXL_FAMILY
    # No attention at the full latent size, as SDXL: cross-attention at latent/2 and /4.
    assert model.cross_attention_levels((16, 16)) == (2, 4)
    processors = model.unet.attn_processors
    assert sum(".attn2." in name for name in processors) == 11  # SDXL base: 70
    context = model.encode_text([SOURCE, TARGET])
    hidden, pooled = model.unpack(context)
    assert context.shape == (2, 78, 64) and hidden.shape == (2, 77, 64)
    assert pooled.shape == (2, 32) and torch.count_nonzero(context[:, 77, 32:]) == 0
    assert torch.count_nonzero(model.uncond_context()) == 0  # force_zeros_for_empty_prompt


def test_tokenizers_that_split_a_prompt_differently_are_refused(tiny_sdxl_model, tmp_path):
    # A second tokenizer without "cat" as one token: word positions would differ. (Every
    # other test runs the model's own pair, which agrees.)
    other = build_clip_tokenizer(["a", "photo", "of", "on", "mat", "dog"], tmp_path / "tok")
    model = dataclasses.replace(tiny_sdxl_model, tokenizer_2=other)
    with pytest.raises(OptionError, match="two tokenizers split 'a photo of a cat"):
        model.encode_text([SOURCE])


def test_a_refiner_is_refused(tiny_sdxl_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from p2p_framework import ModelLoadError

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl_model_dir, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    index["tokenizer"] = [None, None]
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_model(refiner, device="cpu", dtype="float32")


def test_float16_vae_with_force_upcast_runs_in_float32(tiny_sdxl_model_dir: Path) -> None:
    """diffusers' SDXL rule: a float16 VAE whose config says force_upcast decodes (and
    encodes) in float32; the weights go back to float16 afterwards."""
    model = load_model(tiny_sdxl_model_dir, device="cpu", dtype="float32")
    assert model.vae.config.force_upcast
    model.vae.to(torch.float16)
    seen: list[torch.dtype] = []
    for part in (model.vae.decoder, model.vae.encoder):
        part.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    images = model.decode(torch.randn(1, 4, 16, 16))
    latents = model.encode_image(images)
    assert seen == [torch.float32, torch.float32]
    assert model.vae.dtype == torch.float16 and latents.dtype == torch.float16
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("force_zeros", [True, False])
def test_source_row_equals_diffusers_sdxl_pipeline(
    tiny_sdxl_model_dir: Path, tiny_sdxl_model, force_zeros: bool
) -> None:
    model = dataclasses.replace(tiny_sdxl_model, force_zeros_for_empty_prompt=force_zeros)
    pipe = _diffusers_pipeline(tiny_sdxl_model_dir, model)
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    ours = run_edit(model, [SOURCE, TARGET], [Replace()], settings=settings(guidance=7.5))
    theirs = pipe(
        SOURCE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(8888),
        output_type="latent",
        height=128,
        width=128,
    ).images
    torch.testing.assert_close(ours.latents[:1], theirs, atol=1e-4, rtol=0)


def test_size_conditioning_equals_diffusers_and_is_sdxl_only(
    tiny_sdxl_model_dir: Path, tiny_sdxl_model, tiny_model
) -> None:
    pipe = _diffusers_pipeline(tiny_sdxl_model_dir, tiny_sdxl_model)
    sizes = dict(original_size=(64, 96), crop_top_left=(8, 0), target_size=(128, 128))
    ours = run_edit(tiny_sdxl_model, [SOURCE], settings=settings(**sizes))
    plain = run_edit(tiny_sdxl_model, [SOURCE], settings=settings())
    theirs = pipe(
        SOURCE,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(8888),
        output_type="latent",
        height=128,
        width=128,
        guidance_scale=7.5,
        crops_coords_top_left=sizes["crop_top_left"],
        **{k: sizes[k] for k in ("original_size", "target_size")},
    ).images
    torch.testing.assert_close(ours.latents, theirs, atol=1e-4, rtol=0)
    assert (ours.latents - plain.latents).abs().max() > 1e-3  # the time ids matter
    with pytest.raises(OptionError, match="SDXL's size conditioning"):
        run_edit(tiny_model, [SOURCE], settings=settings(original_size=(64, 64)))


# --------------------------------------------------------------------------- edits


def test_identity_edit_gives_the_source(tiny_sdxl_model) -> None:
    full = settings(cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_min_downscale=1)
    result = run_edit(tiny_sdxl_model, [SOURCE, SOURCE], [Replace()], settings=full)
    torch.testing.assert_close(result.latents[1], result.latents[0], atol=1e-6, rtol=0)


def test_no_injection_gives_the_targets_plain_generation(tiny_sdxl_model) -> None:
    none = settings(cross_replace_steps=0.0, self_replace_steps=0.0)
    edited = run_edit(tiny_sdxl_model, [SOURCE, TARGET], [Replace()], settings=none)
    plain = run_edit(tiny_sdxl_model, [TARGET], settings=settings())
    torch.testing.assert_close(edited.latents[1:], plain.latents, atol=1e-4, rtol=1e-4)
    injected = run_edit(tiny_sdxl_model, [SOURCE, TARGET], [Replace()], settings=settings())
    assert (injected.latents[1] - plain.latents[0]).abs().max() > 1e-3


def test_local_blend_keeps_the_source_outside_the_mask(tiny_sdxl_model) -> None:
    # The default mask level (latent/4: 16x16 at 512 px SD 1.x) is SDXL's deepest level
    # (32x32 at 1024 px); the tiny model's 4x4.
    blend = LocalBlend(words=["cat", "dog"], start_blend=0.0, threshold=0.7)
    result = run_edit(tiny_sdxl_model, [SOURCE, TARGET], [Replace(), blend], settings=settings())
    mask = result.edit_runs[1].mask
    assert mask is not None and 0 < mask[1].float().mean() < 1
    outside = ~mask[1].expand_as(result.latents[1])
    assert torch.equal(result.latents[1][outside], result.latents[0][outside])


@pytest.mark.parametrize("guidance", [0.0, 7.5])
def test_every_edit_applies_with_and_without_guidance(tiny_sdxl_model, guidance) -> None:
    """Guidance 0 and 2 steps, as SDXL-Turbo is used: only conditional rows run, and each
    edit still changes its target against the plain target generation."""
    run = settings(steps=2, guidance=guidance)
    cases = {
        "replace": ([SOURCE, TARGET], [Replace()]),
        "refine": ([SOURCE, "a red photo of a cat on a mat"], [Refine()]),
        "reweight": ([SOURCE, SOURCE], [Replace(), Reweight({"cat": 4.0})]),
        "local-blend": (
            [SOURCE, TARGET],
            [Replace(), LocalBlend(words=["cat", "dog"], start_blend=0.0)],
        ),
    }
    for name, (prompts, edits) in cases.items():
        edited = run_edit(tiny_sdxl_model, prompts, edits, settings=run)
        plain = run_edit(tiny_sdxl_model, prompts[1:], settings=run)
        source = run_edit(tiny_sdxl_model, prompts[:1], settings=run)
        torch.testing.assert_close(edited.latents[:1], source.latents, atol=1e-4, rtol=0)
        changed = (edited.latents[1] - plain.latents[0]).abs().max().item()
        assert changed > 1e-3, name


def test_fused_edits_ride_on_the_unpacked_context(tiny_sdxl_model) -> None:
    edits = [Replace(), Reweight({"dog": 2.0})]
    exact = run_edit(tiny_sdxl_model, [SOURCE, TARGET], edits, settings=settings())
    fused = run_edit(tiny_sdxl_model, [SOURCE, TARGET], edits, settings=settings(fused_edits=True))
    torch.testing.assert_close(fused.latents, exact.latents, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def smooth_sdxl(tiny_sdxl_model_dir: Path, load_smooth_model):
    return load_smooth_model(tiny_sdxl_model_dir)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    yy, xx = np.mgrid[0:128, 0:160]
    disc = ((xx - 80) ** 2 + (yy - 64) ** 2) < 32**2
    pixels = np.stack([255 * xx / 159, 255 * yy / 127, 255.0 * disc], -1)
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    Image.fromarray(pixels.round().astype(np.uint8)).save(path)
    return path


def _error(result, reference: torch.Tensor) -> float:
    return ((result.latents[:1] - reference).norm() / reference.norm()).item()


@pytest.mark.filterwarnings("ignore::p2p_framework.P2PWarning")
def test_every_inversion_reconstructs_as_it_promises(smooth_sdxl, photo: Path) -> None:
    steps = 6
    z0 = invert(smooth_sdxl, photo, "a photo of a cat", "direct", num_steps=steps).image_latent

    def reconstruct(source, guidance=7.5):
        run = settings(steps=steps, guidance=guidance)
        return _error(run_edit(smooth_sdxl, ["a photo of a cat"], source=source, settings=run), z0)

    image = dict(image=str(photo), cache=False)
    ddim = reconstruct(DDIMSource(**image))
    null_text = reconstruct(NullTextSource(**image, num_inner_steps=10))
    negative = reconstruct(NegativePromptSource(**image))
    direct = reconstruct(DirectSource(**image))
    ddim_unguided = reconstruct(DDIMSource(**image), guidance=1.0)
    assert null_text < 0.75 * ddim, (null_text, ddim)
    assert negative < 0.1 * ddim and direct < 1e-5
    assert ddim_unguided < 0.1 * ddim


@pytest.mark.filterwarnings("ignore::p2p_framework.P2PWarning")
def test_saved_sdxl_inversion_edits_again_and_other_families_refuse(
    smooth_sdxl, tiny_model, photo: Path, tmp_path: Path
) -> None:
    steps = 3
    inversion = invert(smooth_sdxl, photo, SOURCE, "null-text", num_steps=steps, num_inner_steps=2)
    assert inversion.model_family == SDXL_FAMILY
    assert inversion.uncond_embeddings.shape == (steps, 78, 64)  # pooled row optimised too
    path = inversion.save(tmp_path / "cat.p2pinv")
    run = settings(steps=steps)
    source = NullTextSource(inversion=str(path))
    first = run_edit(smooth_sdxl, [SOURCE, TARGET], [Replace()], source=source, settings=run)
    again = run_edit(smooth_sdxl, [SOURCE, TARGET], [Replace()], source=source, settings=run)
    assert first.source_info["inversion"]["cache"] == "file"
    assert torch.equal(first.latents, again.latents)
    with pytest.raises(InversionMismatchError, match="made with a stable-diffusion-xl model"):
        run_edit(tiny_model, [SOURCE], source=source, settings=run)
    sd_inversion = invert(tiny_model, photo, SOURCE, "ddim", num_steps=steps)
    sd_path = sd_inversion.save(tmp_path / "sd.p2pinv")
    with pytest.raises(InversionMismatchError, match="this model is stable-diffusion-xl"):
        run_edit(smooth_sdxl, [SOURCE], source=DDIMSource(inversion=str(sd_path)), settings=run)


@pytest.mark.filterwarnings("ignore::p2p_framework.P2PWarning")
def test_few_step_inversion_and_edit_without_guidance(smooth_sdxl, photo: Path) -> None:
    run = settings(steps=2, guidance=0.0)
    image = dict(image=str(photo), cache=False)
    for source in (DDIMSource(**image), DirectSource(**image)):
        result = run_edit(smooth_sdxl, [SOURCE, TARGET], [Replace()], source=source, settings=run)
        alone = run_edit(smooth_sdxl, [SOURCE], source=source, settings=run)
        torch.testing.assert_close(result.latents[:1], alone.latents, atol=1e-4, rtol=0)
        assert (result.latents[1] - result.latents[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------- command line


def test_cli_edit_on_an_sdxl_folder(registry, tiny_sdxl_model_dir: Path, tmp_path: Path) -> None:
    from p2p_framework.cli import cli

    out = tmp_path / "out"
    args = ["edit", "--model", str(tiny_sdxl_model_dir), "--device", "cpu", "--quiet"]
    args += ["--prompt", SOURCE, "--target", TARGET, "--steps", "2", "--out", str(out)]
    args += ["--set", "pipeline.original_size=256,256", "--json"]
    result = CliRunner().invoke(cli, args, obj=registry)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["family"] == SDXL_FAMILY
    assert record["settings"]["original_size"] == [256, 256]
    assert Image.open(out / "target-1.png").size == (128, 128)
    again = tmp_path / "again"
    rerun = CliRunner().invoke(cli, ["rerun", str(out), "--out", str(again), "-q"], obj=registry)
    assert rerun.exit_code == 0, rerun.output
    for name in ("source.png", "target-1.png"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
