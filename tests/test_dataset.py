"""``p2p-run dataset`` in one process (no Ray): spec checks, deterministic samples, filters,
Parquet shards committed by the manifest, exactly once across an interruption.

The Ray engine's tests (a local Ray, killed actors) are in ``test_dataset_ray.py``, marked
``ray`` (run with ``pytest -m ray``), as is the real-SIGINT test here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from p2p_framework import EditPair, Filter, P2PError, hookimpl, run_edit
from p2p_framework.cli import cli
from p2p_framework.dataset import (
    MANIFEST,
    SHARDS,
    DatasetError,
    Manifest,
    load_dataset_spec,
    read_dataset,
    read_items,
    run_dataset,
    sample_values,
)
from p2p_framework.demo import DEMO_MODEL_DIR
from p2p_framework.registry import PluginRegistry
from p2p_framework.spec import RunSpec

pytest.importorskip("pyarrow", reason="p2p-run dataset writes Parquet (the test extra has it)")

GOOD = [
    {"id": "yellow", "prompt": "a blue circle on a striped green background",
     "target": "a yellow circle on a striped green background"},
    {"prompt": "a purple square on a dotted orange background",
     "target": "a red square on a dotted orange background"},
    {"id": "dotted", "prompt": "a red circle on a striped yellow background",
     "target": "a red circle on a dotted yellow background"},
]  # fmt: skip
#: A photo that does not exist: every sample of this item fails, the others go on.
BAD = {"id": "no-photo", "prompt": "a blue circle on a striped green background",
       "target": "a red circle on a striped green background", "image": "missing.png"}  # fmt: skip


@dataclass(frozen=True)
class Blueness(Filter):
    """Mean blue minus mean red of the target (a third-party filter)."""

    name = "blueness"

    def score(self, pair: EditPair) -> float:
        pixels = np.asarray(pair.target, dtype=np.float32) / 255
        return float(pixels[..., 2].mean() - pixels[..., 0].mean())


class BluenessPlugin:
    @hookimpl
    def register_filters(self, register):  # noqa: ANN001
        register(Blueness)


def write_spec(folder: Path, items: list[dict], **top: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    lines = [
        'items = "items.jsonl"',
        *(f"{k} = {json.dumps(v)}" for k, v in top.items()),
        "[job]",
        'edits = ["replace"]',
        "steps = 3",
        "[sample]",
        "cross_replace = [0.2, 0.9]",
        "self_replace = [0.1, 0.6]",
        "guidance = [5.0, 9.0]",
        "[[filters]]",
        'name = "pixel-change"',
        "min = 0.0",
        "[[filters]]",
        'name = "blueness"',
    ]
    (folder / "spec.toml").write_text("\n".join(lines) + "\n")
    return folder / "spec.toml"


SPEC = {"samples_per_item": 2, "keep": 1, "rank": "blueness", "shard_size": 1, "seed": 5}


@pytest.fixture(scope="module")
def plugins() -> PluginRegistry:
    registry = PluginRegistry(entry_points=False)
    registry.add(BluenessPlugin(), name="blueness-plugin")
    return registry


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, plugins: PluginRegistry):
    """One uninterrupted dataset: 3 good items and a failing one, 2 samples each, keep 1."""
    root = tmp_path_factory.mktemp("dataset")
    spec = load_dataset_spec(write_spec(root / "spec", [*GOOD, BAD], **SPEC), plugins)
    seen = []
    summary = run_dataset(spec, root / "out", ray="off", registry=plugins, on_item=seen.append)
    return SimpleNamespace(spec=spec, out=root / "out", summary=summary, seen=seen, root=root)


def test_dataset_keeps_the_best_sample_per_item_and_records_the_failing_one(made):
    summary = made.summary.as_json()
    assert summary["engine"] == "process"
    assert (summary["items_run"], summary["samples"]) == (4, 8)
    assert (summary["kept"], summary["dropped"], summary["failed"]) == (3, 3, 2)
    rows = read_dataset(made.out).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == 3
    assert {row["item"] for row in rows} == {"yellow", "dotted", read_items(
        made.spec.items)[1].key}  # fmt: skip
    # keep = 1 by blueness: the kept sample scores at least its item's dropped one.
    outcomes = Manifest.read(made.out).items()
    for row in rows:
        scores = dict(row["scores"])
        assert row["rank"] == 0 and set(scores) == {"pixel-change", "blueness"}
        dropped = outcomes[row["item"]]["dropped"]
        assert [d["blueness"] <= scores["blueness"] for d in dropped.values()] == [True]
    failed = outcomes["no-photo"]["failed"]
    assert sorted(failed) == ["no-photo/0000", "no-photo/0001"]
    assert all("missing.png" in error for error in failed.values())
    # shard_size 1: a shard per item with a kept sample, committed in order.
    assert Manifest.read(made.out).shards() == [f"shard-0000{i}.parquet" for i in range(3)]
    assert sorted(os.listdir(made.out / SHARDS)) == Manifest.read(made.out).shards()
    assert [p.items_done for p in made.seen] == [1, 2, 3, 4]


def test_a_row_reruns_to_its_pixels(made, plugins):
    """Each row records its run (RunSpec JSON): run alone, it gives the row's images."""
    from p2p_framework import load_model
    from p2p_framework.outputs import png_bytes

    row = read_dataset(made.out).to_pylist()[0]
    spec = RunSpec.from_json(json.loads(row["run"]), plugins)
    params = json.loads(row["params"])
    assert spec.source.seed == params["seed"]
    assert spec.settings.guidance == params["guidance"]
    model = load_model(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    result = run_edit(model, spec.prompts, spec.edits, source=spec.source, settings=spec.settings)
    assert png_bytes(result.images[0]) == row["source_image"]
    assert [png_bytes(result.images[1])] == row["target_images"]


def test_rerun_of_a_finished_dataset_changes_nothing(made, plugins):
    before = {p: p.stat().st_mtime_ns for p in made.out.rglob("*")}
    again = run_dataset(made.spec, made.out, ray="off", registry=plugins)
    assert (again.items_before, again.items_run, again.failed_before) == (4, 0, 2)
    assert {p: p.stat().st_mtime_ns for p in made.out.rglob("*")} == before


def test_interrupted_run_finishes_only_what_is_missing(made, plugins, tmp_path):
    spec = load_dataset_spec(write_spec(tmp_path / "spec", [*GOOD, BAD], **SPEC), plugins)
    out = tmp_path / "out"

    def interrupt(progress):
        if progress.items_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dataset(spec, out, ray="off", registry=plugins, on_item=interrupt)
    assert len(Manifest.read(out).items()) == 2  # both finished items were committed
    # A kill between a shard's rename and its manifest line, and one mid-append.
    (out / SHARDS / "shard-00007.parquet").write_bytes(b"renamed, never committed")
    with open(out / MANIFEST, "ab") as file:
        file.write(b'{"shard": "shard-00009.parquet", "items": {"dot')
    summary = run_dataset(spec, out, ray="off", registry=plugins)
    assert (summary.items_before, summary.items_run, summary.progress.samples) == (2, 2, 4)
    assert not (out / SHARDS / "shard-00007.parquet").exists()
    assert (out / MANIFEST).read_bytes().endswith(b"}\n")
    first = {row["key"]: row for row in read_dataset(made.out).to_pylist()}
    second = {row["key"]: row for row in read_dataset(out).to_pylist()}
    assert sorted(first) == sorted(second)  # every kept sample once, the same ones
    for key, row in first.items():
        assert second[key]["target_images"] == row["target_images"]

    def outcomes(folder):
        found = Manifest.read(folder).items()
        return {k: {**v, "failed": sorted(v["failed"])} for k, v in found.items()}

    assert outcomes(out) == outcomes(made.out)


def test_samples_draw_from_the_spec_seed_item_and_index_only(made, tmp_path, plugins):
    items = read_items(made.spec.items)
    values = [sample_values(made.spec, item, i) for item in items for i in range(2)]
    assert len({json.dumps(v, sort_keys=True) for v in values}) == len(values)
    for v in values:
        assert 0.2 <= v["cross_replace"] <= 0.9 and 5.0 <= v["guidance"] <= 9.0
        assert isinstance(v["seed"], int)
    # Reordered items (and one added) keep every item's key and values.
    spec = load_dataset_spec(
        write_spec(tmp_path, [GOOD[2], {**BAD, "id": "other"}, GOOD[1], GOOD[0]], **SPEC),
        plugins,
    )
    moved = {item.key: item for item in read_items(spec.items)}
    for item in items[:3]:
        assert sample_values(spec, moved[item.key], 1) == sample_values(made.spec, item, 1)
    reseeded = load_dataset_spec(write_spec(tmp_path, GOOD, **{**SPEC, "seed": 6}), plugins)
    assert sample_values(reseeded, items[0], 0) != sample_values(made.spec, items[0], 0)


def test_another_spec_into_the_same_folder_is_refused(made, plugins, tmp_path):
    spec = load_dataset_spec(write_spec(tmp_path, GOOD, **{**SPEC, "keep": 2}), plugins)
    with pytest.raises(P2PError, match="another spec"):
        run_dataset(spec, made.out, ray="off", registry=plugins)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(P2PError, match="notes.txt"):
        run_dataset(spec, tmp_path / "mine", ray="off", registry=plugins)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('items = "i.jsonl"\nsamples = 3\n', "unknown key(s) samples"),
        ('items = "i.jsonl"\n[sample]\nguidance = 7.5\n', "sample.guidance: expected a range"),
        ('items = "i.jsonl"\n[sample]\nguidance = [9, 5]\n', "is empty"),
        ('items = "i.jsonl"\n[job]\nmodel = "x"\n', "[job] key(s) model"),
        ('items = "i.jsonl"\n[[filters]]\nname = "clip"\n', "unknown filter plugin 'clip'"),
        ('items = "i.jsonl"\n[[filters]]\nname = "structure"\nmin = "a"\n', "structure"),
        ('items = "i.jsonl"\nkeep = 0\n', "keep must be a positive whole number"),
    ],
)
def test_bad_specs_say_what_is_wrong(tmp_path, plugins, text, message):
    (tmp_path / "spec.toml").write_text(text)
    with pytest.raises(Exception, match=None) as caught:
        load_dataset_spec(tmp_path / "spec.toml", plugins)
    assert message in str(caught.value)


