"""Batched editing (``run_edits``, ``p2p-run run --batch-rows``): many jobs in one UNet batch
give what each gives alone.

Equality is checked on the final latents: exact where the batch changes nothing, otherwise
to float rounding (a larger UNet batch and, where another job of the batch needs a layer's
probabilities, the materialised instead of the fused attention kernel, reorder float sums).
Runs use the tiny model at 64x64 px with 4 steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from p2p_framework import Edit, EditRun, EditSettings, OptionError, PluginRegistry, run_edit
from p2p_framework.batch import ControllerGroup, plan_batches
from p2p_framework.cli import cli
from p2p_framework.inversion import invert
from p2p_framework.pipeline import EditJob, iter_edits, run_edits
from p2p_framework.plugins.inversion_sources import DirectSource, NullTextSource
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.refine import Refine
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.reweight import Reweight
from p2p_framework.plugins.seed import Seed
from p2p_framework.runner import MODEL_ENV

STEPS = 4
SIZE = {"height": 64, "width": 64}
SQUIRREL = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"
SOUP = "a bowl of soup"
PEA_SOUP = "a bowl of pea soup with croutons"
CAT = "a photo of a cat"
DOG = "a photo of a dog"
# Float rounding of a different UNet batch, on latents of size ~1 to ~30.
TOLERANCE = {"atol": 2e-4, "rtol": 1e-4}


def settings(**overrides) -> EditSettings:
    return EditSettings(**{"steps": STEPS, **SIZE, **overrides})


def solo(model, job: EditJob):
    return run_edit(model, job.prompts, job.edits, source=job.source, settings=job.settings)


def assert_same_results(batched, alone) -> None:
    assert len(batched) == len(alone)
    for one, other in zip(batched, alone):
        assert one.prompts == other.prompts
        torch.testing.assert_close(one.latents, other.latents, **TOLERANCE)


def record_unet_rows(model, monkeypatch) -> list[int]:
    """Rows of every UNet call the model makes from now on."""
    calls: list[int] = []
    predict = model.predict

    def counting(latents, timestep, context, *rest):
        calls.append(latents.shape[0])
        return predict(latents, timestep, context, *rest)

    monkeypatch.setattr(model, "predict", counting)
    return calls


# --------------------------------------------------------------------------- equality


def test_different_edits_and_schedules_in_one_batch(tiny_model, monkeypatch):
    def jobs():
        return [
            EditJob(
                [SQUIRREL, LION],
                [Replace()],
                Seed(1),
                settings(cross_replace_steps=0.8, self_replace_steps=0.5),
            ),
            EditJob(
                [SOUP, PEA_SOUP],
                [Refine(), Reweight(weights={"croutons": 3.0})],
                Seed(2),
                settings(
                    cross_replace_steps={"default": 1.0, "croutons": 0.5},
                    self_replace_steps=(0.25, 0.75),
                    guidance=5.0,
                    attention_maps=True,
                ),
            ),
        ]

    alone = [solo(tiny_model, job) for job in jobs()]
    calls = record_unet_rows(tiny_model, monkeypatch)
    batched = run_edits(tiny_model, jobs())
    assert calls == [8] * STEPS  # both jobs, uncond and cond rows, in every UNet call
    assert [r.batch for r in batched] == [[0, 1], [0, 1]]
    assert_same_results(batched, alone)
    # Each job kept its own attention store: the second tracked maps, the first nothing.
    assert batched[0].attention_store.nbytes() == 0
    torch.testing.assert_close(
        batched[1].attention_store.average(downscale=4),
        alone[1].attention_store.average(downscale=4),
        **TOLERANCE,
    )
    # The edits did something, so the equality above is not that of two plain generations.
    plain = run_edit(tiny_model, [SOUP, PEA_SOUP], [], source=Seed(2), settings=settings())
    assert (plain.latents[1] - batched[1].latents[1]).abs().max() > 1e-2


@pytest.fixture(scope="module")
def inversions(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A null-text and a direct inversion of a small synthetic photo, saved once."""
    folder = tmp_path_factory.mktemp("batching-inversions")
    yy, xx = np.mgrid[0:64, 0:64]
    photo = np.stack([4 * xx, 4 * yy, 255 * ((xx - 32) ** 2 + (yy - 32) ** 2 < 200)], -1)
    Image.fromarray(photo.clip(0, 255).astype(np.uint8)).save(folder / "photo.png")
    paths = {}
    for method, options in (("null-text", {"num_inner_steps": 2}), ("direct", {})):
        inversion = invert(
            tiny_model, folder / "photo.png", CAT, method, num_steps=STEPS, **SIZE, **options
        )
        paths[method] = inversion.save(folder / f"{method}.p2pinv")
    return paths


