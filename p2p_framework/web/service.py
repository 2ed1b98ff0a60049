"""What the web page does, without the web toolkit: :class:`EditService`.

The page's handlers (:mod:`p2p_framework.web.app`) are thin: they pass what the controls hold
to an :class:`EditService`, which

- accepts uploads (:meth:`EditService.accept_photo`, :meth:`EditService.accept_inversion`):
  size-limited, decoded by the project's own image loader (Pillow's decompression-bomb check,
  EXIF orientation, transparency), and copied into the service's private folder under a name
  of its own choosing;
- turns an :class:`EditForm` into a job of the command line's vocabulary and then a
  :class:`~p2p_framework.spec.RunSpec` through :func:`~p2p_framework.spec.spec_from_job`, so
  every value is validated as on the command line;
- runs it with :func:`~p2p_framework.runner.run_job` on the one loaded model, one run at a
  time, writing the usual files (images, ``grid.png``, ``attention.png``, ``run.json``) into
  a run folder of its own; a photo's inversion goes through the inversion cache, so moving a
  slider re-runs only the edit;
- stops a run at its next step when asked (:class:`RunCancelled`, raised from the per-step
  progress callback).

Nothing here reads or writes a path that came from a user's text: paths are the service's
own (its folder, the model, the cache) or Gradio's upload files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import P2PError, P2PWarning
from ..registry import PluginRegistry, get_registry
from ..spec import RunSpec, default_edit, spec_argv, spec_from_job
from .controls import MISSING, Control, control_value, option_controls

#: Largest upload the service accepts, in bytes (the page's limit too).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest photo, in pixels, the service decodes (about 25 MP: a photo from a phone; a
#: decompression bomb claims far more in a small file and is refused before decoding).
MAX_PIXELS = 25_000_000
#: Run folders kept in the service's folder (the oldest are removed).
KEEP_RUNS = 32

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


class WebInputError(P2PError):
    """Bad input from the page (an upload that is not a photo, a missing field...)."""


class RunCancelled(BaseException):  # noqa: N818 - a control-flow signal, like KeyboardInterrupt
    """Raised from the progress callback when a run was cancelled: it stops the run at its
    next step. A ``BaseException`` (like ``KeyboardInterrupt``) so that no plugin's
    ``except Exception`` swallows it and the run's folder is discarded on the way out."""

    def __init__(self, step: int, total: int, phase: str) -> None:
        super().__init__(f"cancelled at {phase} step {step} of {total}")
        self.step, self.total, self.phase = step, total, phase


@dataclass
class EditForm:
    """What the page's controls hold for one run.

    Attributes:
        start: ``"seed"`` (generate the source image), ``"photo"`` (invert an uploaded
            photo) or ``"inversion"`` (an uploaded ``.p2pinv`` file).
        photo: the service's copy of the photo (from :meth:`EditService.accept_photo`).
        photo_name: the photo's own file name, for the command line shown to the user.
        inversion: the service's copy of the ``.p2pinv`` file.
        inversion_name: its own file name.
        method: the inversion method (an inverting source's name).
        method_options: ``{option: control value}`` of the method.
        prompt: the source prompt.
        targets: target prompts, one per line (or a list).
        edit: ``"auto"`` (replace or refine, as the command line chooses) or an edit's name.
        extra_edits: more edits to apply after it, in order.
        edit_options: ``{edit: {option: control value}}`` (used for the edits in the run).
        cross_replace: fraction of the steps with cross-attention injected.
        cross_replace_words: per-word windows, ``lion=0.4`` (or ``lion=0.2:0.6``), comma
            separated.
        self_replace: fraction of the steps with self-attention injected.
        steps, guidance, seed, height, width, scheduler: as the command line's options
            (height/width None: the model's size).
        attention: keep and draw the per-token attention maps.
    """

    start: str = "seed"
    photo: str | None = None
    photo_name: str = "photo.png"
    inversion: str | None = None
    inversion_name: str = "inversion.p2pinv"
    method: str = "null-text"
    method_options: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    targets: str | Sequence[str] = ""
    edit: str = "auto"
    extra_edits: Sequence[str] = ()
    edit_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    cross_replace: float = 0.8
    cross_replace_words: str = ""
    self_replace: float = 0.4
    steps: int = 50
    guidance: float = 7.5
    seed: int = 8888
    height: int | None = None
    width: int | None = None
    scheduler: str = "ddim"
    attention: bool = True