def test_bad_items_say_which_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match="items.jsonl line 2: an item needs a target"):
        read_items(path)
    path.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "a", "target": "b"}\n')
    with pytest.raises(DatasetError, match="lines 1 and 2 have the same key"):
        read_items(path)
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("id,prompt,targets,image\nx,a b,c d|e f,cat.png\n")
    (item,) = read_items(csv_path)
    assert item.key == "x" and item.job["targets"] == ["c d", "e f"]
    assert item.job["image"] == str(tmp_path / "cat.png")


def _pair(source: np.ndarray, target: np.ndarray, attention=None, changed=(1,)) -> EditPair:
    return EditPair(
        "a", "b", Image.fromarray(source), Image.fromarray(target), 1, list(changed), attention
    )


def test_built_in_filters_score_change_structure_and_locality(plugins):
    build = plugins.build
    rng = np.random.default_rng(0)
    scene = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    same = _pair(scene, scene)
    assert build("filter", "pixel-change").score(same) == 0.0
    assert build("filter", "structure").score(same) == pytest.approx(1.0)
    other = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    assert abs(build("filter", "structure").score(_pair(scene, other))) < 0.2
    # The edited word (token 1) attends to the left half; change there or on the right.
    attention = torch.zeros(4, 4, 3)
    attention[:, :2, 1] = 1.0
    left, right = scene.copy(), scene.copy()
    left[:, :16] = 255 - left[:, :16]
    right[:, 16:] = 255 - right[:, 16:]
    locality = build("filter", "edit-locality", {"min": 0.9})
    inside = locality.score(_pair(scene, left, attention))
    outside = locality.score(_pair(scene, right, attention))
    assert inside > 0.95 and outside < 0.2  # the bilinear mask spills over a little
    assert locality.accepts(inside) and not locality.accepts(outside)
    assert locality.score(_pair(scene, left, attention, changed=())) == 0.0
    assert not build("filter", "pixel-change", {"max": 0.5}).accepts(float("nan"))


