"""Option values from text and TOML/JSON (``--set``), and the job vocabulary's own values."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from p2p_framework import OptionError
from p2p_framework.jobs import JobError, job_from_options, parse_cross_replace
from p2p_framework.values import json_ready, parse_option, type_text

Words = str | Sequence[str]


def parse(annotation: Any, value: Any) -> Any:
    return parse_option("plugin", "option", annotation, value)


@pytest.mark.parametrize(
    ("annotation", "text", "expected"),
    [
        (int, "5", 5),
        (int, "1e3", 1000),
        (float, "0.4", 0.4),
        (float, "-2", -2.0),
        (bool, "true", True),
        (bool, "No", False),
        (bool, "1", True),
        (str, " a b ", " a b "),
        (Path, "x/y.png", Path("x/y.png")),
        (list[str], "a,b , c", ["a", "b", "c"]),
        (list[str], "squirrel lion", ["squirrel", "lion"]),
        (list[str], '["red car", "tree"]', ["red car", "tree"]),
        (list[float], "1 2.5", [1.0, 2.5]),
        (tuple[int, int, int, int], "0,0,10,0", (0, 0, 10, 0)),
        (list[Words], "red car,tree", ["red car", "tree"]),
        (list[Words], '[["red", "car"], "tree"]', [["red", "car"], "tree"]),
        (dict[str, float], "smiling=5,doll=-1", {"smiling": 5.0, "doll": -1.0}),
        (dict[str, float | Sequence[float]], '{"a": [1, 2]}', {"a": [1.0, 2.0]}),
        (float | None, "none", None),
        (float | None, "0.5", 0.5),
        (int | str, "x", "x"),
        (Literal["down", "up"], "up", "up"),
        (Any, '{"a": 1}', {"a": 1}),
        (Any, "plain text", "plain text"),
    ],
)
def test_text_is_read_by_the_annotation(annotation, text, expected):
    assert parse(annotation, text) == expected


@pytest.mark.parametrize(
    ("annotation", "value", "expected"),
    [
        (float, 1, 1.0),
        (list[float], [1, 2], [1.0, 2.0]),
        (dict[str, float], {"a": 2}, {"a": 2.0}),
        (list[str], "a b", ["a", "b"]),  # a TOML string for a list is read as text
        (float | None, None, None),
        (tuple[int, int], [1, 2], (1, 2)),
    ],
)
def test_typed_values_are_coerced(annotation, value, expected):
    assert parse(annotation, value) == expected


@pytest.mark.parametrize(
    ("annotation", "text", "message"),
    [
        (float, "abc", "expected float, got 'abc'"),
        (int, "1.5", "expected int"),
        (bool, "maybe", "expected bool"),
        (dict[str, float], "smiling", "expected key=value pairs"),
        (dict[str, float], "a=x", "expected float"),
        (Literal["down", "up"], "mid", "expected one of down, up"),
        (list[int], "[1,", "bad JSON list"),
    ],
)
def test_bad_text_names_plugin_and_option(annotation, text, message):
    with pytest.raises(OptionError, match=r"^plugin: option: ") as caught:
        parse(annotation, text)
    assert message in str(caught.value)


def test_type_text_and_json_ready():
    assert type_text(dict[str, float | Sequence[float]]) == "dict[str, float | Sequence[float]]"
    assert type_text(list[str] | None) == "list[str] | None"
    assert json_ready({"a": (1, Path("p")), 2: float("nan")}) == {"a": [1, "p"], "2": "nan"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.8", 0.8),
        (0.8, 0.8),
        ("0.2:0.8", (0.2, 0.8)),
        ([0.2, 0.8], (0.2, 0.8)),
        ("default=1.0,lion=0.4", {"default_": 1.0, "lion": 0.4}),
        ("lion=0.1:0.4", {"lion": (0.1, 0.4)}),
        ({"default": 1, "lion": "0:0.4"}, {"default_": 1, "lion": (0.0, 0.4)}),
        ('{"default_": 0.5}', {"default_": 0.5}),
    ],
)
def test_cross_replace_values(value, expected):
    assert parse_cross_replace(value) == expected


@pytest.mark.parametrize("value", ["often", "1.5", "0.8:0.2", "lion", "=0.3"])
def test_bad_cross_replace_values(value):
    with pytest.raises(OptionError, match="cross_replace_steps"):
        parse_cross_replace(value)


def test_job_vocabulary(registry):
    spec = job_from_options(
        {
            "prompt": "a cat",
            "targets": ["a dog"],
            "blend": "cat dog",
            "reweight": ["dog=2"],
            "set": {"local-blend": {"threshold": 0.5}, "pipeline": {"separate_uncond_pass": True}},
            "seed": 3,
            "steps": 10,
        },
        registry,
    )
    assert [e.name for e in spec.edits] == ["replace", "reweight", "local-blend"]
    assert spec.edits[2].options["threshold"] == 0.5
    assert spec.edits[1].options == {"weights": {"dog": 2.0}, "self_replace": True}
    assert spec.source.options == {"seed": 3}
    assert spec.settings["steps"] == 10 and spec.settings["separate_uncond_pass"] is True
    assert spec.settings["cross_replace_steps"] == 0.8  # the default, recorded


def test_job_vocabulary_errors(registry):
    with pytest.raises(JobError, match="unknown job key"):
        job_from_options({"prompt": "a", "stpes": 3}, registry)
    with pytest.raises(JobError, match="give the source prompt"):
        job_from_options({"targets": ["a"]}, registry)
    with pytest.raises(JobError, match="edits, blend and reweight need"):
        job_from_options({"mode": "generate", "prompts": ["a"], "edits": ["replace"]}, registry)
    with pytest.raises(OptionError, match="seed: seed: input should be greater than or equal to 0"):
        job_from_options({"prompt": "a", "seed": -1}, registry)
