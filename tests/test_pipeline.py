"""End-to-end behaviour of the edit pipeline on tiny models: equality with diffusers, the
identity and no-op edits, local blend, model families, and errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from p2p_framework import (
    AttentionController,
    AttentionStore,
    Edit,
    EditRun,
    EditSettings,
    OptionError,
    RunContext,
    load_model,
    run_edit,
)
from p2p_framework.plugins.local_blend import LocalBlend, LocalBlendRun
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.reweight import Reweight
from p2p_framework.plugins.seed import Seed

STEPS = 6
SOURCE = "a painting of a squirrel eating a burger"
TARGET = "a painting of a lion eating a burger"


def diffusers_generate(model_dir, prompt, *, seed=8888, steps=STEPS, guidance=7.5, **size):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
        **size,
    ).images


def settings(**overrides) -> EditSettings:
    return EditSettings(**{"steps": STEPS, **overrides})


def test_source_row_equals_diffusers(tiny_model_dir, tiny_model):
    expected = diffusers_generate(tiny_model_dir, SOURCE)
    result = run_edit(
        tiny_model, [SOURCE, TARGET], [Replace()], source=Seed(8888), settings=settings()
    )
    # Self-attention materialised for self-replace vs fused SDPA: float rounding only.
    torch.testing.assert_close(result.latents[:1], expected, atol=1e-4, rtol=1e-4)
    assert result.images[0].size == (128, 128)


def test_identity_edit_gives_the_source_image(tiny_model):
    result = run_edit(
        tiny_model,
        [SOURCE, SOURCE],
        [Replace()],
        settings=settings(cross_replace_steps=1.0, self_replace_steps=1.0),
    )
    torch.testing.assert_close(result.latents[1], result.latents[0], atol=1e-6, rtol=0)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_no_injection_gives_the_targets_plain_generation(tiny_model):
    edited = run_edit(
        tiny_model,
        [SOURCE, TARGET],
        [Replace()],
        settings=settings(cross_replace_steps=0.0, self_replace_steps=0.0),
    )
    plain = run_edit(tiny_model, [TARGET], [], settings=settings())
    # A UNet batch of 4 rows against one of 2: the matrix products block differently (and
    # with the thread count), which moves float32 latents of about 1 by up to ~3e-5; an
    # injection, even one step of it, moves them by more than 1e-2.
    torch.testing.assert_close(edited.latents[1:], plain.latents, atol=1e-4, rtol=1e-4)


def test_injection_changes_the_target(tiny_model):
    edited = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=settings())
    plain = run_edit(tiny_model, [TARGET], [], settings=settings())
    assert (edited.latents[1] - plain.latents[0]).abs().max() > 1e-3


def test_reweight_with_ones_changes_nothing(tiny_model):
    base = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=settings())
    ones = run_edit(
        tiny_model, [SOURCE, TARGET], [Replace(), Reweight({"lion": 1.0})], settings=settings()
    )
    assert torch.equal(base.latents, ones.latents)
    boosted = run_edit(
        tiny_model, [SOURCE, TARGET], [Replace(), Reweight({"lion": 5.0})], settings=settings()
    )
    assert torch.equal(boosted.latents[0], base.latents[0])  # the source is never edited
    assert not torch.equal(boosted.latents[1], base.latents[1])


class WitnessedBlendRun(LocalBlendRun):
    """Local blend that checks, after each blended step, that targets equal the source
    outside its mask."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checked: list[int] = []

    def after_step(self, latents, step):
        latents = super().after_step(latents, step)
        mask = self.mask
        if mask is not None and step >= self.start:
            outside = ~mask.expand_as(latents)
            for target in range(1, latents.shape[0]):
                assert torch.equal(latents[target][outside[target]], latents[0][outside[target]])
            assert mask[1:].float().mean() < 1  # the mask does not cover everything
            self.checked.append(step)
        return latents


@dataclass(frozen=True)
class WitnessedBlend(LocalBlend):
    def bind(self, run: RunContext) -> WitnessedBlendRun:
        plain = super().bind(run)
        return WitnessedBlendRun(self, run, plain.weights, plain.substruct)


def test_local_blend_keeps_targets_equal_to_source_outside_the_mask(tiny_model):
    blend = WitnessedBlend(words=["squirrel", "lion", "tiger"], start_blend=0.0, threshold=0.5)
    prompts = [SOURCE, TARGET, "a painting of a tiger eating a burger"]
    result = run_edit(tiny_model, prompts, [Replace(), blend], settings=settings())
    assert result.edit_runs[1].checked == list(range(STEPS))
    assert result.latents.shape[0] == 3


