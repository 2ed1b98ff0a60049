"""Null-text reconstruction with the UNet in float32, bfloat16 and float16.

Inverts photos with null-text (the paper's settings: 50 DDIM steps, guidance 7.5, 10 inner
steps, early stop) once per ``unet_precision``, runs the editing loop with the source prompt
alone and measures the decoded source row against the photo (``PSNR in``), against the VAE
round trip ``decode(encode(photo))`` (``PSNR vae``, the inversion's own error) and the latent
error ``|z_rec - z_0| / |z_0|``; then the difference of each precision to the float32
reference, per photo and averaged.

Models:

- ``--model demo`` (default): the shipped demo model on renders of held-out scenes that it
  never generated (:func:`tools.demo_model.edit_quality.sample_photo_cases`, as
  ``benchmarks/edit_quality.py`` picks them), 64 px, each with its caption as prompt.
- ``--model tiny``: tiny random models (:func:`p2p_framework.testing.tiny_models.save_tiny_pipeline`
  with seeds ``--start`` ..) with the UNet's output layer scaled by 0.05 (see
  ``benchmarks/inversion.py``), on the synthetic photo of ``benchmarks/inversion.py``. Their
  VAEs are random: compare rows, not absolute PSNRs.
- ``--model PATH``: any diffusers folder (``--image`` and ``--prompt`` then required).

``--load-dtype`` loads the weights in that dtype (on a CPU too: only for this measurement):
``float32`` runs the reduced precisions under autocast, ``float16`` / ``bfloat16`` emulate the
GPU case where a half-loaded UNet runs its own dtype natively and the editing loop runs in
half precision too (the float32 reference casts the UNet up for the inversion).

Usage::

    python benchmarks/inversion_precision.py --photos 6                     # demo model
    python benchmarks/inversion_precision.py --load-dtype float16 --precisions float32 float16
    python benchmarks/inversion_precision.py --model tiny --photos 3
    python benchmarks/inversion_precision.py --json a.json ... ; --table a.json b.json

``--json`` appends the rows to a file; ``--table FILES`` prints the tables of saved rows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from p2p_framework import EditSettings, load_model, run_edit
from p2p_framework.inversion import image_to_tensor, prepare_image
from p2p_framework.pipeline import to_pil
from p2p_framework.plugins.inversion_sources import NullTextSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TINY_OUTPUT_SCALE = 0.05


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def cases(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """``{"name", "model", "image", "prompt"}`` per photo; ``model`` is a folder."""
    found = []
    if args.model == "demo":
        from p2p_framework.demo import DEMO_MODEL_DIR
        from p2p_framework.demo.shapes import render

        # The demo model's evaluation code is a developer tool of the repository.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tools.demo_model import edit_quality as eq

        for case in eq.sample_photo_cases(args.photos, start=args.start):
            image, _ = render(case.scene, size=64)
            path = folder / f"photo-{case.index}.png"
            image.save(path)
            found.append(
                {
                    "name": f"scene {case.index}",
                    "model": str(DEMO_MODEL_DIR),
                    "image": path,
                    "prompt": case.source,
                }
            )
    elif args.model == "tiny":
        import importlib.util

        from p2p_framework.testing import save_tiny_pipeline

        spec = importlib.util.spec_from_file_location(
            "inversion_benchmark", Path(__file__).resolve().parent / "inversion.py"
        )
        benchmark = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(benchmark)  # type: ignore[union-attr]
        path = folder / "photo.png"
        benchmark.synthetic_photo(256).save(path)
        for seed in range(args.start, args.start + args.photos):
            model = save_tiny_pipeline(folder / f"tiny-{seed}", seed=seed)
            found.append(
                {
                    "name": f"tiny seed {seed}",
                    "model": str(model),
                    "image": path,
                    "prompt": args.prompt,
                }
            )
    else:
        if not (args.image and args.prompt):
            raise SystemExit("--model PATH needs --image and --prompt")
        found.append(
            {
                "name": Path(args.image).name,
                "model": args.model,
                "image": Path(args.image),
                "prompt": args.prompt,
            }
        )
    return found


def float32_ddim_stage() -> None:
    """Make ``invert`` run its DDIM inversion stage with the UNet in float32 whatever its
    ``unet_precision`` (the null-text stage keeps it): a measurement only, so it patches
    the module instead of being an option."""
    from p2p_framework.inversion import api
    from p2p_framework.inversion.ddim import float32_unet

    plain = api.ddim_inversion

    def ddim_inversion(unet, math, latent, cond, report=None):  # noqa: ANN001, ANN202
        autocast, unet.autocast = unet.autocast, None
        try:
            with float32_unet(unet.model):
                return plain(unet, math, latent, cond, report)
        finally:
            unet.autocast = autocast

    api.ddim_inversion = ddim_inversion


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    if args.ddim_stage_float32:
        float32_ddim_stage()
    rows = []
    loaded: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args, Path(tmp)):
            if case["model"] not in loaded:
                loaded.clear()
                model = load_model(case["model"], device=args.device, dtype=DTYPES[args.load_dtype])
                if args.model == "tiny":
                    with torch.no_grad():
                        model.unet.conv_out.weight.mul_(TINY_OUTPUT_SCALE)
                        model.unet.conv_out.bias.mul_(TINY_OUTPUT_SCALE)
                loaded[case["model"]] = model
            model = loaded[case["model"]]
            size = model.default_size
            prepared = prepare_image(case["image"], size, size)
            pixels = image_to_tensor(prepared)
            with torch.no_grad():
                z0 = model.encode_image(pixels).float().cpu()
                round_trip = to_pil(model.decode(model.encode_image(pixels)))[0]
            for precision in args.precisions:
                source = NullTextSource(
                    image=str(case["image"]), cache=False, unet_precision=precision
                )
                settings = EditSettings(
                    steps=args.steps, guidance=args.guidance, height=size, width=size
                )
                began = time.perf_counter()
                result = run_edit(model, [case["prompt"]], source=source, settings=settings)
                info = result.source_info["inversion"]
                latent = result.latents[:1].float().cpu()
                row = {
                    "model": args.model,
                    "load_dtype": args.load_dtype,
                    "ddim_stage": "float32" if args.ddim_stage_float32 else "same",
                    "case": case["name"],
                    "prompt": case["prompt"],
                    "precision": precision,
                    "psnr_input": psnr(result.images[0], prepared),
                    "psnr_vae": psnr(result.images[0], round_trip),
                    "vae_bound": psnr(round_trip, prepared),
                    "latent_error": float((latent - z0).norm() / z0.norm()),
                    "inner": float(np.mean(info["inner_steps"])),
                    "seconds": info["seconds"],
                    "total_seconds": time.perf_counter() - began,
                    "device": str(model.device),
                    "threads": args.threads,
                    "torch": torch.__version__,
                }
                rows.append(row)
                print(
                    f"{row['case']} {args.load_dtype} {precision}: PSNR in {row['psnr_input']:.3f} "
                    f"vae {row['psnr_vae']:.3f} lat {row['latent_error']:.4f} inner "
                    f"{row['inner']:.1f} {row['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


#: (column label, row key, format, show the difference to float32)
METRICS = (
    ("PSNR in", "psnr_input", "{:.2f}", True),
    ("PSNR vae", "psnr_vae", "{:.2f}", True),
    ("lat err", "latent_error", "{:.4f}", False),
    ("inner", "inner", "{:.1f}", False),
)


def _group_table(title: str, mine: list[dict[str, Any]]) -> list[str]:
    precisions = list(dict.fromkeys(r["precision"] for r in mine))
    others = [p for p in precisions if p != "float32"] if "float32" in precisions else []
    names = list(dict.fromkeys(r["case"] for r in mine))
    by = {(r["case"], r["precision"]): r for r in mine}
    bound = {r["case"]: r["vae_bound"] for r in mine}
    head = ["photo", "VAE bound"]
    for label, _, _, delta in METRICS:
        head += [f"{label} {p}" for p in precisions]
        head += [f"{label} {p} - float32" for p in others if delta]
    values: dict[str, list[float]] = {"bound": [bound[n] for n in names]}
    lines = []
    for name in names:
        cells = [name, f"{bound[name]:.2f}"]
        for _, key, fmt, delta in METRICS:
            for p in precisions:
                row = by.get((name, p))
                cells.append("" if row is None else fmt.format(row[key]))
                if row is not None:
                    values.setdefault(f"{key} {p}", []).append(row[key])
            for p in others if delta else ():
                a, b = by.get((name, p)), by.get((name, "float32"))
                if a is None or b is None:
                    cells.append("")
                    continue
                diff = a[key] - b[key]
                values.setdefault(f"{key} {p} diff", []).append(diff)
                cells.append(f"{diff:+.3f}")
        lines.append(cells)
    mean = ["**mean**", f"{np.mean(values['bound']):.2f}"]
    for _, key, fmt, delta in METRICS:
        mean += [fmt.format(np.mean(values[f"{key} {p}"])) for p in precisions]
        mean += [f"{np.mean(values[f'{key} {p} diff']):+.3f}" for p in others if delta]
    out = [title, "", "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    out += ["| " + " | ".join(cells) + " |" for cells in [*lines, mean]]
    extremes = [
        f"{label} {p}: {min(v):+.3f} to {max(v):+.3f} dB"
        for label, key, _, delta in METRICS
        if delta
        for p in others
        if (v := values.get(f"{key} {p} diff"))
    ]
    if extremes:
        out += ["", "Per-photo differences to float32: " + "; ".join(extremes) + "."]
    return [*out, ""]


def tables(rows: list[dict[str, Any]]) -> str:
    """One table per (model, load dtype, DDIM stage): per photo, then the mean."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["load_dtype"], row["ddim_stage"]), []).append(row)
    out = []
    for (model, load_dtype, stage), mine in groups.items():
        title = (
            f"Model {model}, weights loaded in {load_dtype}, DDIM inversion stage: "
            f"{'float32' if stage == 'float32' else 'same precision'}."
        )
        out += _group_table(title, mine)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, tiny, or a diffusers folder")
    parser.add_argument("--image", help="photo (with --model PATH)")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--photos", type=int, default=6, help="demo scenes or tiny seeds")
    parser.add_argument("--start", type=int, default=0, help="first scene index or seed")
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--load-dtype", default="float32", choices=list(DTYPES))
    parser.add_argument(
        "--ddim-stage-float32",
        action="store_true",
        help="run the DDIM inversion stage in float32 whatever the precision",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="append the rows to this JSON file")
    parser.add_argument("--table", type=Path, nargs="+", help="print the tables of saved rows")
    args = parser.parse_args(argv)
    if args.table:
        rows = [row for path in args.table for row in json.loads(path.read_text())]
        print(tables(rows))
        return
    rows = measure(args)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(old + rows, indent=1))
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {args.device}, "
        f"{args.threads} thread(s)"
    )
    print(tables(rows))


if __name__ == "__main__":
    main()