@dataclass
class InversionFacts:
    """What the page fills in from an uploaded ``.p2pinv`` file."""

    path: str
    name: str
    prompt: str
    method: str
    steps: int
    guidance: float
    height: int
    width: int


@dataclass
class RunOutcome:
    """A finished run, for the page.

    Attributes:
        images: ``(path, caption)`` per prompt, source first.
        attention: ``attention.png`` or None.
        record: ``run.json``.
        command: the shell command that runs the same edit (``p2p-run edit ...``).
        inversion: ``"computed"``, ``"reused"`` (the cache held it), ``"file"`` (an
            uploaded ``.p2pinv``) or None (no photo).
        inversion_seconds: how long the inversion took when it was computed.
        warnings: one line each (words the model does not know, a photo it cannot
            represent...).
        seconds: the run's wall time, model lock wait excluded.
        record_data: the ``run.json`` record.
    """

    images: list[tuple[Path, str]]
    attention: Path | None
    record: Path
    command: str
    inversion: str | None
    inversion_seconds: float | None
    warnings: list[str]
    seconds: float
    record_data: dict[str, Any]


def _inverting_sources(registry: PluginRegistry) -> list[str]:
    from ..inversion import InvertingSource

    return [
        info.name
        for info in registry.plugins("source")
        if issubclass(info.plugin_class, InvertingSource)
    ]


