"""pytest fixtures for testing p2p-framework plugins, offline and on the CPU.

Enable them in your package's top-level ``conftest.py``::

    pytest_plugins = ["p2p_framework.testing.fixtures"]

then ask for them by name::

    def test_suppress_word(tiny_model, registry, register_plugin):
        register_plugin(my_plugin_module, name="mine")
        edit = registry.build("edit", "suppress-word", {"word": "cat"})
        ...

Fixtures:

* ``tiny_model_dir`` (session): :class:`~pathlib.Path` of a tiny random SD 1.x-shaped
  ``StableDiffusionPipeline`` folder built by
  :func:`~p2p_framework.testing.save_tiny_pipeline` (128 px images, epsilon prediction).
* ``tiny_model`` (session): that folder loaded with
  ``p2p_framework.load_model(tiny_model_dir, device="cpu", dtype="float32")``. It is shared by
  every test of the session: do not change its modules (load your own copy from
  ``tiny_model_dir`` if a test must).
* ``tiny_sdxl_model_dir`` / ``tiny_sdxl_model`` (session): the same for a tiny
  ``StableDiffusionXLPipeline`` (:func:`~p2p_framework.testing.save_tiny_sdxl_pipeline`):
  two text encoders, SDXL's UNet layout and added conditioning, 128 px images.
* ``registry`` (function): a private ``PluginRegistry(entry_points=False)``: the built-in
  plugins only, whatever is installed, new for each test.
* ``register_plugin`` (function): ``register_plugin(plugin, *, name=None, package="unknown",
  version="unknown") -> str`` adds a plugin module or object to that test's ``registry`` (as
  an entry point would) and removes it when the test ends; it raises ``PluginError`` for a
  misspelled hook, as loading through an entry point would report.

The fixtures need ``pytest``; :mod:`p2p_framework.testing` itself does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from ..model import StableDiffusionModel, load_model
from ..registry import PluginRegistry
from . import plugin_registered, save_tiny_pipeline, save_tiny_sdxl_pipeline

__all__ = [
    "register_plugin",
    "registry",
    "tiny_model",
    "tiny_model_dir",
    "tiny_sdxl_model",
    "tiny_sdxl_model_dir",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random epsilon-prediction (SD 1.x-shaped) ``StableDiffusionPipeline``."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-epsilon"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> StableDiffusionModel:
    """The tiny epsilon model, loaded once through ``load_model`` on the CPU in float32."""
    return load_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random ``StableDiffusionXLPipeline`` (128 px images)."""
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tiny_sdxl_model_dir: Path) -> StableDiffusionModel:
    """The tiny SDXL model, loaded once through ``load_model`` on the CPU in float32 (an
    :class:`~p2p_framework.model_sdxl.StableDiffusionXLModel`); shared, do not change it."""
    return load_model(tiny_sdxl_model_dir, device="cpu", dtype="float32")


@pytest.fixture
def registry() -> PluginRegistry:
    """A registry of the built-in plugins only (no entry points), private to one test."""
    return PluginRegistry(entry_points=False)


@pytest.fixture
def register_plugin(registry: PluginRegistry) -> Iterator[Callable[..., str]]:
    """``register_plugin(plugin, *, name=None, package="unknown", version="unknown") -> str``:
    add ``plugin`` to this test's ``registry`` until the test ends; returns its name there."""
    with ExitStack() as stack:

        def register(
            plugin: object,
            *,
            name: str | None = None,
            package: str = "unknown",
            version: str = "unknown",
        ) -> str:
            return stack.enter_context(
                plugin_registered(registry, plugin, name=name, package=package, version=version)
            )

        yield register
