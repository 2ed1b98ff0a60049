"""The suppress-word edit on p2p-framework's tiny offline model (a few seconds on a CPU)."""

import p2p_example_plugin
import pytest
import torch

from p2p_framework import EditSettings, OptionError, run_edit

PROMPTS = ["a cat eating a burger", "a dog eating a burger"]
SETTINGS = EditSettings(steps=4, cross_replace_steps=1.0, self_replace_steps=0.0)


@pytest.fixture
def edits(registry, register_plugin):
    """``edits(suppress_word_options)``: replace, then suppress-word with those options."""
    # The registry fixture has the built-ins only; add this package as its entry point would.
    register_plugin(p2p_example_plugin, name="example", package="p2p-example-plugin")
    return lambda **options: [
        registry.build("edit", "replace"),
        registry.build("edit", "suppress-word", options),
    ]


def test_factor_one_changes_nothing(tiny_model, registry, edits):
    replaced = run_edit(tiny_model, PROMPTS, [registry.build("edit", "replace")], settings=SETTINGS)
    kept = run_edit(tiny_model, PROMPTS, edits(words=["burger"], factor=1.0), settings=SETTINGS)
    assert torch.equal(kept.latents, replaced.latents)


def test_suppressing_a_word_changes_the_target_only(tiny_model, registry, edits):
    replaced = run_edit(tiny_model, PROMPTS, [registry.build("edit", "replace")], settings=SETTINGS)
    suppressed = run_edit(tiny_model, PROMPTS, edits(words=["burger"]), settings=SETTINGS)
    assert torch.equal(suppressed.latents[0], replaced.latents[0])  # the source row
    assert (suppressed.latents[1] - replaced.latents[1]).abs().max() > 1e-4


def test_a_word_of_no_target_is_refused(tiny_model, edits):
    with pytest.raises(OptionError, match="words"):
        run_edit(tiny_model, PROMPTS, edits(words=["tiger"]), settings=SETTINGS)
