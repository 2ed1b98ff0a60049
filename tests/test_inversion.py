"""Tests of real-photo inversion (``p2p_framework.inversion``) and its source plugins.

The models are the tiny ones with a scaled UNet output layer (``load_smooth_model`` in
conftest.py): inversion assumes a well-conditioned noise predictor, which the tiny random UNet
is not.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2p_framework import EditSettings, OptionError, P2PError, load_model, run_edit
from p2p_framework.inversion import (
    MIN_SIDE,
    ImageError,
    Inversion,
    InversionError,
    InversionFileError,
    InversionMismatchError,
    invert,
    load_image,
    prepare_image,
)
from p2p_framework.plugins.inversion_sources import (
    DDIMSource,
    DirectSource,
    NegativePromptSource,
    NullTextSource,
)
from p2p_framework.plugins.replace import Replace
from p2p_framework.testing import save_tiny_pipeline

STEPS = 10
PROMPT = "a photo of a cat"
TARGET = "a photo of a dog"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, load_smooth_model):
    return load_smooth_model(tiny_model_dir)


@pytest.fixture(scope="module")
def vpred_model(tiny_vpred_model_dir: Path, load_smooth_model):
    return load_smooth_model(tiny_vpred_model_dir)


def _picture(width: int = 160, height: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    red = 255 * xx / (width - 1)
    green = 255 * yy / (height - 1)
    blue = 255.0 * (((xx - width / 2) ** 2 + (yy - height / 2) ** 2) < (height / 4) ** 2)
    return np.stack([red, green, blue], -1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 160x128 synthetic photo (gradients and a disc), not square on purpose."""
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    Image.fromarray(_picture()).save(path)
    return path


def _settings(guidance: float = 7.5, **kwargs) -> EditSettings:
    return EditSettings(steps=STEPS, guidance=guidance, **kwargs)


def _relative_error(latent: torch.Tensor, reference: torch.Tensor) -> float:
    return ((latent - reference).norm() / reference.norm()).item()


def _reconstruct(model, source, guidance: float = 7.5, prompts=(PROMPT,), edits=()):
    return run_edit(model, list(prompts), edits, source=source, settings=_settings(guidance))


# --------------------------------------------------------------------------- methods


def test_ddim_inversion_guidance_1_reconstructs(model, photo: Path) -> None:
    inversion = invert(model, photo, PROMPT, "ddim", num_steps=STEPS)
    assert inversion.latent.shape == (1, 4, 16, 16)
    assert inversion.uncond_embeddings is None and inversion.source_latents is None
    assert inversion.stats["unet_forward_rows"] == STEPS
    z0 = inversion.image_latent
    result = _reconstruct(model, DDIMSource(image=str(photo), cache=False), guidance=1.0)
    error = _relative_error(result.latents[:1], z0)
    from_noise = _reconstruct(model, None, guidance=1.0)  # seed 8888, no inversion
    assert error < 0.25
    assert error < 0.1 * _relative_error(from_noise.latents[:1], z0)


def test_null_text_beats_ddim_at_guidance(model, photo: Path) -> None:
    z0 = invert(model, photo, PROMPT, "ddim", num_steps=STEPS).image_latent
    ddim = _reconstruct(model, DDIMSource(image=str(photo), cache=False))
    # The tiny model needs more Adam steps than SD (its text path is far less sensitive).
    null_text = _reconstruct(
        model, NullTextSource(image=str(photo), cache=False, num_inner_steps=20)
    )
    ddim_error = _relative_error(ddim.latents[:1], z0)
    null_error = _relative_error(null_text.latents[:1], z0)
    assert null_error < 0.4 * ddim_error, (null_error, ddim_error)
    info = null_text.source_info["inversion"]
    assert info["method"] == "null-text" and info["cache"] == "off"
    assert len(info["inner_steps"]) == STEPS and len(info["final_loss"]) == STEPS
    assert info["unet_backward_rows"] == sum(info["inner_steps"])


