"""``p2p-run dataset`` on a local Ray (2 CPUs) with the demo model: the same images as one
process, every sample exactly once when an actor is killed or the driver interrupted, a
failing item recorded.

Marked ``ray`` (minutes: Ray's start and each actor's model load); ``.ci/run`` runs them once
with ``pytest -m ray`` after installing the extra. ``P2P_REQUIRE_RAY=1`` turns a missing Ray
into a failure instead of a skip.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from p2p_framework.dataset import Manifest, load_dataset_spec, read_dataset, run_dataset
from p2p_framework.demo.shapes import EDIT_PROMPTS

pytestmark = pytest.mark.ray

if os.environ.get("P2P_REQUIRE_RAY"):
    import ray
else:
    ray = pytest.importorskip("ray", reason="pip install 'p2p-framework[ray]'")

#: (source, target) prompts of the demo model's scenes.
ITEMS = EDIT_PROMPTS[:5]
#: Fails in every sample (no such photo); the others go on.
BAD = {"id": "bad", "prompt": ITEMS[0][0], "target": ITEMS[0][1], "image": "missing.png"}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for this module, shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_spec(folder: Path, count: int, samples: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"id": f"item-{i}", "prompt": p, "target": t} for i, (p, t) in enumerate(ITEMS)]
    lines = [json.dumps(item) for item in [*items[: count - 1], BAD]]
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "spec.toml").write_text(
        f'items = "items.jsonl"\nsamples_per_item = {samples}\nseed = 3\nshard_size = 2\n'
        '[job]\nedits = ["replace"]\nsteps = 3\n'
        "[sample]\ncross_replace = [0.2, 0.9]\nguidance = [5.0, 9.0]\n"
        '[[filters]]\nname = "structure"\nmin = 0.0\n'
    )
    return folder / "spec.toml"


def every_sample_once(out: Path, items: int, samples: int) -> dict[str, dict]:
    """Check that each sample of each item is in exactly one place (a shard row, or the
    manifest's dropped or failed), and return the shard rows by key."""
    rows = read_dataset(out).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    outcomes = Manifest.read(out).items()
    assert len(outcomes) == items
    placed = list(keys)
    for outcome in outcomes.values():
        placed += list(outcome["dropped"]) + list(outcome["failed"])
    assert sorted(placed) == sorted(
        f"{item}/{i:04d}" for item in outcomes for i in range(samples)
    ), "a sample is missing or counted twice"
    assert sorted(outcomes["bad"]["failed"]) == [f"bad/{i:04d}" for i in range(samples)]
    return {row["key"]: row for row in rows}


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    """The 12-sample dataset (4 items, one failing, 3 samples each) on 2 Ray workers."""
    root = tmp_path_factory.mktemp("ray-dataset")
    spec = load_dataset_spec(make_spec(root / "spec", 4, 3))
    summary = run_dataset(spec, root / "out", ray="auto", workers=2)
    assert summary.engine == "ray" and summary.progress.samples == 12
    assert len(summary.progress.workers) == 2, summary.progress.workers
    return spec, root, every_sample_once(root / "out", 4, 3)


def test_same_spec_twice_gives_the_same_images_as_one_process(reference, tmp_path):
    """Bit for bit: 2 workers of 1 CPU thread each, again, and one process of 1 thread (on
    the CPU the thread count changes float rounding, so it is kept equal)."""
    spec, _, first = reference
    again = run_dataset(spec, tmp_path / "ray", ray="auto", workers=2)
    second = every_sample_once(tmp_path / "ray", 4, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 actors (a CLI test's --threads auto may differ)
    try:
        alone = run_dataset(spec, tmp_path / "process", ray="off")
    finally:
        torch.set_num_threads(threads)
    third = every_sample_once(tmp_path / "process", 4, 3)
    assert (again.engine, alone.engine) == ("ray", "process")
    assert sorted(first) == sorted(second) == sorted(third) and len(first) == 9
    for key, row in first.items():
        for other in (second[key], third[key]):
            assert other["source_image"] == row["source_image"], key
            assert other["target_images"] == row["target_images"], key


def test_killed_actor_still_gives_every_sample_exactly_once(local_ray, tmp_path):
    spec = load_dataset_spec(make_spec(tmp_path / "spec", 6, 2))
    killed: list[int] = []

    def kill_a_worker(progress):
        if not killed:  # after the first item: the actors are mid-way through others
            name = sorted(progress.workers)[0]
            killed.append(int(name.rsplit(":", 1)[1]))
            os.kill(killed[0], signal.SIGKILL)

    summary = run_dataset(spec, tmp_path / "out", ray="auto", workers=2, on_item=kill_a_worker)
    assert killed and summary.items_run == 6
    every_sample_once(tmp_path / "out", 6, 2)
    # Ray restarted the actor: a third process finished the killed one's work.
    assert len(summary.progress.workers) >= 3, summary.progress.workers


def test_interrupted_driver_and_rerun_does_not_redo_finished_samples(reference, tmp_path):
    spec, _, first = reference
    out = tmp_path / "out"

    def interrupt(progress):
        if progress.items_done == 2:
            raise KeyboardInterrupt  # what Ctrl-C and SIGTERM raise in p2p-run

    with pytest.raises(KeyboardInterrupt):
        run_dataset(spec, out, ray="auto", workers=2, on_item=interrupt)
    assert len(Manifest.read(out).items()) == 2
    summary = run_dataset(spec, out, ray="auto", workers=2)
    assert (summary.items_before, summary.items_run, summary.progress.samples) == (2, 2, 6)
    rows = every_sample_once(out, 4, 3)
    assert sorted(rows) == sorted(first)
    for key, row in rows.items():
        assert row["target_images"] == first[key]["target_images"], key
