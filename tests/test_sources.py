"""The source protocol: the per-step StepGuide and invertible sources of third parties.

A source hands the denoising loop one :class:`~p2p_framework.StepGuide`; the built-in
inversions use its public subclasses. A third-party :class:`InvertingSource` registered
through the registry works with ``invert()``, ``p2p-run invert``, ``.p2pinv`` files,
``p2p-run edit --inversion`` and the cache, like the built-ins.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pydantic import Field

from p2p_framework import (
    Edit,
    EditRun,
    EditSettings,
    OptionError,
    PluginRegistry,
    RunContext,
    Source,
    SourceRequest,
    SourceStart,
    StepGuide,
    UncondEmbeddingGuide,
    hookimpl,
    run_edit,
)
from p2p_framework.cli import cli
from p2p_framework.inversion import (
    Inversion,
    InversionContext,
    InversionOutput,
    InvertingSource,
    invert,
    invertible_sources,
)
from p2p_framework.plugins.seed import Seed

PROMPTS = ["a photo of a cat", "a photo of a dog"]
STEPS = 4
FAST = ["--steps", str(STEPS), "--device", "cpu", "--dtype", "float32"]


class Recorder(StepGuide):
    """Records what the loop asks and gives."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def uncond_embedding(self, step: int) -> torch.Tensor | None:
        self.calls.append(("uncond", step))
        return None

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        self.calls.append(("guide", step, tuple(latents.shape)))
        return latents


@dataclass
class Recorded(Source):
    """Seed 8888's latent with a recording guide."""

    name = "recorded"
    calls: Any = field(default_factory=list)

    def prepare(self, request: SourceRequest) -> SourceStart:
        start = Seed().prepare(request)
        return SourceStart(start.latent, guide=Recorder(self.calls), info=start.info)


class LogRun(EditRun):
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        self.calls.append(("edit", step))
        return latents


@dataclass
class Log(Edit):
    """Records the order of after_step calls."""

    name = "log"
    calls: Any = field(default_factory=list)

    def bind(self, run: RunContext) -> EditRun:
        return LogRun(self.calls)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_the_loop_asks_the_guide_every_step_in_order(tiny_model, guidance: float) -> None:
    calls: list = []
    settings = EditSettings(steps=STEPS, guidance=guidance)
    run_edit(
        tiny_model, PROMPTS, [Log(calls=calls)], source=Recorded(calls=calls), settings=settings
    )
    shape = (2, 4, 16, 16)
    expected = []
    for step in range(STEPS):
        if guidance > 1:  # the unconditional text is asked only with guidance on
            expected.append(("uncond", step))
        expected += [("guide", step, shape), ("edit", step)]
    assert calls == expected


@dataclass
class Guided(Source):
    """Seed 8888's latent with a given guide."""

    name = "guided"
    guide: Any = None

    def prepare(self, request: SourceRequest) -> SourceStart:
        start = Seed().prepare(request)
        return SourceStart(start.latent, guide=self.guide, info=start.info)


def test_an_empty_text_guide_is_bit_identical_to_none(tiny_model) -> None:
    settings = EditSettings(steps=STEPS)
    plain = run_edit(tiny_model, PROMPTS, source=Guided(guide=None), settings=settings)
    base = run_edit(tiny_model, PROMPTS, source=Guided(guide=StepGuide()), settings=settings)
    empty = tiny_model.encode_text([""])
    same = UncondEmbeddingGuide(empty.expand(STEPS, -1, -1))
    explicit = run_edit(tiny_model, PROMPTS, source=Guided(guide=same), settings=settings)
    assert torch.equal(plain.latents, base.latents)
    assert torch.equal(plain.latents, explicit.latents)
    other = UncondEmbeddingGuide(tiny_model.encode_text([PROMPTS[0]]).expand(STEPS, -1, -1))
    changed = run_edit(tiny_model, PROMPTS, source=Guided(guide=other), settings=settings)
    assert not torch.equal(plain.latents, changed.latents)


# --------------------------------------------------------------------------- third-party inversion


