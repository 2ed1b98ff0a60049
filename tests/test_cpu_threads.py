"""``--threads`` / ``P2P_THREADS`` and the ``auto`` choice (cores no other process is busy on)."""

from __future__ import annotations

import itertools

import pytest
import torch
from click.testing import CliRunner

from p2p_framework import cpu_threads
from p2p_framework.cli import cli
from p2p_framework.errors import OptionError


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_proc_stat(monkeypatch: pytest.MonkeyPatch, busy_fraction: float, cores: int) -> None:
    """/proc/stat readings in which the sampled interval is ``busy_fraction`` busy."""
    ticks = itertools.count()
    samples = iter([(0, 0), (round(1000 * busy_fraction * cores), 1000 * cores)])
    monkeypatch.setattr(cpu_threads, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda seconds: next(ticks))
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)


@pytest.mark.parametrize(
    ("cores", "busy_fraction", "expected"),
    [(2, 0.0, 2), (2, 0.5, 1), (2, 1.0, 1), (16, 0.0, 16), (16, 0.25, 12), (16, 0.02, 16)],
)
def test_auto_leaves_out_the_cores_other_processes_keep_busy(
    monkeypatch: pytest.MonkeyPatch, cores: int, busy_fraction: float, expected: int
) -> None:
    fake_proc_stat(monkeypatch, busy_fraction, cores)
    assert cpu_threads.pick_threads("auto") == expected


def test_busy_cores_counts_ticks_of_the_affinity_set_only(tmp_path, monkeypatch) -> None:
    stat = tmp_path / "stat"
    lines = {
        # name: user nice system idle iowait irq softirq steal
        "cpu": "100 0 0 100 0 0 0 0",
        "cpu0": "50 0 0 50 0 0 0 0",
        "cpu1": "50 0 0 50 0 0 0 0",
    }
    stat.write_text("".join(f"{k} {v}\n" for k, v in lines.items()) + "intr 1 2 3\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda path, *a, **k: real_open(stat if path == "/proc/stat" else path)
    )
    assert cpu_threads._cpu_times({0}) == (50, 100)
    assert cpu_threads._cpu_times({0, 1}) == (100, 200)
    assert cpu_threads._cpu_times({5}) is None


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "two", "", "True"])
def test_a_bad_thread_count_is_refused(bad: str) -> None:
    with pytest.raises(OptionError, match="positive whole number or auto"):
        cpu_threads.pick_threads(bad)


def test_a_number_is_taken_as_given() -> None:
    assert cpu_threads.pick_threads("3") == 3
    assert cpu_threads.pick_threads(1) == 1
    assert cpu_threads.use_threads("1") == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("args_env", [(["--threads", "0"], {}), ([], {"P2P_THREADS": "many"})])
def test_cli_refuses_a_bad_thread_count_before_loading(args_env) -> None:
    args, env = args_env
    result = CliRunner().invoke(
        cli, ["generate", "--prompt", "a red circle", "--model", "/nonexistent", *args], env=env
    )
    assert result.exit_code == 2
    assert "Invalid value for '--threads'" in result.output
    assert "positive whole number or auto" in result.output
    assert "model folder" not in result.output  # refused before the model


def test_cli_sets_the_threads_from_the_option_and_the_environment() -> None:
    runner = CliRunner()
    # The model does not exist: the run stops right after the options are taken.
    runner.invoke(cli, ["generate", "--prompt", "x", "--model", "/nonexistent", "--threads", "1"])
    assert torch.get_num_threads() == 1
    runner.invoke(cli, ["generate", "--prompt", "x", "--model", "/no"], env={"P2P_THREADS": "2"})
    assert torch.get_num_threads() == 2
