"""Benchmark of the inversion methods: time, UNet work and reconstruction quality.

For each method (and each null-text speed-up) it inverts one photo, runs the editing loop
with the source prompt alone, decodes the result and compares it with the input:

- ``seconds``: wall time of the inversion (``Inversion.stats["seconds"]``);
- ``calls`` / ``fwd`` / ``bwd``: UNet calls, latent rows evaluated, rows back-propagated;
- ``inner``: mean Adam steps per diffusion step (null-text);
- ``PSNR in``: decoded reconstruction vs the input image, in dB;
- ``PSNR vae``: decoded reconstruction vs the VAE round trip ``decode(encode(image))``, i.e.
  the inversion's own error (the VAE round trip vs the input is the bound for ``PSNR in``);
- ``lat err``: ``|z_rec - z_0| / |z_0|`` in latent space.

By default it builds the tiny random model of :mod:`p2p_framework.testing.tiny_models` and scales
its UNet's output layer by ``--unet-output-scale`` (0.05): the random UNet is far from smooth in its
input and DDIM's ODE is unstable on it, which no inversion can fix; a real model needs no scaling
(``--model PATH`` uses 1). Absolute PSNRs of a random VAE mean nothing; compare rows.

Usage::

    python benchmarks/inversion.py                       # tiny model, 50 steps, CPU
    python benchmarks/inversion.py --model PATH --image cat.jpg --prompt "a cat ..."
    python benchmarks/inversion.py --write docs/benchmarks.md   # replace the "Inversion" section

The null-text time target (issue 6: SD 1.5 size, 512 px, 50 steps, at most 10 s on an H100)
is checked on random SD 1.5 weights, float16 as a GPU loads them, the UNet in half precision
(``unet_precision``), with and without ``torch.compile``::

    python benchmarks/inversion.py --random-sd --device cuda --dtype float16 \
        --only paper reuse bf16 fp16 [--compile]

Random weights never stop early (every step takes all 10 inner steps: the worst case).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import re
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
from p2p_framework.plugins.inversion_sources import (
    DDIMSource,
    DirectSource,
    NegativePromptSource,
    NullTextSource,
)

#: The reference precision: null-text's default (auto) would run a float16-loaded UNet
#: (a GPU's) in float16, so the rows that measure the other options say float32.
F32 = {"unet_precision": "float32"}

#: (label, source class, options, guidance or None for --guidance)
VARIANTS: list[tuple[str, type, dict[str, Any], float | None]] = [
    ("ddim (guidance 1)", DDIMSource, {}, 1.0),
    ("ddim", DDIMSource, {}, None),
    ("negative-prompt", NegativePromptSource, {}, None),
    ("direct", DirectSource, {}, None),
    ("null-text (paper: 10 inner, early stop)", NullTextSource, F32, None),
    ("null-text, no early stop", NullTextSource, {**F32, "early_stop_epsilon": -1.0}, None),
    ("null-text, reuse_cond", NullTextSource, {**F32, "reuse_cond": True}, None),
    ("null-text, batch_cond", NullTextSource, {**F32, "batch_cond": True}, None),
    ("null-text, 5 inner", NullTextSource, {**F32, "num_inner_steps": 5}, None),
    (
        "null-text, 5 inner, reuse_cond",
        NullTextSource,
        {**F32, "num_inner_steps": 5, "reuse_cond": True},
        None,
    ),
    (
        "null-text, 3 inner, reuse_cond",
        NullTextSource,
        {**F32, "num_inner_steps": 3, "reuse_cond": True},
        None,
    ),
    # unet_precision: the frozen UNet's forward and backward in half precision (a UNet loaded
    # in that dtype is then not cast up; fp16 is the default, auto, for a float16-loaded
    # UNet); labels say bf16 / fp16 so that --only can tell them apart.
    ("null-text, UNet in bf16", NullTextSource, {"unet_precision": "bfloat16"}, None),
    ("null-text, UNet in fp16", NullTextSource, {"unet_precision": "float16"}, None),
    (
        "null-text, reuse_cond + batch_cond, UNet in bf16",
        NullTextSource,
        {"reuse_cond": True, "batch_cond": True, "unet_precision": "bfloat16"},
        None,
    ),
    (
        "null-text, reuse_cond + batch_cond, UNet in fp16",
        NullTextSource,
        {"reuse_cond": True, "batch_cond": True, "unet_precision": "float16"},
        None,
    ),
]

try:  # the example plugin package's third-party source, when installed
    from p2p_example_plugin.fixed_point import FixedPointSource
except ImportError:  # pragma: no cover - optional
    pass
else:
    VARIANTS += [
        ("fixed-point (example plugin), 5 iterations", FixedPointSource, {}, None),
        ("fixed-point (example plugin), 3 iterations", FixedPointSource, {"iterations": 3}, None),
    ]


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def synthetic_photo(size: int) -> Image.Image:
    """Smooth gradients, a disc and a bar: something with edges and flat areas."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    red = 255 * xx
    green = 255 * yy
    disc = ((xx - 0.5) ** 2 + (yy - 0.45) ** 2) < 0.08
    blue = 60 + 180 * disc
    red = np.where((yy > 0.75) & (yy < 0.85), 30, red)
    return Image.fromarray(np.stack([red, green, blue], -1).round().astype(np.uint8))


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    torch.set_num_threads(args.threads)
    if args.random_sd:
        from p2p_framework.testing import build_random_model

        model = build_random_model("sd15", device=args.device, dtype=args.dtype)
        scale = 1.0
    elif args.model:
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        scale = args.unet_output_scale if args.unet_output_scale is not None else 1.0
    else:
        from p2p_framework.testing import save_tiny_pipeline

        folder = save_tiny_pipeline(Path(tempfile.mkdtemp(prefix="p2p-bench-")) / "tiny")
        model = load_model(folder, device=args.device, dtype=args.dtype)
        scale = args.unet_output_scale if args.unet_output_scale is not None else 0.05
    if scale != 1.0:
        with torch.no_grad():
            model.unet.conv_out.weight.mul_(scale)
            model.unet.conv_out.bias.mul_(scale)
    if args.compile:
        model.compile(args.compile)
    size = args.size or model.default_size
    with tempfile.TemporaryDirectory() as folder:
        if args.image:
            image_path = Path(args.image)
        else:
            image_path = Path(folder) / "photo.png"
            synthetic_photo(max(size, 256)).save(image_path)
        prepared = prepare_image(image_path, size, size)
        pixels = image_to_tensor(prepared)
        z0 = model.encode_image(pixels).float().cpu()
        round_trip = to_pil(model.decode(model.encode_image(pixels)))[0]
        # Kernels' first-use costs and compilation are not the methods': on a GPU or with
        # --compile each variant first runs 2 steps (same shapes, dtypes and graphs).
        warm_up = model.device.type == "cuda" or bool(args.compile)
        rows = []
        for label, source_class, options, guidance in VARIANTS:
            if args.only and not any(word in label for word in args.only):
                continue
            w = args.guidance if guidance is None else guidance
            source = source_class(image=str(image_path), cache=False, **options)
            if warm_up:
                warm = EditSettings(steps=2, guidance=w, height=size, width=size)
                run_edit(model, [args.prompt], source=source, settings=warm)
            settings = EditSettings(steps=args.steps, guidance=w, height=size, width=size)
            began = time.perf_counter()
            result = run_edit(model, [args.prompt], source=source, settings=settings)
            total = time.perf_counter() - began
            info = result.source_info["inversion"]
            latent = result.latents[:1].float().cpu()
            inner = info.get("inner_steps")
            rows.append(
                {
                    "method": label,
                    "guidance": w,
                    "seconds": info["seconds"],
                    "edit_seconds": total - info["seconds"],
                    "calls": info["unet_calls"],
                    "fwd": info["unet_forward_rows"],
                    "bwd": info["unet_backward_rows"],
                    "inner": float(np.mean(inner)) if inner else None,
                    "psnr_input": psnr(result.images[0], prepared),
                    "psnr_vae": psnr(result.images[0], round_trip),
                    "latent_error": float((latent - z0).norm() / z0.norm()),
                }
            )
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    if args.random_sd:
        name = "random SD 1.x-sized model (timings only)"
    else:
        name = str(args.model or "tiny random model (p2p_framework.testing.tiny_models)")
    meta = {
        "model": name,
        "unet_output_scale": scale,
        "size": size,
        "steps": args.steps,
        "guidance": args.guidance,
        "prompt": args.prompt,
        "image": args.image or "synthetic",
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "compile": model.compile_mode if getattr(model, "compiled", False) else None,
        "threads": args.threads,
        "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else None,
        "vae_psnr": psnr(round_trip, prepared),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return rows, meta


def format_row(row: dict[str, Any]) -> str:
    inner = "" if row["inner"] is None else f"{row['inner']:.1f}"
    return (
        f"| {row['method']} | {row['guidance']:g} | {row['seconds']:.2f} | {row['calls']} | "
        f"{row['fwd']} | {row['bwd']} | {inner} | {row['psnr_input']:.2f} | "
        f"{row['psnr_vae']:.2f} | {row['latent_error']:.4f} |"
    )


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "| method | w | inversion s | UNet calls | fwd rows | bwd rows | inner/step | "
        "PSNR in (dB) | PSNR vae (dB) | latent err |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(format_row(row) for row in rows),
        "",
        f"VAE round-trip PSNR (bound for PSNR in): {meta['vae_psnr']:.2f} dB.",
    ]
    return "\n".join(lines)


