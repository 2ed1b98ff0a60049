"""Reliability: a plugin's bug fails only its job, runs never mix in one output folder,
signals end a run cleanly, and reruns work from any folder (issue 15, items 1, 2, 5, 7).

Runs use the tiny model at 64x64 px with 3 steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faulty_plugins
import pytest
import torch
from click.testing import CliRunner

from p2p_framework import EditJob, EditSettings, PluginRunError, run_edit
from p2p_framework.cli import cli
from p2p_framework.pipeline import iter_edits
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.seed import Seed
from p2p_framework.runner import MODEL_ENV

FAST = ["--steps", "3", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32"]
SQUIRREL = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``faulty(*args)``: run ``p2p-run ARGS`` in-process with the faulty plugins registered."""
    monkeypatch.delenv(MODEL_ENV, raising=False)

    def run(*args: Any) -> Any:
        return CliRunner().invoke(cli, [str(a) for a in args], obj=faulty_plugins.registry())

    return run


def edit(model: Path, out: Path, *extra: Any) -> list[Any]:
    return [
        "edit",
        "--model",
        model,
        "--prompt",
        SQUIRREL,
        "--target",
        LION,
        "--out",
        out,
        *FAST,
        *extra,
    ]


# --------------------------------------------------------------------------- 1. plugin bugs

BOOM_PIPELINE = """
model = "{model}"

[defaults]
steps = 3
height = 64
width = 64

[[jobs]]
name = "ok1"
prompt = "{source}"
targets = ["{target}"]
seed = 1

[[jobs]]
name = "boom"
prompt = "{source}"
targets = ["{target}"]
edits = ["replace", "explode"]
set = ["explode.hook={hook}", "explode.exception={exception}"]
seed = 2

[[jobs]]
name = "ok2"
prompt = "{source}"
targets = ["{target}"]
seed = 3
"""


@pytest.mark.parametrize(
    ("hook", "exception", "batch_rows"),
    [
        ("cross_attention", "zero", "64"),  # one UNet batch of the three jobs (GPU style)
        ("after_step", "runtime", "64"),
        ("uses_self_attention", "runtime", "64"),
        ("bind", "zero", "1"),  # one job at a time (CPU default)
    ],
)
def test_a_plugin_exception_fails_only_its_job(
    faulty, tiny_model_dir, tmp_path, hook, exception, batch_rows
):
    path = tmp_path / "jobs.toml"
    path.write_text(
        BOOM_PIPELINE.format(
            model=tiny_model_dir, source=SQUIRREL, target=LION, hook=hook, exception=exception
        )
    )
    out = tmp_path / "out"
    result = faulty("run", path, "--out", out, "--json", "--batch-rows", batch_rows)
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["name"], r["status"]) for r in lines] == [
        ("ok1", "ok"),
        ("boom", "failed"),
        ("ok2", "ok"),
    ]
    boom = lines[1]
    kind = "ZeroDivisionError" if exception == "zero" else "RuntimeError"
    assert boom["error"].startswith(f"plugin 'explode' (package {faulty_plugins.PACKAGE}) failed")
    assert f"in {hook}: {kind}" in boom["error"]
    assert boom["plugin"] == {
        "name": "explode",
        "kind": "edit",
        "package": faulty_plugins.PACKAGE,
        "version": "0.0.1",
        "hook": hook,
        "exception": kind,
    }
    assert f"Error: job 'boom' failed: plugin 'explode' (package {faulty_plugins.PACKAGE})" in (
        result.stderr
    )
    assert sorted(p.name for p in out.iterdir()) == ["ok1", "ok2"]
    for name in ("ok1", "ok2"):
        assert (out / name / "run.json").is_file() and (out / name / "target-1.png").is_file()
    assert "2 of 3 job(s) succeeded" in result.stderr


def test_batched_jobs_beside_a_failing_plugin_are_unchanged(tiny_model):
    """In one UNet batch the failing job is dropped; the others equal their solo runs."""
    settings = EditSettings(steps=3, height=64, width=64)
    explode = faulty_plugins.Explode(hook="cross_attention")
    jobs = [
        EditJob([SQUIRREL, LION], [Replace()], Seed(1), settings),
        EditJob([SQUIRREL, LION], [Replace(), explode], Seed(2), settings),
        EditJob([SQUIRREL, LION], [Replace()], Seed(3), settings),
    ]
    outcomes = dict(iter_edits(tiny_model, jobs, errors="return"))
    assert isinstance(outcomes[1], PluginRunError)
    assert (outcomes[1].name, outcomes[1].hook) == ("explode", "cross_attention")
    assert isinstance(outcomes[1].__cause__, ZeroDivisionError)
    for index in (0, 2):
        assert outcomes[index].batch == [0, 1, 2]
        alone = run_edit(
            tiny_model, jobs[index].prompts, [Replace()], source=Seed(index + 1), settings=settings
        )
        torch.testing.assert_close(outcomes[index].latents, alone.latents, atol=2e-4, rtol=1e-4)


def test_edit_names_the_failing_plugin(faulty, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = faulty(*edit(tiny_model_dir, out, "--edit", "replace", "--edit", "explode"))
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"Error: plugin 'explode' (package {faulty_plugins.PACKAGE}) failed in cross_attention: "
        "ZeroDivisionError: division by zero (run with --debug for the traceback)"
    )
    assert "internal error" not in result.stderr and "Traceback" not in result.output
    assert not out.exists()
    debug = faulty(*edit(tiny_model_dir, out, "--edit", "replace", "--edit", "explode", "--debug"))
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr and "1 / 0" in debug.stderr
