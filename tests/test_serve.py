"""``p2p-run serve``'s handlers on the demo model: an edit, a reused inversion, plugin options
turned into controls, bad input, cancellation, and the "copy as p2p-run command" text.

The handlers (:class:`p2p_framework.web.app.Page`, :class:`p2p_framework.web.service.
EditService`) need no Gradio; the test that builds the page itself skips without it. Runs
use 6 steps of the 64 px demo model on one CPU thread.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import Field

from p2p_framework import Edit, PluginRegistry, hookimpl
from p2p_framework.cli import cli
from p2p_framework.demo import DEMO_MODEL_DIR
from p2p_framework.demo.shapes import render, sample_scene
from p2p_framework.errors import P2PError
from p2p_framework.runner import MODEL_ENV
from p2p_framework.spec import RunSpec, spec_argv, spec_from_job
from p2p_framework.testing import plugin_registered
from p2p_framework.web.app import Page
from p2p_framework.web.controls import MISSING, control_value, option_controls
from p2p_framework.web.service import EditForm, EditService, RunCancelled

STEPS = 6
# The demo scene of seed 0: "a red square on a yellow background".
PROMPT = "a red square on a yellow background"
TARGET = "a red circle on a yellow background"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> EditService:
    """One service on the demo model (CPU, float32), built-in plugins only."""
    root = tmp_path_factory.mktemp("serve")
    service = EditService(
        str(DEMO_MODEL_DIR),
        device="cpu",
        dtype="float32",
        registry=PluginRegistry(entry_points=False),
        workdir=root / "work",
        cache_dir=root / "cache",
    )
    service.load()
    return service


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128 px render of the demo scene of seed 0, as a user's photo."""
    image, _ = render(sample_scene(np.random.default_rng(0)), 128)
    path = tmp_path_factory.mktemp("photo") / "shapes.png"
    image.save(path)
    return path


def form(**changes: Any) -> EditForm:
    return EditForm(**{"prompt": PROMPT, "targets": TARGET, "steps": STEPS, **changes})