def _integer(value: Any, label: str, kind: type = int) -> Any:
    """A number field's value as ``kind``; an empty or non-numeric field is a
    :class:`WebInputError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise WebInputError(f"{label} must be a number, got {value!r}") from None
    if kind is int and not number.is_integer():
        raise WebInputError(f"{label} must be a whole number, got {value!r}")
    return int(number) if kind is int else number


def _lines(text: str | Sequence[str]) -> list[str]:
    items = text.splitlines() if isinstance(text, str) else list(text)
    return [item.strip() for item in items if item and item.strip()]


class EditService:
    """The page's engine: one model, one run at a time, a private folder.

    Args:
        model: hub id or diffusers folder (None: ``$P2P_FRAMEWORK_MODEL``, else the demo
            model), as ``p2p-run --model``.
        revision, device, dtype, compile: as the command line's options.
        registry: the plugins (default: the global registry, entry points included).
        workdir: the service's folder for uploads and runs (default: a new temporary
            folder, removed by :meth:`close`).
        cache_dir: the inversion cache (default: the command line's,
            ``$P2P_FRAMEWORK_CACHE_DIR`` or ``~/.cache/p2p-framework/inversions``).
        loader: ``loader(model, device=, dtype=, revision=, compile=)`` (default
            :func:`~p2p_framework.load_model`).
        max_upload_bytes, max_pixels, keep_runs: limits (see the module's constants).
        max_steps: the most diffusion steps a page run may ask for.
        max_side: the largest height or width, in pixels (default: twice the model's size).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        registry: PluginRegistry | None = None,
        workdir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        loader: Callable[..., Any] | None = None,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int = MAX_PIXELS,
        keep_runs: int = KEEP_RUNS,
        max_steps: int = 200,
        max_side: int | None = None,
    ) -> None:
        from ..inversion.cache import default_cache_dir
        from ..runner import ModelCache, model_from_env

        self.registry = registry if registry is not None else get_registry()
        self.model_name = model_from_env(model)
        self.model_options = {
            "model": self.model_name,
            "revision": revision,
            "device": device,
            "dtype": dtype,
            "compile": compile,
        }
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="p2p-serve-")).resolve()
        (self.workdir / "uploads").mkdir(parents=True, exist_ok=True)
        (self.workdir / "runs").mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.models = ModelCache(loader)
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.keep_runs = keep_runs
        self.max_steps = max_steps
        self._max_side = max_side
        #: Held by the run on the model; a cancelled run holds it until its next step.
        self.lock = threading.Lock()
        #: What the last run did, for logs and tests: ``"ok"``, ``"error"`` or the
        #: :class:`RunCancelled` message.
        self.last_status: str | None = None

    # -- the model ---------------------------------------------------------------------------
    def _spec_base(self) -> RunSpec:
        from ..pipeline import EditSettings
        from ..plugins.seed import Seed

        return RunSpec("edit", ["x"], Seed(), [], EditSettings(), **self.model_options)

    def load(self) -> Any:
        """Load the model now (the first run would otherwise); returns it."""
        return self.models.get(self._spec_base())[0]

    @property
    def model(self) -> Any:
        """The loaded model."""
        return self.load()

    @property
    def max_side(self) -> int:
        """The largest height or width a run may ask for."""
        return self._max_side or 2 * int(self.model.default_size)

    def close(self) -> None:
        """Remove the service's folder if it made it."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what the page offers ----------------------------------------------------------------
    def edit_names(self) -> list[str]:
        """The registered edits."""
        return [info.name for info in self.registry.plugins("edit")]

    def method_names(self) -> list[str]:
        """The registered inversion methods (sources that can invert a photo)."""
        return _inverting_sources(self.registry)

    def edit_controls(self) -> dict[str, list[Control]]:
        """Each edit's controls, generated from its declared options."""
        return {
            info.name: option_controls(info.name, info.plugin_class)
            for info in self.registry.plugins("edit")
        }

    def method_controls(self) -> dict[str, list[Control]]:
        """Each inversion method's own controls (not the photo, file and cache options,
        which the page sets itself)."""
        from ..inversion.source import COMMON_OPTIONS

        return {
            info.name: option_controls(info.name, info.plugin_class, skip=COMMON_OPTIONS)
            for info in self.registry.plugins("source")
            if info.name in self.method_names()
        }

    def summary(self, name: str, kind: str = "edit") -> str:
        """A plugin's one-line summary."""
        return self.registry.get(kind, name).summary

    # -- uploads -----------------------------------------------------------------------------
    def _check_upload(self, path: str | Path, what: str) -> Path:
        source = Path(path)
        if not source.is_file():
            raise WebInputError(f"the uploaded {what} is gone; upload it again")
        size = source.stat().st_size
        if size > self.max_upload_bytes:
            raise WebInputError(
                f"the {what} is {size / 2**20:.1f} MiB; at most "
                f"{self.max_upload_bytes / 2**20:.0f} MiB is accepted"
            )
        return source

    def accept_photo(self, path: str | Path, name: str | None = None) -> tuple[str, Image.Image]:
        """Check and copy an uploaded photo.

        Its header is read first: a file that is not an image, or one that claims more than
        ``max_pixels`` (a decompression bomb), is refused before anything is decoded. Then the
        project's loader decodes it (EXIF orientation, transparency on white) and the RGB
        pixels are stored as PNG in the service's folder, named by their hash.

        Returns:
            ``(stored path, the photo as the model will see it)``.

        Raises:
            WebInputError: not an image, too large, unreadable or too small.
        """
        from ..inversion.images import load_image, prepare_image

        source = self._check_upload(path, "photo")
        shown = name or source.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(source) as opened:
                    width, height = opened.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise WebInputError(
                f"{shown!r} is too large to decode safely (a decompression bomb?)"
            ) from None
        except (OSError, SyntaxError, ValueError) as error:
            detail = "not an image Pillow can read" if "identify" in str(error) else str(error)
            raise WebInputError(f"{shown!r} is {detail}") from None
        if width * height > self.max_pixels:
            raise WebInputError(
                f"{shown!r} is {width}x{height} px ({width * height / 1e6:.0f} MP); at most "
                f"{self.max_pixels / 1e6:.0f} MP is accepted"
            )
        try:
            rgb = load_image(source)
        except P2PError as error:
            raise WebInputError(str(error).replace(str(source), shown)) from None
        digest = hashlib.sha256(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()[:32]
        stored = self.workdir / "uploads" / f"{digest}.png"
        if not stored.is_file():
            from ..outputs import save_png

            save_png(rgb, stored)
        size = int(self.model.default_size)
        return str(stored), prepare_image(rgb, size, size)

    def accept_inversion(self, path: str | Path, name: str | None = None) -> InversionFacts:
        """Check and copy an uploaded ``.p2pinv`` file (safetensors: no code runs on load).

        Raises:
            WebInputError: not a saved inversion, or made for another model.
        """
        from ..inversion import Inversion

        source = self._check_upload(path, "inversion file")
        shown = name or source.name
        try:
            inversion = Inversion.load(source)
            inversion.check(self.model, name=f"inversion {shown!r}")
        except P2PError as error:
            raise WebInputError(str(error).replace(str(source), shown)) from None
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:32]
        stored = self.workdir / "uploads" / f"{digest}.p2pinv"
        if not stored.is_file():
            shutil.copyfile(source, stored)
        return InversionFacts(
            str(stored),
            shown,
            inversion.prompt,
            inversion.method,
            inversion.num_steps,
            inversion.guidance,
            inversion.height,
            inversion.width,
        )

    # -- a run -------------------------------------------------------------------------------
    def _own(self, path: str | None, what: str) -> str:
        """``path`` if it is one of this service's uploads (a run never reads another)."""
        if not path:
            raise WebInputError(f"upload a {what} first")
        resolved = Path(path).resolve()
        if resolved.parent != self.workdir / "uploads" or not resolved.is_file():
            raise WebInputError(f"upload the {what} again (it is not one of this page's)")
        return str(resolved)

    def _options(
        self, plugin: str, controls: list[Control], values: Mapping[str, Any]
    ) -> dict[str, Any]:
        options = {}
        for control in controls:
            if control.option in values:
                value = control_value(control, values[control.option])
                if value is not MISSING:
                    options[control.option] = value
        return options

    def job(self, form: EditForm) -> tuple[dict[str, Any], dict[str, str | None]]:
        """The form as a job of the command line's vocabulary, and the source's path
        options as the command line shown to the user writes them.

        Raises:
            WebInputError: a missing upload, no target, or a value out of the page's limits.
        """
        prompt = form.prompt.strip()
        targets = _lines(form.targets)
        if not targets:
            raise WebInputError("give at least one target prompt (one per line)")
        steps = _integer(form.steps, "steps")
        if not 1 <= steps <= self.max_steps:
            raise WebInputError(f"steps must be between 1 and {self.max_steps}, got {steps}")
        for label, value in (("height", form.height), ("width", form.width)):
            if value is not None and not 1 <= int(value) <= self.max_side:
                raise WebInputError(
                    f"{label} must be between 1 and {self.max_side} px, got {value}"
                )
        cross = f"default={_integer(form.cross_replace, 'cross-replace', float)}"
        if form.cross_replace_words.strip():
            cross += "," + form.cross_replace_words.strip()
        job: dict[str, Any] = {
            "mode": "edit",
            "targets": targets,
            "cross_replace": cross,
            "self_replace": _integer(form.self_replace, "self-replace", float),
            "steps": steps,
            "guidance": _integer(form.guidance, "guidance", float),
            "scheduler": form.scheduler,
            "height": int(form.height) if form.height else None,
            "width": int(form.width) if form.width else None,
            "save_attention": bool(form.attention),
            **{k: v for k, v in self.model_options.items()},
        }
        sets: dict[str, dict[str, Any]] = {}
        paths: dict[str, str | None] = {"cache_dir": None}
        if form.start == "photo":
            if form.method not in self.method_names():
                raise WebInputError(f"unknown inversion method {form.method!r}")
            job["image"] = self._own(form.photo, "photo")
            job["source"] = form.method
            controls = self.method_controls()[form.method]
            sets[form.method] = {
                **self._options(form.method, controls, form.method_options),
                "cache_dir": str(self.cache_dir),
            }
            paths["image"] = Path(form.photo_name or "photo.png").name
        elif form.start == "inversion":
            job["inversion"] = self._own(form.inversion, "saved inversion (.p2pinv)")
            if not prompt:  # the file's prompt, as `p2p-run edit --inversion` takes it
                from ..inversion import Inversion

                prompt = Inversion.load(job["inversion"]).prompt
            paths["inversion"] = Path(form.inversion_name or "inversion.p2pinv").name
        elif form.start == "seed":
            job["seed"] = _integer(form.seed, "seed")
        else:
            raise WebInputError(f"start from a seed, a photo or an inversion, not {form.start!r}")
        job["prompt"] = prompt or None
        edits = [] if form.edit in ("", "auto", None) else [form.edit]
        if not edits and prompt:
            edits = default_edit(self.registry, [prompt, *targets])
        edits += [name for name in form.extra_edits if name not in edits]
        job["edits"] = edits
        controls_by_edit = self.edit_controls()
        for name in edits:
            if name not in controls_by_edit:
                raise WebInputError(f"unknown edit {name!r}")
            options = self._options(name, controls_by_edit[name], form.edit_options.get(name, {}))
            if options:
                sets[name] = options
        job["set"] = sets
        return job, paths

    def spec(self, form: EditForm) -> tuple[RunSpec, list[str]]:
        """The form's :class:`RunSpec` and the ``p2p-run edit`` arguments that make it.

        Raises:
            P2PError: bad input, with a one-line message (as the command line gives it).
        """
        job, paths = self.job(form)
        spec = spec_from_job(job, self.registry)
        return spec, spec_argv(spec, self.registry, paths=paths)

    def run(
        self,
        form: EditForm,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> RunOutcome:
        """Run the form's edit on the model (waiting for the run before it) and write its
        files into a new run folder.

        Args:
            form: what the controls hold.
            progress: ``progress(done, total, info)`` after each step of the inversion
                (``info["phase"] == "source"``) and of the edit (``"denoise"``).
            cancel: when set, the run stops at its next step (:class:`RunCancelled`).

        Raises:
            P2PError, OSError: bad input, one line (nothing is written).
            RunCancelled: ``cancel`` was set.
        """
        import shlex

        from ..preflight import unknown_word_warning
        from ..runner import run_job

        spec, argv = self.spec(form)

        def on_step(done: int, total: int, info: dict[str, Any]) -> None:
            if cancel is not None and cancel.is_set():
                raise RunCancelled(done, total, str(info.get("phase", "denoise")))
            if progress is not None:
                progress(done, total, info)

        out = self.workdir / "runs" / uuid.uuid4().hex
        with self.lock:
            if cancel is not None and cancel.is_set():
                raise RunCancelled(0, spec.settings.steps, "queue")
            began = time.perf_counter()
            # The run's warnings, for the page (one run at a time: the lock is held).
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", P2PWarning)
                try:
                    record, paths = run_job(
                        spec,
                        out,
                        registry=self.registry,
                        models=self.models,
                        progress=on_step,
                        command=argv,
                    )
                except RunCancelled as stop:
                    self.last_status = str(stop)
                    raise
                except BaseException:
                    self.last_status = "error"
                    raise
            seconds = time.perf_counter() - began
        self.last_status = "ok"
        self._prune()
        notes = [
            " ".join(str(w.message).split()) for w in caught if issubclass(w.category, P2PWarning)
        ]
        unknown = unknown_word_warning(self.model.tokenizer, spec.prompts, self.model_name)
        if unknown:
            notes.insert(0, unknown)
        folder = paths[0].parent
        names = record["outputs"]["images"]
        inversion = record["source_info"].get("inversion")
        where = {"hit": "reused", "miss": "computed", "off": "computed", "file": "file"}
        return RunOutcome(
            images=[(folder / n, p) for n, p in zip(names, record["prompts"])],
            attention=folder / record["outputs"]["attention"]
            if record["outputs"].get("attention")
            else None,
            record=folder / "run.json",
            command=shlex.join(argv),
            inversion=where.get(inversion.get("cache")) if inversion else None,
            inversion_seconds=inversion.get("seconds") if inversion else None,
            warnings=list(dict.fromkeys(notes)),
            seconds=seconds,
            record_data=record,
        )

    def _prune(self) -> None:
        """Keep the newest ``keep_runs`` run folders and uploads."""
        for sub in ("runs", "uploads"):
            entries = sorted(
                (self.workdir / sub).iterdir(), key=lambda p: p.stat().st_mtime, reverse=True
            )
            for old in entries[self.keep_runs :]:
                with contextlib.suppress(OSError):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()


def form_fields() -> list[str]:
    """The names of :class:`EditForm`'s fields, in order."""
    return [f.name for f in dataclasses.fields(EditForm)]


__all__ = [
    "KEEP_RUNS",
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "EditForm",
    "EditService",
    "InversionFacts",
    "RunCancelled",
    "RunOutcome",
    "WebInputError",
    "form_fields",
]
