"""The compiled path: one graph for every step, and the same result as eager.

The default tests compile with the ``eager`` backend and ``fullgraph=True``: Dynamo traces the
UNet with the controller exactly as it would for inductor (a graph break raises, a recompile
raises under ``error_on_recompile``), without inductor's code generation, which takes minutes
on a CPU. The slow test runs inductor itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo

from p2p_framework import (
    AttentionController,
    AttentionStore,
    EditSettings,
    OptionError,
    RunContext,
    SelfReplaceRun,
    load_model,
    run_edit,
)
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.refine import Refine
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.reweight import Reweight
from p2p_framework.store import AttentionLayer

PROMPTS = ["a cat on a mat", "a dog on a mat"]
# Cross injection stops and self injection starts mid-run, and every self-attention layer is
# replaced (min downscale 1), so the step tensors switch both schedules during the run.
SETTINGS = dict(steps=6, cross_replace_steps=0.5, self_replace_steps=(0.3, 0.7))


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.fixture
def fresh_model(tiny_model_dir: Path):
    """A model of its own: compiling must not leak into the shared ``tiny_model``."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield load_model(tiny_model_dir, device="cpu", dtype="float32")
    torch._dynamo.reset()


def _edit(model, edits, **overrides):
    settings = EditSettings(**{**SETTINGS, "self_replace_min_downscale": 1, **overrides})
    return run_edit(model, PROMPTS, edits, settings=settings)