def test_sources_with_per_step_embeddings_and_latents_and_local_blend(tiny_model, inversions):
    def jobs():
        return [
            EditJob([SQUIRREL, LION], [Replace()], Seed(3), settings()),
            EditJob(
                [CAT, DOG],
                [Replace(), LocalBlend(words=["cat", "dog"], start_blend=0.0)],
                NullTextSource(inversion=str(inversions["null-text"])),
                settings(self_replace_steps=0.5),
            ),
            EditJob(
                [CAT, DOG],
                [Replace()],
                DirectSource(inversion=str(inversions["direct"])),
                settings(),
            ),
            EditJob(
                [SQUIRREL, LION, "a painting of a tiger eating a burger"],
                [Replace(), LocalBlend(words=["squirrel", "lion", "tiger"], start_blend=0.0)],
                Seed(4),
                settings(cross_replace_steps={"default": 1.0, "lion": 0.4}),
            ),
        ]

    alone = [solo(tiny_model, job) for job in jobs()]
    batched = run_edits(tiny_model, jobs())
    assert [r.batch for r in batched] == [[0, 1, 2, 3]] * 4
    assert_same_results(batched, alone)
    assert alone[1].source_info["inversion"]["method"] == "null-text"
    # Each local blend computed its mask from its own job's attention only.
    blend_null, blend_seed = batched[1].edit_runs[1], batched[3].edit_runs[1]
    assert blend_null.mask.shape[0] == 2 and blend_seed.mask.shape[0] == 3
    assert torch.equal(blend_null.mask, alone[1].edit_runs[1].mask)


def test_null_text_rows_use_their_own_embeddings(tiny_model, inversions):
    """Two jobs, one from the null-text inversion and one from plain noise of the same start:
    if the batch mixed up their unconditional rows, one of them would change."""
    from p2p_framework.inversion import Inversion

    inversion = Inversion.load(inversions["null-text"])
    empty = tiny_model.encode_text([""])
    assert not torch.allclose(inversion.uncond_embeddings[0].to(empty), empty)

    def jobs():
        return [
            EditJob(
                [CAT, DOG],
                [Replace()],
                NullTextSource(inversion=str(inversions["null-text"])),
                settings(),
            ),
            EditJob([CAT, DOG], [Replace()], Seed(5), settings()),
        ]

    alone = [solo(tiny_model, job) for job in jobs()]
    batched = run_edits(tiny_model, jobs())
    assert_same_results(batched, alone)
    assert (batched[0].latents - batched[1].latents).abs().max() > 1e-2


# --------------------------------------------------------------------------- grouping


def test_incompatible_jobs_run_in_separate_batches_in_order(tiny_model, monkeypatch):
    def jobs():
        return [
            EditJob([SQUIRREL, LION], [Replace()], Seed(1), settings(steps=3)),
            EditJob([SQUIRREL, LION], [Replace()], Seed(2), settings()),
            EditJob([SOUP, PEA_SOUP], [Refine()], Seed(3), settings(steps=3)),
            EditJob([SOUP], [], Seed(4), settings(guidance=1.0)),
        ]

    alone = [solo(tiny_model, job) for job in jobs()]
    calls = record_unet_rows(tiny_model, monkeypatch)
    batched = run_edits(tiny_model, jobs())
    assert [r.batch for r in batched] == [[0, 2], [1], [0, 2], [3]]
    assert calls == [8] * 3 + [4] * STEPS + [1] * STEPS
    assert [r.settings.steps for r in batched] == [3, STEPS, 3, STEPS]
    assert_same_results(batched, alone)


