"""Embedded demo domain and model: procedural coloured-shape scenes.

* :mod:`p2p_framework.demo.shapes` samples and renders scenes of one or two coloured shapes on
  a plain, striped or dotted background, with exact ground truth and a caption;
* :mod:`p2p_framework.demo.scoring` finds objects in an image by colour and classifies their
  shape (used to measure Prompt-to-Prompt edits on the demo model);
* :mod:`p2p_framework.demo.edit_quality` defines and runs those measurements (edit success,
  structure and background preservation, against the naive baseline; inversion of renders),
  for ``benchmarks/edit_quality.py`` and ``tests/test_demo_quality.py``;
* :mod:`p2p_framework.demo.train` trains a small Stable-Diffusion-shaped model on the domain
  and saves it as a standard diffusers ``StableDiffusionPipeline`` folder.

The trained demo model ships in the package (:data:`DEMO_MODEL_DIR`, float16 safetensors) and
is ``p2p-run``'s default model; it loads through the same ``from_pretrained`` path as any
model folder.
"""

from pathlib import Path

#: Folder of the shipped demo model (a diffusers ``StableDiffusionPipeline`` folder).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "weights"