def test_null_text_early_stop_and_progress(model, photo: Path) -> None:
    calls: list[tuple[int, int, dict]] = []
    inversion = invert(
        model,
        photo,
        PROMPT,
        "null-text",
        num_steps=STEPS,
        early_stop_epsilon=10.0,
        progress=lambda done, total, info: calls.append((done, total, info)),
    )
    assert [s["inner_steps"] for s in inversion.steps] == [1] * STEPS
    assert all(s["loss"] < 10.0 for s in inversion.steps)
    assert inversion.uncond_embeddings.shape == (STEPS, 77, 32)
    assert inversion.options["early_stop_epsilon"] == 10.0
    # one cond pass, one inner pass and one batched [uncond, cond] pass per step
    assert inversion.stats["unet_forward_rows"] == STEPS + STEPS * (1 + 1 + 2)
    assert [c[:2] for c in calls] == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]
    assert calls[0][2]["phase"] == "ddim-inversion" and calls[-1][2]["phase"] == "null-text"
    assert "loss" in calls[-1][2]
    # The optimisation moved the embeddings away from "" and warm-started from step to step.
    null = model.encode_text([""])
    assert not torch.equal(inversion.uncond_embeddings[0], null[0])


def test_null_text_speed_ups_change_little(model, photo: Path) -> None:
    common = dict(num_steps=STEPS, num_inner_steps=3)
    reference = invert(model, photo, PROMPT, "null-text", **common)
    reused = invert(model, photo, PROMPT, "null-text", reuse_cond=True, **common)
    batched = invert(model, photo, PROMPT, "null-text", batch_cond=True, **common)
    assert reused.stats["unet_forward_rows"] == reference.stats["unet_forward_rows"] - STEPS
    assert batched.stats["unet_calls"] == reference.stats["unet_calls"] - STEPS
    # Same arithmetic up to float rounding, which Adam's normalised steps may amplify a bit.
    losses = np.array([s["loss"] for s in reference.steps])
    for other in (reused, batched):
        torch.testing.assert_close(
            other.uncond_embeddings, reference.uncond_embeddings, atol=0.05, rtol=0
        )
        other_losses = np.array([s["loss"] for s in other.steps])
        assert np.abs(other_losses / losses - 1).max() < 0.05


def test_negative_prompt_equals_guidance_1(model, photo: Path) -> None:
    inversion = invert(model, photo, PROMPT, "negative-prompt", num_steps=STEPS)
    cond = model.encode_text([PROMPT])
    assert torch.equal(inversion.uncond_embeddings, cond.expand(STEPS, -1, -1))
    # With the source prompt as unconditional text the source row's guidance cancels out.
    guided = _reconstruct(model, NegativePromptSource(image=str(photo), cache=False))
    plain = _reconstruct(model, DDIMSource(image=str(photo), cache=False), guidance=1.0)
    torch.testing.assert_close(guided.latents[:1], plain.latents[:1], atol=1e-5, rtol=1e-4)


def test_direct_source_row_is_exact(model, photo: Path) -> None:
    inversion = invert(model, photo, PROMPT, "direct", num_steps=STEPS)
    assert inversion.source_latents.shape == (STEPS, 4, 16, 16)
    result = _reconstruct(
        model,
        DirectSource(image=str(photo), cache=False),
        prompts=(PROMPT, TARGET),
        edits=[Replace()],
    )
    torch.testing.assert_close(result.latents[:1], inversion.image_latent, atol=1e-6, rtol=0)
    assert (result.latents[1] - result.latents[0]).abs().mean() > 1e-3


