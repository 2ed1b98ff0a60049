"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p_framework.tiny_models import save_tiny_pipeline


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
