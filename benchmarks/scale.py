"""Speed and memory at Stable Diffusion size: our edits and inversions against diffusers.

Builds SD 1.5, SD 2.1 and SDXL 1.0 (``--arch``) with random weights from their published configs
(:mod:`p2p_framework.testing.random_models`) and times, side by side in one run, 2 prompts (source
and target) at guidance 7.5, i.e. UNet batch 4, with the same DDIM scheduler, steps and size:

- ``plain``: diffusers' ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL)
  generating the 2 prompts;
- ``edit``: ``run_edit`` with replace + local blend (what a word swap usually runs), with
  ``fused_edits`` at its default ``"auto"`` (the fused route on CUDA, the exact one on a CPU);
- ``edit-exact``: the same with ``fused_edits=False``: every edited layer materialised, as
  CPU runs are (on a CPU it is the ``edit`` row again); ``edit-fused`` (asked for with
  ``--rows``): with ``fused_edits=True``, the route CUDA runs take (on CUDA, ``edit`` again);
- ``edit-all``: the same edit with every attention layer materialised, reference-style:
  the attention store tracks every resolution, cross and self, so every layer computes its
  softmax explicitly and stores its maps (the original code computes every softmax itself;
  it stores self-attention maps up to 32x32 only, so this is its upper bound);
- ``edit-compiled`` (``--compile``): ``edit`` after ``model.compile()``; the first run
  (compilation) is reported apart, as ``first run s``;
- one row per inversion method (``invert``) on a synthetic photo: ddim, negative-prompt,
  direct, null-text at the paper's settings and with both its speed options (``reuse_cond``
  and ``batch_cond``; each alone with ``--rows all`` or ``--small``); with ``--compile``,
  ``null-text-compiled`` (both speed options). With random weights null-text's early stop
  does not trigger (it did not in our runs), so every step takes all its inner steps.

Both generation sides include text encoding and decoding to PIL images (``run_edit`` always
decodes; diffusers runs with ``output_type="pil"`` and no safety checker). Each row: a warm-up
run (inversions: 1 step, 2 inner steps), then the best of ``--repeats`` runs (inversions:
``--inversion-repeats``), CUDA synchronised; UNet calls are counted. Peak memory: on CUDA
``max_memory_allocated`` over the timed runs (``reset_peak_memory_stats`` after the warm-up);
on a CPU each run of a row (its warm-up, then one timed run) is a forked child of the process
that built the model, whose peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` as the
child starts, so warm-up included: memory freed by the allocator stays resident) is its own;
the rows take turns, one run each per round, so a shared machine's changing load spreads over
all of them; ``--no-isolate`` runs the rows in-process and reports no CPU memory. "above
start" is the peak minus the memory at the start (CUDA: allocated after the warm-up, i.e. the
weights; CPU: the child's first RSS).

Usage::

    python benchmarks/scale.py --small                    # smoke check: seconds on a CPU
    python benchmarks/scale.py --device cuda --arch sd15 sd21 --compile
    python benchmarks/scale.py --device cuda --arch sdxl      # 1024 px, its own size
    python benchmarks/scale.py --device cuda --json out.json --write-docs
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.util
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2p_framework import Edit, EditRun, EditSettings, RunContext, run_edit
from p2p_framework.inversion import invert
from p2p_framework.model import StableDiffusionModel, pick_device, pick_dtype
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.replace import Replace
from p2p_framework.testing import architecture, build_random_model, diffusers_pipeline

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "a painting of a squirrel eating a burger"
TARGET = "a painting of a lion eating a burger"
BLEND_WORDS = ["squirrel", "lion"]
GUIDANCE = 7.5
SEED = 8888
SECTION = "Speed at scale"

# Targets of issue 6 (H100, SD 1.5, 512 px, 50 steps, batch 4).
TARGET_EDIT_RATIO = 1.10
TARGET_COMPILED_S = 0.8
TARGET_NULL_TEXT_S = 10.0
TARGET_MEMORY_RATIO = 1.10


def _load_inversion_benchmark() -> Any:
    """benchmarks/inversion.py as a module (for ``synthetic_photo`` and ``write_section``)."""
    spec = importlib.util.spec_from_file_location(
        "p2p_benchmark_inversion", Path(__file__).with_name("inversion.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class MaterialiseAll(Edit):
    """Track every attention resolution, cross and self: every layer materialises its maps."""

    name = "materialise-all"

    def bind(self, run: RunContext) -> EditRun:
        downscale = 1
        while downscale <= max(run.latent_size):
            for cross in (True, False):
                run.attention_store.track(downscale=downscale, cross=cross)
            downscale *= 2
        return EditRun()


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: ``kind`` is ``plain``, ``edit`` or ``invert``; ``default``: run
    without ``--rows`` (``--small`` runs every row)."""

    key: str
    label: str
    kind: str
    method: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    materialise: bool = False
    compiled: bool = False
    default: bool = True
    #: EditSettings.fused_edits of an edit row ("auto": fused on CUDA, exact on the CPU).
    fused_edits: bool | str = "auto"


