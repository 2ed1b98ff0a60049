"""Shared pytest fixtures.

``tiny_model_dir``, ``tiny_model``, ``registry`` and ``register_plugin`` come from
:mod:`p2p_framework.testing.fixtures`, the fixtures that plugin packages use too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from p2p_framework import StableDiffusionModel, load_model
from p2p_framework.cpu_threads import THREADS_ENV
from p2p_framework.testing import save_tiny_pipeline

# pytester: tests/test_testing.py runs a test session the way a plugin package would.
pytest_plugins = ["p2p_framework.testing.fixtures", "pytester"]

#: Factor on the tiny UNet's output layer in :func:`load_smooth_model`.
SMOOTH_OUTPUT_SCALE = 0.05


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from threads, and one thread keeps timings and results
    # steady when other processes share the two cores.
    torch.set_num_threads(1)
    # The same for every p2p-run the tests start (CliRunner or subprocess) that does not say
    # --threads: `auto` counts the cores other processes are busy on, which changes while the
    # suite runs (the browser test's server boots beside the first tests), and a run that
    # took 2 threads rounds differently from its rerun that took 1.
    os.environ.setdefault(THREADS_ENV, "1")


@pytest.fixture(autouse=True)
def _one_thread_again() -> Iterator[None]:
    """Back to one thread after each test: a command-line test with ``--threads auto`` sets
    PyTorch's process-wide thread count (2 on an idle machine), which would change the float
    rounding of every later in-process run and break bit-for-bit comparisons by test order."""
    yield
    torch.set_num_threads(1)


def pytest_collection_finish(session: pytest.Session) -> None:
    # A test module may start slow background work before the first test runs, through a
    # start_early(config) function: test_serve_browser.py boots `p2p-run serve` there.
    for module in {getattr(item, "module", None) for item in session.items}:
        start = getattr(module, "start_early", None)
        if callable(start):
            start(session.config)


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random v-prediction (SD 2.x-style) ``StableDiffusionPipeline``."""
    return save_tiny_pipeline(
        tmp_path_factory.mktemp("tiny-sd-vpred"), prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def load_smooth_model() -> Callable[..., StableDiffusionModel]:
    """``load_smooth_model(path, dtype=torch.float32)``: a tiny model whose UNet output layer
    is scaled by 0.05.

    The tiny random UNet is far from smooth in its input, so DDIM's ODE is unstable on it and
    even a guidance-1 reconstruction drifts. Inversion assumes a well-conditioned noise
    predictor; the scaled output layer gives one (the prompt still changes the prediction)
    without changing the code paths under test.
    """

    def load(path: Path, dtype: torch.dtype = torch.float32) -> StableDiffusionModel:
        model = load_model(path, device="cpu", dtype=dtype)
        with torch.no_grad():
            model.unet.conv_out.weight.mul_(SMOOTH_OUTPUT_SCALE)
            model.unet.conv_out.bias.mul_(SMOOTH_OUTPUT_SCALE)
        return model

    return load
