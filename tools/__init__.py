"""Developer tools of the p2p-framework repository (not installed with the package).

Run them from the repository root, e.g. ``python -m tools.demo_model.train --help``.
"""