def test_compiled_edit_is_one_graph_and_matches_eager(fresh_model) -> None:
    eager = _edit(fresh_model, [Replace(), LocalBlend(words=["cat", "dog"], mask_downscale=1)])
    fresh_model.compile(backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = _edit(fresh_model, [Replace(), LocalBlend(words=["cat", "dog"], mask_downscale=1)])
        # A second run with new plugin and controller objects reuses the graph too.
        second = _edit(fresh_model, [Replace(), LocalBlend(words=["cat", "dog"], mask_downscale=1)])
    assert _unique_graphs() == 1
    # Static mode materialises every layer's probabilities (softmax instead of the fused
    # kernel), so results agree to float32 rounding, not bit for bit.
    torch.testing.assert_close(first.latents, eager.latents, atol=1e-4, rtol=0)
    assert torch.equal(first.latents, second.latents)
    assert first.edit_runs[1].mask is not None
    assert torch.equal(first.edit_runs[1].mask, eager.edit_runs[1].mask)
    # The target really was edited (not the source twice, not the plain target prompt).
    assert not torch.allclose(first.latents[0], first.latents[1], atol=1e-3)


@pytest.mark.slow  # about 30 s of tracing; the one-graph guard stays in the default run
def test_compiled_refine_reweight_and_separate_uncond_pass(fresh_model) -> None:
    prompts = ["a cat on a mat", "a fluffy cat on a mat"]
    settings = EditSettings(**SETTINGS, separate_uncond_pass=True, self_replace_min_downscale=1)

    def edits():
        return [Refine(), Reweight(weights={"fluffy": 3.0})]

    eager = run_edit(fresh_model, prompts, edits(), settings=settings)
    fresh_model.compile(backend="eager", fullgraph=True)
    compiled = run_edit(fresh_model, prompts, edits(), settings=settings)
    # The unconditional pass (no controlled rows) and the conditional one: two graphs for
    # all six steps (one per step and pass would be 12).
    assert _unique_graphs() == 2
    torch.testing.assert_close(compiled.latents, eager.latents, atol=1e-4, rtol=0)


def test_compiled_batch_of_jobs_is_one_graph(fresh_model) -> None:
    from p2p_framework import EditJob, run_edits

    def jobs() -> list[EditJob]:
        settings = EditSettings(**SETTINGS, self_replace_min_downscale=1)
        blend = LocalBlend(words=["cat", "dog"], mask_downscale=1)
        return [
            EditJob(PROMPTS, [Replace(), blend], settings=settings),
            EditJob(["a cat on a mat", "a fluffy cat on a mat"], [Refine()], settings=settings),
        ]

    eager = run_edits(fresh_model, jobs())
    fresh_model.compile(backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run_edits(fresh_model, jobs())
    assert _unique_graphs() == 1
    assert compiled[0].batch == compiled[1].batch == [0, 1]  # really one UNet batch
    for solo, batched in zip(eager, compiled):
        torch.testing.assert_close(batched.latents, solo.latents, atol=1e-4, rtol=0)


@pytest.mark.slow  # tracing the SDXL UNet takes about 30 s on 2 cores
def test_compiled_sdxl_edit_is_one_graph_and_matches_eager(tiny_sdxl_model_dir: Path) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = load_model(tiny_sdxl_model_dir, device="cpu", dtype="float32")

    def edit():
        return _edit(model, [Replace(), LocalBlend(words=["cat", "dog"])])

    eager = edit()
    model.compile(backend="eager", fullgraph=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = edit()
        # The added conditioning (pooled text, time ids) is traced into the same graph.
        assert _unique_graphs() == 1
        torch.testing.assert_close(compiled.latents, eager.latents, atol=1e-4, rtol=0)
    finally:
        torch._dynamo.reset()


def test_compiled_generation_without_edits(fresh_model) -> None:
    eager = run_edit(fresh_model, PROMPTS[:1], settings=EditSettings(steps=3))
    fresh_model.compile(backend="eager", fullgraph=True)
    compiled = run_edit(fresh_model, PROMPTS[:1], settings=EditSettings(steps=3))
    # Nothing to control: every layer keeps the fused kernel, so the result is identical.
    assert torch.equal(compiled.latents, eager.latents)


@pytest.mark.slow  # about 40 s of tracing (forward and backward)
def test_compiled_null_text_inversion_graphs_and_result(fresh_model) -> None:
    from PIL import Image

    from p2p_framework.inversion import invert

    pixels = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(0))
    photo = Image.fromarray((pixels * 255).to(torch.uint8).numpy())
    eager = invert(fresh_model, photo, "a cat on a mat", "null-text", num_steps=4)
    fresh_model.compile(backend="eager", fullgraph=True)
    compiled = invert(fresh_model, photo, "a cat on a mat", "null-text", num_steps=4)
    # Forward without grad (batch 1 and 2) and forward+backward (batch 1): three graphs for
    # the whole inversion, whatever the number of steps and inner steps.
    assert _unique_graphs() == 3
    torch.testing.assert_close(compiled.uncond_embeddings, eager.uncond_embeddings)
    assert compiled.steps == eager.steps


def test_load_model_compile_option_and_bad_mode(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, device="cpu", dtype="float32", compile=True)
    assert model.compiled and model.compile_mode == "default"  # auto on a CPU
    plain = load_model(tiny_model_dir, device="cpu", dtype="float32")
    assert not plain.compiled
    with pytest.raises(OptionError, match="unknown mode 'fast'"):
        plain.compile("fast")
    assert not plain.compiled


def _layer(is_cross: bool, downscale: int = 1) -> AttentionLayer:
    return AttentionLayer("up_blocks.1.attentions.0", "up", is_cross, (4, 4), downscale)


@pytest.mark.parametrize("is_cross", [True, False])
def test_static_schedules_equal_eager_branches_at_every_step(is_cross: bool) -> None:
    steps, tokens = 5, 6
    # Target 0 injected on steps 0-2 for all tokens; target 1 only on token 2, steps 1-3.
    table = torch.zeros(steps + 1, 2, tokens)
    table[0:3, 0] = 1
    table[1:4, 1, 2] = 1

    class Double(SelfReplaceRun):
        def cross_attention(self, injected, targets, layer, step):  # noqa: ANN001, ANN201
            return injected * 2

    def controller(static: bool) -> AttentionController:
        run = RunContext(
            ["a", "b", "c"],
            None,
            steps,
            (4, 4),
            AttentionStore(),
            torch.device("cpu"),
            self_replace_window=(2, 4),
            self_replace_min_downscale=1,
            compiled=static,
        )
        return AttentionController(
            [Double(run)],
            cross_table=table,
            latent_size=(4, 4),
            num_steps=steps,
            static=static,
        )

    eager, static = controller(False), controller(True)
    generator = torch.Generator().manual_seed(0)
    keys = tokens if is_cross else 16
    layer = _layer(is_cross)
    for step in range(steps):
        probs = torch.rand(6, 2, 16, keys, generator=generator)
        outputs = []
        for ctrl in (eager, static):
            ctrl.begin_call(step, slice(3, 6))
            if ctrl.static:  # a fixed plan: the layer materialises at every step
                assert ctrl.wants(layer)
            outputs.append(ctrl.attend(probs.clone(), layer) if ctrl.wants(layer) else probs)
        assert torch.equal(outputs[0], outputs[1]), f"step {step}"
        changed = not torch.equal(outputs[1], probs)
        expected = step < 4 if is_cross else 2 <= step < 4
        assert changed == expected, f"step {step}"
        assert torch.equal(outputs[1][:4], probs[:4])  # unconditional rows and the source


def test_store_allocated_sums_and_missing_resolution() -> None:
    store = AttentionStore()
    store.track(downscale=2, cross=True)
    store.track(downscale=8, cross=True)
    store.allocate(2, 5, (16, 12), torch.device("cpu"))
    layer = AttentionLayer("down_blocks.1.attentions.0", "down", True, (8, 6), 2)
    maps = torch.rand(2, 3, 48, 5)
    store.add(layer, maps)
    store.add(layer, 3 * maps)
    expected = (2 * maps.mean(dim=1)).reshape(2, 8, 6, 5)
    torch.testing.assert_close(store.average(downscale=2), expected)
    # Allocated but never filled (no layer at 1/8 of this latent) reads as missing.
    with pytest.raises(KeyError, match="1/8"):
        store.average(downscale=8)
    assert store.nbytes() == (2 * 48 * 5 + 2 * (2 * 2) * 5) * 4  # 1/8 of 16x12: a 2x2 grid


@pytest.mark.slow
def test_inductor_compiled_edit_matches_eager(fresh_model) -> None:
    edits = [Replace(), LocalBlend(words=["cat", "dog"], mask_downscale=1)]
    eager = _edit(fresh_model, edits)
    fresh_model.compile("default")
    compiled = _edit(fresh_model, [Replace(), LocalBlend(words=["cat", "dog"], mask_downscale=1)])
    assert _unique_graphs() == 1
    torch.testing.assert_close(compiled.latents, eager.latents, atol=1e-3, rtol=0)


@pytest.fixture
def trace_only_compile(monkeypatch: pytest.MonkeyPatch):
    """``--compile`` with Dynamo's tracing but not inductor's code generation (minutes)."""
    from p2p_framework.model import StableDiffusionModel

    original = StableDiffusionModel.compile

    def compile_traced(self, mode="auto", *, backend="inductor", fullgraph=False):  # noqa: ANN001, ANN202
        original(self, mode, backend="eager", fullgraph=True)
        self.compile_mode = "default" if mode == "auto" else mode

    torch._dynamo.reset()
    monkeypatch.setattr(StableDiffusionModel, "compile", compile_traced)
    yield
    torch._dynamo.reset()


def test_cli_compile_flag_is_recorded_and_rerun(
    trace_only_compile, registry, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import json

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from p2p_framework.cli import cli
    from p2p_framework.runner import MODEL_ENV

    monkeypatch.delenv(MODEL_ENV, raising=False)
    common = ["--prompt", "a cat on a mat", "--target", "a dog on a mat", "--steps", "3"]
    common += ["--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32"]
    common += ["--model", str(tiny_model_dir)]

    def invoke(*args: str):
        result = CliRunner().invoke(cli, list(args), obj=registry)
        assert result.exit_code == 0, result.output
        return result

    invoke("edit", *common, "--out", str(tmp_path / "eager"))
    invoke("edit", *common, "--compile", "--out", str(tmp_path / "compiled"))
    record = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert record["model"]["compile"] == "default"
    assert json.loads((tmp_path / "eager" / "run.json").read_text())["model"]["compile"] is None
    for name in ("source.png", "target-1.png"):
        eager = np.asarray(Image.open(tmp_path / "eager" / name), dtype=np.int16)
        compiled = np.asarray(Image.open(tmp_path / "compiled" / name), dtype=np.int16)
        assert np.abs(eager - compiled).max() <= 1  # float rounding at most
    invoke("rerun", str(tmp_path / "compiled"), "--out", str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    assert again["model"]["compile"] == "default"
    for name in ("source.png", "target-1.png"):
        first = (tmp_path / "compiled" / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == first

    pipeline = tmp_path / "jobs.toml"
    pipeline.write_text(
        f'model = "{tiny_model_dir}"\ndevice = "cpu"\ndtype = "float32"\ncompile = true\n'
        "[defaults]\nsteps = 3\nheight = 64\nwidth = 64\n"
        '[[jobs]]\nname = "dog"\nprompt = "a cat on a mat"\ntargets = ["a dog on a mat"]\n'
    )
    invoke("run", str(pipeline), "--out", str(tmp_path / "batch"))
    record = json.loads((tmp_path / "batch" / "dog" / "run.json").read_text())
    assert record["model"]["compile"] == "default"
    first = (tmp_path / "compiled" / "target-1.png").read_bytes()
    assert (tmp_path / "batch" / "dog" / "target-1.png").read_bytes() == first
