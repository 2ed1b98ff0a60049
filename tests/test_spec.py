"""The typed run description: schedules as value objects, ``RunSpec`` and its JSON round trip,
the job vocabulary (shortcuts declared by plugins), and option errors on every path."""

from __future__ import annotations

import json
import random
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pytest
from click.testing import CliRunner
from pydantic import Field

from p2p_framework import Edit, EditSettings, OptionError, PluginRegistry, hookimpl
from p2p_framework.cli import cli
from p2p_framework.outputs import json_ready
from p2p_framework.pipeline_file import load_pipeline, pipeline_job_spec
from p2p_framework.schedules import CrossReplace, StepWindow
from p2p_framework.spec import SHORTCUTS, JobError, RunSpec, job_keys, spec_from_job

DATA = Path(__file__).parent / "data"
#: run.json written by the code before the schedules were value objects (commit 70227f5):
#: ``cross_replace_steps`` is ``{"default_": 1.0, "lion": [0.1, 0.4]}``.
OLD_RECORD = DATA / "run-default_-key.json"
FAST = ["--steps", "3", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32"]

# ------------------------------------------------------------------------ schedules


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.8", CrossReplace(0.8)),
        (0.8, CrossReplace(StepWindow(0.0, 0.8))),
        (1, CrossReplace(1.0)),
        ("0.2:0.8", CrossReplace((0.2, 0.8))),
        ([0.2, 0.8], CrossReplace((0.2, 0.8))),
        ("[0.2, 0.8]", CrossReplace((0.2, 0.8))),
        ("default=1.0,lion=0.4", CrossReplace(1.0, {"lion": 0.4})),
        ("lion=0.1:0.4", CrossReplace(1.0, {"lion": (0.1, 0.4)})),
        ({"default": 1, "lion": "0:0.4"}, CrossReplace(1.0, {"lion": 0.4})),
        ({"default_": 0.5}, CrossReplace(0.5)),  # the key of run.json files written before
        ('{"default": [0.1, 0.9], "lion": 0.4}', CrossReplace((0.1, 0.9), {"lion": 0.4})),
    ],
)
def test_cross_replace_reads_every_form(value, expected):
    assert CrossReplace.parse(value) == expected
    assert EditSettings(cross_replace_steps=value).cross_replace_steps == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("often", "expected a fraction such as 0.8 or a range a:b, got 'often'"),
        ("1.5", "fractions must lie in [0, 1]"),
        ("0.8:0.2", "start 0.8 is after end 0.2"),
        ("lion", "expected a fraction"),
        ("=0.3", "expected word=fraction pairs"),
        ("lion=x", "cross_replace_steps['lion']: expected a fraction"),
        ("{bad", "bad JSON"),
        (True, "expected a fraction or a pair, got True"),
        ([0.1, 0.2, 0.3], "expected a fraction or a pair"),
    ],
)
def test_bad_cross_replace_values_name_the_setting(value, message):
    with pytest.raises(OptionError, match=r"^pipeline: cross_replace_steps") as caught:
        CrossReplace.parse(value)
    assert message in str(caught.value)


def _random_window(rng: random.Random) -> StepWindow:
    a, b = sorted(round(rng.random(), rng.choice([1, 2, 3])) for _ in range(2))
    return StepWindow(a, b) if rng.random() < 0.6 else StepWindow(0.0, b)


def _text(window: StepWindow) -> str:
    return f"{window.end!r}" if window.start == 0 else f"{window.start!r}:{window.end!r}"


