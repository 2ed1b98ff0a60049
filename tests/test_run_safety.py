"""Reliability: a plugin's bug fails only its job, runs never mix in one output folder,
signals end a run cleanly, and reruns work from any folder (issue 15, items 1, 2, 5, 7).

Runs use the tiny model at 64x64 px with 3 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


# --------------------------------------------------------------------------- 2. output folders


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Staging folders, aside copies and locks of runs into ``folder``, beside it."""
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.p2p-*"))


def test_a_folder_holding_a_run_is_refused_then_replaced_whole(faulty, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    three = [
        "--target",
        "a painting of a cat eating a burger",
        "--target",
        LION,
        "--save-attention",
    ]
    assert faulty(*edit(tiny_model_dir, out, *three)).exit_code == 0
    before = snapshot(out)
    assert {"target-3.png", "attention.png"} <= set(before)

    refused = faulty(*edit(tiny_model_dir, out))
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip().splitlines()[-1] == (
        f"Error: output folder '{out}' holds another run (run.json); pass --overwrite to "
        "replace it, or choose another --out"
    )
    assert "Loading model" not in refused.stderr  # refused before the model loads
    assert snapshot(out) == before

    replaced = faulty(*edit(tiny_model_dir, out, "--overwrite", "--json"))
    assert replaced.exit_code == 0, replaced.output
    assert sorted(snapshot(out)) == ["grid.png", "run.json", "source.png", "target-1.png"]
    assert json.loads((out / "run.json").read_text())["prompts"] == [SQUIRREL, LION]
    assert leftovers(out) == []


def test_a_folder_with_other_files_is_never_replaced(faulty, tiny_model_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    (out / "run.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        result = faulty(*edit(tiny_model_dir, out, *extra))
        assert result.exit_code == 2, result.output
        assert "holds files that are not a run's ('holiday.jpg')" in result.stderr
    assert snapshot(out) == {"holiday.jpg": b"mine", "run.json": b"{}"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert faulty(*edit(tiny_model_dir, empty)).exit_code == 0  # an empty folder is fine
    assert (empty / "run.json").is_file()


def test_a_failed_run_leaves_the_earlier_run_untouched(
    faulty, tiny_model_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    assert faulty(*edit(tiny_model_dir, out, "--target", "a cat")).exit_code == 0
    before = snapshot(out)
    # A plugin's bug during the run.
    failed = faulty(
        *edit(tiny_model_dir, out, "--overwrite", "--edit", "replace", "--edit", "explode")
    )
    assert failed.exit_code == 1
    assert snapshot(out) == before and leftovers(out) == []
    # The disk fills up while the third file is written.
    import p2p_framework.outputs as outputs

    real, calls = outputs.os.fsync, []

    def disk_full(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(outputs.os, "fsync", disk_full)
    full = faulty(*edit(tiny_model_dir, out, "--overwrite"))
    assert full.exit_code == 2 and "No space left on device" in full.stderr
    assert snapshot(out) == before and leftovers(out) == []


def test_a_second_run_on_a_locked_folder_is_refused_at_once(faulty, tiny_model_dir, tmp_path):
    from p2p_framework.outputs import OutputLockedError, RunFolder

    out = tmp_path / "out"
    first = RunFolder.claim(out)  # a run in progress (flock: another process is refused too)
    try:
        result = faulty(*edit(tiny_model_dir, out))
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: output folder '{out}' is in use by another p2p-run (pid {os.getpid()}); "
            "wait for it to finish or choose another --out"
        )
        assert "Loading model" not in result.stderr
        with pytest.raises(OutputLockedError):
            RunFolder.claim(out, overwrite=True)
    finally:
        first.abort()
    assert not out.exists() and leftovers(out) == []
    assert faulty(*edit(tiny_model_dir, out)).exit_code == 0


def test_a_killed_run_is_cleaned_up_by_the_next(tmp_path):
    """A run killed (SIGKILL) between the two renames of its swap left the earlier run aside:
    the next claim puts it back; staging folders of killed runs are removed."""
    from p2p_framework.outputs import RunFolder

    out = tmp_path / "out"
    aside = tmp_path / ".out.p2p-old-dead"
    aside.mkdir()
    (aside / "run.json").write_text("{}")
    (tmp_path / ".out.p2p-new-dead").mkdir()
    folder = RunFolder.claim(out, overwrite=True)
    assert (out / "run.json").read_text() == "{}"
    assert leftovers(out) == sorted([folder.staging.name, ".out.p2p-lock"])
    (folder.staging / "run.json").write_text('{"new": 1}')
    assert folder.commit() == out
    assert (out / "run.json").read_text() == '{"new": 1}' and leftovers(out) == []


def test_pipeline_jobs_refuse_their_folders_holding_runs(faulty, tiny_model_dir, tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text(
        BOOM_PIPELINE.format(
            model=tiny_model_dir, source=SQUIRREL, target=LION, hook="bind", exception="zero"
        )
    )
    out = tmp_path / "out"
    assert faulty("run", path, "--out", out).exit_code == 1  # boom fails
    before = snapshot(out)
    again = faulty("run", path, "--out", out, "--json")
    assert again.exit_code == 1
    lines = {r["name"]: r for r in map(json.loads, again.stdout.splitlines())}
    assert [r["status"] for r in lines.values()] == ["failed"] * 3
    # The finished jobs are refused (their runs kept); the failed one, which left nothing,
    # runs again: running a file again resumes it.
    for name in ("ok1", "ok2"):
        assert "holds another run (run.json); pass --overwrite" in lines[name]["error"]
    assert "plugin 'explode'" in lines["boom"]["error"]
    assert snapshot(out) == before
    replaced = faulty("run", path, "--out", out, "--overwrite", "--json")
    status = {r["name"]: r["status"] for r in map(json.loads, replaced.stdout.splitlines())}
    assert status == {"ok1": "ok", "boom": "failed", "ok2": "ok"}
    assert sorted(p.name for p in out.iterdir()) == ["ok1", "ok2"]


# --------------------------------------------------------------------------- 5. signals


def run_cli_process(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``p2p-run ARGS`` in a new process with the faulty plugins (tests/faulty_plugins.py)."""
    env = {k: v for k, v in os.environ.items() if k != MODEL_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(TESTS / "faulty_plugins.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_sigterm_ends_the_run_and_keeps_the_earlier_one(faulty, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert faulty(*edit(tiny_model_dir, out, "--target", "a cat")).exit_code == 0
    before = snapshot(out)
    args = edit(tiny_model_dir, out, "--overwrite", "--edit", "replace", "--edit", "send-signal")
    result = run_cli_process(*args, "--set", "send-signal.signal=TERM")
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Terminated (SIGTERM); no half-written file was left."
    )
    assert result.stdout == ""
    assert snapshot(out) == before and leftovers(out) == []


def test_an_interrupt_swallowed_in_a_del_still_ends_the_run(tiny_model_dir, tmp_path):
    """Python ignores the KeyboardInterrupt that Ctrl-C raises inside a ``__del__`` (as it
    once did while the model loaded); the recorded signal ends the run at the next step."""
    out = tmp_path / "out"
    args = edit(tiny_model_dir, out, "--edit", "replace", "--edit", "send-signal")
    result = run_cli_process(
        *args, "--set", "send-signal.signal=INT", "--set", "send-signal.via_del=true"
    )
    assert "Exception ignored" in result.stderr  # the interrupt was swallowed ...
    assert result.returncode == 130, result.stderr  # ... and the run still ended
    assert result.stderr.strip().splitlines()[-1] == ("Interrupted; no half-written file was left.")
    assert not out.exists() and leftovers(out) == []


# --------------------------------------------------------------------------- 7. rerun anywhere


def test_rerun_from_another_folder_finds_relative_paths(
    faulty, tiny_model_dir, tmp_path, monkeypatch
):
    from PIL import Image

    registry = faulty_plugins.registry()
    if not any(p.name == "ddim" for p in registry.plugins("source")):
        pytest.skip("the inversion sources are not registered")
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "photos").mkdir(parents=True)
    b.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(a / "photos" / "red.png")
    monkeypatch.chdir(a)
    photo = ["--source", "ddim", "--image", "photos/red.png", "--no-cache"]
    first = faulty(*edit(tiny_model_dir, Path("out"), *photo))
    assert first.exit_code == 0, first.output
    record = json.loads((a / "out" / "run.json").read_text())
    assert record["source"]["options"]["image"] == str(a / "photos" / "red.png")
    assert record["cwd"] == str(a)
    # A pipeline file's relative image path too.
    (a / "jobs.toml").write_text(
        f'model = "{tiny_model_dir}"\n[defaults]\nsteps = 3\nheight = 64\nwidth = 64\n'
        f'[[jobs]]\nname = "red"\nprompt = "{SQUIRREL}"\ntargets = ["{LION}"]\n'
        'source = "ddim"\nimage = "photos/red.png"\nno_cache = true\n'
    )
    assert faulty("run", "jobs.toml", "--out", "batch").exit_code == 0
    monkeypatch.chdir(b)
    for made in (a / "out", a / "batch" / "red"):
        again = faulty("rerun", made / "run.json", "--out", b / made.name)
        assert again.exit_code == 0, again.output
        for name in ("source.png", "target-1.png"):
            assert (b / made.name / name).read_bytes() == (made / name).read_bytes()


def test_default_folders_of_runs_started_in_one_second_differ(
    faulty, tiny_model_dir, tmp_path, monkeypatch
):
    import datetime

    import p2p_framework.cli as cli_module
    from p2p_framework.outputs import RunFolder

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:
            return cls(2026, 12, 1, 12, 0, 0)

    monkeypatch.setattr(cli_module.datetime, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    running = RunFolder.claim(Path("p2p-out/edit-20261201-120000"))  # another run, same second
    try:
        args = [
            a for a in edit(tiny_model_dir, Path("unused")) if str(a) not in ("--out", "unused")
        ]
        result = faulty(*args)
        assert result.exit_code == 0, result.output
    finally:
        running.abort()
    made = tmp_path / "p2p-out" / "edit-20261201-120000-2"
    assert (made / "run.json").is_file()
    assert sorted(p.name for p in (tmp_path / "p2p-out").iterdir()) == [made.name]
