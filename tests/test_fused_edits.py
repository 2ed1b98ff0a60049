"""The FAST route: edits that the fused attention kernel can carry give the materialised
result, and materialise nothing.

Replace, refine and reweight declare their cross-attention linear in the maps
(``EditRun.linear_cross_attention``) and the Prompt-to-Prompt self-attention injection says
it copies the source (``EditRun.self_attention_is_source``); an eager run then keeps those
layers on the fused kernel. Forcing every such layer back onto the materialised path
(``attend``) must give the same latents up to float rounding. ``EditSettings.fused_edits``
is ``"auto"`` by default: on for eager runs on a CUDA device (launch-bound), off elsewhere,
where every edited layer materialises every row, as the reference implementation does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import p2p_framework.attention as attention
from p2p_framework import (
    AttentionController,
    Edit,
    EditRun,
    EditSettings,
    LinearCrossAttention,
    OptionError,
    RunContext,
    run_edit,
)
from p2p_framework.pipeline import resolve_fused_edits
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.refine import Refine
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.reweight import Reweight

SOURCE = "a painting of a squirrel eating a burger"
TARGET = "a painting of a lion eating a burger"
REFINED = "a painting of a squirrel eating a burger in the forest"
# Every schedule changes during the run: cross injection per word, self injection mid-run.
SETTINGS = dict(
    steps=6,
    cross_replace_steps={"default": 0.8, "burger": 0.4},
    self_replace_steps=(0.2, 0.6),
    fused_edits=True,
)


@dataclass(frozen=True)
class Mute(Edit):
    """A third-party edit: remove one word's attention from what is injected, declared
    linear through the public API."""

    name = "mute"
    word: str = "burger"

    def bind(self, run: RunContext) -> EditRun:
        keep = torch.ones(run.num_targets, run.max_tokens, device=run.device)
        for target in range(run.num_targets):
            keep[target, run.find_word(target + 1, self.word)] = 0
        return MuteRun(keep)


class MuteRun(EditRun):
    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep  # (targets, tokens)

    def cross_attention(self, injected, targets, layer, step):  # noqa: ANN001, ANN201
        return injected * self.keep[:, None, None, :]

    def linear_cross_attention(self, step: int) -> LinearCrossAttention:
        return LinearCrossAttention(torch.diag_embed(self.keep))


class UndeclaredMuteRun(MuteRun):
    def linear_cross_attention(self, step: int) -> None:
        return None


@dataclass(frozen=True)
class UndeclaredMute(Mute):
    name = "undeclared-mute"

    def bind(self, run: RunContext) -> EditRun:
        return UndeclaredMuteRun(super().bind(run).keep)


CASES = {
    "replace": ([SOURCE, TARGET], lambda: [Replace()]),
    "replace, two targets": ([SOURCE, TARGET, TARGET.replace("lion", "cat")], lambda: [Replace()]),
    "refine": ([SOURCE, REFINED], lambda: [Refine()]),
    "reweight": ([SOURCE, SOURCE], lambda: [Reweight({"squirrel": 3.0})]),
    "replace + reweight": ([SOURCE, TARGET], lambda: [Replace(), Reweight({"lion": 2.0})]),
    "replace + third-party mute": ([SOURCE, TARGET], lambda: [Replace(), Mute()]),
    "replace + local blend": (
        [SOURCE, TARGET],
        lambda: [Replace(), LocalBlend(words=["squirrel", "lion"], start_blend=0.0)],
    ),
}


class Materialisations:
    """Counts the layer calls that compute explicit probabilities."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = attention.attention_probabilities

        def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(attention, "attention_probabilities", counting)


