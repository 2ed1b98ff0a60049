"""Training and evaluation of the shipped demo model (developer tools, not installed).

* :mod:`tools.demo_model.train` trains the small Stable-Diffusion-shaped demo model on the
  procedural scenes of :mod:`p2p_framework.demo.shapes` and saves it as a diffusers
  ``StableDiffusionPipeline`` folder: ``python -m tools.demo_model.train --help`` from the
  repository root;
* :mod:`tools.demo_model.scoring` finds objects in an image by colour and classifies their
  shape (used to measure Prompt-to-Prompt edits on the demo model);
* :mod:`tools.demo_model.edit_quality` defines and runs those measurements (edit success,
  structure and background preservation, against the naive baseline; inversion of renders),
  for ``benchmarks/edit_quality.py`` and ``tests/test_demo_quality.py``.

They live outside the installed package because nothing at run time needs them: ``p2p-run``
only loads the trained weights (:data:`p2p_framework.demo.DEMO_MODEL_DIR`).
"""