def describe(meta: dict[str, Any]) -> str:
    return (
        f"Model: {meta['model']} (UNet output scale {meta['unet_output_scale']:g}), "
        f"{meta['size']}x{meta['size']} px, {meta['steps']} DDIM steps, guidance "
        f"{meta['guidance']:g}, prompt {meta['prompt']!r}, image: {meta['image']}; "
        f"{meta['gpu'] or meta['device']} {meta['dtype']}, {meta['threads']} thread(s), "
        + (f"compiled ({meta['compile']}), " if meta.get("compile") else "")
        + f"torch {meta['torch']}, Python {meta['python']}."
    )


def _section(marker: str, title: str, stop: str) -> re.Pattern[str]:
    return re.compile(rf"^{marker} {re.escape(title)}[ \t]*\n.*?(?={stop}|\Z)", re.S | re.M)


def write_section(
    path: Path, body: str, title: str = "Inversion", parent: str | None = None
) -> None:
    """Replace (or append) the ``## title`` section of ``path``, nothing else.

    With ``parent``, the section is the ``### title`` subsection of ``## parent`` (added at the
    parent's end if new; the parent is appended to the file if missing).
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if parent is None:
        section = f"## {title}\n\n{body.strip()}\n"
        pattern = _section("##", title, "^## ")
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
        else:
            text = text.rstrip() + "\n\n" + section
    else:
        outer = _section("##", parent, "^## ")
        if not outer.search(text):
            text = text.rstrip() + f"\n\n## {parent}\n"
        match = outer.search(text)
        assert match is not None
        inner, section = match.group(0), f"### {title}\n\n{body.strip()}\n"
        pattern = _section("###", title, "^##")
        if pattern.search(inner):
            inner = pattern.sub(lambda _: section + "\n", inner, count=1)
        else:
            inner = inner.rstrip() + "\n\n" + section + "\n"
        text = (text[: match.start()] + inner + text[match.end() :]).rstrip() + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline folder or hub id (default: tiny)")
    parser.add_argument(
        "--random-sd",
        action="store_true",
        help="random weights in SD 1.x's sizes (512 px): real timings, meaningless quality",
    )
    parser.add_argument("--image", help="photo to invert (default: a synthetic one)")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, help="pixels (default: the model's size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--unet-output-scale",
        type=float,
        help="scale the UNet's output layer (default 0.05 for the tiny model, 1 otherwise)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="auto",
        help="run the UNet under torch.compile (model.compile(MODE); default mode auto)",
    )
    parser.add_argument("--only", nargs="*", help="run only variants whose label has a word")
    parser.add_argument("--write", type=Path, help="write the table into this Markdown file")
    parser.add_argument("--machine", default=platform.machine(), help="machine, for --write")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="for --write")
    args = parser.parse_args(argv)
    rows, meta = run(args)
    body = table(rows, meta)
    print(describe(meta))
    print()
    print(body)
    if args.write:
        write_section(
            args.write,
            f"Measured {args.date} on {args.machine} with `python benchmarks/inversion.py`.\n"
            f"{describe(meta)}\n\n{body}\n",
        )


if __name__ == "__main__":
    main()
