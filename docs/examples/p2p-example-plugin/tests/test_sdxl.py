"""This package's edits and inversion on Stable Diffusion XL, through the same public API: a
plugin written against SD 1.x runs on the tiny offline SDXL of p2p_framework.testing as is."""

import p2p_example_plugin
import pytest
import torch

from p2p_framework import EditSettings, run_edit

PROMPTS = ["a cat eating a burger", "a dog eating a burger"]
SETTINGS = EditSettings(steps=4, cross_replace_steps=1.0, self_replace_steps=0.0)


@pytest.fixture
def registry_with_package(registry, register_plugin):
    register_plugin(p2p_example_plugin, name="example", package="p2p-example-plugin")
    return registry


def test_suppress_word_changes_the_sdxl_target_only(tiny_sdxl_model, registry_with_package):
    build = registry_with_package.build
    replaced = run_edit(tiny_sdxl_model, PROMPTS, [build("edit", "replace")], settings=SETTINGS)
    edits = [build("edit", "replace"), build("edit", "suppress-word", {"words": ["burger"]})]
    suppressed = run_edit(tiny_sdxl_model, PROMPTS, edits, settings=SETTINGS)
    assert torch.equal(suppressed.latents[0], replaced.latents[0])  # the source row
    assert (suppressed.latents[1] - replaced.latents[1]).abs().max() > 1e-4


def test_masactrl_on_sdxl_blocks(tiny_sdxl_model, registry_with_package):
    # start_layer counts transformer blocks in forward order: SDXL has several per module.
    masactrl = registry_with_package.build("edit", "masactrl", {"start_step": 0, "start_layer": 0})
    plain = run_edit(tiny_sdxl_model, PROMPTS[1:], settings=SETTINGS)
    edited = run_edit(tiny_sdxl_model, PROMPTS, [masactrl], settings=SETTINGS)
    source = run_edit(tiny_sdxl_model, PROMPTS[:1], settings=SETTINGS)
    torch.testing.assert_close(edited.latents[:1], source.latents, atol=1e-4, rtol=0)
    assert (edited.latents[1] - plain.latents[0]).abs().max() > 1e-3