def page_values(
    page: Page, edit_form: EditForm, use: str | None = None, options: dict[str, Any] | None = None
) -> list[Any]:
    """What the page's Run button sends: the form's fields, then per edit its "use" box and
    its controls (``options`` for the edit ``use``), then each method's controls."""
    values = [getattr(edit_form, name) for name in Page.form_names()]
    for name in page.edit_names:
        given = options or {} if name == use else {}
        values.append(name == use)
        values += [given.get(c.option, c.default) for c in page.edit_controls[name]]
    for name in page.method_names:
        values += [c.default for c in page.method_controls[name]]
    return values


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_an_edit_on_the_page_is_the_edit_its_command_makes(
    service: EditService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome = service.run(form(seed=3, self_replace=0.5, cross_replace_words="circle=0.5"))
    assert [caption for _, caption in outcome.images] == [PROMPT, TARGET]
    assert outcome.inversion is None and outcome.attention is not None
    assert Image.open(outcome.attention).size[0] > 128  # a cell per token, captioned
    assert outcome.record_data["edits"][0]["name"] == "replace"  # auto: same word count
    assert outcome.command.startswith("p2p-run edit --prompt 'a red square")
    assert "--seed 3" in outcome.command and "--self-replace 0.5" in outcome.command
    assert "--cross-replace default=0.8,circle=0.5" in outcome.command

    # The command, run from the shell, makes the same pixels.
    monkeypatch.delenv(MODEL_ENV, raising=False)
    argv = outcome.record_data["argv"][1:] + ["--out", str(tmp_path / "cli"), "--device", "cpu"]
    # One thread, as the service's runs in these tests: --threads auto could take 2 on an idle
    # machine, which rounds differently.
    argv += ["--dtype", "float32", "--threads", "1"]
    result = CliRunner().invoke(cli, argv, obj=service.registry)
    assert result.exit_code == 0, result.output
    for path, _ in outcome.images:
        assert np.array_equal(pixels(path), pixels(tmp_path / "cli" / path.name))


def test_the_second_edit_of_a_photo_reuses_its_inversion(service: EditService, photo: Path) -> None:
    stored, preview = service.accept_photo(photo, "shapes.png")
    assert preview.size == (64, 64)  # as the model sees it
    first = service.run(form(start="photo", photo=stored, method="negative-prompt"))
    assert first.inversion == "computed" and first.inversion_seconds > 0
    moved = service.run(
        form(
            start="photo",
            photo=stored,
            photo_name="shapes.png",
            method="negative-prompt",
            cross_replace=0.3,
        )
    )
    assert moved.inversion == "reused"
    assert moved.record_data["source_info"]["inversion"]["cache"] == "hit"
    assert moved.record_data["timings"]["source"] < first.record_data["timings"]["source"]
    # The same inversion: the same cache entry.
    keys = [run.record_data["source_info"]["inversion"]["key"] for run in (first, moved)]
    assert keys[0] == keys[1]
    assert len(list(service.cache_dir.glob("*.p2pinv"))) == 1
    # The command names the photo by its own name, never the server's copy or cache.
    assert "--image shapes.png" in moved.command and "--source negative-prompt" in moved.command
    assert str(service.workdir) not in moved.command and "cache_dir" not in moved.command
    # The cached inversion, uploaded as a saved one: its prompt and settings fill the page.
    page = Page(service, log=lambda line: None)
    cached = next(service.cache_dir.glob("*.p2pinv"))
    path, name, prompt, steps, guidance, height, width, status = page.inversion_uploaded(
        str(cached), "", 50, 7.5, 64, 64
    )
    assert (prompt, steps, guidance, height, width) == (PROMPT, STEPS, 7.5, 64, 64)
    assert status.startswith(f"Inversion {cached.name} ready (negative-prompt, {STEPS} steps")
    saved = service.run(form(start="inversion", inversion=path, inversion_name="mine.p2pinv"))
    assert saved.inversion == "file" and saved.record_data["prompts"][0] == PROMPT
    assert f"--inversion mine.p2pinv --edit replace --steps {STEPS}" in saved.command
    # Another method's options are another inversion.
    other = service.run(
        form(start="photo", photo=stored, method="ddim", method_options={}, cross_replace=0.3)
    )
    assert other.inversion == "computed"


@dataclass(frozen=True)
class Knobs(Edit):
    """A test edit with one option of each kind."""

    name = "knobs"

    words: list[str] = field(metadata={"help": "words to act on"})
    strength: Annotated[float, Field(ge=0, le=2)] = field(
        default=1.0, metadata={"help": "how much"}
    )
    count: Annotated[int, Field(ge=1)] = 3
    enabled: bool = True
    mode: Literal["soft", "hard"] = "soft"
    places: list[Literal["down", "mid", "up"]] = field(default_factory=lambda: ["mid"])
    factors: dict[str, float] = field(default_factory=dict)
    note: str | None = None
    table: str | None = field(default=None, metadata={"help": "a file", "path": True})


class KnobsPlugin:
    @hookimpl
    def register_edits(self, register):  # noqa: ANN001
        register(Knobs)


def test_a_plugins_declared_options_become_controls(
    service: EditService, registry: PluginRegistry, register_plugin: Any
) -> None:
    register_plugin(KnobsPlugin(), name="knobs-package")
    controls = {c.option: c for c in option_controls("knobs", Knobs)}
    assert "table" not in controls  # a path option: no control, the page reads no typed path
    kinds = {name: c.kind for name, c in controls.items()}
    assert kinds == {
        "words": "text",
        "strength": "slider",
        "count": "number",
        "enabled": "checkbox",
        "mode": "dropdown",
        "places": "checkboxgroup",
        "factors": "text",
        "note": "text",
    }
    strength = controls["strength"]
    assert (strength.minimum, strength.maximum, strength.default) == (0, 2, 1.0)
    assert controls["count"].minimum == 1 and controls["count"].integer
    assert controls["mode"].choices == ("soft", "hard")
    assert controls["places"].choices == ("down", "mid", "up")
    assert controls["words"].required and "words to act on" in controls["words"].info
    assert control_value(controls["words"], "  ") is MISSING
    assert control_value(controls["count"], 4.0) == 4

    # What the controls hold reaches the plugin through the same validation as --set.
    with plugin_registered(service.registry, KnobsPlugin(), name="knobs-package"):
        page_service = EditService(
            service.model_name, registry=service.registry, workdir=service.workdir / "knobs"
        )
        values = {"words": "cat dog", "strength": 1.5, "places": ["down", "up"], "factors": "a=2"}
        spec, argv = page_service.spec(
            form(extra_edits=["knobs"], edit_options={"knobs": {**values, "mode": "hard"}})
        )
        knobs = spec.edits[-1]
        assert isinstance(knobs, Knobs)
        assert knobs.words == ["cat", "dog"] and knobs.factors == {"a": 2.0}
        assert list(knobs.places) == ["down", "up"] and knobs.mode == "hard"
        assert "--set knobs.strength=1.5" in " ".join(argv)
        with pytest.raises(P2PError, match="strength"):
            page_service.spec(
                form(extra_edits=["knobs"], edit_options={"knobs": {"words": "a", "strength": 3}})
            )
        with pytest.raises(P2PError, match="words"):
            page_service.spec(form(extra_edits=["knobs"]))  # required, left empty


def _bomb(path: Path) -> Path:
    """A tiny PNG whose header claims 40000 x 40000 px (a decompression bomb)."""
    Image.new("L", (16, 16)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 40000, 40000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_bad_input_is_one_line_on_the_page(
    service: EditService, tmp_path: Path, photo: Path
) -> None:
    page = Page(service, log=lambda line: None)
    text = tmp_path / "notes.png"
    text.write_text("not a photo")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (service.max_upload_bytes + 1))
    for upload, message in [
        (text, "'notes.png' is not an image"),
        (_bomb(tmp_path / "bomb.png"), "'bomb.png' is too large to decode safely"),
        (big, "at most 20 MiB"),
    ]:
        stored, name, preview, status = page.photo_uploaded(str(upload))
        assert stored is None and preview is None
        assert status.startswith("**Error:**") and message in status
    stored, _, _, status = page.photo_uploaded(str(photo))
    assert status == "Photo shapes.png ready."

    def run(use: str | None = None, options: dict[str, Any] | None = None, **changes: Any) -> str:
        values = page_values(page, form(**changes), use=use, options=options)
        status, gallery, maps, command, record = page.run_sync(values)
        assert gallery is None and record is None and command == ""
        assert "\n" not in status and "Traceback" not in status
        return status

    assert "give at least one target prompt" in run(targets="  ")
    assert "upload a photo first" in run(start="photo", photo=None)
    # A server path typed into the request (not one of this page's uploads) is never read.
    assert "not one of this page's" in run(start="photo", photo="/etc/hostname")
    assert "not one of this page's" in run(start="inversion", inversion=str(photo))
    assert "steps must be between 1 and 200" in run(steps=5000)
    assert "seed must be a number" in run(seed=None)
    assert "'lion'" in run(use="local-blend", options={"words": "square lion"})
    assert "cross_replace" in run(cross_replace_words="circle=2")


def test_a_cancelled_run_stops_at_its_next_step(service: EditService) -> None:
    runs_before = set((service.workdir / "runs").iterdir())
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int, info: dict[str, Any]) -> None:
        seen.append(done)
        if done == 2:
            cancel.set()

    with pytest.raises(RunCancelled) as stopped:
        service.run(form(steps=40), progress, cancel)
    assert seen == [1, 2] and stopped.value.step == 3 and stopped.value.phase == "denoise"
    assert set((service.workdir / "runs").iterdir()) == runs_before  # nothing half-written
    assert service.lock.acquire(blocking=False)
    service.lock.release()

    # Through the page's coroutine, as Gradio cancels a request: the task is cancelled,
    # the worker thread stops at its next step.
    page = Page(service, log=lambda line: None)
    values = page_values(page, form(steps=40))

    async def cancel_at_step_two() -> None:
        loop = asyncio.get_running_loop()
        reached = asyncio.Event()

        def tracker(progress: tuple[int, int], desc: str, unit: str) -> None:
            if progress[0] == 2:
                loop.call_soon_threadsafe(reached.set)

        task = asyncio.create_task(page.run(*values, progress=tracker))
        await reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_at_step_two())
    with service.lock:  # the worker let go of the model: it stopped
        assert service.last_status is not None
        assert service.last_status.startswith("cancelled at denoise step")
        assert int(service.last_status.split()[4]) <= 4


