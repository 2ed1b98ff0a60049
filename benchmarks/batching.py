"""Throughput of batched editing: many edits one by one (``run_edit``) against together
(``run_edits``, one UNet batch).

``--jobs`` edit jobs, each a source prompt and one target (``replace``; a second variant adds
``local-blend``), with different prompts and seeds, are run

- ``one by one``: ``run_edit`` per job (UNet batch 4 with guidance);
- ``batched``: ``run_edits`` with all jobs in one UNet batch (``4 x jobs`` rows), and with
  ``--batch-rows`` as the cap when given.

Prints a Markdown table of wall time (best of ``--repeats`` rounds after a warm-up, the modes
taking turns in each round), edits per minute, and the largest difference between a batched
and the one-by-one latents. The model is the Stable-Diffusion-shaped random one of
``benchmarks/edit_overhead.py`` at ``--preset``, or a model folder given with ``--model``.

    python benchmarks/batching.py                        # small CPU preset, 1 thread
    python benchmarks/batching.py --model p2p_framework/demo/weights --steps 20
    python benchmarks/batching.py --device cuda --preset sd15 --steps 50 --jobs 16
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_overhead import PRESETS, build_model  # noqa: E402

SOURCE = "a painting of a squirrel eating a burger"
ANIMALS = ("lion", "tiger", "cat", "dog", "bear", "fox", "wolf", "horse", "rabbit", "mouse")


def make_jobs(count: int, steps: int, blend: bool) -> list:
    """``count`` fresh jobs (plugins keep per-run state, so every run needs new ones)."""
    from p2p_framework import EditSettings
    from p2p_framework.pipeline import EditJob
    from p2p_framework.plugins.local_blend import LocalBlend
    from p2p_framework.plugins.replace import Replace
    from p2p_framework.plugins.seed import Seed

    jobs = []
    for index in range(count):
        animal = ANIMALS[index % len(ANIMALS)]
        edits = [Replace()] + ([LocalBlend(words=["squirrel", animal])] if blend else [])
        target = SOURCE.replace("squirrel", animal)
        jobs.append(EditJob([SOURCE, target], edits, Seed(100 + index), EditSettings(steps=steps)))
    return jobs


def timed(runs: dict[str, Callable[[], list]], device: str, repeats: int) -> dict:
    """Best wall time of each run over ``repeats`` rounds, and its last results. The runs
    take turns within a round, so a slow spell of a shared machine hits them alike."""
    best: dict[str, float] = {name: float("inf") for name in runs}
    results: dict[str, list] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            results[name] = run()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - began)
    return {name: (best[name], results[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="edit jobs (one target each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--model", help="a model folder or hub id instead of the preset")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (float16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts")
    parser.add_argument(
        "--batch-rows", type=int, action="append", default=[], help="also run with this cap"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from p2p_framework import load_model, run_edit
    from p2p_framework.pipeline import run_edits

    dtype = "float16" if args.device == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder, described = args.model, f"model {args.model}"
        else:
            folder = Path(tmp) / "model"
            build_model(folder, args.preset)
            described = f"preset {args.preset}"
        model = load_model(folder, device=args.device, dtype=dtype)
    channels = list(model.unet.config.block_out_channels)
    size = model.default_size // model.vae_scale_factor
    described += f" (UNet channels {channels}, latent {size}x{size})"

    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, float16"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s), float32"
    print(
        f"{where}; torch {torch.__version__}; {described}; {args.jobs} jobs of 1 target, "
        f"{args.steps} steps, guidance 7.5; best of {args.repeats} rounds after a warm-up\n"
    )
    print("| edits | mode | UNet rows per call | wall s | edits/min | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for blend in (False, True):
        name = "replace + local blend" if blend else "replace"

        def one_by_one(blend: bool = blend) -> list:
            return [
                run_edit(model, j.prompts, j.edits, source=j.source, settings=j.settings)
                for j in make_jobs(args.jobs, args.steps, blend)
            ]

        def batched(blend: bool = blend, cap: int | None = None) -> list:
            return run_edits(model, make_jobs(args.jobs, args.steps, blend), max_batch_rows=cap)

        runs: dict[str, Callable[[], list]] = {"one by one": one_by_one, "batched": batched}
        rows = {"one by one": 4, "batched": 4 * args.jobs}
        for cap in args.batch_rows:
            runs[f"batched (cap {cap})"] = lambda blend=blend, cap=cap: batched(blend, cap)
            rows[f"batched (cap {cap})"] = min(4 * args.jobs, max(4, cap - cap % 4))
        run_edits(model, make_jobs(1, args.steps, blend))  # warm-up
        measured = timed(runs, args.device, args.repeats)
        solo_time, solo = measured["one by one"]
        for mode, (seconds, results) in measured.items():
            diff = max(
                (a.latents.float() - b.latents.float()).abs().max().item()
                for a, b in zip(solo, results)
            )
            print(
                f"| {name} | {mode} | {rows[mode]} | {seconds:.2f} | "
                f"{60 * args.jobs / seconds:.1f} | {solo_time / seconds:.2f} | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
