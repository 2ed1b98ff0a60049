"""The plugin registry: built-ins, third-party plugins, broken plugins, entry points."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from p2p_framework import (
    Edit,
    EditRun,
    EditSettings,
    OptionError,
    PluginError,
    PluginRegistry,
    Source,
    SourceStart,
    hookimpl,
    run_edit,
)
from p2p_framework.registry import LOAD_PLUGINS_ENV


def test_builtins_are_listed_with_kind_package_and_options(registry):
    listed = {(p.kind, p.name): p for p in registry.plugins()}
    assert set(listed) >= {
        ("edit", "replace"),
        ("edit", "refine"),
        ("edit", "reweight"),
        ("edit", "local-blend"),
        ("source", "seed"),
    }
    assert all(p.package == "p2p-framework" for p in listed.values())
    blend = listed["edit", "local-blend"]
    assert blend.package == "p2p-framework" and blend.version == importlib.metadata.version(
        "p2p-framework"
    )
    options = {o.name: o for o in blend.options}
    assert options["threshold"].default == 0.3 and options["start_blend"].default == 0.2
    assert options["words"].required and options["words"].help
    assert {o.name: o.default for o in listed["source", "seed"].options} == {"seed": 8888}
    assert {p.kind for p in registry.plugins("source")} == {"source"}
    assert registry.errors == []
    as_dict = blend.as_dict()
    assert as_dict["kind"] == "edit" and as_dict["options"][1]["name"] == "threshold"


def test_unknown_plugin_lists_the_available_ones(registry):
    with pytest.raises(PluginError, match="available: local-blend, refine, replace, reweight"):
        registry.get("edit", "swap")


def test_build_checks_option_names_and_required_options(registry):
    with pytest.raises(OptionError, match=r"^reweight: weight: unknown option; reweight accepts"):
        registry.build("edit", "reweight", {"weight": {"a": 2}})
    with pytest.raises(OptionError, match=r"^local-blend: words: is required"):
        registry.build("edit", "local-blend", {})
    edit = registry.build("edit", "local-blend", {"words": "cat dog", "threshold": 0.5})
    assert edit.words == ["cat", "dog"] and edit.threshold == 0.5


# -- a third-party plugin, registered for one test ---------------------------------------------


@dataclass
class SuppressWord(Edit):
    """Injects the source's attention with one word's attention removed."""

    name = "suppress-word"

    word: str = field(default="burger", metadata={"help": "word to suppress"})

    def bind(self, run):
        positions = [
            run.word_positions(i, self.word, plugin=self.name, option="word")
            for i in range(1, len(run.prompts))
        ]
        return SuppressWordRun(positions)


class SuppressWordRun(EditRun):
    def __init__(self, positions):
        self.positions = positions

    def cross_attention(self, injected, targets, layer, step):
        injected = injected.clone()
        for target, positions in enumerate(self.positions):
            injected[target, ..., positions] = 0
        return injected


class ThirdPartyPlugin:
    @hookimpl
    def register_edits(self, register):
        register(SuppressWord)


def test_third_party_plugin_registered_and_used(registry, tiny_model):
    name = registry.add(ThirdPartyPlugin(), name="example", package="example-pkg", version="1.2")
    try:
        info = registry.get("edit", "suppress-word")
        assert (info.plugin, info.package, info.version) == ("example", "example-pkg", "1.2")
        edit = registry.build("edit", "suppress-word", {"word": "burger"})
        prompts = ["a cat eating a burger", "a cat eating a burger"]
        settings = EditSettings(steps=4, cross_replace_steps=1.0, self_replace_steps=0.0)
        edited = run_edit(tiny_model, prompts, [edit], settings=settings)
        replaced = run_edit(
            tiny_model, prompts, [registry.build("edit", "replace")], settings=settings
        )
        assert torch.equal(edited.latents[0], replaced.latents[0])
        assert (edited.latents[1] - replaced.latents[1]).abs().max() > 1e-4
    finally:
        registry.remove(name)
    with pytest.raises(PluginError, match="unknown edit plugin 'suppress-word'"):
        registry.get("edit", "suppress-word")


@dataclass
class FixedLatent(Source):
    """Start from a given latent (here: scaled noise from a seed)."""

    name = "fixed-latent"

    seed: int = 3
    scale: float = 0.5

    def prepare(self, request):
        generator = torch.Generator().manual_seed(self.seed)
        latent = torch.randn(request.latent_shape, generator=generator) * self.scale
        return SourceStart(latent=latent, info={"scale": self.scale})


class SourcePlugin:
    @hookimpl
    def register_sources(self, register):
        register(FixedLatent)


def test_third_party_source_registered_and_used(registry, tiny_model, tiny_model_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    registry.add(SourcePlugin(), name="fixed")
    source = registry.build("source", "fixed-latent", {"scale": 0.7})
    prompt = "a cat on a mountain"
    result = run_edit(tiny_model, [prompt], source=source, settings=EditSettings(steps=4))
    assert result.source_info == {"scale": 0.7}

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.7
    expected = pipe(prompt, num_inference_steps=4, latents=latent, output_type="latent").images
    torch.testing.assert_close(result.latents, expected, atol=1e-5, rtol=1e-4)


def test_broken_plugin_is_reported_and_the_rest_work(registry):
    class Broken:
        @hookimpl
        def register_edits(self, register):
            raise RuntimeError("boom")

    class NotADataclass:
        @hookimpl
        def register_edits(self, register):
            class Plain(Edit):
                name = "plain"

            register(Plain)
            register(SuppressWord, name="Bad Name")

    registry.add(Broken(), name="broken")
    registry.add(NotADataclass(), name="sloppy")
    messages = [str(error) for error in registry.errors]
    assert "plugin 'broken': register_edits failed: RuntimeError: boom" in messages
    assert any("'sloppy'" in m and "Plain must be a dataclass" in m for m in messages)
    assert any("'sloppy'" in m and "bad edit name 'Bad Name'" in m for m in messages)
    assert registry.get("edit", "replace").name == "replace"


def test_name_collision_keeps_the_first(registry):
    class Clash:
        @hookimpl
        def register_edits(self, register):
            register(SuppressWord, name="replace")

    registry.add(Clash(), name="clash")
    assert registry.get("edit", "replace").plugin == "p2p_framework.plugins.replace"
    assert any("already registered by plugin" in str(e) for e in registry.errors)


def test_misspelled_hook_implementation_is_caught(registry):
    class Misspelled:
        @hookimpl
        def register_edit(self, register):  # missing "s"
            pass

    with pytest.raises(PluginError, match="plugin 'typo'.*register_edit"):
        registry.add(Misspelled(), name="typo")
    assert registry.get("edit", "refine")  # the registry still works

    class WrongArgument:
        @hookimpl
        def register_edits(self, registrar):
            pass

    with pytest.raises(PluginError, match="plugin 'wrong-arg'"):
        registry.add(WrongArgument(), name="wrong-arg")


# -- entry points --------------------------------------------------------------------------------


@pytest.fixture
def fake_entry_points(monkeypatch):
    good = types.ModuleType("p2p_fake_good_plugin")
    good.register_edits = hookimpl(lambda register: register(SuppressWord))
    monkeypatch.setitem(sys.modules, "p2p_fake_good_plugin", good)
    typo = types.ModuleType("p2p_fake_typo_plugin")
    typo.register_sourcez = hookimpl(lambda register: None)
    monkeypatch.setitem(sys.modules, "p2p_fake_typo_plugin", typo)
    points = [
        importlib.metadata.EntryPoint("good", "p2p_fake_good_plugin", "p2p_framework"),
        importlib.metadata.EntryPoint("missing", "p2p_no_such_module_xyz", "p2p_framework"),
        importlib.metadata.EntryPoint("typo", "p2p_fake_typo_plugin", "p2p_framework"),
    ]
    real = importlib.metadata.entry_points

    def entry_points(**params):
        if params.get("group") == "p2p_framework":
            return points
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)


def test_entry_points_load_and_broken_ones_are_reported(fake_entry_points):
    registry = PluginRegistry()
    assert registry.get("edit", "suppress-word").plugin == "good"
    messages = {error.plugin: error.message for error in registry.errors}
    assert messages["missing"].startswith("failed to import: ModuleNotFoundError")
    assert "register_sourcez" in messages["typo"]
    assert registry.get("edit", "replace")


def test_environment_variable_narrows_or_disables_entry_points(fake_entry_points, monkeypatch):
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "")
    registry = PluginRegistry()
    builtins = PluginRegistry(entry_points=False).plugins()
    assert registry.errors == [] and len(registry.plugins()) == len(builtins)
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "good")
    registry = PluginRegistry()
    assert registry.errors == [] and registry.get("edit", "suppress-word")
