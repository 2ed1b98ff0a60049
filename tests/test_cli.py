"""``p2p-run``: every command, the files a run writes, reruns, pipeline files and errors.

Runs use the tiny model at 64x64 px with 3 steps, so the whole file stays fast on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from p2p_framework import Edit, EditRun, PluginRegistry, hookimpl
from p2p_framework.cli import cli
from p2p_framework.outputs import OutputError, write_bytes_atomic
from p2p_framework.runner import MODEL_ENV

# CPU and float32 also on a machine with a GPU: records and byte-identical reruns are checked.
FAST = ["--steps", "3", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32"]
EXAMPLE_PLUGIN = importlib.util.find_spec("p2p_example_plugin") is not None
# CI installs the example package and sets this, so the entry-point tests fail there rather
# than skip if the package is missing.
if os.environ.get("P2P_REQUIRE_EXAMPLE_PLUGIN") and not EXAMPLE_PLUGIN:
    raise RuntimeError("P2P_REQUIRE_EXAMPLE_PLUGIN is set but p2p_example_plugin is not installed")
needs_example_plugin = pytest.mark.skipif(
    not EXAMPLE_PLUGIN,
    reason="the example plugin package is not installed "
    "(pip install ./docs/examples/p2p-example-plugin)",
)


@pytest.fixture
def invoke(registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch):
    """Run ``p2p-run ARGS`` in-process with the built-in plugins only (no entry points)."""
    monkeypatch.delenv(MODEL_ENV, raising=False)

    def run(*args: Any, obj: Any = None) -> Any:
        runner = CliRunner()
        return runner.invoke(cli, [str(a) for a in args], obj=obj or registry)

    return run


def edit_args(model: Path, out: Path, *extra: Any) -> list[Any]:
    return [
        "edit",
        "--model",
        model,
        "--prompt",
        "a painting of a squirrel eating a burger",
        "--target",
        "a painting of a lion eating a burger",
        "--out",
        out,
        *FAST,
        *extra,
    ]


def assert_one_line_error(result: Any, *fragments: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message"
    assert lines[-1].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert result.stdout == ""


# --------------------------------------------------------------------------- edit and rerun


@pytest.fixture(scope="module")
def edit_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One edit run shared by the tests that inspect its files."""
    out = tmp_path_factory.mktemp("edit") / "lion"
    runner = CliRunner()
    args = edit_args(
        tiny_model_dir,
        out,
        "--cross-replace",
        "default=1.0,lion=0.4",
        "--self-replace",
        "0.2:0.6",
        "--blend",
        "squirrel lion",
        "--reweight",
        "lion=2",
        "--set",
        "local-blend.threshold=0.4",
        "--seed",
        "7",
        "--save-attention",
    )
    result = runner.invoke(cli, [str(a) for a in args], obj=PluginRegistry(entry_points=False))
    return result, out