def test_max_batch_rows_splits_batches(tiny_model, monkeypatch):
    def jobs():
        return [EditJob([SQUIRREL, LION], [Replace()], Seed(i), settings()) for i in range(3)] + [
            EditJob([SQUIRREL, LION, LION, LION], [Replace()], Seed(9), settings())
        ]

    alone = [solo(tiny_model, job) for job in jobs()]
    calls = record_unet_rows(tiny_model, monkeypatch)
    batched = run_edits(tiny_model, jobs(), max_batch_rows=8)
    # 4 rows per 2-prompt job: two fit in 8; the 8-row job fills its own batch.
    assert [r.batch for r in batched] == [[0, 1], [0, 1], [2], [3]]
    assert calls == [8] * STEPS + [4] * STEPS + [8] * STEPS
    assert_same_results(batched, alone)
    calls.clear()
    run_edits(tiny_model, jobs()[:2], max_batch_rows=3)  # smaller than any job: one at a time
    assert calls == [4] * (2 * STEPS)


def test_plan_batches():
    assert plan_batches(["a", "b", "a", "a", None], [4, 4, 4, 4, 4], 8) == [[0, 2], [1], [3]]
    assert plan_batches(["a", "a", "a"], [4, 12, 4], 8) == [[0], [1], [2]]
    assert plan_batches(["a", "a", "a"], [4, 12, 4], None) == [[0, 1, 2]]
    with pytest.raises(OptionError, match="max_batch_rows"):
        plan_batches(["a"], [4], 0)


@dataclass(frozen=True)
class FailsMidRun(Edit):
    """Test edit whose after_step raises an OptionError at step 1: a job failing in the loop
    (local blend at a level the model lacks used to, and is now refused in bind)."""

    name = "fails-mid-run"

    def bind(self, run):  # noqa: ANN001, ANN201
        return FailsMidRunRun()


class FailsMidRunRun(EditRun):
    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        if step == 1:
            raise OptionError("fails-mid-run", "step", "fails during the loop")
        return latents


def test_failing_jobs_do_not_stop_the_others(tiny_model):
    jobs = [
        EditJob([SQUIRREL, LION], [Replace()], Seed(1), settings()),
        EditJob([SQUIRREL, LION], [Reweight(weights={"frowning": 2.0})], Seed(2), settings()),
        EditJob(["a cat", ""], [], Seed(3), settings()),
        EditJob([SQUIRREL, LION], [Replace(), FailsMidRun()], Seed(4), settings()),
        EditJob([SQUIRREL, LION], [Replace()], Seed(5), settings()),
    ]
    outcomes = dict(iter_edits(tiny_model, jobs, errors="return"))
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    assert "'frowning' is not a word of" in str(outcomes[1])
    assert "prompt 1 is empty" in str(outcomes[2])
    assert "fails during the loop" in str(outcomes[3])
    assert outcomes[0].batch == [0, 3, 4] and outcomes[4].batch == [0, 3, 4]
    for index in (0, 4):
        expected = solo(
            tiny_model, EditJob([SQUIRREL, LION], [Replace()], Seed(index + 1), settings())
        )
        torch.testing.assert_close(outcomes[index].latents, expected.latents, **TOLERANCE)
    with pytest.raises(OptionError, match="not a word of"):
        run_edits(tiny_model, [jobs[1]])


def test_jobs_may_share_edit_objects(tiny_model):
    """Edits hold only options (each run binds its own state), so one object may serve
    several jobs of a batch, and the results are those of separate objects."""
    shared = [Replace(), LocalBlend(words=["squirrel", "lion"], start_blend=0.0)]
    together = run_edits(
        tiny_model,
        [
            EditJob([SQUIRREL, LION], shared, Seed(1), settings()),
            EditJob([SQUIRREL, LION], shared, Seed(2), settings()),
        ],
    )
    apart = [
        solo(
            tiny_model,
            EditJob(
                [SQUIRREL, LION],
                [Replace(), LocalBlend(words=["squirrel", "lion"], start_blend=0.0)],
                Seed(seed),
                settings(),
            ),
        )
        for seed in (1, 2)
    ]
    assert_same_results(together, apart)
    assert together[0].edit_runs[1] is not together[1].edit_runs[1]


