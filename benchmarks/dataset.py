"""Samples per minute of ``p2p-run dataset``: the plain loop against the dataset in one
process and on Ray with 1 and 2 workers, and Ray's overhead per sample.

All rows make the same samples (the example spec's items and ranges, ``--items`` items of
``--samples`` samples, ``--steps`` steps) on the embedded demo model:

- ``plain loop``: one model loaded once, ``run_edit`` per sample (the jobs the dataset would
  run, built by the same sampler), nothing scored or written: the floor;
- ``dataset, one process``: :func:`~p2p_framework.dataset.run_dataset` with ``ray="off"``
  (model load, filters, PNG encoding, Parquet shards and the manifest included);
- ``dataset, Ray N workers``: the same on a local Ray started before the row (its start is
  reported apart), N actors each loading the model and taking 2/N CPU threads.

``end to end`` is the call's wall time; ``compute`` the busiest worker's time on its samples
(running, scoring, PNG encoding: the workers' own ``seconds``); ``overhead`` the rest (model
loads, actors' start, moving rows, writing shards). Ray's overhead per sample is its
overhead less the one process's, over the samples.

    python benchmarks/dataset.py                       # about 10 minutes on 2 idle cores
    python benchmarks/dataset.py --items 4 --samples 2 --steps 5       # a smoke run
    python benchmarks/dataset.py --device cuda --workers 1 --steps 50  # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from p2p_framework.demo.shapes import EDIT_PROMPTS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "dataset"


def make_spec(folder: Path, items: int, samples: int, steps: int, device: str) -> Path:
    """The example spec's ranges and filters on ``items`` items (scenes repeated with
    distinct ids) of ``samples`` samples."""
    import json

    lines = []
    for i in range(items):
        source, target = EDIT_PROMPTS[i % len(EDIT_PROMPTS)]
        lines.append(json.dumps({"id": f"item-{i}", "prompt": source, "target": target}))
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    text = (EXAMPLE / "spec.toml").read_text()
    text = text.replace("samples_per_item = 4", f"samples_per_item = {samples}")
    text = text.replace("steps = 20", f"steps = {steps}")
    (folder / "spec.toml").write_text(f'device = "{device}"\n' + text)
    return folder / "spec.toml"


def plain_loop(spec, threads: int) -> dict:  # noqa: ANN001
    """``run_edit`` per sample on one model: the jobs the dataset runs, nothing written."""
    from p2p_framework import load_model, run_edit
    from p2p_framework.dataset import read_items, sample_job, sample_values
    from p2p_framework.demo import DEMO_MODEL_DIR
    from p2p_framework.spec import spec_from_job

    torch.set_num_threads(threads)
    began = time.perf_counter()
    model = load_model(DEMO_MODEL_DIR, device=spec.device)
    loaded = time.perf_counter()
    items = read_items(spec.items)
    for item in items:
        for index in range(spec.samples_per_item):
            job, defaults = sample_job(spec, item, sample_values(spec, item, index))
            run = spec_from_job(job, defaults=defaults)
            run_edit(model, run.prompts, run.edits, source=run.source, settings=run.settings)
    end = time.perf_counter()
    total = len(items) * spec.samples_per_item
    return {"seconds": end - began, "busy": end - loaded, "samples": total, "load": loaded - began}


def dataset_run(spec, out: Path, ray: str, workers: int, gpus: float) -> dict:  # noqa: ANN001
    from p2p_framework.dataset import run_dataset

    began = time.perf_counter()
    summary = run_dataset(spec, out, ray=ray, workers=workers, gpus_per_worker=gpus)
    end = time.perf_counter()
    busy = summary.progress.busy
    return {
        "seconds": end - began,
        "samples": summary.progress.samples,
        # The workers run side by side: the busiest one's time is the compute's span.
        "busy": max(busy.values()),
        "workers": len(busy),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    gpus = 1.0 if args.device.startswith("cuda") else 0.0

    import ray

    from p2p_framework.dataset import load_dataset_spec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_dataset_spec(
            make_spec(Path(tmp), args.items, args.samples, args.steps, args.device)
        )
        total = args.items * args.samples
        plain = plain_loop(spec, args.cpus)
        rows.append(("plain loop (run_edit per sample)", args.cpus, plain))
        torch.set_num_threads(args.cpus)
        alone = dataset_run(spec, Path(tmp) / "process", "off", 1, 0.0)
        rows.append(("dataset, one process", args.cpus, alone))
        began = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - began
        try:
            for workers in args.workers:
                found = dataset_run(spec, Path(tmp) / f"ray{workers}", "auto", workers, gpus)
                threads = f"{workers} x {max(1, args.cpus // workers)}"
                rows.append((f"dataset, Ray {workers} worker(s)", threads, found))
        finally:
            ray.shutdown()

    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}, ray {ray.__version__}"
    )
    print(
        f"{args.items} items x {args.samples} samples = {total} samples, {args.steps} steps, "
        f"demo model on {args.device}; plain loop's model load {plain['load']:.1f} s; "
        f"local Ray start {ray_start:.1f} s (not in the Ray rows)\n"
    )
    print("| run | threads | end to end s | samples/min | compute s | overhead s |")
    print("|---|---|---|---|---|---|")
    for name, threads, found in rows:
        per_minute = found["samples"] / found["seconds"] * 60
        overhead = found["seconds"] - found["busy"]
        print(
            f"| {name} | {threads} | {found['seconds']:.1f} | {per_minute:.1f} | "
            f"{found['busy']:.1f} | {overhead:.1f} |"
        )
    print()
    for name, _, found in rows[2:]:
        extra = (found["seconds"] - found["busy"]) - (alone["seconds"] - alone["busy"])
        print(
            f"{name}: Ray's overhead {extra:+.1f} s against one process, "
            f"{extra / total:+.2f} s per sample (actors' start and model loads included)"
        )


if __name__ == "__main__":
    main()
