"""Bad or surprising input found by the newcomer probe (issue 15): over-long prompts, numbers
out of range, ``--inversion`` without ``--prompt``, words and photos the demo model does not
know, local blend at a level the model lacks, NaN runs and the small ones (fonts, messages).

Each test fails on the code before its fix. Runs use the tiny model at 64x64 px, 3 steps.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from p2p_framework import (
    Edit,
    EditRun,
    EditSettings,
    ModelLoadError,
    NumericalError,
    OptionError,
    P2PWarning,
    PluginRegistry,
    PromptError,
    RunContext,
    hookimpl,
    load_model,
    run_edit,
)
from p2p_framework.cli import cli
from p2p_framework.demo import DEMO_MODEL_DIR
from p2p_framework.model import _error_summary
from p2p_framework.pipeline import to_pil
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.refine import Refine
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.seed import Seed
from p2p_framework.preflight import check_before_load
from p2p_framework.prompts import (
    check_prompt_lengths,
    refinement_mapper,
    replacement_mapper,
    unknown_words,
)
from p2p_framework.runner import MODEL_ENV

FAST = ["--steps", "3", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32"]
REPO = Path(__file__).resolve().parents[1]


def settings(**kwargs: Any) -> EditSettings:
    return EditSettings(steps=kwargs.pop("steps", 3), height=64, width=64, **kwargs)


@pytest.fixture
def invoke(registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)

    def run(*args: Any, obj: Any = None) -> Any:
        return CliRunner().invoke(cli, [str(a) for a in args], obj=obj or registry)

    return run


def one_line_error(result: Any, *fragments: str, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def long_prompt(changed: str = "blue") -> str:
    """127 words, the 122nd ``changed``: far past CLIP's 77 tokens."""
    words = ["a", "red", "circle", "on", "a", "green", "background"] * 19
    words = words[:127]
    words[121] = changed
    return " ".join(words)


# --------------------------------------------------------------------- 3. over-long prompts


@pytest.mark.parametrize("edit", [Replace(), Refine()], ids=["replace", "refine"])
def test_over_long_prompts_are_refused_by_every_edit(tiny_model, edit):
    """replace used to truncate silently (and change an identical target), refine refused:
    now both refuse with the token count and the limit, before any denoising."""
    prompts = [long_prompt("blue"), long_prompt("green")]
    with pytest.raises(PromptError, match=r"has 129 tokens; .* at most 77 .* 52 would be cut"):
        run_edit(tiny_model, prompts, [edit], settings=settings())
    for mapper in (replacement_mapper, refinement_mapper):
        with pytest.raises(PromptError, match="at most 77"):
            mapper(tiny_model.tokenizer, *prompts)


def test_a_prompt_of_exactly_the_limit_is_accepted(tiny_model):
    tokenizer = tiny_model.tokenizer
    prompt = " ".join(["red"] * 75)  # 75 words of one token + start + end = 77
    check_prompt_lengths(tokenizer, [prompt])
    with pytest.raises(PromptError, match="has 78 tokens"):
        check_prompt_lengths(tokenizer, [prompt + " red"])


def test_cli_refuses_an_over_long_prompt_before_loading(invoke, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    result = invoke(
        "edit",
        "--model",
        tiny_model_dir,
        "--prompt",
        long_prompt("blue"),
        "--target",
        long_prompt("green"),
        "--out",
        out,
        *FAST,
    )
    one_line_error(result, "prompt 0", "has 129 tokens", "at most 77")
    assert "Loading model" not in result.stderr  # refused from the folder's tokenizer
    assert not out.exists()


# ------------------------------------------------------------------------------ 4. numbers


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--steps", "1001"], ["pipeline: steps:", "at most 1000", "got 1001"]),
        (["--height", "0"], ["pipeline: height:", "positive multiple", "got 0"]),
        (["--width", "60"], ["pipeline: width:", "multiple of 8", "VAE scale factor", "got 60"]),
        (["--seed", str(2**64)], ["seed: seed:", "below 2**64"]),
    ],
)
def test_numbers_out_of_range_are_usage_errors_before_loading(
    invoke, tiny_model_dir, tmp_path, extra, fragments
):
    result = invoke(
        "edit",
        "--model",
        tiny_model_dir,
        "--prompt",
        "a red circle",
        "--target",
        "a blue circle",
        "--out",
        tmp_path / "o",
        *FAST,
        *extra,
    )
    line = one_line_error(result, *fragments)
    assert "internal error" not in line and "value error" not in line
    assert "Loading model" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_numbers_are_checked_on_the_loaded_model_too(tiny_model):
    """The Python API (and hub models, whose folder is not read first) get the same errors."""
    with pytest.raises(OptionError, match=r"^pipeline: steps: must be at most 1000"):
        run_edit(tiny_model, ["a cat"], settings=settings(steps=1001))
    with pytest.raises(OptionError, match=r"^pipeline: height: must be a positive multiple"):
        EditSettings(height=0)
    with pytest.raises(OptionError, match=r"multiple of 8 \(this model's VAE scale factor\)"):
        run_edit(tiny_model, ["a cat"], settings=EditSettings(steps=1, height=60, width=64))