def test_local_blend_start_step(tiny_model):
    blend = WitnessedBlend(words=["squirrel", "lion"], start_blend=0.5)
    result = run_edit(tiny_model, [SOURCE, TARGET], [Replace(), blend], settings=settings())
    assert result.edit_runs[1].checked == list(range(STEPS // 2, STEPS))


def test_substruct_words_shrink_the_mask(tiny_model):
    plain = LocalBlend(words=["squirrel", "lion"], start_blend=0.0)
    minus = LocalBlend(
        words=["squirrel", "lion"], start_blend=0.0, substruct_words=["burger", "burger"]
    )
    plain_mask = (
        run_edit(tiny_model, [SOURCE, TARGET], [Replace(), plain], settings=settings())
        .edit_runs[1]
        .mask
    )
    minus_mask = (
        run_edit(tiny_model, [SOURCE, TARGET], [Replace(), minus], settings=settings())
        .edit_runs[1]
        .mask
    )
    assert not (minus_mask & ~plain_mask).any()
    assert minus_mask.sum() < plain_mask.sum()


def test_separate_guidance_passes_give_the_same_edit(tiny_model):
    def edits():
        return [Replace(), LocalBlend(words=["squirrel", "lion"])]

    batched = run_edit(tiny_model, [SOURCE, TARGET], edits(), settings=settings())
    separate = run_edit(
        tiny_model, [SOURCE, TARGET], edits(), settings=settings(separate_uncond_pass=True)
    )
    # float rounding only: the UNet batch is 2 rows instead of 4
    torch.testing.assert_close(separate.latents, batched.latents, atol=1e-4, rtol=1e-3)


def test_guidance_one_runs_the_edit_without_uncond_rows(tiny_model):
    result = run_edit(
        tiny_model,
        [SOURCE, SOURCE],
        [Replace()],
        settings=settings(guidance=1.0, cross_replace_steps=1.0, self_replace_steps=1.0),
    )
    torch.testing.assert_close(result.latents[1], result.latents[0], atol=1e-6, rtol=0)


def test_store_memory_does_not_grow_with_steps(tiny_model):
    sizes = []
    for steps in (3, 12):
        result = run_edit(
            tiny_model,
            [SOURCE, TARGET],
            [Replace(), LocalBlend(words=["squirrel", "lion"])],
            settings=settings(steps=steps, attention_maps=True),
        )
        sizes.append(result.attention_store.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_attention_store_maps_sum_to_one_over_tokens(tiny_model):
    result = run_edit(tiny_model, [SOURCE, TARGET], [], settings=settings(attention_maps=True))
    maps = result.attention_store.average(downscale=4)
    assert maps.shape == (2, 4, 4, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 4))


def test_attention_image_shows_each_token_of_each_prompt(tiny_model):
    from PIL import Image

    from p2p_framework import attention_image

    prompts = ["a cat", "a big cat"]
    result = run_edit(tiny_model, prompts, [], settings=settings(attention_maps=True))
    sheet = np.asarray(attention_image(result, tiny_model, cell_size=32))
    # the longest prompt has 5 tokens (start, a, big, cat, end): 5 cells of 32 px, 2 px apart
    assert sheet.shape[1] == 5 * 32 + 4 * 2
    maps = result.attention_store.average(downscale=4)
    for prompt, tokens in ((0, 4), (1, 5)):
        for token in range(tokens):
            plane = maps[prompt, :, :, token]
            plane = (plane / plane.max() * 255).round().to(torch.uint8).numpy()
            cell = Image.fromarray(plane, mode="L").convert("RGB")
            expected = np.asarray(cell.resize((32, 32), Image.Resampling.BICUBIC))
            column = sheet[:, token * 34 : token * 34 + 32]
            rows = [
                y for y in range(len(column) - 31) if np.array_equal(column[y : y + 32], expected)
            ]
            assert rows, f"map of token {token} of prompt {prompt} not found"


def test_v_prediction_model_matches_diffusers_non_square(tiny_vpred_model_dir):
    model = load_model(tiny_vpred_model_dir, device="cpu", dtype="float32")
    assert model.prediction_type == "v_prediction"
    size = {"height": 128, "width": 96}
    expected = diffusers_generate(tiny_vpred_model_dir, SOURCE, **size)
    result = run_edit(
        model,
        [SOURCE, TARGET],
        [Replace(), LocalBlend(words=["squirrel", "lion"], start_blend=0.0)],
        settings=settings(**size),
    )
    assert result.latents.shape == (2, 4, 16, 12)
    assert [image.size for image in result.images] == [(96, 128)] * 2
    # Self-attention materialised for self-replace vs fused SDPA: float rounding only.
    torch.testing.assert_close(result.latents[:1], expected, atol=1e-4, rtol=1e-4)


# -- the controller on its own -------------------------------------------------------------


def unet_inputs(model, batch=4):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    context = torch.randn(batch, 77, model.unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor(500), context


@torch.no_grad()
def test_controller_without_edits_equals_default_attention(tiny_model):
    latents, t, context = unet_inputs(tiny_model)
    original = dict(tiny_model.unet.attn_processors)
    expected = tiny_model.predict(latents, t, context)

    controller = AttentionController(latent_size=(16, 16))
    with controller.installed(tiny_model.unet):
        controller.begin_call(0, slice(2, 4))
        fused = tiny_model.predict(latents, t, context)
    assert torch.equal(fused, expected)

    # every layer's probabilities materialised and recorded: same output up to rounding
    store = AttentionStore()
    for downscale in (1, 2, 4, 8):
        store.track(downscale=downscale, cross=True)
        store.track(downscale=downscale, cross=False)
    controller = AttentionController(store=store, latent_size=(16, 16))
    with controller.installed(tiny_model.unet):
        controller.begin_call(0, slice(2, 4))
        materialised = tiny_model.predict(latents, t, context)
    # softmax(QK^T)V vs the fused kernel: float32 rounding (up to ~3e-5 on torch 2.13 CPU)
    torch.testing.assert_close(materialised, expected, atol=1e-4, rtol=1e-4)
    assert store.nbytes() > 0

    # removing the controller restores the very same processor objects
    restored = tiny_model.unet.attn_processors
    assert all(restored[key] is original[key] for key in original)


@torch.no_grad()
def test_controller_layers_know_their_place_and_grid(tiny_model):
    seen = {}

    class Spy(AttentionStore):
        def wants(self, layer):
            seen[layer.name] = layer
            return False

    controller = AttentionController(store=Spy(), latent_size=(16, 16))
    latents, t, context = unet_inputs(tiny_model)
    with controller.installed(tiny_model.unet):
        controller.begin_call(0, slice(2, 4))
        tiny_model.predict(latents, t, context)
    every_layer = {key.rsplit(".processor", 1)[0] for key in tiny_model.unet.attn_processors}
    assert set(seen) == every_layer
    places = {layer.place for layer in seen.values()}
    assert places == {"down", "mid", "up"}
    mid = [layer for layer in seen.values() if layer.place == "mid"]
    assert {(layer.grid, layer.downscale) for layer in mid} == {((2, 2), 8)}
    assert sum(layer.is_cross for layer in seen.values()) == len(seen) // 2
    for name, layer in seen.items():
        assert layer.is_cross == name.endswith("attn2")


# -- errors -----------------------------------------------------------------------------------


def test_replace_with_different_word_counts_is_a_clear_error(tiny_model):
    with pytest.raises(OptionError, match=r"^replace: prompts: .*same number of words"):
        run_edit(
            tiny_model,
            [SOURCE, "a painting of a big lion eating a burger"],
            [Replace()],
            settings=settings(),
        )


def test_word_not_in_prompt_is_a_clear_error(tiny_model):
    with pytest.raises(OptionError, match=r"^local-blend: words: 'tiger' is not a word of"):
        run_edit(
            tiny_model,
            [SOURCE, TARGET],
            [Replace(), LocalBlend(words=["squirrel", "tiger"])],
            settings=settings(),
        )
    with pytest.raises(OptionError, match=r"^reweight: weights: 'tiger' is not a word"):
        run_edit(tiny_model, [SOURCE, TARGET], [Reweight({"tiger": 2.0})], settings=settings())
    with pytest.raises(OptionError, match="one entry per prompt"):
        run_edit(
            tiny_model, [SOURCE, TARGET], [LocalBlend(words=["squirrel"])], settings=settings()
        )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LocalBlend(words=["a", "b"], threshold=1.5), "local-blend: threshold"),
        (lambda: LocalBlend(words=["a", "b"], start_blend=-0.1), "local-blend: start_blend"),
        (lambda: Reweight({"smiling": "lots"}), "reweight: weights"),
        (lambda: Seed(-1), "seed: seed"),
    ],
)
def test_out_of_range_options_are_clear_errors(make, message):
    with pytest.raises(OptionError, match=f"^{message}"):
        make()


