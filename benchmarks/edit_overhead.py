"""Cost of a Prompt-to-Prompt edit against diffusers' plain generation of the same prompts.

Builds a Stable-Diffusion-shaped model with random weights whose UNet dominates the run time (SD
1.5's block layout at the ``--preset``'s width, from :mod:`p2p_framework.testing.random_models`),
then times, each in a fresh process so that peak memory (max RSS) is its own:

- ``diffusers``: ``StableDiffusionPipeline`` generating the 2 prompts (UNet batch 4);
- ``edit``: ``run_edit`` with a replace edit on the same 2 prompts (and local blend with
  ``--blend``), same steps, size and scheduler.

Each at ``--steps`` and at twice as many steps, to show that memory does not grow with the
step count. Prints a Markdown table.

    python benchmarks/edit_overhead.py                    # minutes on 2 CPU cores
    python benchmarks/edit_overhead.py --preset quick     # a smoke run in seconds
    python benchmarks/edit_overhead.py --preset sd15 --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPEATS = 3
SOURCE = "a painting of a squirrel eating a burger"
TARGET = "a painting of a lion eating a burger"


def _presets() -> dict:
    from p2p_framework.testing import ARCHITECTURES, narrow

    # name: (architecture of p2p_framework.testing.random_models, latent size)
    return {
        "quick": (ARCHITECTURES["sd15-small"], 16),
        "cpu": (narrow(ARCHITECTURES["sd15"], 96), 32),
        "sd15": (ARCHITECTURES["sd15"], 64),
    }


PRESETS = ("quick", "cpu", "sd15")


def build_model(folder: Path, preset: str) -> None:
    """A pipeline folder of random weights (p2p_framework.testing.random_models): SD 1.5's block
    layout at the preset's width (``sd15``: SD 1.5 itself)."""
    from p2p_framework.testing import build_random_model, diffusers_pipeline

    arch, sample_size = _presets()[preset]
    model = build_random_model(arch, device="cpu", dtype="float32", sample_size=sample_size)
    diffusers_pipeline(model).save_pretrained(folder)


def worker(kind: str, folder: str, steps: int, blend: bool, device: str) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    if kind == "diffusers":
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False, dtype=dtype
        ).to(device)
        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False
        )
        pipe.set_progress_bar_config(disable=True)

        def run() -> None:
            pipe(
                [SOURCE, TARGET],
                num_inference_steps=steps,
                guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(8888),
            )

        store_bytes = 0
    else:
        from p2p_framework import EditSettings, load_model, run_edit
        from p2p_framework.plugins.local_blend import LocalBlend
        from p2p_framework.plugins.replace import Replace

        model = load_model(folder, device=device, dtype=dtype)
        holder: dict = {}

        def run() -> None:
            edits = [Replace()] + ([LocalBlend(words=["squirrel", "lion"])] if blend else [])
            holder["result"] = run_edit(
                model, [SOURCE, TARGET], edits, settings=EditSettings(steps=steps)
            )

    run()  # warm-up: first-call allocations and lazy imports
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    if kind != "diffusers":
        store_bytes = holder["result"].attention_store.nbytes()
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": min(times), "peak_mb": peak_mb, "store_bytes": store_bytes}


def measure(kind: str, folder: Path, steps: int, blend: bool, device: str) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--folder", str(folder)]
    command += ["--steps", str(steps), "--device", device] + (["--blend"] if blend else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="model size: quick (smoke), cpu (default), sd15 (SD 1.5's UNet)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (float16)")
    parser.add_argument("--blend", action="store_true", help="add local blend to the edit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.steps, args.blend, args.device)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder, args.preset)
        rows = []
        for steps in (args.steps, 2 * args.steps):
            plain = measure("diffusers", folder, steps, args.blend, args.device)
            edit = measure("edit", folder, steps, args.blend, args.device)
            rows.append((steps, plain, edit))

    edit_name = "replace + local blend" if args.blend else "replace"
    arch, sample_size = _presets()[args.preset]
    width = arch.unet["block_out_channels"][0]
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, float16"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} threads, float32"
    print(
        f"{where}; torch {torch.__version__}; preset {args.preset} (UNet width {width}, "
        f"latent {sample_size}x{sample_size}); 2 prompts, guidance 7.5 (UNet batch 4); "
        f"best of {REPEATS}\n"
    )
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(
        f"| steps | diffusers s | edit ({edit_name}) s | ratio | diffusers {memory} |"
        f" edit {memory} | attention store bytes |"
    )
    print("|---|---|---|---|---|---|---|")
    for steps, plain, edit in rows:
        print(
            f"| {steps} | {plain['seconds']:.2f} | {edit['seconds']:.2f} | "
            f"{edit['seconds'] / plain['seconds']:.3f} | {plain['peak_mb']:.0f} | "
            f"{edit['peak_mb']:.0f} | {edit['store_bytes']} |"
        )


if __name__ == "__main__":
    main()