def test_cli_dataset_runs_in_one_process_and_says_how_to_scale_out(made, plugins, monkeypatch):
    """Without Ray, --ray auto runs in this process (the same code path) and says how to
    scale out; the summary is JSON; a finished dataset is not run again."""
    import p2p_framework.dataset as dataset

    monkeypatch.setattr(dataset, "ray_available", lambda: False)
    result = CliRunner().invoke(
        cli,
        ["dataset", str(made.spec.path), "--out", str(made.out), "--json", "--threads", "1"],
        obj=plugins,
    )
    assert result.exit_code == 0, result.output
    assert "Ray is not installed: running in this process" in result.stderr
    assert "p2p-framework[ray]" in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["engine"], summary["items_run"], summary["failed_before"]) == (
        "process",
        0,
        2,
    )
    bad = CliRunner().invoke(cli, ["dataset", str(made.root / "nope.toml"), "--out", "x"])
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: cannot read dataset spec")


def test_the_example_spec_and_items_load(plugins):
    root = Path(__file__).resolve().parent.parent / "docs" / "examples" / "dataset"
    spec = load_dataset_spec(root / "spec.toml", plugins)
    items = read_items(spec.items)
    assert (len(items), spec.samples_per_item, spec.keep) == (4, 4, 2)
    assert spec.items == root / "items.jsonl"