def test_bad_run_settings_are_clear_errors(tiny_model):
    with pytest.raises(OptionError, match=r"^pipeline: self_replace_steps"):
        run_edit(
            tiny_model, [SOURCE, TARGET], [Replace()], settings=settings(self_replace_steps=2.0)
        )
    with pytest.raises(OptionError, match=r"^pipeline: height: must be a positive multiple of 8"):
        run_edit(tiny_model, [SOURCE], [], settings=settings(height=100))
    with pytest.raises(OptionError, match=r"^pipeline: steps"):
        run_edit(tiny_model, [SOURCE], [], settings=settings(steps=0))


# -- the edit protocol: which hooks run, with which step ----------------------------------------


class HookSpyRun(EditRun):
    """Records every hook call as (hook, step, is_cross); changes nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bool]] = []

    def attention_inputs(self, query, key, value, layer, step):
        self.calls.append(("inputs", step, layer.is_cross))
        return query, key, value

    def self_attention(self, source, targets, layer, step):
        self.calls.append(("self", step, layer.is_cross))
        return targets

    def cross_attention(self, injected, targets, layer, step):
        self.calls.append(("cross", step, layer.is_cross))
        return targets  # inject the targets' own maps: no change

    def after_step(self, latents, step):
        self.calls.append(("after", step, False))
        return latents


@dataclass(frozen=True)
class HookSpy(Edit):
    name = "hook-spy"

    def bind(self, run: RunContext) -> HookSpyRun:
        return HookSpyRun()


@pytest.mark.parametrize("separate", [False, True])
def test_every_hook_gets_the_step_and_changes_nothing_by_default(tiny_model, separate):
    plain = run_edit(tiny_model, [SOURCE, TARGET], [], settings=settings())
    spied = run_edit(
        tiny_model,
        [SOURCE, TARGET],
        [HookSpy()],
        settings=settings(cross_replace_steps=(0.25, 0.75), separate_uncond_pass=separate),
    )
    calls = spied.edit_runs[0].calls
    # every layer materialised (softmax) instead of the fused kernel: rounding only
    torch.testing.assert_close(spied.latents, plain.latents, atol=1e-4, rtol=1e-4)
    steps = {hook: sorted({s for h, s, _ in calls if h == hook}) for hook in ("inputs", "self")}
    assert steps["inputs"] == steps["self"] == list(range(STEPS))
    assert {c for h, _, c in calls if h == "self"} == {False}
    # cross only inside the schedule's rows int(a*(T+1)) <= t < int(b*(T+1))
    rows = STEPS + 1
    window = list(range(int(0.25 * rows), int(0.75 * rows)))
    assert sorted({s for h, s, _ in calls if h == "cross"}) == window
    assert {c for h, _, c in calls if h == "cross"} == {True}
    assert [s for h, s, _ in calls if h == "after"] == list(range(STEPS))
    # once per layer call of a step (never for an unconditional-only pass)
    layers = len(tiny_model.unet.attn_processors)
    assert sum(1 for h, s, _ in calls if h == "inputs" and s == 0) == layers


class InjectSourceRun(EditRun):
    def cross_attention(self, injected, targets, layer, step):
        return injected


@dataclass(frozen=True)
class InjectSource(Edit):
    name = "inject-source"

    def bind(self, run: RunContext) -> InjectSourceRun:
        return InjectSourceRun()


def test_self_attention_injection_belongs_to_the_prompt_to_prompt_edits(tiny_model):
    """Overriding cross_attention no longer switches self-attention injection on; the P2P
    edits do it through their shared self_replace option."""
    prompts = [SOURCE, TARGET]
    with_self = settings(self_replace_steps=0.6)
    without_self = settings(self_replace_steps=0.0)

    def latents(edits, run_settings):
        return run_edit(tiny_model, prompts, edits, settings=run_settings).latents

    assert torch.equal(
        latents([InjectSource()], with_self), latents([InjectSource()], without_self)
    )
    assert torch.equal(
        latents([Replace(self_replace=False)], with_self), latents([Replace()], without_self)
    )
    assert not torch.equal(latents([Replace()], with_self), latents([Replace()], without_self))
    # A P2P edit turns it on for a run even beside a non-P2P cross edit.
    assert not torch.equal(
        latents([InjectSource(), Reweight({"lion": 1.0})], with_self),
        latents([InjectSource(), Reweight({"lion": 1.0}, self_replace=False)], with_self),
    )
