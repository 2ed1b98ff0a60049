"""Offline models and helpers for testing plugins: ``p2p_framework.testing``.

A public API for plugin authors and for p2p-framework's own tests and benchmarks. Nothing in
the runtime path (``p2p_framework``, its CLI, built-in plugins or inversion) imports it.

* :func:`save_tiny_pipeline` writes a tiny random Stable-Diffusion-shaped
  ``StableDiffusionPipeline`` folder (SD 1.x block layout, 128 px images by default) fully
  offline, in about a second; :func:`build_clip_tokenizer` writes the small CLIP tokenizer it
  uses, in which every word of :data:`DEFAULT_WORDS` (or of your own list) is one token.
  :func:`save_tiny_sdxl_pipeline` writes a tiny ``StableDiffusionXLPipeline`` folder the
  same way (two tokenizers and text encoders, SDXL's UNet layout and added conditioning).
* :func:`build_random_model` builds Stable Diffusion 1.5 / 2.1 (or narrow variants) from their
  published configs with random weights, for timing and memory only
  (:mod:`p2p_framework.testing.random_models`).
* :func:`plugin_registered` registers a plugin object in a registry for the duration of a
  ``with`` block.
* :mod:`p2p_framework.testing.fixtures` is a pytest plugin with the fixtures ``tiny_model_dir``,
  ``tiny_model``, ``registry`` and ``register_plugin``; a plugin package enables it in its
  ``conftest.py`` with ``pytest_plugins = ["p2p_framework.testing.fixtures"]``. It is not
  imported here, so this package works without pytest installed.

The weights are random: images are meaningless but deterministic for a seed and they depend on
the prompt, which is what tests of attention edits need.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..registry import PluginRegistry
from .random_models import (
    ARCHITECTURES,
    CLIP_VOCAB_SIZE,
    Architecture,
    architecture,
    build_random_model,
    build_text_encoder,
    build_unet,
    build_vae,
    diffusers_pipeline,
    narrow,
    parameter_counts,
)
from .tiny_models import (
    BOS_TOKEN,
    CROSS_ATTENTION_OUT_GAIN,
    CROSS_ATTENTION_QK_GAIN,
    DEFAULT_WORDS,
    END_OF_WORD,
    EOS_TOKEN,
    TEXT_HIDDEN_SIZE,
    UNET_ATTENTION_HEADS,
    UNET_BLOCK_OUT_CHANNELS,
    VAE_BLOCK_OUT_CHANNELS,
    build_clip_tokenizer,
    bytes_to_unicode,
    prefix_text_encoder_keys,
    save_tiny_pipeline,
    save_tiny_sdxl_pipeline,
)

__all__ = [
    "ARCHITECTURES",
    "BOS_TOKEN",
    "CLIP_VOCAB_SIZE",
    "CROSS_ATTENTION_OUT_GAIN",
    "CROSS_ATTENTION_QK_GAIN",
    "DEFAULT_WORDS",
    "END_OF_WORD",
    "EOS_TOKEN",
    "TEXT_HIDDEN_SIZE",
    "UNET_ATTENTION_HEADS",
    "UNET_BLOCK_OUT_CHANNELS",
    "VAE_BLOCK_OUT_CHANNELS",
    "Architecture",
    "architecture",
    "build_clip_tokenizer",
    "build_random_model",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "bytes_to_unicode",
    "diffusers_pipeline",
    "narrow",
    "parameter_counts",
    "plugin_registered",
    "prefix_text_encoder_keys",
    "save_tiny_pipeline",
    "save_tiny_sdxl_pipeline",
]


@contextmanager
def plugin_registered(
    registry: PluginRegistry,
    plugin: object,
    *,
    name: str | None = None,
    package: str = "unknown",
    version: str = "unknown",
) -> Iterator[str]:
    """Register ``plugin`` (a module or object with ``@hookimpl`` functions) in ``registry``
    inside a ``with`` block, and remove it on leaving the block, even on an error.

    Args:
        registry: the registry to add it to (e.g. ``PluginRegistry(entry_points=False)``).
        plugin: what an entry point of the ``p2p_framework`` group would name.
        name, package, version: as for :meth:`PluginRegistry.add`; ``package`` and ``version``
            show in listings and run records.

    Yields:
        the plugin's name in the registry.

    Raises:
        PluginError: the name is taken, or a hook implementation matches no hook
            (a misspelled hook name or argument), as :meth:`PluginRegistry.add` does.
    """
    registered = registry.add(plugin, name=name, package=package, version=version)
    try:
        yield registered
    finally:
        registry.remove(registered)