def random_schedules(count: int, seed: int = 0) -> list[CrossReplace]:
    rng = random.Random(seed)
    words = ["lion", "cat", "burger", "tiger"]
    return [
        CrossReplace(
            _random_window(rng),
            {w: _random_window(rng) for w in rng.sample(words, rng.randint(0, 3))},
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("schedule", random_schedules(60))
def test_cross_replace_round_trips_through_text_and_json(schedule):
    # text -> object -> json -> object: equal, and the table is the same
    text = ",".join(
        [f"default={_text(schedule.default)}"]
        + [f"{w}={_text(v)}" for w, v in schedule.words.items()]
    )
    parsed = (
        CrossReplace.parse(text) if schedule.words else CrossReplace.parse(_text(schedule.default))
    )
    assert parsed == schedule
    stored = json.loads(json.dumps(parsed.to_json()))
    assert CrossReplace.parse(stored) == schedule
    assert "default_" not in json.dumps(stored)


def test_table_is_the_reference_arithmetic(tiny_model_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    prompts = ["a painting of a squirrel", "a painting of a lion", "a painting of a cat"]
    rows = 11
    table = CrossReplace((0.1, 0.9), {"lion": (0.2, 0.5)}).table(prompts, rows - 1, tokenizer)
    # int(a * (T + 1)) <= t < int(b * (T + 1)) is on
    assert table[:, 1, 0].tolist() == [0] + [1] * 8 + [0, 0]
    assert table[:, 0, 5].tolist() == [0, 0, 1, 1, 1] + [0] * 6
    assert StepWindow(0.2, 0.6).steps(10) == (2, 6) and StepWindow(0, 0.8).steps(4) == (0, 3)


def test_step_window_values_and_errors():
    assert StepWindow.parse("0.2:0.6") == StepWindow.parse([0.2, 0.6]) == StepWindow(0.2, 0.6)
    assert StepWindow.parse(0.4).to_json() == 0.4 and StepWindow(0.2, 0.6).to_json() == [0.2, 0.6]
    for bad in ("-0.1", "1:0", "x", [0.1], float("nan")):
        with pytest.raises(OptionError, match="^pipeline: self_replace_steps: "):
            EditSettings(self_replace_steps=bad)


# ------------------------------------------------------------------------ RunSpec


SETTINGS_SHAPES = [
    {},
    {"cross_replace_steps": {"default": 1.0, "lion": (0.1, 0.4)}},
    {"cross_replace_steps": (0.2, 0.8), "self_replace_steps": (0.1, 0.5)},
    {"cross_replace_steps": {"lion": 0.3}, "height": None, "width": None},
    {"height": 64, "width": 128, "guidance": 1.0, "steps": 7, "scheduler": "euler"},
    {"attention_maps": True, "attention_downscale": 2, "self_replace_min_downscale": 8},
    {"separate_uncond_pass": True, "self_replace_steps": 0.0, "cross_replace_steps": 1},
]


@pytest.mark.parametrize("shape", SETTINGS_SHAPES)
def test_run_spec_round_trips_through_run_json(registry, shape):
    spec = spec_from_job(
        {
            "prompt": "a painting of a squirrel eating a burger",
            "targets": ["a painting of a lion eating a burger"],
            "blend": "squirrel lion",
            "reweight": {"lion": [2, 3]},
            "seed": 3,
            "set": {"local-blend": {"threshold": 0.5}},
            "model": "some/model",
            "device": "cpu",
        },
        registry,
    )
    spec.settings = EditSettings(**shape)
    stored = json.loads(json.dumps(spec.to_json(registry)))
    again = RunSpec.from_json(stored, registry)
    assert again == spec
    assert again.settings == spec.settings and again.edits == spec.edits
    assert "default_" not in json.dumps(stored)


def test_old_run_json_with_default_key_is_read(registry):
    record = json.loads(OLD_RECORD.read_text())
    assert record["format"] == "p2p-framework/run@1"
    assert record["settings"]["cross_replace_steps"]["default_"] == 1.0
    spec = RunSpec.from_json(record, registry)
    assert spec.settings.cross_replace_steps == CrossReplace(1.0, {"lion": (0.1, 0.4)})
    assert spec.settings.self_replace_steps == StepWindow(0.2, 0.6)
    assert [type(e).name for e in spec.edits] == ["replace", "reweight", "local-blend"]
    assert spec.source.seed == 7 and spec.model == "/tmp/rd/tiny"
    assert spec.to_json(registry)["settings"]["cross_replace_steps"] == {
        "default": 1.0,
        "lion": [0.1, 0.4],
    }


def test_old_run_json_reruns_as_the_same_command_does(registry, tiny_model_dir, tmp_path):
    """A run.json written before (``"default_"``) reruns, and gives the images the same
    command gives today, byte for byte."""
    record = json.loads(OLD_RECORD.read_text())
    record["model"]["model"] = str(tiny_model_dir)
    record["model"].pop("folder_hash")
    (tmp_path / "run.json").write_text(json.dumps(record))
    runner = CliRunner()
    result = runner.invoke(
        cli, ["rerun", str(tmp_path), "--out", str(tmp_path / "a")], obj=registry
    )
    assert result.exit_code == 0, result.output
    args = [
        "edit", "--model", str(tiny_model_dir), "--out", str(tmp_path / "b"), "--seed", "7",
        "--prompt", record["prompts"][0], "--target", record["prompts"][1],
        "--cross-replace", "default=1.0,lion=0.1:0.4", "--self-replace", "0.2:0.6",
        "--blend", "squirrel lion", "--reweight", "lion=2", *FAST,
    ]  # fmt: skip
    result = runner.invoke(cli, args, obj=registry)
    assert result.exit_code == 0, result.output
    for name in ("source.png", "target-1.png", "grid.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    new = json.loads((tmp_path / "a" / "run.json").read_text())
    assert new["settings"]["cross_replace_steps"] == {"default": 1.0, "lion": [0.1, 0.4]}


def test_not_a_record(registry):
    with pytest.raises(JobError, match="not a p2p-run record"):
        RunSpec.from_json({"format": "x"}, registry)
    with pytest.raises(JobError, match="incomplete"):
        RunSpec.from_json({"format": "p2p-framework/run@2"}, registry)


# ------------------------------------------------------------------------ the vocabulary


def test_job_vocabulary(registry):
    spec = spec_from_job(
        {
            "prompt": "a cat",
            "targets": ["a dog"],
            "blend": "cat dog",
            "reweight": ["dog=2"],
            "set": {"local-blend": {"threshold": 0.5}, "pipeline": {"separate_uncond_pass": True}},
            "seed": 3,
            "steps": 10,
            "cross_replace": "default=1.0,dog=0.4",
        },
        registry,
    )
    assert [type(e).name for e in spec.edits] == ["replace", "reweight", "local-blend"]
    assert spec.edits[2].threshold == 0.5 and spec.edits[2].words == ["cat", "dog"]
    assert spec.edits[1].weights == {"dog": 2.0}
    assert spec.source.seed == 3
    assert spec.settings.steps == 10 and spec.settings.separate_uncond_pass is True
    assert spec.settings.cross_replace_steps == CrossReplace(1.0, {"dog": 0.4})
    assert spec_from_job({"prompt": "a", "targets": ["a b"]}, registry).edits[0].name == "refine"


def test_every_shortcut_is_a_job_key_and_an_option(registry):
    keys = job_keys(registry)
    edit_options = {p.name for p in cli.commands["edit"].params}
    for shortcut in SHORTCUTS:
        assert shortcut.key in keys and shortcut.key in edit_options
    declared = {key for info in registry.plugins() for key in info.plugin_class.shortcuts}
    assert {"blend", "reweight", "seed"} <= declared
    assert declared <= {"blend", "reweight", "seed", "image", "inversion", "no_cache"}


@dataclass
class Scale(Edit):
    """A third-party edit that declares its own shortcut."""

    name = "scale"
    shortcuts = {"scale_by": "factor"}

    factor: Annotated[float, Field(ge=0)] = field(default=1.0, metadata={"help": "factor"})

    def cross_attention(self, injected, targets, layer):  # noqa: ANN001
        return injected * self.factor


@pytest.fixture
def with_scale(registry: PluginRegistry) -> PluginRegistry:
    plugin = types.ModuleType("scale_plugin")
    plugin.register_edits = hookimpl(lambda register: register(Scale))
    registry.add(plugin, name="scale-plugin")
    return registry


def test_a_plugin_declares_its_own_shortcut(with_scale, tmp_path):
    spec = spec_from_job({"prompt": "a cat", "targets": ["a dog"], "scale_by": "0.5"}, with_scale)
    assert [type(e).name for e in spec.edits] == ["replace", "scale"]
    assert spec.edits[1].factor == 0.5
    with pytest.raises(JobError, match="generate makes plain images: scale_by"):
        spec_from_job({"mode": "generate", "prompts": ["a"], "scale_by": 1}, with_scale)
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]]\nprompt = "a cat"\ntargets = ["a dog"]\nscale_by = 2\n')
    spec = pipeline_job_spec(load_pipeline(path), 0, with_scale)
    assert spec.edits[1].factor == 2.0


def test_job_vocabulary_errors(registry):
    with pytest.raises(JobError, match="unknown job key"):
        spec_from_job({"prompt": "a", "stpes": 3}, registry)
    with pytest.raises(JobError, match="give the source prompt"):
        spec_from_job({"targets": ["a"]}, registry)
    with pytest.raises(JobError, match="generate makes plain images: edits"):
        spec_from_job({"mode": "generate", "prompts": ["a"], "edits": ["replace"]}, registry)
    with pytest.raises(JobError, match="generate makes plain images: blend"):
        spec_from_job({"mode": "generate", "prompts": ["a"], "blend": "a"}, registry)
    with pytest.raises(JobError, match="reweight: expected WORD=FACTOR"):
        spec_from_job({"prompt": "a", "targets": ["b"], "reweight": ["b"]}, registry)


# ------------------------------------------------------------------------ option errors


def test_option_errors_name_plugin_and_option_on_every_path(with_scale, tmp_path):
    """Python, registry.build, the job vocabulary (--set) and a pipeline file."""
    match = r"^scale: factor: input should be greater than or equal to 0"
    with pytest.raises(OptionError, match=match):
        Scale(factor=-1)
    with pytest.raises(OptionError, match=match):
        with_scale.build("edit", "scale", {"factor": -1})
    with pytest.raises(OptionError, match=match):
        spec_from_job(
            {"prompt": "a", "targets": ["b"], "set": ["scale.factor=-1"], "edit": "scale"},
            with_scale,
        )
    with pytest.raises(OptionError, match=r"^scale: factor: .*'x'"):
        spec_from_job({"prompt": "a", "targets": ["b"], "scale_by": "x"}, with_scale)
    with pytest.raises(OptionError, match=r"^pipeline: guidance: "):
        spec_from_job({"prompt": "a", "guidance": -2}, with_scale)
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]]\nprompt = "a"\ntargets = ["b"]\nedits = ["scale"]\n'
                    "set = { scale = { factor = -1 } }\n")  # fmt: skip
    with pytest.raises(OptionError, match=match):
        pipeline_job_spec(load_pipeline(path), 0, with_scale)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--edit", "scale", "--set", "scale.factor=-1"], "scale: factor: input should be"),
        (["--scale-by", "2"], "No such option"),  # third-party keys: --set or pipeline files
        (["--set", "scale.factor=1"], "not in this run"),
        (["--cross-replace", "lion=2"], "pipeline: cross_replace_steps['lion']: fractions"),
    ],
)
def test_cli_option_errors_exit_2(with_scale, tiny_model_dir, tmp_path, args, fragment):
    base = ["edit", "--model", str(tiny_model_dir), "--prompt", "a cat", "--target", "a dog"]
    result = CliRunner().invoke(
        cli, [*base, *FAST, "--out", str(tmp_path / "o"), *args], obj=with_scale
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert fragment in result.stderr
    assert not (tmp_path / "o").exists()


def test_json_ready_uses_to_json():
    value = {"a": (1, Path("p")), 2: float("nan"), "w": StepWindow(0.2, 0.6)}
    assert json_ready(value) == {"a": [1, "p"], "2": "nan", "w": [0.2, 0.6]}


def test_cross_replace_text_is_parsed_once_from_the_cli_to_the_table(
    registry, tiny_model_dir, tmp_path, monkeypatch
):
    """``--cross-replace`` text is read once; the table is built from that object."""
    parsed: list[object] = []
    tables: list[CrossReplace] = []
    real_parse, real_table = CrossReplace.parse.__func__, CrossReplace.table

    def parse(cls, value):  # noqa: ANN001
        if not isinstance(value, CrossReplace):
            parsed.append(value)
        return real_parse(cls, value)

    def table(self, *args):  # noqa: ANN001
        tables.append(self)
        return real_table(self, *args)

    monkeypatch.setattr(CrossReplace, "parse", classmethod(parse))
    monkeypatch.setattr(CrossReplace, "table", table)
    args = [
        "edit", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
        "--prompt", "a painting of a squirrel", "--target", "a painting of a lion",
        "--cross-replace", "default=1.0,lion=0.1:0.4", *FAST,
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args, obj=registry)
    assert result.exit_code == 0, result.output
    assert parsed == ["default=1.0,lion=0.1:0.4"]
    assert tables == [CrossReplace(1.0, {"lion": (0.1, 0.4)})]