ROWS: list[RowSpec] = [
    RowSpec("plain", "diffusers pipeline (plain generation)", "plain"),
    RowSpec("edit", "edit: replace + local blend", "edit"),
    RowSpec(
        "edit-exact",
        "edit: replace + local blend, exact path (fused_edits=false)",
        "edit",
        fused_edits=False,
    ),
    RowSpec(
        "edit-fused",
        "edit: replace + local blend, fused route (fused_edits=true)",
        "edit",
        fused_edits=True,
        default=False,
    ),
    RowSpec("edit-all", "edit, every attention layer materialised", "edit", materialise=True),
    RowSpec("ddim", "inversion: ddim", "invert", "ddim"),
    RowSpec("negative-prompt", "inversion: negative-prompt", "invert", "negative-prompt"),
    RowSpec("direct", "inversion: direct", "invert", "direct"),
    RowSpec(
        "null-text", "inversion: null-text (paper: 10 inner, early stop)", "invert", "null-text"
    ),
    # The default row's UNet runs in the model's precision (float16 on a GPU: unet_precision
    # auto); this one casts it up to float32, the reference behaviour the speed-up is held to.
    RowSpec(
        "null-text-fp32",
        "inversion: null-text, float32 UNet (reference)",
        "invert",
        "null-text",
        {"unet_precision": "float32"},
    ),
    RowSpec(
        "null-text-reuse",
        "inversion: null-text, reuse_cond",
        "invert",
        "null-text",
        {"reuse_cond": True},
        default=False,
    ),
    RowSpec(
        "null-text-batch",
        "inversion: null-text, batch_cond",
        "invert",
        "null-text",
        {"batch_cond": True},
        default=False,
    ),
    RowSpec(
        "null-text-both",
        "inversion: null-text, reuse_cond + batch_cond",
        "invert",
        "null-text",
        {"reuse_cond": True, "batch_cond": True},
    ),
]
COMPILED_ROWS: list[RowSpec] = [
    RowSpec("edit-compiled", "edit: replace + local blend, compiled", "edit", compiled=True),
    RowSpec(
        "null-text-compiled",
        "inversion: null-text, reuse_cond + batch_cond, compiled",
        "invert",
        "null-text",
        {"reuse_cond": True, "batch_cond": True},
        compiled=True,
    ),
]


def select_rows(args: argparse.Namespace) -> list[RowSpec]:
    """``plain`` (the baseline) first, then the rows asked for, in table order."""
    specs = ROWS + (COMPILED_ROWS if args.compile else [])
    if args.rows and "all" not in args.rows:
        unknown = set(args.rows) - {spec.key for spec in ROWS + COMPILED_ROWS}
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {row_keys()}")
        return [spec for spec in specs if spec.key == "plain" or spec.key in args.rows]
    if args.rows or args.small:
        return specs
    return [spec for spec in specs if spec.default]


def row_keys() -> list[str]:
    return [spec.key for spec in ROWS + COMPILED_ROWS]