def test_edit_writes_images_grid_attention_and_record(edit_run):
    result, out = edit_run
    assert result.exit_code == 0, result.output
    names = ["source.png", "target-1.png", "grid.png", "attention.png", "run.json"]
    assert result.stdout.splitlines() == [str(out / name) for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left
    for name in ("source.png", "target-1.png"):
        assert Image.open(out / name).size == (64, 64)
    grid = Image.open(out / "grid.png")
    assert grid.width > 128 and grid.height > 64  # two images side by side, captions below
    attention = Image.open(out / "attention.png")
    # A row per prompt, one cell per token from the start to the end token: 10 tokens here.
    assert attention.width >= 10 * 128 and attention.height > 2 * 128


def test_run_record_has_every_parameter(edit_run, tiny_model_dir):
    _, out = edit_run
    record = json.loads((out / "run.json").read_text())
    assert record["format"] == "p2p-framework/run@2" and record["mode"] == "edit"
    assert record["prompts"] == [
        "a painting of a squirrel eating a burger",
        "a painting of a lion eating a burger",
    ]
    assert record["model"]["model"] == str(Path(tiny_model_dir).resolve())
    assert len(record["model"]["folder_hash"]) == 64
    assert record["model"]["device"] == "cpu" and record["model"]["dtype"] == "float32"
    assert record["seed"] == 7
    assert record["source"] == {
        "name": "seed",
        "kind": "source",
        "package": "p2p-framework",
        "version": record["versions"]["p2p-framework"],
        "plugin": "p2p_framework.plugins.seed",
        "options": {"seed": 7},
    }
    edits = {e["name"]: e for e in record["edits"]}
    assert [e["name"] for e in record["edits"]] == ["replace", "reweight", "local-blend"]
    assert edits["reweight"]["options"] == {"weights": {"lion": 2.0}, "self_replace": True}
    assert edits["local-blend"]["options"]["words"] == ["squirrel", "lion"]
    assert edits["local-blend"]["options"]["threshold"] == 0.4
    assert edits["local-blend"]["options"]["start_blend"] == 0.2  # defaults included
    settings = record["settings"]
    assert settings["cross_replace_steps"] == {"default": 1.0, "lion": 0.4}
    assert settings["self_replace_steps"] == [0.2, 0.6]
    assert settings["steps"] == 3 and settings["guidance"] == 7.5
    assert settings["height"] == 64 and settings["scheduler"] == "ddim"
    assert settings["self_replace_min_downscale"] == 4
    assert set(record["versions"]) >= {"torch", "diffusers", "transformers", "p2p-framework"}
    assert set(record["timings"]) >= {"load_model", "source", "denoise", "decode", "total"}
    assert record["command"].startswith("p2p-run edit --model ")
    assert "--blend 'squirrel lion'" in record["command"]
    assert record["outputs"]["attention"] == "attention.png"


def test_rerun_reproduces_the_images_byte_for_byte(edit_run, invoke, tmp_path):
    _, out = edit_run
    again = tmp_path / "again"
    result = invoke("rerun", out / "run.json", "--out", again)
    assert result.exit_code == 0, result.output
    for name in ("source.png", "target-1.png", "grid.png", "attention.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    first = json.loads((out / "run.json").read_text())
    second = json.loads((again / "run.json").read_text())
    for key in ("prompts", "source", "edits", "settings", "model", "seed"):
        assert second[key] == first[key], key
    assert second["command"].startswith("p2p-run rerun ")


def test_rerun_warns_when_the_model_folder_changed(edit_run, invoke, tmp_path):
    _, out = edit_run
    record = json.loads((out / "run.json").read_text())
    record["model"]["folder_hash"] = "0" * 64
    (tmp_path / "run.json").write_text(json.dumps(record))
    result = invoke("rerun", tmp_path, "--out", tmp_path / "again", "--quiet")
    assert result.exit_code == 0, result.output
    assert "Warning: the model folder" in result.stderr


def test_edit_without_edit_flag_picks_replace_or_refine(invoke, tiny_model_dir, tmp_path):
    result = invoke(
        "edit",
        "--model",
        tiny_model_dir,
        "--prompt",
        "soup",
        "--target",
        "pea soup with croutons",
        "--reweight",
        "croutons=3",
        "--out",
        tmp_path,
        "--json",
        "--quiet",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --quiet
    record = json.loads(result.stdout)
    assert [e["name"] for e in record["edits"]] == ["refine", "reweight"]
    assert record == json.loads((tmp_path / "run.json").read_text())


# --------------------------------------------------------------------------- generate


def test_generate_writes_one_image_per_prompt(invoke, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MODEL_ENV, str(tiny_model_dir))  # the model from the environment
    result = CliRunner().invoke(
        cli,
        ["generate", "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "3"] + FAST,
        obj=PluginRegistry(entry_points=False),
    )
    assert result.exit_code == 0, result.output
    (out,) = (tmp_path / "p2p-out").iterdir()  # the default output folder
    assert out.name.startswith("generate-")
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png",
        "image-1.png",
        "image-2.png",
        "run.json",
    ]
    record = json.loads((out / "run.json").read_text())
    assert record["mode"] == "generate" and record["edits"] == [] and record["seed"] == 3


# --------------------------------------------------------------------------- real photos


def test_invert_then_edit_the_saved_inversion(invoke, registry, edit_run, tiny_model_dir, tmp_path):
    if not any(p.name == "negative-prompt" for p in registry.plugins("source")):
        pytest.skip("the inversion sources are not registered")
    _, first = edit_run
    saved = tmp_path / "photo.p2pinv"
    prompt = "a painting of a squirrel eating a burger"
    result = invoke(
        "invert",
        "--model",
        tiny_model_dir,
        "--image",
        first / "source.png",
        "--prompt",
        prompt,
        "--method",
        "negative-prompt",
        *FAST,
        "--out",
        saved,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(saved) and saved.is_file()
    # The source is the method the inversion was made with.
    result = invoke(
        *edit_args(tiny_model_dir, tmp_path / "edit", "--inversion", saved), "--json", "-q"
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["source"]["name"] == "negative-prompt"
    assert record["source"]["options"]["inversion"] == str(saved)
    assert record["source_info"]["inversion"]["cache"] == "file"


def test_inversion_cache_is_hit_then_skipped_with_no_cache(
    invoke, registry, edit_run, tiny_model_dir, tmp_path, monkeypatch
):
    if not any(p.name == "negative-prompt" for p in registry.plugins("source")):
        pytest.skip("the inversion sources are not registered")
    monkeypatch.setenv("P2P_FRAMEWORK_CACHE_DIR", str(tmp_path / "cache"))
    _, first = edit_run
    photo = ("--image", first / "source.png", "--source", "negative-prompt", "--json", "-q")

    def cache_state(out, *extra):
        result = invoke(*edit_args(tiny_model_dir, tmp_path / out, *photo, *extra))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["source_info"]["inversion"]["cache"]

    assert cache_state("a") == "miss"
    assert cache_state("b") == "hit"
    assert cache_state("c", "--no-cache") == "off"
    result = invoke(*edit_args(tiny_model_dir, tmp_path / "d", "--no-cache"))
    assert_one_line_error(result, "no_cache: source 'seed' has no option 'cache'")


def test_image_shortcut_picks_null_text(registry, tmp_path):
    from p2p_framework.spec import spec_from_job

    if not any(p.name == "null-text" for p in registry.plugins("source")):
        pytest.skip("the inversion sources are not registered")
    spec = spec_from_job({"prompt": "a cat", "targets": ["a dog"], "image": "cat.jpg"}, registry)
    assert spec.source.name == "null-text" and spec.source.image == "cat.jpg"
    assert spec.source.num_inner_steps == 10
    spec = spec_from_job({"prompt": "a cat", "image": "cat.jpg", "source": "direct"}, registry)
    assert spec.source.name == "direct"


# --------------------------------------------------------------------------- plugins


def test_plugins_lists_kind_package_version_and_options(invoke):
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    assert "reweight (edit) from p2p-framework" in result.stdout
    assert "--set local-blend.threshold: float >= 0 <= 1, default 0.3" in result.stdout
    assert "seed (source)" in result.stdout

    listed = json.loads(invoke("plugins", "--json", "--kind", "source").stdout)
    assert {p["kind"] for p in listed} == {"source"}
    seed = next(p for p in listed if p["name"] == "seed")
    assert seed["package"] == "p2p-framework" and seed["version"]
    assert seed["options"] == [
        {
            "name": "seed",
            "type": "int >= 0",
            "default": 8888,
            "required": False,
            "help": "random seed of the initial noise",
        }
    ]


def test_plugins_warns_about_broken_plugins(invoke, registry):
    broken = types.ModuleType("broken_plugin")

    @hookimpl
    def register_edits(register):  # noqa: ANN001
        raise RuntimeError("boom")

    broken.register_edits = register_edits
    registry.add(broken, name="broken-plugin")
    result = invoke("plugins", "--kind", "edit")
    assert result.exit_code == 0
    assert "Warning: plugin 'broken-plugin': register_edits failed: RuntimeError: boom" in (
        result.stderr
    )
    assert "replace (edit)" in result.stdout


# --------------------------------------------------------------------------- third-party plugins


@dataclass
class Dampen(Edit):
    """Test edit from a 'third-party' plugin registered for one test."""

    name = "dampen"

    factor: float = field(default=1.0, metadata={"help": "multiplier"})
    words: list[str] = field(default_factory=list, metadata={"help": "words"})

    def bind(self, run):  # noqa: ANN001, ANN201
        return DampenRun(self.factor)


class DampenRun(EditRun):
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def cross_attention(self, injected, targets, layer, step):  # noqa: ANN001, ANN201
        return injected * self.factor


def test_set_reaches_a_registered_plugins_options(invoke, registry, tiny_model_dir, tmp_path):
    plugin = types.ModuleType("dampen_plugin")
    plugin.register_edits = hookimpl(lambda register: register(Dampen))
    registry.add(plugin, name="dampen-plugin", package="dampen-pkg", version="9.9")
    result = invoke(
        *edit_args(tiny_model_dir, tmp_path, "--edit", "replace", "--edit", "dampen"),
        "--set",
        "dampen.factor=0.5",
        "--set",
        "dampen.words=lion,burger",
        "--json",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    dampen = record["edits"][1]
    assert dampen["options"] == {"factor": 0.5, "words": ["lion", "burger"]}
    assert (dampen["package"], dampen["version"]) == ("dampen-pkg", "9.9")


@needs_example_plugin
def test_example_plugin_is_found_through_its_entry_point(invoke):
    result = invoke("plugins", "--kind", "edit", obj=PluginRegistry())
    assert result.exit_code == 0, result.output
    assert "suppress-word (edit) from p2p-example-plugin 0.2.0" in result.stdout
    assert "--set suppress-word.factor: float, default 0.0" in result.stdout


@needs_example_plugin
def test_example_plugin_runs_with_set_options(invoke, tiny_model_dir, tmp_path):
    result = invoke(
        *edit_args(tiny_model_dir, tmp_path, "--edit", "replace", "--edit", "suppress-word"),
        "--set",
        "suppress-word.words=burger",
        "--set",
        "suppress-word.factor=0.25",
        "--set",
        "suppress-word.renormalize=true",
        "--set",
        "suppress-word.places=up mid",
        "--json",
        obj=PluginRegistry(),
    )
    assert result.exit_code == 0, result.output
    edit = json.loads(result.stdout)["edits"][1]
    assert edit["name"] == "suppress-word" and edit["package"] == "p2p-example-plugin"
    assert edit["options"] == {
        "words": ["burger"],
        "factor": 0.25,
        "renormalize": True,
        "places": ["up", "mid"],
        "self_replace": True,
    }


@needs_example_plugin
def test_example_plugin_errors_are_one_line(invoke, tiny_model_dir, tmp_path):
    args = edit_args(tiny_model_dir, tmp_path, "--edit", "suppress-word")
    result = invoke(*args, "--set", "suppress-word.words=zebra", obj=PluginRegistry())
    assert_one_line_error(result, "suppress-word: words: none of ['zebra']")
    result = invoke(*args, "--set", "suppress-word.places=up", obj=PluginRegistry())
    assert_one_line_error(result, "suppress-word: words: is required")
    args += ["--set", "suppress-word.words=lion"]
    result = invoke(*args, "--set", "suppress-word.places=left", obj=PluginRegistry())
    assert_one_line_error(result, "suppress-word: places:")
    assert "'down', 'mid' or 'up'" in result.output


# --------------------------------------------------------------------------- pipeline files


PIPELINE = """
model = "{model}"

[defaults]
steps = 3
height = 64
width = 64
seed = 5

[[jobs]]
name = "lion"
prompt = "a painting of a squirrel eating a burger"
targets = ["a painting of a lion eating a burger"]
cross_replace = {{ default = 1.0, lion = 0.4 }}
blend = "squirrel lion"

[[jobs]]
name = "bad-word"
prompt = "a smiling bunny doll"
targets = ["a smiling bunny doll"]
reweight = {{ frowning = 5 }}

[[jobs]]
name = "plain"
mode = "generate"
prompts = ["a red circle"]
set = ["seed.seed=11"]
"""


def test_run_pipeline_runs_every_job_once_loading_the_model_once(invoke, tiny_model_dir, tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text(PIPELINE.format(model=tiny_model_dir))
    result = invoke("run", path, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 1, result.output  # one job failed
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["name"], r["status"]) for r in lines] == [
        ("lion", "ok"),
        ("bad-word", "failed"),
        ("plain", "ok"),
    ]
    assert "'frowning' is not a word of" in lines[1]["error"]
    assert lines[0]["settings"]["cross_replace_steps"] == {"default": 1.0, "lion": 0.4}
    assert lines[0]["seed"] == 5 and lines[2]["seed"] == 11
    assert (tmp_path / "out" / "lion" / "target-1.png").is_file()
    assert (tmp_path / "out" / "plain" / "image-1.png").is_file()
    assert not (tmp_path / "out" / "bad-word").exists()
    assert result.stderr.count("Loading model") == 1
    assert "[2/3] bad-word" in result.stderr
    assert "Error: job 'bad-word' failed:" in result.stderr
    assert "Traceback" not in result.output


def test_run_rejects_a_bad_pipeline_file(invoke, tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]]\nprompt = "a cat"\nstep = 3\n')
    # The unknown key is the job's error: the job fails, the run exits with 1.
    result = invoke("run", path, "--out", tmp_path, "--model", "x")
    assert result.exit_code == 1
    assert "unknown job key(s) step" in result.stderr
    path.write_text("jobs = [\n")
    assert_one_line_error(invoke("run", path), "is not valid TOML")
    path.write_text('modle = "x"\n[[jobs]]\nprompt = "a"\n')
    assert_one_line_error(invoke("run", path), "unknown top-level key(s) modle")


def test_the_documented_pipeline_file_is_valid(registry, tmp_path):
    from p2p_framework.pipeline_file import load_pipeline, pipeline_job_spec
    from p2p_framework.schedules import CrossReplace

    if not any(p.name == "null-text" for p in registry.plugins("source")):
        pytest.skip("the inversion sources are not registered")
    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    example = text.split("### Pipeline file format", 1)[1].split("```toml\n", 1)[1]
    path = tmp_path / "jobs.toml"
    path.write_text(example.split("```", 1)[0])
    pipeline = load_pipeline(path)
    specs = [pipeline_job_spec(pipeline, i, registry) for i in range(len(pipeline.jobs))]
    assert [s.name for s in specs] == ["lion", "croutons", "fall", "tiger", "plain"]
    assert specs[0].out == str(Path("out/batch/lion"))
    assert specs[0].settings.cross_replace_steps == CrossReplace(1.0, {"lion": 0.4})
    assert [e.name for e in specs[1].edits] == ["refine", "reweight"]
    assert specs[2].edits[1].threshold == 0.4
    assert specs[3].source.name == "null-text"
    assert specs[3].settings.self_replace_steps.to_json() == 0.5
    assert specs[4].mode == "generate" and specs[4].model.startswith("stabilityai/")
    assert specs[4].source.seed == 8888


# --------------------------------------------------------------------------- errors


def test_unknown_plugins_list_the_available_ones(invoke, tiny_model_dir, tmp_path):
    result = invoke(*edit_args(tiny_model_dir, tmp_path, "--edit", "swap"))
    assert_one_line_error(
        result, "unknown edit plugin 'swap'", "available: local-blend, refine, replace, reweight"
    )
    result = invoke(*edit_args(tiny_model_dir, tmp_path, "--source", "noise"))
    assert_one_line_error(result, "unknown source plugin 'noise'", "seed")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            ["--blend", "squirrel lion", "--set", "local-blend.threshold=abc"],
            ["local-blend: threshold:", "'abc'"],
        ),
        (["--blend", "squirrel lion", "--set", "local-blend.threshold=7"], ["threshold"]),
        (["--set", "replace.strength=1"], ["replace: strength: unknown option"]),
        (["--set", "threshold=1"], ["--set expects PLUGIN.KEY=VALUE"]),
        (["--cross-replace", "often"], ["cross_replace_steps", "'often'"]),
        (["--cross-replace", "0.9:0.1"], ["start 0.9 is after end 0.1"]),
        (["--reweight", "lion"], ["expected WORD=FACTOR"]),
        (["--set", "pipeline.steps=-1"], ["pipeline: steps: input should be greater than"]),
        (["--steps", "0"], ["pipeline: steps:"]),
        (["--set", "pipeline.attention_downscale=3"], ["must be a power of two"]),
        (["--set", "pipeline.stpes=3"], ["pipeline: stpes: unknown setting"]),
        (["--seed", "-1"], ["seed: seed:"]),
    ],
)
def test_bad_option_values(invoke, tiny_model_dir, tmp_path, extra, fragments):
    assert_one_line_error(invoke(*edit_args(tiny_model_dir, tmp_path, *extra)), *fragments)
    assert not any(tmp_path.iterdir())  # rejected before anything was written


def test_option_for_a_plugin_not_in_the_run(invoke, tiny_model_dir, tmp_path):
    result = invoke(*edit_args(tiny_model_dir, tmp_path, "--set", "reweight.weights=lion=2"))
    assert_one_line_error(
        result, "reweight.weights", "not in this run", "edits: replace", "--edit reweight"
    )


def test_missing_model(invoke, tmp_path):
    result = invoke(*edit_args(tmp_path / "no-such-model", tmp_path / "out"))
    assert_one_line_error(result, "no-such-model", "does not exist")


def test_default_model_is_the_embedded_demo_model(invoke, tmp_path):
    from p2p_framework.demo import DEMO_MODEL_DIR

    out = tmp_path / "out"
    result = invoke(
        "edit",
        "--prompt",
        "a red circle on a blue background",
        "--target",
        "a green circle on a blue background",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["model"] == str(DEMO_MODEL_DIR)
    assert Image.open(out / "target-1.png").size == (64, 64)


def test_unavailable_device_or_dtype(invoke, tiny_model_dir, tmp_path):
    result = invoke(*edit_args(tiny_model_dir, tmp_path), "--device", "cuda:99")
    assert_one_line_error(result, "pipeline: device: 'cuda:99'")
    result = invoke(*edit_args(tiny_model_dir, tmp_path), "--device", "cpu", "--dtype", "float16")
    assert_one_line_error(result, "float16 needs a GPU")


def test_unreadable_image(invoke, registry, tiny_model_dir, tmp_path):
    if not any(p.name == "ddim" for p in registry.plugins("source")):
        pytest.skip("the inversion sources are not registered")
    image = tmp_path / "photo.png"
    image.write_text("not an image")
    result = invoke(
        *edit_args(tiny_model_dir, tmp_path / "out", "--source", "ddim"),
        "--set",
        f"ddim.image={image}",
        "--set",
        "ddim.cache=false",
    )
    assert_one_line_error(result, "photo.png")


def test_prompt_word_not_found(invoke, tiny_model_dir, tmp_path):
    result = invoke(*edit_args(tiny_model_dir, tmp_path, "--reweight", "tiger=2"))
    assert_one_line_error(result, "reweight: weights:", "'tiger' is not a word of")
    result = invoke(*edit_args(tiny_model_dir, tmp_path, "--edit", "replace"), "--target", "a b")
    assert_one_line_error(result, "same number of words")


def test_output_folder_not_writable(invoke, tiny_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(invoke(*edit_args(tiny_model_dir, blocker)), "is a file")
    assert_one_line_error(
        invoke(*edit_args(tiny_model_dir, blocker / "sub")), "cannot create output folder"
    )


def test_debug_shows_the_traceback(invoke, tiny_model_dir, tmp_path):
    result = invoke(*edit_args(tiny_model_dir, tmp_path, "--edit", "swap", "--debug"))
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "PluginError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: unknown edit plugin")


def test_usage_errors_are_one_line(invoke):
    result = invoke("edit", "--steps", "many")
    assert_one_line_error(result, "'--steps'", "p2p-run edit --help")
    assert_one_line_error(invoke("frobnicate"), "No such command")


def test_interrupted_run_leaves_no_partial_files(invoke, tiny_model_dir, tmp_path, monkeypatch):
    import p2p_framework.outputs as outputs

    real = outputs.os.fsync
    calls = []

    def interrupt_on_record(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:  # source.png, target-1.png, then grid.png is interrupted
            raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr(outputs.os, "fsync", interrupt_on_record)
    result = invoke(*edit_args(tiny_model_dir, tmp_path))
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr and "Traceback" not in result.output
    # Nothing of the run appears (its files are swapped in together), and its staging
    # folder and lock beside the output folder are gone.
    assert list(tmp_path.iterdir()) == []
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.p2p-*"))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    write_bytes_atomic(target, b"old")

    def fail(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="No space left on device"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["edit", "generate", "rerun", "plugins", "run", "invert"])
def test_help_explains_every_option_with_an_example(invoke, command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    group = cli.commands[command]
    for param in group.params:
        if not isinstance(param, click.Option) or param.is_flag or param.name == "help":
            continue
        assert "E.g." in (param.help or ""), f"{command} {param.opts}: no example"
        assert param.opts[-1] in result.stdout
    assert "Example" in result.stdout


def test_version(invoke):
    result = invoke("--version")
    assert result.exit_code == 0 and "p2p-run" in result.stdout


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "p2p-run"]
    assert script.value == "p2p_framework.cli:main"
    assert sys.modules["p2p_framework.cli"].main is not None