def test_vpred_model(vpred_model, photo: Path) -> None:
    ddim = invert(vpred_model, photo, PROMPT, "ddim", num_steps=STEPS)
    z0 = ddim.image_latent
    plain = _reconstruct(vpred_model, DDIMSource(image=str(photo), cache=False), guidance=1.0)
    assert _relative_error(plain.latents[:1], z0) < 0.15
    guided = _reconstruct(vpred_model, DDIMSource(image=str(photo), cache=False))
    null_text = _reconstruct(
        vpred_model, NullTextSource(image=str(photo), cache=False, num_inner_steps=10)
    )
    assert _relative_error(null_text.latents[:1], z0) < 0.6 * _relative_error(
        guided.latents[:1], z0
    )
    direct = _reconstruct(vpred_model, DirectSource(image=str(photo), cache=False))
    torch.testing.assert_close(direct.latents[:1], z0, atol=1e-6, rtol=0)


def test_half_precision_unet_is_run_in_float32(tiny_model_dir: Path, photo: Path) -> None:
    rounded = load_model(tiny_model_dir, device="cpu", dtype="float32")
    rounded.unet.half().float()  # float32 weights holding float16 values
    common = dict(num_steps=3, num_inner_steps=2, unet_precision="float32")
    reference = invert(rounded, photo, PROMPT, "null-text", **common)
    half = load_model(tiny_model_dir, device="cpu", dtype="float32")
    half.unet.half()
    # unet_precision float32 (the default, auto, would run a half UNet as it is: see
    # tests/test_inversion_precision.py)
    result = invert(half, photo, PROMPT, "null-text", **common)
    assert half.unet.dtype == torch.float16  # given back as it was
    assert result.uncond_embeddings.dtype == torch.float32
    # The float16 UNet ran in float32: exactly the float32 run with the same weights.
    assert torch.equal(result.uncond_embeddings, reference.uncond_embeddings)
    assert torch.equal(result.latent, reference.latent)


def test_bad_method_and_options(model, photo: Path) -> None:
    with pytest.raises(OptionError, match="unknown method"):
        invert(model, photo, PROMPT, "magic")
    with pytest.raises(OptionError, match="null-text: num_inner_step: unknown option"):
        invert(model, photo, PROMPT, "null-text", num_inner_step=3)
    with pytest.raises(OptionError, match="direct: num_inner_steps: unknown option"):
        invert(model, photo, PROMPT, "direct", num_inner_steps=3)
    with pytest.raises(OptionError, match="null-text: num_inner_steps: .*greater than or equal"):
        invert(model, photo, PROMPT, "null-text", num_inner_steps=-1)
    with pytest.raises(OptionError, match="num_steps"):
        invert(model, photo, PROMPT, "ddim", num_steps=0)
    with pytest.raises(OptionError, match="prompt"):
        invert(model, photo, " ", "ddim")
    with pytest.raises(InversionError, match="ddim scheduler"):
        invert(model, photo, PROMPT, "ddim", scheduler=model.make_scheduler("euler"))


# --------------------------------------------------------------------------- save / load


def test_saved_inversion_gives_the_same_edit(model, photo: Path, tmp_path: Path) -> None:
    options = dict(image=str(photo), num_inner_steps=2, cache_dir=str(tmp_path))
    fresh = _reconstruct(
        model, NullTextSource(**options), prompts=(PROMPT, TARGET), edits=[Replace()]
    )
    info = fresh.source_info["inversion"]
    assert info["cache"] == "miss"
    saved = Path(info["path"])
    assert saved.suffix == ".p2pinv" and saved.parent == tmp_path
    again = _reconstruct(
        model,
        NullTextSource(inversion=str(saved)),
        prompts=(PROMPT, TARGET),
        edits=[Replace()],
    )
    assert again.source_info["inversion"]["cache"] == "file"
    assert torch.equal(fresh.latents, again.latents)
    assert [np.asarray(i).tobytes() for i in fresh.images] == [
        np.asarray(i).tobytes() for i in again.images
    ]