def test_size_help_names_the_model_dependent_factor(invoke):
    result = invoke("edit", "--help")
    assert "a multiple of 8." not in result.output
    assert "VAE scale factor" in result.output


# ------------------------------------------------------------- 6. --inversion without --prompt


@pytest.fixture(scope="module")
def saved_inversion(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from p2p_framework.inversion import invert
    from p2p_framework.plugins.inversion_sources import DDIMSource

    folder = tmp_path_factory.mktemp("inv")
    photo = folder / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(photo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", P2PWarning)  # the random VAE cannot represent it
        inversion = invert(
            tiny_model,
            photo,
            "a photo of a cat",
            DDIMSource(image=str(photo)),
            num_steps=3,
            height=64,
            width=64,
        )
    return inversion.save(folder / "cat.p2pinv")


def test_edit_with_an_inversion_takes_its_prompt(invoke, tiny_model_dir, saved_inversion, tmp_path):
    out = tmp_path / "o"
    result = invoke(
        "edit",
        "--model",
        tiny_model_dir,
        "--inversion",
        saved_inversion,
        "--target",
        "a photo of a dog",
        "--out",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"] == ["a photo of a cat", "a photo of a dog"]
    assert record["source"]["name"] == "ddim"


def test_edit_with_an_inversion_refuses_another_prompt_before_loading(
    invoke, tiny_model_dir, saved_inversion, tmp_path
):
    result = invoke(
        "edit",
        "--model",
        tiny_model_dir,
        "--inversion",
        saved_inversion,
        "--prompt",
        "a photo of a lion",
        "--target",
        "a photo of a dog",
        "--out",
        tmp_path / "o",
        *FAST,
    )
    one_line_error(result, "'a photo of a lion'", "'a photo of a cat'", "leave out --prompt")
    assert "Loading model" not in result.stderr


def test_a_pipeline_job_with_an_inversion_needs_no_prompt(saved_inversion, registry):
    from p2p_framework.spec import spec_from_job

    job = {"inversion": str(saved_inversion), "targets": ["a photo of a dog"]}
    assert spec_from_job(job, registry).prompts == ["a photo of a cat", "a photo of a dog"]
    job = {"set": [f"ddim.inversion={saved_inversion}"], "source": "ddim", "target": "a dog"}
    assert spec_from_job(job, registry).prompts[0] == "a photo of a cat"


# ----------------------------------------------------------- 8. the demo model's words, photos


def test_demo_model_words_it_does_not_know_are_warned_about():
    warnings_ = check_before_load(
        str(DEMO_MODEL_DIR), ["a red circle on a plain yellow background", "a red star on a bg"]
    )
    assert len(warnings_) == 1
    assert "'plain', 'bg'" in warnings_[0] and "docs/demo-model.md#vocabulary" in warnings_[0]
    known = "a red circle and a blue square on a striped yellow background"
    assert check_before_load(str(DEMO_MODEL_DIR), [known]) == []


def test_no_unknown_words_on_a_large_vocabulary():
    """On CLIP's 49,408-entry vocabulary, BPE splits are ordinary: nothing is reported."""

    class LargeVocabulary:
        def __len__(self) -> int:
            return 49408

        def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
            raise AssertionError("a large vocabulary is not tokenized")

    assert unknown_words(LargeVocabulary(), "pea soup with croutons") == []


def test_cli_prints_the_word_warning(invoke, tmp_path):
    result = invoke(
        "generate", "--prompt", "a plain circle", "--steps", "1", "--out", tmp_path / "o", "-q"
    )
    assert result.exit_code == 0, result.output
    assert "Warning: word(s) 'plain' are not in the model's vocabulary" in result.stderr


def test_demo_vocabulary_in_the_docs_is_the_model_s():
    info = json.loads((Path(DEMO_MODEL_DIR) / "training_info.json").read_text())
    text = (REPO / "docs" / "demo-model.md").read_text()
    section = text.split("## Vocabulary", 1)[1].split("\n## ", 1)[0]
    for word in info["vocabulary"]:
        assert f"`{word}`" in section


def test_a_photo_the_vae_cannot_represent_is_warned_about(tiny_model, tmp_path):
    from p2p_framework.inversion import invert
    from p2p_framework.plugins.inversion_sources import DDIMSource

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    with pytest.warns(P2PWarning, match=r"reproduces this photo at -?\d+\.\d dB"):
        inversion = invert(
            tiny_model,
            photo,
            "a cat",
            DDIMSource(image=str(photo)),
            num_steps=2,
            height=64,
            width=64,
        )
    assert inversion.stats["vae_psnr"] < 20


# ------------------------------------------------------------ 9. local blend's attention level


def test_local_blend_at_a_missing_level_is_refused_before_the_first_step(tiny_model):
    calls = []
    hook = tiny_model.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(OptionError, match=r"no cross-attention layer at 1/16 .* 1/1, 1/2, "):
            run_edit(
                tiny_model,
                ["a red cat", "a blue cat"],
                [Replace(), LocalBlend(words=["cat", "cat"], mask_downscale=16)],
                settings=settings(),
            )
    finally:
        hook.remove()
    assert calls == []  # refused in bind, not mid-run


def test_levels_follow_the_latent_size(tiny_model):
    assert tiny_model.cross_attention_levels((8, 8)) == (1, 2, 4, 8)
    # A 2x2 latent: the 1/4 and 1/8 levels' grids are 1x1 and named 1/2 at run time.
    assert tiny_model.cross_attention_levels((2, 2)) == (1, 2)


# ------------------------------------------------------------------------ 11. NaN, black PNGs


@dataclass(frozen=True)
class PoisonNaN(Edit):
    """Test edit: puts NaN into the targets' latents after the last step."""

    name = "poison-nan"

    def bind(self, run: RunContext) -> EditRun:
        return PoisonRun(run.num_steps)


class PoisonRun(EditRun):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        if step == self.steps - 1:
            latents = latents.clone()
            latents[1:] = float("nan")
        return latents


@hookimpl
def register_edits(register):  # noqa: ANN001
    register(PoisonNaN)


def test_nan_latents_are_an_error_not_a_black_image(tiny_model):
    with pytest.raises(NumericalError, match="NaN or infinite .* no image was written"):
        run_edit(tiny_model, ["a cat", "a dog"], [PoisonNaN()], settings=settings())


def test_cli_writes_nothing_for_a_nan_run(invoke, tiny_model_dir, tmp_path, register_plugin):
    import sys

    register_plugin(sys.modules[__name__], name="poison")
    out = tmp_path / "o"
    result = invoke(
        "edit",
        "--model",
        tiny_model_dir,
        "--prompt",
        "a cat",
        "--target",
        "a dog",
        "--edit",
        "poison-nan",
        "--out",
        out,
        *FAST,
    )
    one_line_error(result, "NaN or infinite", "no image was written")
    assert not out.exists()


def test_nan_fails_only_its_job_in_a_batch(tiny_model):
    from p2p_framework import EditJob
    from p2p_framework.pipeline import iter_edits

    jobs = [
        EditJob(["a cat", "a dog"], [PoisonNaN()], Seed(1), settings()),
        EditJob(["a cat", "a dog"], [Replace()], Seed(1), settings()),
    ]
    outcomes = dict(iter_edits(tiny_model, jobs, errors="return"))
    assert isinstance(outcomes[0], NumericalError)
    assert len(outcomes[1].images) == 2


# ---------------------------------------------------------------------------- 13. small ones


def test_captions_draw_non_ascii_letters():
    from p2p_framework.outputs import _font

    font = _font(16)
    assert "DejaVu" in font.getname()[0]
    missing = np.asarray(font.getmask("\U0010fffd"))  # no font has a glyph for it
    for letter in "üéöß€":
        assert not np.array_equal(np.asarray(font.getmask(letter)), missing), letter


def test_gitignore_has_the_default_output_folders():
    lines = (REPO / ".gitignore").read_text().splitlines()
    assert "out/" in lines and "p2p-out/" in lines


def test_offline_hub_error_does_not_point_at_a_hidden_traceback():
    error = OSError(
        "Cannot load model CompVis/stable-diffusion-v1-4: the model is not fully cached "
        "locally (...) and an error occurred while trying to fetch metadata from the Hub. "
        "Please check out the root cause in the stacktrace above."
    )
    summary = _error_summary(error, "CompVis/stable-diffusion-v1-4")
    assert "stacktrace" not in summary and not summary.lower().startswith("cannot load")
    assert summary.endswith("from the Hub.")


def test_set_hint_names_only_the_plugin_s_kind(invoke, tiny_model_dir, tmp_path):
    base = ["edit", "--model", tiny_model_dir, "--prompt", "a cat", "--target", "a dog"]
    result = invoke(*base, "--out", tmp_path / "o", *FAST, "--set", "reweight.weights=dog=2")
    line = one_line_error(result, "add it with --edit reweight")
    assert "--source reweight" not in line
    result = invoke(*base, "--out", tmp_path / "o", *FAST, "--set", "null-text.cache=false")
    line = one_line_error(result, "add it with --source null-text")
    assert "--edit null-text" not in line
    result = invoke(*base, "--out", tmp_path / "o", *FAST, "--set", "nope.x=1")
    one_line_error(result, "no installed plugin is called 'nope'")


def test_a_model_without_unet_names_the_missing_subfolder(tiny_model_dir, tmp_path):
    copy = tmp_path / "nounet"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "unet")
    with pytest.raises(ModelLoadError, match=r"has no unet/ subfolder"):
        load_model(copy, device="cpu")


def test_invert_refuses_too_many_steps_and_a_zero_size(tiny_model, tmp_path):
    from p2p_framework.inversion import invert
    from p2p_framework.plugins.inversion_sources import DDIMSource

    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(photo)
    source = DDIMSource(image=str(photo))
    with pytest.raises(OptionError, match=r"^inversion: num_steps: must be at most 1000"):
        invert(tiny_model, photo, "a cat", source, num_steps=1001)
    with pytest.raises(OptionError, match=r"^pipeline: height: must be a positive multiple"):
        invert(tiny_model, photo, "a cat", source, num_steps=2, height=0, width=64)


def test_a_half_precision_vae_that_overflows_is_decoded_upcast(tiny_model_dir, tiny_model):
    """An SD 1.x/SDXL VAE can give NaN in float16: the images are decoded again with the
    VAE in float32 (diffusers' force_upcast), with a warning, not written black."""
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    model.vae.to(torch.float16)
    original = model.vae.decode

    def overflowing(latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        if model.vae.dtype == torch.float16:  # what an overflowing float16 VAE gives
            n, _, h, w = latents.shape
            factor = model.vae_scale_factor
            return (torch.full((n, 3, h * factor, w * factor), float("nan")),)
        return original(latents, return_dict=return_dict)

    model.vae.decode = overflowing
    prompts = ["a cat", "a dog"]
    with pytest.warns(P2PWarning, match="decoded with the VAE in float32"):
        result = run_edit(model, prompts, [Replace()], settings=settings())
    assert model.vae.dtype == torch.float16  # put back
    expected = run_edit(tiny_model, prompts, [Replace()], settings=settings())
    torch.testing.assert_close(result.latents, expected.latents)  # the UNet's work unchanged
    # The images are the float32 decode of the (float16-rounded) VAE weights.
    model.vae.to(torch.float32)
    decoded = to_pil(model.decode(result.latents))
    for got, want in zip(result.images, decoded):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_a_pipeline_job_with_an_over_long_prompt_fails_alone(invoke, tiny_model_dir, tmp_path):
    pipeline = tmp_path / "jobs.toml"
    pipeline.write_text(
        f'model = "{tiny_model_dir}"\n'
        '[defaults]\nsteps = 2\nheight = 64\nwidth = 64\ndevice = "cpu"\ndtype = "float32"\n'
        f'[[jobs]]\nname = "long"\nprompt = "{long_prompt()}"\ntargets = ["{long_prompt("red")}"]\n'
        '[[jobs]]\nname = "short"\nprompt = "a red cat"\ntargets = ["a blue cat"]\n'
    )
    result = invoke("run", pipeline, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line.get("status", "ok") for line in lines] == ["failed", "ok"]
    assert "has 129 tokens" in lines[0]["error"]
    assert not (tmp_path / "out" / "long").exists() and (tmp_path / "out" / "short").is_dir()


def test_pipeline_jobs_warn_about_unknown_words(invoke, tiny_model_dir, tmp_path):
    """The tiny test tokenizer is a closed vocabulary too: 'frowning' is not one of its words."""
    pipeline = tmp_path / "jobs.toml"
    pipeline.write_text(
        f'model = "{tiny_model_dir}"\n'
        '[defaults]\nsteps = 1\nheight = 64\nwidth = 64\ndevice = "cpu"\ndtype = "float32"\n'
        '[[jobs]]\nname = "frown"\nprompt = "a frowning cat"\ntargets = ["a frowning dog"]\n'
    )
    result = invoke("run", pipeline, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Warning: job 'frown': word(s) 'frowning' are not in the model's vocabulary" in (
        result.stderr
    )
