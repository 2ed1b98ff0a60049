"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from p2p_framework import PluginRegistry, StableDiffusionModel, load_model
from p2p_framework.tiny_models import save_tiny_pipeline

#: Factor on the tiny UNet's output layer in :func:`load_smooth_model`.
SMOOTH_OUTPUT_SCALE = 0.05


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from threads, and one thread keeps timings and results
    # steady when other processes share the two cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random epsilon-prediction (SD 1.x-shaped) ``StableDiffusionPipeline``."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-epsilon"))


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random v-prediction (SD 2.x-style) ``StableDiffusionPipeline``."""
    return save_tiny_pipeline(
        tmp_path_factory.mktemp("tiny-sd-vpred"), prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> StableDiffusionModel:
    """The tiny epsilon model, loaded once through ``load_model`` on the CPU in float32."""
    return load_model(tiny_model_dir, device="cpu", dtype="float32")


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


@pytest.fixture
def registry() -> PluginRegistry:
    """A registry of the built-in plugins only (no entry points), private to one test."""
    return PluginRegistry(entry_points=False)
