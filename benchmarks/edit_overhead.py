"""Cost of a Prompt-to-Prompt edit against diffusers' plain generation of the same prompts.

Builds a Stable-Diffusion-shaped model with random weights whose UNet dominates the run time
(SD 1.x block layout, ``--width`` channels at the first level), then times, each in a fresh
process so that peak memory (max RSS) is its own:

- ``diffusers``: ``StableDiffusionPipeline`` generating the 2 prompts (UNet batch 4);
- ``edit``: ``run_edit`` with a replace edit on the same 2 prompts (and local blend with
  ``--blend``), same steps, size and scheduler.

Each at ``--steps`` and at twice as many steps, to show that memory does not grow with the
step count. Prints a Markdown table.

    python benchmarks/edit_overhead.py            # about 5 minutes on 2 CPU cores
    python benchmarks/edit_overhead.py --quick    # a smoke run in seconds
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

SOURCE = "a painting of a squirrel eating a burger"
TARGET = "a painting of a lion eating a burger"


def build_model(folder: Path, width: int, sample_size: int) -> None:
    """A tiny-model pipeline folder whose UNet is replaced by a wider SD 1.x-shaped one."""
    from diffusers import UNet2DConditionModel

    from p2p_framework.tiny_models import save_tiny_pipeline

    save_tiny_pipeline(folder, sample_size=sample_size)
    config = UNet2DConditionModel.load_config(folder / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=config["cross_attention_dim"],
    )
    unet.save_pretrained(folder / "unet")


def worker(kind: str, folder: str, steps: int, blend: bool) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    if kind == "diffusers":
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
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

        model = load_model(folder, device="cpu", dtype="float32")
        holder: dict = {}

        def run() -> None:
            edits = [Replace()] + ([LocalBlend(words=["squirrel", "lion"])] if blend else [])
            holder["result"] = run_edit(
                model, [SOURCE, TARGET], edits, settings=EditSettings(steps=steps)
            )

    run()  # warm-up: first-call allocations and lazy imports
    began = time.perf_counter()
    run()
    seconds = time.perf_counter() - began
    if kind != "diffusers":
        store_bytes = holder["result"].attention_store.nbytes()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak_mb, "store_bytes": store_bytes}


def measure(kind: str, folder: Path, steps: int, blend: bool) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--folder", str(folder)]
    command += ["--steps", str(steps)] + (["--blend"] if blend else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=96, help="UNet channels at level 1")
    parser.add_argument("--sample-size", type=int, default=32, help="latent size (px / 8)")
    parser.add_argument("--blend", action="store_true", help="add local blend to the edit")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.steps, args.blend)))
        return
    if args.quick:
        args.steps, args.width, args.sample_size = 4, 32, 16

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder, args.width, args.sample_size)
        rows = []
        for steps in (args.steps, 2 * args.steps):
            plain = measure("diffusers", folder, steps, args.blend)
            edit = measure("edit", folder, steps, args.blend)
            rows.append((steps, plain, edit))

    edit_name = "replace + local blend" if args.blend else "replace"
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
          f" torch {torch.__version__}; UNet width {args.width}, latent {args.sample_size}px,"
          f" 2 prompts, guidance 7.5 (UNet batch 4)\n")
    print(f"| steps | diffusers s | edit ({edit_name}) s | ratio | diffusers peak MB |"
          " edit peak MB | attention store bytes |")
    print("|---|---|---|---|---|---|---|")
    for steps, plain, edit in rows:
        print(f"| {steps} | {plain['seconds']:.2f} | {edit['seconds']:.2f} | "
              f"{edit['seconds'] / plain['seconds']:.3f} | {plain['peak_mb']:.0f} | "
              f"{edit['peak_mb']:.0f} | {edit['store_bytes']} |")


if __name__ == "__main__":
    main()
