"""How far each attention route's edit is from the reference implementation's arithmetic.

The authors' Prompt-to-Prompt code materialises the probabilities of every attention layer,
edited or not (``softmax(Q K^T * scale)``, then ``P V``). Our exact path (``fused_edits``
off: what CPU runs use) materialises only the layers an edit reads or changes and leaves the
others on the fused kernel, as diffusers does; the fused route (``fused_edits`` on: what
eager CUDA runs use by default) also keeps the edited layers on it where the edit allows.
This script runs each edit three ways on the embedded demo model, with the same seed:

- **reference**: every layer of every call materialised (``scale.py``'s ``MaterialiseAll``
  edit has the store track every resolution, so on the exact path every layer computes
  its probabilities), which is the reference code's computation;
- **exact**: ``fused_edits=False``;
- **fused**: ``fused_edits=True``;

and prints, per edit and seed, the largest absolute latent difference and the number of
8-bit image values that differ, between each pair. It takes about 5 minutes at 50 steps on
one CPU thread.

    python benchmarks/route_rounding.py [--steps 50] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from scale import MaterialiseAll  # this folder's: run as python benchmarks/route_rounding.py

from p2p_framework import Edit, EditResult, EditSettings, load_model, run_edit
from p2p_framework.demo import DEMO_MODEL_DIR
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.refine import Refine
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.reweight import Reweight
from p2p_framework.plugins.seed import Seed

SOURCE = "a blue circle on a striped green background"
TARGET = "a yellow circle on a striped green background"
REFINED = "a blue circle and a red square on a striped green background"

EDITS: dict[str, tuple[list[str], Callable[[], list[Edit]]]] = {
    "replace": ([SOURCE, TARGET], lambda: [Replace()]),
    "refine": ([SOURCE, REFINED], lambda: [Refine()]),
    "reweight": ([SOURCE, SOURCE], lambda: [Reweight(weights={"striped": 2.0})]),
    "replace + local blend": (
        [SOURCE, TARGET],
        lambda: [Replace(), LocalBlend(words=["circle", "circle"])],
    ),
}


def pixels(result: EditResult) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images]).astype(np.int16)


def compare(a: EditResult, b: EditResult) -> str:
    latent = float((a.latents - b.latents).abs().max())
    differing = int((pixels(a) != pixels(b)).sum())
    return f"{latent:.1e} / {differing}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (50)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (1 2 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    began = time.perf_counter()
    lines = []
    values = 0
    for name, (prompts, edits) in EDITS.items():
        for seed in args.seeds:

            def run(fused: bool, extra=(), prompts=prompts, edits=edits, seed=seed):  # noqa: ANN001, ANN202
                settings = EditSettings(steps=args.steps, fused_edits=fused)
                chosen = [*edits(), *extra]
                return run_edit(model, prompts, chosen, source=Seed(seed=seed), settings=settings)

            reference = run(False, extra=[MaterialiseAll()])
            exact, fused = run(False), run(True)
            values += pixels(reference).size
            lines.append(
                f"| {name} | {seed} | {compare(exact, reference)} | {compare(fused, reference)} "
                f"| {compare(fused, exact)} |"
            )
    print(
        f"demo model, CPU {platform.machine()}, float32, torch {torch.__version__}, 1 thread; "
        f"{args.steps} DDIM steps, guidance 7.5; {values:,} 8-bit values compared per column; "
        f"{time.perf_counter() - began:.0f} s\n"
    )
    print(
        "| edit | seed | exact vs reference: max latent diff / 8-bit values differing "
        "| fused vs reference | fused vs exact |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