# -- one row ------------------------------------------------------------------------------
class Bench:
    """The model, the baseline pipeline and the photo of one architecture, and how to time."""

    def __init__(self, model: StableDiffusionModel, args: argparse.Namespace, photo: Any) -> None:
        self.model = model
        self.args = args
        self.photo = photo
        self.pipe = diffusers_pipeline(model)
        self.cuda = model.device.type == "cuda"
        self.calls = 0
        self.rows = 0

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def settings(self, steps: int, fused_edits: bool | str = "auto") -> EditSettings:
        size = self.args.size
        return EditSettings(
            steps=steps, guidance=GUIDANCE, height=size, width=size, fused_edits=fused_edits
        )

    def runner(self, spec: RowSpec, warm: bool) -> Callable[[], dict[str, Any]]:
        """A function doing one run of ``spec`` and returning what it counted."""
        model, size, steps = self.model, self.args.size, self.args.steps
        if spec.kind == "plain":

            def plain() -> dict[str, Any]:
                self.pipe(
                    [SOURCE, TARGET],
                    height=size,
                    width=size,
                    num_inference_steps=steps,
                    guidance_scale=GUIDANCE,
                    generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="pil",
                )
                return {}

            return plain
        if spec.kind == "edit":

            def edit() -> dict[str, Any]:
                edits: list[Edit] = [Replace(), LocalBlend(words=list(BLEND_WORDS))]
                if spec.materialise:
                    edits.append(MaterialiseAll())
                settings = self.settings(steps, spec.fused_edits)
                result = run_edit(model, [SOURCE, TARGET], edits, settings=settings)
                timings = {k: round(v, 4) for k, v in result.timings.items()}
                return {"store_bytes": result.attention_store.nbytes(), "timings": timings}

            return edit
        options = dict(spec.options)
        num_steps = steps
        if warm:
            num_steps = 1
            if spec.method == "null-text":  # 2: the gradient passes of both batch sizes
                options["num_inner_steps"] = 2

        def inversion() -> dict[str, Any]:
            result = invert(
                model,
                self.photo,
                SOURCE,
                spec.method,
                num_steps=num_steps,
                guidance=GUIDANCE,
                height=size,
                width=size,
                **options,
            )
            stats = result.stats
            return {
                "calls": stats["unet_calls"],
                "rows": stats["unet_forward_rows"],
                "backward_rows": stats["unet_backward_rows"],
            }

        return inversion

    def repeats(self, spec: RowSpec) -> int:
        return self.args.inversion_repeats if spec.kind == "invert" else self.args.repeats

    def measure(self, spec: RowSpec, repeats: int | None = None) -> dict[str, Any]:
        """Warm-up, then the best of the repeats; on CUDA, peak memory over the timed runs."""
        row: dict[str, Any] = {"key": spec.key, "label": spec.label}
        if spec.compiled:
            if not hasattr(self.model, "compile"):
                row["error"] = "model.compile is not available in this version"
                return row
            if not getattr(self.model, "compiled", False):
                options = {"mode": self.args.compile_mode, "backend": self.args.compile_backend}
                self.model.compile(**{k: v for k, v in options.items() if v})
            row["compile_mode"] = getattr(self.model, "compile_mode", self.args.compile_mode)
            row["compile_backend"] = self.args.compile_backend or "inductor"
        repeats = repeats or self.repeats(spec)
        hook = None
        if not spec.compiled:  # a hook would be traced into a compiled UNet
            hook = self.model.unet.register_forward_pre_hook(self._count, with_kwargs=True)
        try:
            if self.args.warmup or spec.compiled:
                warm = self.runner(spec, warm=True)
                self.sync()
                began = time.perf_counter()
                warm()
                self.sync()
                row["first_run_s"] = time.perf_counter() - began
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                row["base_mb"] = torch.cuda.memory_allocated() / 2**20
            run = self.runner(spec, warm=False)
            times, info = [], {}
            self.calls = self.rows = 0
            for _ in range(repeats):
                self.sync()
                began = time.perf_counter()
                info = run()
                self.sync()
                times.append(time.perf_counter() - began)
        finally:
            if hook is not None:
                hook.remove()
        row["seconds"] = min(times)
        row["repeats"] = repeats
        if "calls" not in info:  # generation: one batched UNet call per step
            counted = self.calls // repeats if hook is not None else None
            info["calls"] = counted if counted is not None else self.args.steps
            info["rows"] = self.rows // repeats if hook is not None else 4 * self.args.steps
        row.update(info)
        if self.cuda:
            row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return row