def test_save_load_round_trip(model, photo: Path, tmp_path: Path) -> None:
    inversion = invert(model, photo, PROMPT, "direct", num_steps=STEPS, crop=(4, 2, 0, 6))
    path = inversion.save(tmp_path / "sub" / "cat.p2pinv")
    assert [p.name for p in path.parent.iterdir()] == ["cat.p2pinv"]  # no temporary left
    loaded = Inversion.load(path)
    for key in ("latent", "image_latent", "source_latents"):
        assert torch.equal(getattr(loaded, key), getattr(inversion, key))
    assert loaded.uncond_embeddings is None
    assert loaded.metadata() == json.loads(json.dumps(inversion.metadata()))
    assert loaded.crop == (4, 2, 0, 6)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        header = file.metadata()
    assert header["format"] == "p2p-framework-inversion"
    assert json.loads(header["inversion"])["method"] == "direct"


def test_mismatched_inversion_is_refused(model, photo: Path, tmp_path: Path) -> None:
    inversion = invert(model, photo, PROMPT, "null-text", num_steps=STEPS, num_inner_steps=1)
    path = inversion.save(tmp_path / "cat.p2pinv")
    source = NullTextSource(inversion=str(path))

    def run(m=model, steps=STEPS, guidance=7.5, size=None, prompt=PROMPT, scheduler="ddim"):
        settings = EditSettings(
            steps=steps, guidance=guidance, height=size, width=size, scheduler=scheduler
        )
        return run_edit(m, [prompt], source=source, settings=settings)

    other_dir = save_tiny_pipeline(tmp_path / "other", seed=1)
    other = load_model(other_dir, device="cpu", dtype="float32")
    with pytest.raises(InversionMismatchError, match="made with model"):
        run(m=other)
    with pytest.raises(InversionMismatchError, match="it has 10 steps, the run 5"):
        run(steps=5)
    with pytest.raises(InversionMismatchError, match="128x128 px .*the run 64x64"):
        run(size=64)
    with pytest.raises(InversionMismatchError, match="prompt"):
        run(prompt="a photo of a dog")
    with pytest.raises(InversionMismatchError, match="guidance 7.5"):
        run(guidance=5.0)
    with pytest.raises(InversionError, match="ddim scheduler"):
        run(scheduler="euler")
    changed = dataclasses.replace(
        model, scheduler_config={**model.scheduler_config, "beta_end": 0.02}
    )
    with pytest.raises(InversionMismatchError, match="scheduler differs: beta_end"):
        run(m=changed)
    with pytest.raises(InversionError, match="use source 'null-text'"):
        run_edit(model, [PROMPT], source=DirectSource(inversion=str(path)), settings=_settings())
    # Every one of these is a P2PError the command line reports on one line.
    assert issubclass(InversionMismatchError, P2PError)