def force_materialised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FAST layer call takes the materialised path instead."""
    route = AttentionController.route

    def materialising(self, layer):  # noqa: ANN001, ANN202
        found = route(self, layer)
        return attention.MATERIALISE if found == attention.FAST else found

    monkeypatch.setattr(AttentionController, "route", materialising)


@pytest.mark.parametrize("case", list(CASES))
def test_fast_route_gives_the_materialised_result(tiny_model, monkeypatch, case) -> None:
    prompts, edits = CASES[case]
    settings = EditSettings(**SETTINGS)
    counted = Materialisations(monkeypatch)
    fast = run_edit(tiny_model, prompts, edits(), settings=settings)
    fast_materialised = counted.calls
    with monkeypatch.context() as patch:
        force_materialised(patch)
        counted.calls = 0
        slow = run_edit(tiny_model, prompts, edits(), settings=settings)
    assert counted.calls > fast_materialised
    if "local blend" not in case:  # nothing keeps maps: no layer materialises
        assert fast_materialised == 0
    # The same arithmetic up to float rounding (the fused kernel sums in another order).
    torch.testing.assert_close(fast.latents, slow.latents, atol=1e-4, rtol=0)
    pixels = np.abs(np.stack(fast.images).astype(int) - np.stack(slow.images).astype(int))
    assert pixels.max() <= 1  # 8-bit rounding at most


def test_an_undeclared_edit_materialises_and_agrees_with_its_declared_twin(
    tiny_model, monkeypatch
) -> None:
    settings = EditSettings(**SETTINGS)
    counted = Materialisations(monkeypatch)
    declared = run_edit(tiny_model, [SOURCE, SOURCE], [Mute()], settings=settings)
    assert counted.calls == 0
    undeclared = run_edit(tiny_model, [SOURCE, SOURCE], [UndeclaredMute()], settings=settings)
    assert counted.calls > 0  # the cross-attention layers of injecting steps
    torch.testing.assert_close(declared.latents, undeclared.latents, atol=1e-4, rtol=0)
    # The edit did something: muting "burger" changes the target.
    assert (declared.latents[1] - declared.latents[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "edits",
    [
        lambda: [Replace()],  # FAST layers
        lambda: [UndeclaredMute()],  # materialised layers
        lambda: [Replace(), LocalBlend(words=["squirrel", "lion"], start_blend=0.0)],  # kept maps
    ],
    ids=["fast", "materialised", "local blend"],
)
def test_source_row_is_plain_generation_bit_for_bit(tiny_model, edits) -> None:
    """Every route leaves the unconditional rows and the source on the fused kernel, so the
    source of an edit is exactly the plain generation of its prompt (with the same batch
    layout: a target's plain run next to it), whatever the edits."""
    settings = EditSettings(**SETTINGS)
    edited = run_edit(tiny_model, [SOURCE, TARGET], edits(), settings=settings)
    plain = run_edit(tiny_model, [SOURCE, TARGET], [], settings=settings)
    assert torch.equal(edited.latents[0], plain.latents[0])


@dataclass(frozen=True)
class MuteValues(Edit):
    """Halves the targets' cross-attention values through ``attention_inputs`` (no maps)."""

    name = "mute-values"

    def bind(self, run: RunContext) -> EditRun:
        return MuteValuesRun()


class MuteValuesRun(EditRun):
    def uses_attention_inputs(self, layer, step):  # noqa: ANN001, ANN201
        return layer.is_cross

    def attention_inputs(self, query, key, value, layer, step):  # noqa: ANN001, ANN201
        value = value.clone()
        value[1:] *= 0.5
        return query, key, value


def test_a_batch_runs_another_jobs_input_hooks_on_fast_layers(tiny_model) -> None:
    from p2p_framework import EditJob, run_edits

    settings = EditSettings(**SETTINGS)
    jobs = [
        EditJob([SOURCE, TARGET], [Replace()], settings=settings),
        EditJob([SOURCE, SOURCE], [MuteValues()], settings=settings),
    ]
    batched = run_edits(tiny_model, jobs)
    assert batched[1].batch == [0, 1]
    for job, result in zip(jobs, batched):
        alone = run_edit(tiny_model, job.prompts, job.edits, settings=settings)
        torch.testing.assert_close(result.latents, alone.latents, atol=2e-4, rtol=1e-4)


def test_auto_takes_the_fast_route_on_cuda_only_when_eager() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_fused_edits("auto", cuda) is True
    assert resolve_fused_edits("auto", cuda, compiled=True) is False
    assert resolve_fused_edits("auto", cpu) is False
    assert resolve_fused_edits("auto", torch.device("mps")) is False
    for device in (cuda, cpu):
        assert resolve_fused_edits(True, device) is True
        assert resolve_fused_edits(False, device) is False


def test_auto_on_the_cpu_is_the_exact_path_and_is_recorded_as_off(tiny_model) -> None:
    exact = EditSettings(**{**SETTINGS, "fused_edits": False})
    auto = EditSettings(**{k: v for k, v in SETTINGS.items() if k != "fused_edits"})
    assert auto.fused_edits == "auto"
    by_default = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=auto)
    explicit = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=exact)
    assert by_default.settings.fused_edits is False  # what run.json records
    assert torch.equal(by_default.latents, explicit.latents)


def test_fused_edits_takes_true_false_or_auto_and_says_so() -> None:
    assert EditSettings(fused_edits="true").fused_edits is True
    assert EditSettings(fused_edits="no").fused_edits is False
    with pytest.raises(OptionError, match="fused_edits: expected bool \\| 'auto', got 'maybe'"):
        EditSettings(fused_edits="maybe")


