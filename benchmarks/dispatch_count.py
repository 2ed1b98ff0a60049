"""Dispatched operations per UNet call: our edits against diffusers' plain generation.

On a GPU, Stable Diffusion 1.5 with a UNet batch of 4 is bound by kernel launches rather
than by arithmetic, so an eager edit costs about what it dispatches. This script counts,
with a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that is active only inside
UNet calls (a forward pre-hook and a forward hook on the UNet switch it on and off), in
the controller's ``begin_call`` just before each call (whatever a per-step plan costs counts
as part of that step's call) and in the attention store's ``flush`` (the maps of layers that
stayed on the fused kernel, computed together after the call):

- **ATen ops**: every operator that reaches the dispatcher's Python key, i.e. after
  autograd and after ``CompositeImplicitAutograd`` decompositions (``matmul`` arrives as
  ``view``/``expand``/``clone``/``bmm``/``_unsafe_view``, ``softmax`` as ``_softmax``);
- **kernel ops**: the ATen ops that launch a kernel. Excluded are views and other metadata
  ops, by one rule: an op whose schema returns an alias of an input (``OpOverload.is_view``:
  ``view``, ``expand``, ``permute``, ``transpose``, ``t``, ``squeeze``, ``unsqueeze``,
  ``slice``, ``select``, ``as_strided``, ``detach``, ``alias``, ``split``, ``unbind``,
  ``lift_fresh``, ...), plus the few that only make metadata or memory without an alias
  annotation (:data:`METADATA_OPS`: ``_unsafe_view``, ``empty``, ``empty_strided``).
  Everything else counts as one launch, including copies (``clone``, ``copy_``,
  ``_to_copy``), fills and ``_local_scalar_dense`` (a device-to-host read).

for diffusers' ``StableDiffusionPipeline`` and for ``run_edit`` with replace, refine,
reweight and replace + local blend, at the paper's defaults (cross-replace 0.8, self-replace
0.4, local blend from 0.2 of the steps), 2 prompts, guidance 7.5 (UNet batch 4), DDIM, the
same scheduler, steps and size on both sides. Counts are averaged over the run's UNet calls
(edits change attention in some steps only).

Counts depend on the block layout, not on the channel widths or the resolution, so the
default models are the narrow variants of SD 1.5 and SD 2.1 (``sd15-small``,
``sd21-small``: same levels, layers, heads, projections; see
:mod:`p2p_framework.testing.random_models`) at a 64 px image (8x8 latent: grids 8, 4, 2, 1),
which takes about a minute on a CPU; ``--full`` builds the full-width models (same counts,
minutes and about 5 GB each). Counting on the CPU stands for a GPU: the same Python code
dispatches the same ops on both, except that fused attention is one op on either
(``_scaled_dot_product_flash_attention_for_cpu`` here, a flash or memory-efficient kernel
there).

    python benchmarks/dispatch_count.py                       # both architectures, ~1 min
    python benchmarks/dispatch_count.py --arch sd15 --ops     # + the extra ops per edit
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from p2p_framework import Edit, EditSettings, run_edit
from p2p_framework.batch import ControllerGroup
from p2p_framework.plugins.local_blend import LocalBlend
from p2p_framework.plugins.refine import Refine
from p2p_framework.plugins.replace import Replace
from p2p_framework.plugins.reweight import Reweight
from p2p_framework.store import AttentionStore
from p2p_framework.testing import architecture, build_random_model, diffusers_pipeline

SOURCE = "a painting of a squirrel eating a burger"
TARGET = "a painting of a lion eating a burger"
REFINED = "a painting of a squirrel eating a burger in the forest"
GUIDANCE = 7.5
SEED = 8888

aten = torch.ops.aten
#: Ops that make only metadata or uninitialised memory but carry no alias annotation.
METADATA_OPS = frozenset(
    {
        aten._unsafe_view.default,
        aten.empty.memory_format,
        aten.empty_strided.default,
    }
)


def launches_kernel(func: Any) -> bool:
    """Whether an ATen op launches a kernel (see the module docstring for the rule)."""
    return not (func.is_view or func in METADATA_OPS)


class DispatchCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while :attr:`active` is set.

    Attributes:
        ops: op name -> number of calls, every ATen op.
        calls: UNet calls counted (the hooks of :meth:`watch` add one per call).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.ops: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.active:
            name = str(func.overloadpacket).split(".", 1)[-1]
            self.ops[name] += 1
            if launches_kernel(func):
                self.kernels[name] += 1
        return func(*args, **(kwargs or {}))

    def watch(self, unet: torch.nn.Module) -> Callable[[], None]:
        """Count inside ``unet``'s forward, the controllers' ``begin_call`` and the stores'
        ``flush`` (maps deferred from the UNet call) only; returns a function removing the
        hooks."""
        original = ControllerGroup.begin_call
        original_flush = AttentionStore.flush

        def begin_call(group: ControllerGroup, *args: Any, **kwargs: Any) -> None:
            self.active = True
            try:
                original(group, *args, **kwargs)
            finally:
                self.active = False

        def flush(store: AttentionStore) -> None:
            was, self.active = self.active, True
            try:
                original_flush(store)
            finally:
                self.active = was

        def begin(module: Any, args: Any) -> None:
            self.active = True
            self.calls += 1

        def end(module: Any, args: Any, output: Any) -> None:
            self.active = False

        handles = [unet.register_forward_pre_hook(begin), unet.register_forward_hook(end)]
        ControllerGroup.begin_call = begin_call  # type: ignore[method-assign]
        AttentionStore.flush = flush  # type: ignore[method-assign]

        def unwatch() -> None:
            ControllerGroup.begin_call = original  # type: ignore[method-assign]
            AttentionStore.flush = original_flush  # type: ignore[method-assign]
            for handle in handles:
                handle.remove()

        return unwatch


def configurations() -> dict[str, tuple[list[str], Callable[[], list[Edit]]]]:
    """Edit name -> (prompts, edits), at the plugins' defaults (the paper's)."""
    return {
        "replace": ([SOURCE, TARGET], lambda: [Replace()]),
        "refine": ([SOURCE, REFINED], lambda: [Refine()]),
        "reweight": ([SOURCE, SOURCE], lambda: [Reweight(weights={"squirrel": 2.0})]),
        "replace + local blend": (
            [SOURCE, TARGET],
            lambda: [Replace(), LocalBlend(words=["squirrel", "lion"])],
        ),
    }


def count(run: Callable[[], Any], unet: torch.nn.Module) -> dict[str, Any]:
    """ATen and kernel ops per UNet call of one run."""
    counter = DispatchCounter()
    unhook = counter.watch(unet)
    try:
        with counter:
            run()
    finally:
        unhook()
    calls = max(counter.calls, 1)
    return {
        "calls": counter.calls,
        "aten": sum(counter.ops.values()) / calls,
        "kernel": sum(counter.kernels.values()) / calls,
        "ops": {name: n / calls for name, n in counter.ops.items()},
        "kernels": {name: n / calls for name, n in counter.kernels.items()},
    }


def count_architecture(name: str, *, full: bool, steps: int, size: int) -> dict[str, Any]:
    """Counts for plain generation and every edit configuration of one architecture."""
    arch = architecture(name if full else f"{name}-small")
    model = build_random_model(arch, device="cpu", dtype="float32", seed=0)
    pipe = diffusers_pipeline(model)

    def plain() -> None:
        pipe(
            [SOURCE, TARGET],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="latent",
        )

    rows = {"plain": count(plain, model.unet)}
    # The exact path (every edited layer materialised, as the reference implementation: CPU
    # runs) and the fused route (fused_edits on: eager CUDA runs by default).
    for fused in (False, True):
        settings = EditSettings(
            steps=steps, guidance=GUIDANCE, height=size, width=size, fused_edits=fused
        )
        for label, (prompts, edits) in configurations().items():

            def edit(
                prompts: list[str] = prompts, edits: Callable = edits, settings=settings
            ) -> None:  # noqa: ANN001
                run_edit(model, prompts, edits(), settings=settings)

            rows[f"{label}, {'fused' if fused else 'exact'}"] = count(edit, model.unet)
    return {"arch": arch.name, "title": arch.title, "rows": rows}


def table(result: dict[str, Any], steps: int, size: int) -> str:
    rows = result["rows"]
    plain = rows["plain"]
    lines = [
        f"| {result['title']}, {steps} steps, {size} px | ATen ops / call | x plain |"
        " kernel ops / call | x plain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, row in rows.items():
        name = "diffusers pipeline (plain generation)" if label == "plain" else f"edit: {label}"
        lines.append(
            f"| {name} | {row['aten']:,.1f} | {row['aten'] / plain['aten']:.3f} | "
            f"{row['kernel']:,.1f} | {row['kernel'] / plain['kernel']:.3f} |"
        )
    return "\n".join(lines)


def extra_ops(result: dict[str, Any]) -> str:
    """Per edit, the ops per call it dispatches beyond plain generation, by name."""
    plain = result["rows"]["plain"]
    lines = []
    for label, row in result["rows"].items():
        if label == "plain":
            continue
        parts = []
        for name in sorted(set(row["ops"]) | set(plain["ops"])):
            extra = row["ops"].get(name, 0.0) - plain["ops"].get(name, 0.0)
            if abs(extra) >= 0.05:
                kernel = "" if row["kernels"].get(name) or plain["kernels"].get(name) else " (view)"
                parts.append(f"{name} {extra:+.1f}{kernel}")
        lines.append(f"- {result['title']}, {label}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", nargs="+", default=["sd15", "sd21", "sdxl"], help="sd15, sd21, sdxl"
    )
    parser.add_argument("--full", action="store_true", help="full-width models (same counts)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (10)")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (64)")
    parser.add_argument("--ops", action="store_true", help="list each edit's extra ops by name")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    results = [
        count_architecture(name, full=args.full, steps=args.steps, size=args.size)
        for name in args.arch
    ]
    print(
        f"CPU {platform.machine()}, float32; torch {torch.__version__}; 2 prompts, guidance "
        f"{GUIDANCE} (UNet batch 4), DDIM; ops inside UNet calls, averaged over the run's "
        f"calls; {'full-width' if args.full else 'narrow'} models; "
        f"{time.perf_counter() - began:.0f} s\n"
    )
    for result in results:
        print(table(result, args.steps, args.size) + "\n")
    if args.ops:
        print("Ops per call beyond plain generation (negative: fewer):\n")
        for result in results:
            print(extra_ops(result) + "\n")
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