def test_bad_batches_are_clear_errors(tiny_model):
    with pytest.raises(OptionError, match="not an EditJob"):
        run_edits(tiny_model, [[SQUIRREL, LION]])
    with pytest.raises(OptionError, match="max_batch_rows"):
        run_edits(tiny_model, [EditJob([SQUIRREL])], max_batch_rows=0)
    with pytest.raises(OptionError, match="latent size"):
        ControllerGroup(
            [
                type("C", (), {"latent_size": (8, 8)})(),
                type("C", (), {"latent_size": (16, 16)})(),
            ],
            [1, 1],
        )


# --------------------------------------------------------------------------- p2p-run run

PIPELINE = """
model = "{model}"
[defaults]
steps = 3
height = 64
width = 64
device = "cpu"
dtype = "float32"

[[jobs]]
name = "lion"
prompt = "a painting of a squirrel eating a burger"
targets = ["a painting of a lion eating a burger"]
seed = 5
blend = "squirrel lion"

[[jobs]]
name = "bad-word"
prompt = "a smiling bunny doll"
targets = ["a smiling bunny doll"]
reweight = {{ frowning = 5 }}

[[jobs]]
name = "croutons"
prompt = "a bowl of soup"
targets = ["a bowl of pea soup with croutons"]
reweight = {{ croutons = 3 }}
cross_replace = 0.6

[[jobs]]
name = "longer"
prompt = "a red circle"
targets = ["a blue circle"]
steps = 4

[[jobs]]
name = "plain"
mode = "generate"
prompts = ["a red circle", "a green square"]
seed = 11
"""


def run_pipeline_cli(path: Path, out: Path, *extra: str):
    runner = CliRunner()
    args = ["run", str(path), "--out", str(out), "--json", *extra]
    return runner.invoke(cli, args, obj=PluginRegistry(entry_points=False))


def test_pipeline_file_batches_and_writes_the_same_images(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    path = tmp_path / "jobs.toml"
    path.write_text(PIPELINE.format(model=tiny_model_dir))
    one = run_pipeline_cli(path, tmp_path / "one", "--batch-rows", "1")
    many = run_pipeline_cli(path, tmp_path / "many", "--batch-rows", "64")
    for result in (one, many):
        assert result.exit_code == 1, result.output  # bad-word failed, the others ran
        assert "Error: job 'bad-word' failed:" in result.stderr
        assert result.stderr.count("Loading model") == 1
    lines = {
        name: [json.loads(line) for line in result.stdout.splitlines()]
        for name, result in (("one", one), ("many", many))
    }
    status = {(r["name"], r["status"]) for r in lines["many"]}
    assert status == {
        ("lion", "ok"),
        ("bad-word", "failed"),
        ("croutons", "ok"),
        ("longer", "ok"),
        ("plain", "ok"),
    }
    assert not (tmp_path / "many" / "bad-word").exists()
    records = {r["name"]: r for r in lines["many"]}
    assert records["lion"]["timings"]["denoise"] == records["croutons"]["timings"]["denoise"]
    compared = 0
    for job in ("lion", "croutons", "longer", "plain"):
        one_record = json.loads((tmp_path / "one" / job / "run.json").read_text())
        many_record = json.loads((tmp_path / "many" / job / "run.json").read_text())
        for key in ("prompts", "source", "edits", "settings", "outputs", "seed"):
            assert one_record[key] == many_record[key], (job, key)
        for name in many_record["outputs"]["images"]:
            a = np.asarray(Image.open(tmp_path / "one" / job / name), dtype=np.int16)
            b = np.asarray(Image.open(tmp_path / "many" / job / name), dtype=np.int16)
            assert np.abs(a - b).max() <= 1, (job, name)  # 8-bit rounding at most
            compared += 1
    assert compared == 2 + 2 + 2 + 2


def test_batch_rows_option_rejects_bad_values(tiny_model_dir, tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text(PIPELINE.format(model=tiny_model_dir))
    for value in ("0", "-2", "many"):
        result = run_pipeline_cli(path, tmp_path / "out", "--batch-rows", value)
        assert result.exit_code == 2
        assert "expected a positive integer or auto" in result.stderr