def test_by_default_no_layer_takes_the_fast_route(tiny_model, monkeypatch) -> None:
    routes: list[int] = []
    route = AttentionController.route

    def recording(self, layer):  # noqa: ANN001, ANN202
        found = route(self, layer)
        routes.append(found)
        return found

    monkeypatch.setattr(AttentionController, "route", recording)
    settings = EditSettings(**{**SETTINGS, "fused_edits": False})
    default = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=settings)
    assert attention.MATERIALISE in routes and attention.FAST not in routes
    routes.clear()
    fused = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=EditSettings(**SETTINGS))
    assert attention.FAST in routes
    # The route changes rounding only.
    torch.testing.assert_close(fused.latents, default.latents, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "prompts, edits",
    [
        ([SOURCE, TARGET], lambda: [Replace()]),  # every token injected: no target part
        ([SOURCE, REFINED], lambda: [Refine()]),  # new tokens keep their own maps
        ([SOURCE, TARGET, TARGET.replace("lion", "cat")], lambda: [Replace(), Mute()]),
    ],
    ids=["replace", "refine", "two targets, third-party mute"],
)
def test_kept_maps_computed_after_the_call_equal_the_materialised_ones(
    tiny_model, monkeypatch, prompts, edits
) -> None:
    """A fused run keeps the maps of layers on the fused kernel as queries and keys and
    computes them, edited by the step's token maps, a call at a time: the stored maps equal
    those of layers that materialise and edit their probabilities."""
    settings = EditSettings(**{**SETTINGS, "attention_maps": True})
    counted = Materialisations(monkeypatch)
    deferred = run_edit(tiny_model, prompts, edits(), settings=settings)
    assert counted.calls <= settings.steps  # one batch per call at most, no layer's own
    with monkeypatch.context() as patch:
        force_materialised(patch)
        materialised = run_edit(tiny_model, prompts, edits(), settings=settings)
    ours = deferred.attention_store.average(downscale=4)
    theirs = materialised.attention_store.average(downscale=4)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    # What was stored is the edited attention, not the targets' own.
    plain = run_edit(tiny_model, prompts, [], settings=settings)
    assert (ours[1:] - plain.attention_store.average(downscale=4)[1:]).abs().max() > 1e-3


def test_kept_maps_of_batched_jobs_are_each_jobs_own(tiny_model) -> None:
    from p2p_framework import EditJob, run_edits

    settings = EditSettings(**{**SETTINGS, "attention_maps": True})
    jobs = [
        EditJob([SOURCE, TARGET], [Replace()], settings=settings),
        EditJob([REFINED, REFINED], [Reweight({"forest": 2.0})], settings=settings),
    ]
    batched = run_edits(tiny_model, jobs)
    assert batched[1].batch == [0, 1]
    for job, result in zip(jobs, batched):
        alone = run_edit(tiny_model, job.prompts, job.edits, settings=settings)
        torch.testing.assert_close(
            result.attention_store.average(downscale=4),
            alone.attention_store.average(downscale=4),
            atol=1e-6,
            rtol=1e-5,
        )


def test_deferred_maps_are_computed_in_batches_of_bounded_size(tiny_model, monkeypatch) -> None:
    import p2p_framework.store as store_module

    settings = EditSettings(**{**SETTINGS, "attention_maps": True})
    whole = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=settings)
    counted = Materialisations(monkeypatch)
    monkeypatch.setattr(store_module, "DEFERRED_SCORES", 1)  # every layer call alone
    alone = run_edit(tiny_model, [SOURCE, TARGET], [Replace()], settings=settings)
    assert counted.calls > settings.steps
    torch.testing.assert_close(
        alone.attention_store.average(downscale=4),
        whole.attention_store.average(downscale=4),
        atol=1e-6,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_in_half_precision_the_fused_route_is_as_close_to_float32_as_the_exact_path(
    tiny_model_dir, tiny_model, dtype
) -> None:
    """CUDA runs load in float16 and take the fused route by default: there the half
    precision arithmetic, not the route, sets the distance to a float32 run."""
    from p2p_framework import load_model

    half = load_model(tiny_model_dir, device="cpu", dtype=dtype)
    edits = lambda: [Replace(), LocalBlend(words=["squirrel", "lion"], start_blend=0.0)]  # noqa: E731
    settings = {**SETTINGS, "attention_maps": True}
    reference = run_edit(tiny_model, [SOURCE, TARGET], edits(), settings=EditSettings(**settings))
    errors = {}
    for fused in (False, True):
        result = run_edit(
            half,
            [SOURCE, TARGET],
            edits(),
            settings=EditSettings(**{**settings, "fused_edits": fused}),
        )
        assert result.latents.dtype == dtype and torch.isfinite(result.latents).all()
        errors[fused] = float((result.latents.float() - reference.latents).abs().mean())
        maps = result.attention_store.average(downscale=4)
        torch.testing.assert_close(
            maps, reference.attention_store.average(downscale=4), atol=0.02, rtol=0
        )
    assert errors[False] > 0  # half precision does change the result
    assert errors[True] <= 1.5 * errors[False], errors