@dataclass
class HalfwaySource(InvertingSource):
    """A third party's inversion: DDIM, the source row pulled halfway to it after each step."""

    name = "halfway"
    guidance_specific = False

    pull: Annotated[float, Field(ge=0, le=1)] = field(
        default=0.5, metadata={"help": "how far the source row is pulled (0..1)"}
    )

    def invert_latents(self, ctx: InversionContext) -> InversionOutput:
        latents = ctx.ddim_inversion()
        after = torch.cat([latents[ctx.num_steps - 1 - i] for i in range(ctx.num_steps)])
        return InversionOutput(latent=latents[-1], source_latents=after, steps=[{"n": 1}] * 4)

    def guide(self, inversion: Inversion) -> StepGuide | None:
        pull, targets = self.pull, inversion.source_latents

        class Pull(StepGuide):
            def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
                target = targets[step : step + 1].to(latents)
                latents[:1] = latents[:1] + pull * (target - latents[:1])
                return latents

        return Pull()


@pytest.fixture
def third_party(tmp_path: Path) -> PluginRegistry:
    registry = PluginRegistry(entry_points=False)
    module = types.SimpleNamespace(
        register_sources=hookimpl(lambda register: register(HalfwaySource))
    )
    registry.add(module, name="halfway-plugin")
    return registry


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    yy, xx = np.mgrid[0:128, 0:128]
    pixels = np.stack([2 * xx, 2 * yy, 60 + 180 * ((xx - 64) ** 2 < 900)], -1).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_third_party_inversion_everywhere(
    third_party: PluginRegistry, tiny_model_dir: Path, tiny_model, photo: Path, tmp_path: Path
) -> None:
    assert "halfway" in invertible_sources(third_party)
    assert "seed" not in invertible_sources(third_party)
    # Python API, by name, options validated like any plugin's.
    inversion = invert(
        tiny_model, photo, PROMPTS[0], "halfway", num_steps=STEPS, registry=third_party
    )
    assert inversion.method == "halfway" and inversion.options == {"pull": 0.5}
    with pytest.raises(OptionError, match="halfway: pull: .*less than or equal to 1"):
        invert(tiny_model, photo, PROMPTS[0], "halfway", pull=2, registry=third_party)
    with pytest.raises(OptionError, match="cannot invert .*'seed'.*halfway"):
        invert(tiny_model, photo, PROMPTS[0], "seed", registry=third_party)
    with pytest.raises(OptionError, match="unknown method 'nope'.*ddim, direct, halfway"):
        invert(tiny_model, photo, PROMPTS[0], "nope", registry=third_party)

    # The command line: invert, then edit the file with the source that made it.
    runner = CliRunner()
    saved = tmp_path / "photo.p2pinv"
    args = ["invert", "--model", tiny_model_dir, "--image", photo, "--prompt", PROMPTS[0]]
    args += ["--method", "halfway", "--set", "halfway.pull=0.25", "--out", saved, *FAST]
    result = runner.invoke(cli, [str(a) for a in args], obj=third_party)
    assert result.exit_code == 0, result.output
    loaded = Inversion.load(saved)
    assert loaded.method == "halfway" and loaded.options == {"pull": 0.25}
    args = ["edit", "--model", tiny_model_dir, "--prompt", PROMPTS[0], "--target", PROMPTS[1]]
    args += ["--inversion", saved, "--out", tmp_path / "edit", "--json", "-q", *FAST]
    result = runner.invoke(cli, [str(a) for a in args], obj=third_party)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["source"]["name"] == "halfway"
    assert record["source_info"]["inversion"]["cache"] == "file"
    # An unknown method on the command line lists the invertible sources.
    args = ["invert", "--model", tiny_model_dir, "--image", photo, "--prompt", PROMPTS[0]]
    result = runner.invoke(cli, [str(a) for a in [*args, "--method", "magic"]], obj=third_party)
    assert result.exit_code != 0 and "halfway" in result.output

    # In a run: its guide is used, and the cache keys its name and options.
    def run(**options):
        options = {"image": str(photo), "cache_dir": str(tmp_path / "cache"), **options}
        source = third_party.build("source", "halfway", options)
        return run_edit(tiny_model, PROMPTS, source=source, settings=EditSettings(steps=STEPS))

    full = run(pull=1.0)
    torch.testing.assert_close(full.latents[:1], loaded.image_latent, atol=1e-6, rtol=0)
    assert full.source_info["inversion"]["cache"] == "miss"
    assert run(pull=1.0).source_info["inversion"]["cache"] == "hit"
    half = run(pull=0.5)
    assert half.source_info["inversion"]["cache"] == "miss"
    assert not torch.equal(half.latents[:1], full.latents[:1])
    assert half.source_info["inversion"]["n"] == [1] * 4  # per-step statistics, by key