# -- CPU isolation: one forked child per row -------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _child(bench: Bench, spec: RowSpec, threads: int, conn: Any) -> None:
    """One timed run of ``spec`` (after its warm-up), with this process's peak RSS."""
    try:
        torch.set_num_threads(threads)
        reset, base = _reset_peak_rss(), _status_kb("VmRSS")
        row = bench.measure(spec, repeats=1)
        peak = _status_kb("VmHWM")
        if reset and peak is not None and base is not None:
            row["peak_mb"] = peak / 1024  # warm-up included: freed memory stays resident
            row["base_mb"] = base / 1024
        conn.send(row)
    except BaseException as error:  # report, never hang the parent
        conn.send({"key": spec.key, "label": spec.label, "error": _error_text(error)})
    finally:
        conn.close()


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text[:200]


def _measure_isolated(bench: Bench, spec: RowSpec, threads: int) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(bench, spec, threads, send))
    process.start()
    send.close()
    try:
        row = receive.recv()
    except EOFError:
        row = {"key": spec.key, "label": spec.label, "error": "the child process died"}
    process.join()
    if process.exitcode not in (0, None) and "error" not in row:
        row["error"] = f"child exit code {process.exitcode}"
    return row


def _rounds(bench: Bench, specs: list[RowSpec], threads: int, name: str) -> list[dict]:
    """Every row once per round, each run in its own child, for as many rounds as repeats.

    Interleaving rows spreads the load of a shared machine over all of them (a row run
    back to back would take whatever load its minutes had). Per row: the fastest run, and the
    highest peak memory of its children.
    """
    runs: dict[str, list[dict[str, Any]]] = {spec.key: [] for spec in specs}
    for index in range(max(bench.repeats(spec) for spec in specs)):
        for spec in specs:
            if index >= bench.repeats(spec) or any("error" in r for r in runs[spec.key]):
                continue
            print(f"  {name}: {spec.key}, run {index + 1} ...", file=sys.stderr, flush=True)
            _trim_heap()
            runs[spec.key].append(_measure_isolated(bench, spec, threads))
    rows = []
    for spec in specs:
        done = runs[spec.key]
        failed = [r for r in done if "error" in r]
        if failed:
            rows.append(failed[0])
            continue
        row = dict(min(done, key=lambda r: r["seconds"]))
        row["repeats"] = len(done)
        row["all_seconds"] = [r["seconds"] for r in done]
        peaks = [r for r in done if "peak_mb" in r]
        if peaks:
            top = max(peaks, key=lambda r: r["peak_mb"])
            row["peak_mb"], row["base_mb"] = top["peak_mb"], top["base_mb"]
        rows.append(row)
    for row in rows:
        print(f"  {format_row(row, rows[0])}", file=sys.stderr, flush=True)
    return rows


