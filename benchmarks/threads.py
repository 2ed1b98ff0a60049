"""Wall time of the README's demo edit by CPU thread count, on an idle and on a busy machine.

Each row runs ``p2p-run edit`` (the embedded demo model, 50 DDIM steps, the README's prompts)
in a fresh process with ``--threads`` set, while nothing else runs, or while a competitor
keeps cores busy:

- ``idle``: nothing else (run it on an otherwise idle machine);
- ``python-loop``: one pure-Python busy loop (one core taken);
- ``torch-job``: another PyTorch process doing float32 matrix products with its default
  threads (another test suite or benchmark on the same cores).

Prints a Markdown table of the edit's denoise-and-write time (``Wrote ... in X s``) and the
process's wall time. ``auto`` is the default of ``p2p-run``.

    python benchmarks/threads.py                        # about 3 minutes on 2 idle cores
    python benchmarks/threads.py --threads 1 2 auto --scenarios idle python-loop
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import torch

PROMPT = "a blue circle on a striped green background"
TARGET = "a yellow circle on a striped green background"

COMPETITORS = {
    "idle": None,
    "python-loop": "while True: pass",
    "torch-job": ("import torch\na = torch.randn(512, 512)\nwhile True: a = torch.tanh(a @ a)\n"),
}


def _edit(threads: str, out: str, steps: int) -> tuple[float, float, str]:
    """(edit seconds as p2p-run reports them, process wall seconds, threads it used)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "P2P_THREADS")}
    command = [
        sys.executable, "-c", "from p2p_framework.cli import main; main()", "edit",
        "--prompt", PROMPT, "--target", TARGET, "--steps", str(steps), "--device", "cpu",
        "--threads", threads, "--out", out,
    ]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if done.returncode:
        raise RuntimeError(done.stderr)
    match = re.search(r"Wrote \d+ files to .* in ([\d.]+) s", done.stderr)
    used = re.search(r"(\d+) CPU threads", done.stderr)
    seconds = float(match.group(1)) if match else float("nan")
    return seconds, wall, used.group(1) if used else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--scenarios", nargs="+", default=list(COMPETITORS), choices=COMPETITORS)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"demo edit, {args.steps} steps; {time.strftime('%Y-%m-%d')}\n"
    )
    print("| machine | --threads | threads used | edit (s) | process wall (s) |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for scenario in args.scenarios:
            code = COMPETITORS[scenario]
            competitor = None
            if code is not None:
                competitor = subprocess.Popen([sys.executable, "-c", code])
                time.sleep(1.0)  # let it start, so that auto sees it
            try:
                for threads in args.threads:
                    out = os.path.join(scratch, f"{scenario}-{threads}")
                    edit, wall, used = _edit(threads, out, args.steps)
                    print(
                        f"| {scenario} | {threads} | {used} | {edit:.1f} | {wall:.1f} |",
                        flush=True,
                    )
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()


if __name__ == "__main__":
    main()