@pytest.mark.parametrize(
    "job",
    [
        {"prompt": "a cat", "targets": ["a dog"]},
        {
            "prompt": "a cat on a mat",
            "targets": ["a dog on a mat", "a big dog on a mat"],
            "edits": ["refine", "reweight", "local-blend"],
            "reweight": {"dog": 2.5},
            "set": {"local-blend": {"words": [["cat"], ["dog", "big"], "dog"], "threshold": 0.4}},
            "cross_replace": {"default": 0.9, "dog": [0.1, 0.6]},
            "self_replace": "0.1:0.5",
            "seed": 12,
            "steps": 20,
            "guidance": 5,
            "height": 128,
            "save_attention": True,
        },
        {
            "prompt": "a cat",
            "targets": ["a dog"],
            "image": "/data/photos/cat one.png",
            "no_cache": True,
            "set": {
                "null-text": {"num_inner_steps": 3, "crop": [1, 2, 3, 4]},
                "pipeline": {"fused_edits": True},
            },
            "model": "CompVis/stable-diffusion-v1-4",
            "device": "cpu",
        },
        {"mode": "generate", "prompts": ["a cat", "a dog"], "seed": 5, "scheduler": "euler"},
    ],
)
def test_the_copied_command_makes_the_same_run(
    job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = PluginRegistry(entry_points=False)
    spec = spec_from_job(job, registry)
    argv = spec_argv(spec, registry)
    assert argv[:2] == ["p2p-run", spec.mode]
    parsed: list[RunSpec] = []
    monkeypatch.setattr("p2p_framework.cli._execute", lambda spec, *rest: parsed.append(spec))
    result = CliRunner().invoke(cli, argv[1:], obj=registry)
    assert result.exit_code == 0, result.output
    assert parsed == [spec]


def test_the_command_names_a_photo_by_its_own_name() -> None:
    registry = PluginRegistry(entry_points=False)
    spec = spec_from_job(
        {
            "prompt": "a cat",
            "targets": ["a dog"],
            "image": "/srv/uploads/ab12.png",
            "set": {"null-text": {"cache_dir": "/srv/cache"}},
        },
        registry,
    )
    argv = spec_argv(spec, registry, paths={"image": "cat.jpg", "cache_dir": None})
    assert argv[argv.index("--image") + 1] == "cat.jpg"
    assert "/srv" not in " ".join(argv) and "--source" not in argv  # --image picks null-text


def test_serve_command_warns_off_localhost_and_needs_gradio(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    from p2p_framework.web import app

    served: list[tuple[str, int]] = []
    monkeypatch.setattr(EditService, "load", lambda self: None)
    monkeypatch.setattr(app, "import_gradio", lambda service=None: None)
    monkeypatch.setattr(
        app, "serve", lambda service, host, port, block: served.append((host, port))
    )
    registry = PluginRegistry(entry_points=False)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "8123"], obj=registry)
    assert result.exit_code == 0, result.output
    assert served == [("0.0.0.0", 8123)]
    assert "Warning: serving on 0.0.0.0: anyone who can reach" in result.output
    result = CliRunner().invoke(cli, ["serve"], obj=registry)
    assert "Warning" not in result.output and served[-1] == ("127.0.0.1", 7860)

    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gradio", None)  # not installed
    monkeypatch.setattr(EditService, "load", lambda self: pytest.fail("loaded without Gradio"))
    result = CliRunner().invoke(cli, ["serve"], obj=registry)
    assert result.exit_code == 2
    assert result.output.startswith(
        "Error: p2p-run serve needs Gradio, an optional dependency: pip install 'p2p-framework[ui]'"
    )