def test_unreadable_inversion_files(tmp_path: Path) -> None:
    with pytest.raises(InversionFileError, match="does not exist"):
        Inversion.load(tmp_path / "missing.p2pinv")
    garbage = tmp_path / "garbage.p2pinv"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InversionFileError, match="garbage.p2pinv"):
        Inversion.load(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.p2pinv"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(InversionFileError, match="not a p2p-framework inversion"):
        Inversion.load(foreign)


# --------------------------------------------------------------------------- cache


def test_cache_hit_and_misses(model, photo: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    steps = 3  # cheap: only the cache logic is under test

    def run(source_class=DirectSource, prompt=PROMPT, steps=steps, guidance=7.5, size=None, **opt):
        options = {"image": str(photo), "cache_dir": str(cache_dir), **opt}
        settings = EditSettings(steps=steps, guidance=guidance, height=size, width=size)
        result = run_edit(model, [prompt], source=source_class(**options), settings=settings)
        return result.source_info["inversion"]

    first = run()
    assert first["cache"] == "miss"
    second = run()
    assert second["cache"] == "hit" and second["path"] == first["path"]
    assert second["seconds"] == first["seconds"]  # the stored statistics, not a new run
    variants = {
        "prompt": dict(prompt="a photo of a dog"),
        "steps": dict(steps=steps + 1),
        "guidance": dict(guidance=5.0),
        "size": dict(size=64),
        "crop": dict(crop=(8, 0, 0, 0)),
        "method": dict(source_class=DDIMSource),
        "options": dict(source_class=NullTextSource, num_inner_steps=1),
        "options2": dict(source_class=NullTextSource, num_inner_steps=2),
    }
    keys = {first["key"]}
    for name, change in variants.items():
        info = run(**change)
        assert info["cache"] == "miss", name
        keys.add(info["key"])
        assert run(**change)["cache"] == "hit", name
    assert len(keys) == len(variants) + 1
    # another image content, same path
    other_photo = tmp_path / "photo.png"
    Image.fromarray(_picture()[::-1].copy()).save(other_photo)
    assert run(image=str(other_photo))["cache"] == "miss"
    Image.fromarray(_picture()).save(other_photo)  # same pixels as `photo`
    assert run(image=str(other_photo))["cache"] == "hit"
    # another model identity
    renamed = dataclasses.replace(model, identity={"model": "elsewhere", "folder_hash": "0"})
    result = run_edit(
        renamed,
        [PROMPT],
        source=DirectSource(image=str(photo), cache_dir=str(cache_dir)),
        settings=EditSettings(steps=steps),
    )
    assert result.source_info["inversion"]["cache"] == "miss"
    # writes are atomic: nothing but finished .p2pinv files in the folder
    assert all(p.suffix == ".p2pinv" for p in cache_dir.iterdir())
    # a damaged entry is a miss and is replaced
    Path(first["path"]).write_bytes(b"damaged")
    assert run()["cache"] == "miss"
    assert run()["cache"] == "hit"
    # cache off: nothing read or written
    assert run(cache=False)["cache"] == "off"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from p2p_framework.inversion import default_cache_dir

    monkeypatch.delenv("P2P_FRAMEWORK_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "p2p-framework" / "inversions"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "p2p-framework" / "inversions"
    monkeypatch.setenv("P2P_FRAMEWORK_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"


# --------------------------------------------------------------------------- plugins


def test_sources_are_registered(registry) -> None:
    names = {info.name for info in registry.plugins("source")}
    assert {"null-text", "negative-prompt", "direct", "ddim", "seed"} <= names
    options = {o.name: o for o in registry.get("source", "null-text").options}
    assert options["num_inner_steps"].default == 10
    assert options["early_stop_epsilon"].default == 1e-5
    assert options["cache"].default is True
    assert "num_inner_steps" not in {o.name for o in registry.get("source", "direct").options}
    source = registry.build("source", "null-text", {"image": "x.png", "crop": "1,2,3,4"})
    assert source.crop == (1, 2, 3, 4)
    assert source.method_options() == {
        "num_inner_steps": 10,
        "early_stop_epsilon": 1e-5,
        "reuse_cond": False,
        "batch_cond": False,
        "unet_precision": "auto",
    }
    with pytest.raises(OptionError, match="null-text: image: give either image or inversion"):
        registry.build("source", "null-text", {})
    with pytest.raises(OptionError, match="not both"):
        registry.build("source", "direct", {"image": "a.png", "inversion": "b.p2pinv"})
    with pytest.raises(OptionError, match="null-text: crop"):
        registry.build("source", "null-text", {"image": "a.png", "crop": (1, 2)})
    with pytest.raises(OptionError, match="null-text: num_inner_steps"):
        registry.build("source", "null-text", {"image": "a.png", "num_inner_steps": "many"})


def test_missing_image_names_the_file(model, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg"):
        _reconstruct(model, NullTextSource(image=str(missing), cache=False))


# --------------------------------------------------------------------------- images


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # white left half
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    pixels = np.asarray(loaded).mean(axis=(1, 2))
    assert pixels[:15].mean() > 200 and pixels[25:].mean() < 50  # white is now on top


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    array = np.zeros((32, 32, 4), np.uint8)
    array[..., 0] = 200  # red, but transparent on the left half
    array[:, 16:, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(array, "RGBA").save(path)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (32, 32, 3)
    assert (loaded[:, :16] == 255).all()
    assert (loaded[:, 16:] == [200, 0, 0]).all()
    palette = Image.fromarray(array, "RGBA").convert("P")
    palette.info["transparency"] = 0
    assert load_image(palette).mode == "RGB"


def test_grayscale_and_16_bit_become_rgb(tmp_path: Path) -> None:
    gray = Image.fromarray(np.full((20, 20), 77, np.uint8), "L")
    path = tmp_path / "gray.png"
    gray.save(path)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (20, 20, 3) and (loaded == 77).all()
    deep = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    deep_path = tmp_path / "deep.png"
    deep.save(deep_path)
    assert (np.asarray(load_image(deep_path)) == 255).all()


def test_non_square_centre_crop_and_resize() -> None:
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, :100] = [255, 0, 0]
    array[:, 100:200] = [0, 255, 0]
    array[:, 200:] = [0, 0, 255]
    square = np.asarray(prepare_image(Image.fromarray(array), 64, 64))
    assert square.shape == (64, 64, 3)
    assert (square[..., 1] > 250).all()  # only the green middle third is kept
    wide = np.asarray(prepare_image(Image.fromarray(array), 32, 96))
    assert wide.shape == (32, 96, 3)
    assert wide[:, :20, 0].min() > 250 and wide[:, -20:, 2].min() > 250
    tall = np.asarray(prepare_image(Image.fromarray(array), 96, 32))
    assert tall.shape == (96, 32, 3) and (tall[..., 1] > 250).all()


def test_crop_offsets_as_in_load_512() -> None:
    array = _picture(200, 120)
    left, right, top, bottom = 30, 10, 5, 15
    prepared = prepare_image(Image.fromarray(array), 64, 64, crop=(left, right, top, bottom))
    # the paper: cut the offsets, then a centred square on the short side, then resize
    cut = array[top : 120 - bottom, left : 200 - right]
    h, w = cut.shape[:2]
    offset = (w - h) // 2
    expected = Image.fromarray(cut[:, offset : offset + h]).resize((64, 64), Image.BICUBIC)
    assert np.array_equal(np.asarray(prepared), np.asarray(expected))
    assert np.array_equal(
        np.asarray(prepare_image(Image.fromarray(array), 64, 64, crop="30,10,5,15")),
        np.asarray(prepared),
    )
    with pytest.raises(ImageError, match="leaves"):
        prepare_image(Image.fromarray(array), 64, 64, crop=(100, 90, 0, 0))
    with pytest.raises(ImageError, match="four non-negative"):
        prepare_image(Image.fromarray(array), 64, 64, crop=(-1, 0, 0, 0))


def test_unreadable_truncated_and_tiny_images(tmp_path: Path, photo: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match="cannot read image .*notes.png"):
        load_image(text)
    data = photo.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(_picture()).save(jpeg, quality=90)
    cut_jpeg = tmp_path / "cut.jpg"
    cut_jpeg.write_bytes(jpeg.read_bytes()[:400])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(cut_jpeg)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (MIN_SIDE - 1, 100)).save(tiny)
    with pytest.raises(ImageError, match=f"tiny.png' is {MIN_SIDE - 1}x100 px"):
        load_image(tiny)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_very_large_images_warn_in_one_line_or_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2p_framework import P2PWarning

    big = tmp_path / "big.png"
    Image.fromarray(_picture()).save(big)
    pixels = Image.open(big).size[0] * Image.open(big).size[1]
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels - 1)
    with pytest.warns(P2PWarning, match=r"big.png' is \d+x\d+ px .*resized to the model's size"):
        loaded = load_image(big)
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(big).convert("RGB")))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 2 - 1)
    with pytest.raises(ImageError, match="too large to decode safely"):
        load_image(big)
