"""Embedded demo domain and model: procedural coloured-shape scenes.

* :mod:`p2p_framework.demo.shapes` samples and renders scenes of one or two coloured shapes on
  a plain, striped or dotted background, with exact ground truth and a caption (used by the
  tests, the benchmarks and the trainer to make scenes and photos to invert).

The trained demo model ships in the package (:data:`DEMO_MODEL_DIR`, float16 safetensors) and
is ``p2p-run``'s default model; it loads through the same ``from_pretrained`` path as any
model folder. The trainer and the edit-quality measurements are developer tools outside the
installed package, in ``tools/demo_model/`` of the repository (``python -m
tools.demo_model.train --help`` from its root).
"""

from pathlib import Path

#: Folder of the shipped demo model (a diffusers ``StableDiffusionPipeline`` folder).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "weights"