def _trim_heap() -> None:
    """Give freed heap pages back, so forked children start from the live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- one architecture -------------------------------------------------------------------
def arch_name(name: str, small: bool) -> str:
    return f"{name}-small" if small and not name.endswith("-small") else name


def run_architecture(name: str, args: argparse.Namespace, photo_maker: Callable) -> dict:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    isolate = args.isolate and device.type == "cpu"
    arch = architecture(arch_name(name, args.small))
    # Each architecture at its own size (512, 768, 1024 px) unless --size says otherwise.
    args = argparse.Namespace(**{**vars(args), "size": args.size or arch.default_size})
    torch.set_num_threads(1 if isolate else args.threads)  # no OpenMP pool before a fork
    began = time.perf_counter()
    model = build_random_model(arch, device=device, dtype=dtype, seed=0)
    build_s = time.perf_counter() - began
    bench = Bench(model, args, photo_maker(args.size))
    specs = select_rows(args)
    if isolate:
        rows = _rounds(bench, specs, args.threads, arch.name)
    else:
        rows = []
        for spec in specs:
            print(f"  {arch.name}: {spec.key} ...", file=sys.stderr, flush=True)
            try:
                row = bench.measure(spec)
            except Exception as error:  # one failing row must not lose the others
                traceback.print_exc()
                row = {"key": spec.key, "label": spec.label, "error": _error_text(error)}
            rows.append(row)
            print(f"  {format_row(row, rows[0])}", file=sys.stderr, flush=True)
    result = {
        "arch": arch.name,
        "title": arch.title,
        "size": args.size,
        "steps": args.steps,
        "build_s": build_s,
        "memory": "cuda" if device.type == "cuda" else ("rss" if isolate else None),
        "rows": rows,
    }
    del bench, model
    if args.compile and not isolate:
        torch.compiler.reset()  # compiled graphs hold the UNet
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# -- output -------------------------------------------------------------------------------
def _num(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_row(row: dict[str, Any], plain: dict[str, Any]) -> str:
    if "error" in row:
        return f"| {row['label']} | n/a ({row['error']}) |  |  |  |  |  |  |  |"
    seconds = row["seconds"]
    base = plain.get("seconds") if "error" not in plain else None
    ratio = seconds / base if base else None
    calls = row.get("calls")
    per_call = 1000 * seconds / calls if calls else None
    peak, plain_peak = row.get("peak_mb"), plain.get("peak_mb")
    over = 100 * (peak / plain_peak - 1) if peak is not None and plain_peak else None
    extra = peak - row["base_mb"] if peak is not None and "base_mb" in row else None
    store = row.get("store_bytes")
    first = row.get("first_run_s") if row["key"].endswith("compiled") else None
    label = row["label"] + (f" (first run {first:.1f} s)" if first is not None else "")
    over_text = "" if over is None else f"{over:+.1f}%"
    return (
        f"| {label} | {seconds:.3f} | {_num(ratio, 3)} | {calls or ''} | "
        f"{_num(per_call, 1)} | {_num(peak, 0)} | {over_text} | {_num(extra, 0)} | "
        f"{'' if store is None else f'{store / 2**20:.3g}'} |"
    )


def table(result: dict[str, Any]) -> str:
    memory = {"cuda": "peak GPU MB", "rss": "peak RSS MB", None: "peak MB (n/a)"}
    lines = [
        f"| {result['title']}, {result['size']} px, {result['steps']} steps | s | x plain | "
        f"UNet calls | ms / call | {memory[result['memory']]} | vs plain | above start MB | "
        "store MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = result["rows"]
    lines += [format_row(row, rows[0]) for row in rows]
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> str:
    rows = {row["key"]: row for row in result["rows"] if "error" not in row}
    checks = []

    def check(name: str, value: float | None, limit: float, unit: str) -> None:
        if value is None:
            return
        verdict = "met" if value <= limit else "not met"
        checks.append(f"{name} {value:.3g}{unit} (target <= {limit:g}{unit}: {verdict})")

    plain = rows.get("plain")
    if plain and "edit" in rows:
        check(
            "eager edit / plain", rows["edit"]["seconds"] / plain["seconds"], TARGET_EDIT_RATIO, "x"
        )
        if plain.get("peak_mb") and rows["edit"].get("peak_mb"):
            ratio = rows["edit"]["peak_mb"] / plain["peak_mb"]
            check("edit peak memory / plain", ratio, TARGET_MEMORY_RATIO, "x")
    if "edit-compiled" in rows:
        check("compiled edit", rows["edit-compiled"]["seconds"], TARGET_COMPILED_S, " s")
    null_text = [row for key, row in rows.items() if key.startswith("null-text")]
    if null_text:
        fastest = min(null_text, key=lambda row: row["seconds"])
        check(
            f"null-text inversion ({fastest['key']})", fastest["seconds"], TARGET_NULL_TEXT_S, " s"
        )
    if not checks:
        return ""
    return f"{result['title']}: " + "; ".join(checks) + "."


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def describe(meta: dict[str, Any]) -> str:
    v = meta["versions"]
    threads = f", {meta['threads']} thread(s)" if meta["device"] == "cpu" else ""
    memory = {
        "cuda": "peak memory: torch.cuda.max_memory_allocated over the timed runs",
        "rss": "rows interleaved, one forked child per run; peak memory: its VmHWM",
        None: "no CPU memory figures (rows in one process)",
    }[meta["memory"]]
    return (
        f"{meta['card']}, {meta['dtype']}{threads}; {meta['date']}; torch {v['torch']}, "
        f"diffusers {v['diffusers']}, transformers {v['transformers']}, Python {v['python']}. "
        f"2 prompts, guidance {GUIDANCE:g} (UNet batch 4), DDIM, decode to PIL included on both "
        f"sides; best of {meta['repeats']} (inversions: {meta['inversion_repeats']})"
        f"{' after a warm-up' if meta['warmup'] else ', no warm-up'}; {memory}."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", nargs="+", default=["sd15"], help="sd15, sd21, sdxl (default sd15)"
    )
    parser.add_argument(
        "--size",
        type=int,
        help="pixels (default: the architecture's own, 512, 768 or 1024; 64 with --small)",
    )
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; 3 with --small)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA), float32, ...")
    parser.add_argument("--repeats", type=int, help="timed generation runs (default 3; --small 2)")
    parser.add_argument("--inversion-repeats", type=int, default=1, help="timed inversions")
    parser.add_argument("--threads", type=int, help="CPU threads (default torch's; --small 1)")
    parser.add_argument("--small", action="store_true", help="small variants: a CPU smoke check")
    parser.add_argument("--compile", action="store_true", help="add the model.compile() rows")
    parser.add_argument("--compile-mode", help="mode for model.compile (default its own)")
    parser.add_argument(
        "--compile-backend", help="backend for model.compile (default inductor; aot_eager: quick)"
    )
    parser.add_argument(
        "--rows",
        nargs="*",
        help=f"rows to run, or all (plain, the baseline, always runs): {', '.join(row_keys())}",
    )
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="on a CPU, run the rows in this process (no memory figures)",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="no warm-up run (compiled rows keep theirs): for CPU runs of seconds per UNet call",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument(
        "--write-docs",
        nargs="?",
        const=ROOT / "docs" / "benchmarks.md",
        type=Path,
        help=f"replace this run's subsection of '## {SECTION}' in docs/benchmarks.md (or PATH)",
    )
    parser.add_argument("--machine", help="subsection name for --write-docs (default: the card)")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.small else None)
    args.steps = args.steps or (3 if args.small else 50)
    args.repeats = args.repeats or (2 if args.small else 3)
    args.threads = args.threads or (1 if args.small else torch.get_num_threads())
    for name in args.arch:
        architecture(arch_name(name, args.small))  # fail early on a bad name

    helpers = _load_inversion_benchmark()
    device = pick_device(args.device)
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{os.cpu_count()}-core CPU ({platform.machine()})"
    )
    meta = {
        "card": card,
        "device": device.type,
        "dtype": str(pick_dtype(args.dtype, device)).replace("torch.", ""),
        "threads": args.threads,
        "date": args.date,
        "versions": versions(),
        "repeats": args.repeats,
        "inversion_repeats": args.inversion_repeats,
        "warmup": args.warmup,
        "small": args.small,
        "memory": "cuda" if device.type == "cuda" else ("rss" if args.isolate else None),
        "command": shlex.join(["python", "benchmarks/scale.py", *(argv or sys.argv[1:])]),
    }
    results = [run_architecture(name, args, helpers.synthetic_photo) for name in args.arch]

    def report(chosen: list[dict[str, Any]]) -> str:
        parts = [describe(meta), ""]
        for result in chosen:
            parts += [table(result), ""]
        summary = [line for line in (targets(result) for result in chosen) if line]
        if summary:
            parts += ["Targets (set for an H100, SD 1.5, 512 px, 50 steps): " + " ".join(summary)]
        return "\n".join(parts).rstrip() + "\n"

    print(report(results))
    output = {"meta": meta, "results": results}
    if args.json:
        args.json.write_text(json.dumps(output, indent=1) + "\n", encoding="utf-8")
    if args.write_docs:  # one subsection per machine, architecture and size
        for result in results:
            title = f"{args.machine or card}, {result['title']}, {result['size']} px"
            body = f"Command: `{meta['command']}`\n\n{report([result])}"
            helpers.write_section(args.write_docs, body, title=title, parent=SECTION)
    return output


if __name__ == "__main__":
    main()