@pytest.mark.ray  # a second process (about 15 s): with the heavy dataset tests, -m ray
def test_sigint_commits_what_finished_and_the_rerun_does_the_rest(made, plugins, tmp_path):
    """A real Ctrl-C (SIGINT) to `p2p-run dataset`: exit 130 once an item is committed; the
    rerun runs only the others."""
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path / "spec", GOOD, **{**SPEC, "rank": "pixel-change"})
    text = spec.read_text().replace('[[filters]]\nname = "blueness"\n', "")
    spec.write_text(text)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "p2p_framework.cli", "dataset", str(spec), "--out", str(out)]
    env = {**os.environ, "P2P_FRAMEWORK_LOAD_PLUGINS": ""}
    process = subprocess.Popen(
        [*command, "--ray", "off", "--threads", "1"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while len(Manifest.read(out).items()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr
    committed = len(Manifest.read(out).items())
    assert 1 <= committed < 3
    assert sorted(os.listdir(out / SHARDS)) == Manifest.read(out).shards()
    result = CliRunner().invoke(
        cli,
        ["dataset", str(spec), "--out", str(out), "--ray", "off", "--json", "--threads", "1"],
        obj=plugins,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["items_before"], summary["items_run"]) == (committed, 3 - committed)
    keys = read_dataset(out).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 3


def test_cli_exits_1_when_a_sample_failed_and_names_the_manifest(plugins, tmp_path):
    spec = write_spec(tmp_path / "spec", [BAD], **SPEC)
    out = tmp_path / "out"
    args = ["dataset", str(spec), "--out", str(out), "--ray", "off", "--threads", "1"]
    result = CliRunner().invoke(cli, args, obj=plugins)
    assert result.exit_code == 1, result.output
    assert result.stdout.strip() == str(out)
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: 2 sample(s) failed; their errors are in {out / MANIFEST}"
    )
    assert "failed 2" in result.stderr and Manifest.read(out).shards() == []
    again = CliRunner().invoke(cli, args, obj=plugins)  # recorded: not run again
    assert again.exit_code == 0 and "Nothing to do" in again.stderr
