"""Jobs: one run described in the command line's vocabulary, and pipeline files of many.

A *job* says which model, prompts, source, edits, options and settings a run uses, in the
words of ``p2p-run edit`` (``prompt``, ``targets``, ``edits``, ``cross_replace``, ``blend``,
``reweight``, ``set``...). :func:`job_from_options` resolves it against the plugin registry
into a :class:`JobSpec`: every plugin by name with all its options (defaults included) and every
:class:`~p2p_framework.EditSettings` field. :func:`run_job` runs a spec and writes its files;
``run.json`` keeps the spec, so :func:`job_from_record` gives it back for ``p2p-run rerun``.

A pipeline file (TOML) is a model and a list of jobs; :func:`load_pipeline` reads it and
:func:`run_pipeline` runs the jobs with one model load, going on past a failing job. The file
format is documented in ``docs/cli.md``.

Everything here is Python API::

    from p2p_framework.jobs import job_from_options, run_job

    spec = job_from_options({"model": "path/to/model", "prompt": "a cat on a mat",
                             "targets": ["a dog on a mat"], "seed": 8888})
    record, paths = run_job(spec, out_dir="out/dog")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionError, P2PError
from .options import describe_options
from .values import json_ready, option_types, parse_option

#: Environment variable naming the model when ``--model`` (or a pipeline's ``model``) is absent.
MODEL_ENV = "P2P_FRAMEWORK_MODEL"
#: The plugin name ``--set`` uses for :class:`~p2p_framework.EditSettings` fields.
SETTINGS_PREFIX = "pipeline"
#: The run modes: ``edit`` (a source prompt and targets) and ``generate`` (plain generation).
MODES = ("edit", "generate")

#: Every key a job accepts (the long options of ``p2p-run edit``, with ``_`` for ``-``).
JOB_KEYS = (
    "name",
    "mode",
    "model",
    "revision",
    "device",
    "dtype",
    "compile",
    "prompt",
    "prompts",
    "target",
    "targets",
    "source",
    "image",
    "inversion",
    "no_cache",
    "edit",
    "edits",
    "cross_replace",
    "self_replace",
    "blend",
    "reweight",
    "set",
    "seed",
    "steps",
    "guidance",
    "height",
    "width",
    "scheduler",
    "save_attention",
    "out",
)
#: UNet rows per batch that ``max_batch_rows="auto"`` (``p2p-run run --batch-rows auto``)
#: gives, by device type: on a GPU a batch of 16 rows (4 one-target edits) fills the device
#: better than 4; on the CPU the UNet's cost grows with its rows and batching gained little
#: (see docs/benchmarks.md), so jobs run one at a time. Other devices use the ``cpu`` entry.
AUTO_BATCH_ROWS: dict[str, int] = {"cuda": 16, "cpu": 1}

#: Keys of a pipeline file's top level.
PIPELINE_KEYS = ("model", "revision", "device", "dtype", "compile", "out", "defaults", "jobs")


class JobError(P2PError):
    """A job or pipeline file asks for something that cannot be run (the message says what)."""


@dataclass
class PluginSpec:
    """A plugin by name with every option it is built with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobSpec:
    """One run, fully resolved.

    Attributes:
        mode: ``"edit"`` (prompt 0 is the source, the others its edits) or ``"generate"``
            (independent prompts, no edit).
        prompts: the prompts, source first.
        source: the source plugin and its options.
        edits: the edit plugins, in order, with their options.
        settings: every :class:`~p2p_framework.EditSettings` field.
        model, revision, device, dtype, compile: what :func:`~p2p_framework.load_model` is
            given.
        save_attention: write ``attention.png``.
        out: output folder (None: the caller decides).
        name: the job's name in a pipeline file.
        identity: for a rerun, the model identity recorded by the first run (to warn when
            the model folder changed).
    """

    mode: str
    prompts: list[str]
    source: PluginSpec
    edits: list[PluginSpec]
    settings: dict[str, Any]
    model: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    save_attention: bool = False
    out: str | None = None
    name: str | None = None
    identity: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return json_ready(dataclasses.asdict(self))


# -- values of the vocabulary ---------------------------------------------------------------


def _bounds_from_text(text: str, option: str) -> float | tuple[float, float]:
    text = text.strip()
    try:
        if ":" in text:
            start, _, end = text.partition(":")
            return (float(start), float(end))
        return float(text)
    except ValueError:
        raise OptionError(
            SETTINGS_PREFIX, option, f"expected a fraction such as 0.8 or a range a:b, got {text!r}"
        ) from None


def parse_bounds_value(value: Any, option: str = "self_replace_steps") -> Any:
    """``0.4``, ``"0.4"``, ``"0.2:0.6"``, ``[0.2, 0.6]`` -> a fraction or a pair, checked."""
    from .schedules import parse_bounds

    if isinstance(value, str):
        value = (
            json.loads(value) if value.strip().startswith("[") else _bounds_from_text(value, option)
        )
    if isinstance(value, (list, tuple)):
        value = tuple(value)
    parse_bounds(value, plugin=SETTINGS_PREFIX, option=option)  # raises OptionError
    return value


def parse_cross_replace(value: Any) -> Any:
    """``--cross-replace`` values: ``0.8``, ``0.2:0.8``, ``default=1.0,lion=0.4`` (each value a
    fraction or ``a:b``), a JSON list/object, or the same as TOML values. The key ``default``
    becomes ``default_``."""
    from .schedules import DEFAULT_WORD_KEY

    option = "cross_replace_steps"
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            try:
                value = json.loads(text)
            except ValueError as error:
                raise OptionError(SETTINGS_PREFIX, option, f"bad JSON {text!r}: {error}") from None
        elif "=" in text:
            pairs = {}
            for item in (p for p in text.split(",") if p.strip()):
                word, sep, bounds = item.partition("=")
                if not sep or not word.strip():
                    raise OptionError(
                        SETTINGS_PREFIX, option, f"expected word=fraction pairs, got {text!r}"
                    )
                pairs[word.strip()] = bounds
            value = pairs
    if isinstance(value, Mapping):
        result = {}
        for word, bounds in value.items():
            key = DEFAULT_WORD_KEY if word in ("default", DEFAULT_WORD_KEY) else str(word)
            result[key] = parse_bounds_value(bounds, f"{option}[{word!r}]")
        return result
    return parse_bounds_value(value, option)


def _settings_types() -> dict[str, Any]:
    from .pipeline import EditSettings

    return {f.name: t for f, t in zip(dataclasses.fields(EditSettings), _hints(EditSettings))}


def _hints(cls: type) -> list[Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    return [hints.get(f.name, Any) for f in dataclasses.fields(cls)]


def parse_setting(key: str, value: Any) -> Any:
    """One :class:`~p2p_framework.EditSettings` field from text or a typed value."""
    types = _settings_types()
    if key not in types:
        listed = ", ".join(types)
        raise OptionError(SETTINGS_PREFIX, key, f"unknown setting; settings are: {listed}")
    if key == "cross_replace_steps":
        return parse_cross_replace(value)
    if key == "self_replace_steps":
        return parse_bounds_value(value)
    return parse_option(SETTINGS_PREFIX, key, types[key], value)


def _as_list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise JobError(f"{key}: expected text or a list of texts, got {value!r}")


def parse_assignments(value: Any) -> list[tuple[str, str, Any]]:
    """``set`` entries: ``"PLUGIN.KEY=VALUE"`` texts, or ``{plugin: {key: value}}`` tables."""
    found: list[tuple[str, str, Any]] = []
    if isinstance(value, Mapping):
        for plugin, options in value.items():
            if not isinstance(options, Mapping):
                raise JobError(
                    f"set.{plugin}: expected a table of options such as {{ threshold = 0.4 }}"
                )
            found.extend((str(plugin), str(k), v) for k, v in options.items())
        return found
    for item in _as_list(value, "set"):
        if not isinstance(item, str):
            raise JobError(f"set: expected PLUGIN.KEY=VALUE, got {item!r}")
        target, sep, text = item.partition("=")
        plugin, dot, key = target.strip().rpartition(".")
        if not sep or not dot or not plugin or not key:
            raise JobError(
                f"--set expects PLUGIN.KEY=VALUE (e.g. local-blend.threshold=0.4), got {item!r}"
            )
        found.append((plugin, key, text))
    return found


def _reweight_value(value: Any) -> Any:
    """``--reweight`` gives ``["smiling=5", "doll=2"]``; a pipeline may give a table."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        for item in value:
            if "=" not in item:
                raise OptionError("reweight", "weights", f"expected WORD=FACTOR, got {item!r}")
        return ",".join(value)
    return value


def _auto_edit(prompts: list[str]) -> str:
    """The edit a job without ``edits`` uses: ``replace`` when every target has as many words
    as the source (a word swap), else ``refine`` (words added)."""
    words = len(prompts[0].split())
    return "replace" if all(len(p.split()) == words for p in prompts[1:]) else "refine"


def _plugin_options(registry: Any, kind: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Build the plugin once (validating the options) and return every option's value."""
    plugin = registry.build(kind, name, options)
    return {o.name: getattr(plugin, o.name) for o in describe_options(type(plugin))}


def _default_source(merged: Mapping[str, Any]) -> str:
    """``seed``; with ``image`` ``null-text``; with ``inversion`` the method it was made with."""
    if merged.get("inversion") is not None:
        from .inversion import Inversion

        return Inversion.load(merged["inversion"]).method
    if merged.get("image") is not None:
        return "null-text"
    return "seed"


def _flag(value: Any, key: str) -> bool:
    """A yes/no key of a job or pipeline file (absent means no)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise JobError(f"{key} must be true or false, got {value!r}")
    return value


def model_from_env(model: str | None) -> str:
    """``model``, else ``$P2P_FRAMEWORK_MODEL``, else the embedded demo model's folder."""
    from .demo import DEMO_MODEL_DIR

    return str(model or os.environ.get(MODEL_ENV) or DEMO_MODEL_DIR)


def job_from_options(
    options: Mapping[str, Any],
    registry: Any = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> JobSpec:
    """Resolve a job given in the command line's vocabulary (see :data:`JOB_KEYS`).

    Shortcuts: ``seed`` sets the source's ``seed`` option; ``image`` and ``inversion`` set
    the source's ``image`` / ``inversion`` option, and without ``source`` choose
    ``null-text`` (for an image) or the method a saved inversion was made with;
    ``reweight`` (``word=factor`` texts or a table) sets ``reweight.weights`` and adds
    ``reweight`` to the edits if absent;
    ``blend`` sets ``local-blend.words`` and adds ``local-blend`` if absent; ``set`` gives any
    plugin's option (``PLUGIN.KEY=VALUE`` or ``{plugin = {key = value}}``), or an
    :class:`~p2p_framework.EditSettings` field as ``pipeline.KEY``. Without ``edits``, an edit
    job uses ``replace`` when the targets have the source's word count, else ``refine``.

    Args:
        options: the job's keys; values are text (as typed on the command line) or TOML/JSON
            values.
        registry: plugin registry (default: :func:`~p2p_framework.get_registry`).
        defaults: keys used where ``options`` lacks them (a pipeline file's ``[defaults]``).

    Raises:
        JobError, PluginError, OptionError: with a one-line message.
    """
    from .pipeline import EditSettings
    from .registry import get_registry

    registry = registry if registry is not None else get_registry()
    merged = {**(defaults or {}), **{k: v for k, v in options.items() if v is not None}}
    unknown = sorted(set(merged) - set(JOB_KEYS))
    if unknown:
        raise JobError(
            f"unknown job key(s) {', '.join(unknown)}; a job accepts: {', '.join(JOB_KEYS)}"
        )
    mode = merged.get("mode", "edit")
    if mode not in MODES:
        raise JobError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    # Prompts.
    if mode == "edit":
        prompt = merged.get("prompt")
        if isinstance(prompt, (list, tuple)) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobError('give the source prompt (--prompt / prompt = "...")')
        targets = _as_list(merged.get("targets"), "targets") + _as_list(
            merged.get("target"), "target"
        )
        prompts = [prompt, *targets]
    else:
        prompts = _as_list(merged.get("prompts"), "prompts") + _as_list(
            merged.get("prompt"), "prompt"
        )
        if not prompts:
            raise JobError("give at least one prompt (--prompt / prompts = [...])")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobError(f"prompts must be non-empty texts, got {prompt!r}")

    # Plugins in the run.
    source_name = merged.get("source") or _default_source(merged)
    if not isinstance(source_name, str):
        raise JobError(f"source: expected a plugin name, got {source_name!r}")
    registry.get("source", source_name)
    edit_names = _as_list(merged.get("edits"), "edits") + _as_list(merged.get("edit"), "edit")
    if mode == "generate" and (edit_names or merged.get("blend") or merged.get("reweight")):
        raise JobError("generate makes plain images: edits, blend and reweight need `p2p-run edit`")
    for option in ("cross_replace", "self_replace"):
        if mode == "generate" and merged.get(option) is not None:
            raise JobError(f"generate makes plain images: {option} needs `p2p-run edit`")
    if mode == "edit" and not edit_names and len(prompts) > 1:
        edit_names = [_auto_edit(prompts)]
    assignments: list[tuple[str, str, Any]] = []
    if merged.get("reweight") is not None:
        if "reweight" not in edit_names:
            edit_names.append("reweight")
        assignments.append(("reweight", "weights", _reweight_value(merged["reweight"])))
    if merged.get("blend") is not None:
        if "local-blend" not in edit_names:
            edit_names.append("local-blend")
        assignments.append(("local-blend", "words", merged["blend"]))
    for name in edit_names:
        if not isinstance(name, str):
            raise JobError(f"edits: expected plugin names, got {name!r}")
        registry.get("edit", name)
    if merged.get("seed") is not None:
        seed_options = {o.name for o in registry.get("source", source_name).options}
        # A [defaults] seed does not apply to a source without seeds (a real photo).
        if "seed" in seed_options or options.get("seed") is not None:
            assignments.append((source_name, "seed", merged["seed"]))
    for key in ("image", "inversion"):
        if merged.get(key) is not None:
            assignments.append((source_name, key, str(merged[key])))
    if merged.get("no_cache"):
        if "cache" not in {o.name for o in registry.get("source", source_name).options}:
            raise JobError(f"no_cache: the source {source_name!r} keeps no cache")
        assignments.append((source_name, "cache", False))
    assignments.extend(parse_assignments(merged.get("set")))

    # Settings.
    settings: dict[str, Any] = {}
    for key, setting in (
        ("steps", "steps"),
        ("guidance", "guidance"),
        ("height", "height"),
        ("width", "width"),
        ("scheduler", "scheduler"),
        ("cross_replace", "cross_replace_steps"),
        ("self_replace", "self_replace_steps"),
    ):
        if merged.get(key) is not None:
            settings[setting] = parse_setting(setting, merged[key])
    save_attention = merged.get("save_attention", False)
    if not isinstance(save_attention, bool):
        save_attention = parse_option(SETTINGS_PREFIX, "save_attention", bool, save_attention)

    # Options, each for a plugin that is in the run.
    in_run = {source_name: "source", **{name: "edit" for name in edit_names}}
    options_of: dict[str, dict[str, Any]] = {name: {} for name in in_run}
    for plugin, key, value in assignments:
        if plugin == SETTINGS_PREFIX:
            settings[key] = parse_setting(key, value)
            continue
        if plugin not in in_run:
            edits_text = ", ".join(edit_names) or "none"
            raise JobError(
                f"option {plugin}.{key} is for plugin {plugin!r}, which is not in this run "
                f"(source: {source_name}; edits: {edits_text}); add it with --edit {plugin} "
                f"or --source {plugin}"
            )
        info = registry.get(in_run[plugin], plugin)
        types = option_types(info.plugin_class)
        known = [o.name for o in info.options]
        if key not in known:
            listed = ", ".join(known) or "none"
            raise OptionError(plugin, key, f"unknown option; {plugin} accepts: {listed}")
        options_of[plugin][key] = parse_option(plugin, key, types.get(key, Any), value)
    if save_attention:
        settings["attention_maps"] = True
    try:
        edit_settings = EditSettings(**settings)
    except TypeError as error:
        raise JobError(f"bad settings: {error}") from None
    edit_settings.check()

    source = PluginSpec(
        source_name, _plugin_options(registry, "source", source_name, options_of[source_name])
    )
    edits = [
        PluginSpec(name, _plugin_options(registry, "edit", name, options_of[name]))
        for name in edit_names
    ]
    device, dtype = merged.get("device") or "auto", merged.get("dtype") or "auto"
    name = merged.get("name")
    out = merged.get("out")
    return JobSpec(
        mode=mode,
        prompts=prompts,
        source=source,
        edits=edits,
        settings=dict(edit_settings.__dict__),
        model=str(merged["model"]) if merged.get("model") else None,
        revision=merged.get("revision"),
        device=str(device),
        dtype=str(dtype),
        compile=_flag(merged.get("compile"), "compile"),
        save_attention=bool(save_attention),
        out=str(out) if out else None,
        name=str(name) if name else None,
    )


def job_from_record(record: Mapping[str, Any]) -> JobSpec:
    """The spec of the run a ``run.json`` record describes (for ``p2p-run rerun``).

    The model is the recorded one (a hub model at its recorded commit when known), on the
    recorded device and dtype, so a rerun on the same machine gives the same pixels.

    Raises:
        JobError: not a run record, or one this version cannot read.
    """
    from .outputs import RECORD_FORMAT

    if not isinstance(record, Mapping) or record.get("format") != RECORD_FORMAT:
        found = record.get("format") if isinstance(record, Mapping) else type(record).__name__
        raise JobError(f"not a p2p-run record (format {found!r}; expected {RECORD_FORMAT!r})")
    try:
        identity = dict(record["model"])
        settings_types = _settings_types()
        settings = {k: v for k, v in record["settings"].items() if k in settings_types}
        if isinstance(settings.get("cross_replace_steps"), list):
            settings["cross_replace_steps"] = tuple(settings["cross_replace_steps"])
        if isinstance(settings.get("self_replace_steps"), list):
            settings["self_replace_steps"] = tuple(settings["self_replace_steps"])
        return JobSpec(
            mode=record.get("mode", "edit"),
            prompts=list(record["prompts"]),
            source=PluginSpec(record["source"]["name"], dict(record["source"]["options"])),
            edits=[PluginSpec(e["name"], dict(e["options"])) for e in record["edits"]],
            settings=settings,
            model=identity["model"],
            revision=identity.get("commit") or identity.get("revision"),
            device=identity.get("device", "auto"),
            dtype=identity.get("dtype", "auto"),
            compile=bool(identity.get("compile")),
            save_attention=bool(record.get("save_attention", False)),
            name=record.get("name"),
            identity=identity,
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise JobError(
            f"run record is incomplete or malformed ({type(error).__name__}: {error})"
        ) from None


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``run.json``; :class:`JobError` if it is missing or not JSON."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise JobError(
            f"cannot read run record {os.fspath(path)!r}: {error.strerror or error}"
        ) from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise JobError(f"run record {os.fspath(path)!r} is not JSON: {error}") from None


def build_plugins(spec: JobSpec, registry: Any = None) -> tuple[Any, list[Any]]:
    """Fresh source and edit objects of a spec (plugins keep per-run state).

    Option values are brought to their annotated types first, so a spec read back from JSON
    (lists for tuples, text for paths) builds the same plugins.
    """
    from .registry import get_registry

    registry = registry if registry is not None else get_registry()

    def build(kind: str, plugin: PluginSpec) -> Any:
        types = option_types(registry.get(kind, plugin.name).plugin_class)
        options = {
            key: parse_option(plugin.name, key, types[key], value) if key in types else value
            for key, value in plugin.options.items()
        }
        return registry.build(kind, plugin.name, options)

    return build("source", spec.source), [build("edit", edit) for edit in spec.edits]


# -- models -----------------------------------------------------------------------------------


class ModelCache:
    """Keeps the last loaded model, so jobs that share a model load it once.

    Args:
        loader: ``loader(model, device=, dtype=, revision=, compile=)`` (default
            :func:`~p2p_framework.load_model`).
        size: how many models to keep (1: a job naming another model replaces it).
    """

    def __init__(self, loader: Callable[..., Any] | None = None, size: int = 1) -> None:
        self._loader = loader
        self._size = max(1, size)
        self._models: dict[tuple[Any, ...], Any] = {}
        self.loads = 0

    @staticmethod
    def key(spec: JobSpec) -> tuple[Any, ...]:
        """What tells two jobs' models apart: jobs with equal keys share one model."""
        return (model_from_env(spec.model), spec.revision, spec.device, spec.dtype, spec.compile)

    def get(self, spec: JobSpec) -> tuple[Any, float]:
        """The model of ``spec`` and the seconds spent loading it (0 when cached)."""
        from .model import load_model

        model_name = model_from_env(spec.model)
        key = self.key(spec)
        if key in self._models:
            model = self._models.pop(key)
            self._models[key] = model
            return model, 0.0
        began = time.perf_counter()
        loader = self._loader or load_model
        model = loader(
            model_name,
            device=spec.device,
            dtype=spec.dtype,
            revision=spec.revision,
            compile=spec.compile,
        )
        self.loads += 1
        self._models[key] = model
        while len(self._models) > self._size:
            self._models.pop(next(iter(self._models)))
        return model, time.perf_counter() - began


def model_changed(spec: JobSpec, model: Any) -> str | None:
    """For a rerun: a warning when the loaded model is not the recorded one, else None."""
    recorded = spec.identity or {}
    if recorded.get("folder_hash") and recorded.get("folder_hash") != model.identity.get(
        "folder_hash"
    ):
        return (
            f"the model folder {recorded.get('model')!r} changed since the recorded run "
            "(its folder hash differs); images may differ"
        )
    if recorded.get("commit") and model.identity.get("commit") not in (None, recorded["commit"]):
        found = model.identity.get("commit")
        return f"the model is at commit {found}, the record has {recorded['commit']}"
    return None


# -- running ----------------------------------------------------------------------------------


@dataclass
class _StartedJob:
    """A job whose output folder is ready and whose plugins are built, before its run."""

    spec: JobSpec
    out: Path
    existed: bool
    source: Any
    edits: list[Any]
    settings: Any
    began: float
    setup_seconds: float = 0.0

    def discard(self) -> None:
        """Remove the output folder if this job created it and wrote nothing into it."""
        if not self.existed:
            with contextlib.suppress(OSError):
                self.out.rmdir()


def _start_job(spec: JobSpec, out_dir: str | os.PathLike[str] | None, registry: Any) -> _StartedJob:
    """Check (and create) the output folder, then build the plugins and settings."""
    from .outputs import prepare_output_dir
    from .pipeline import EditSettings

    began = time.perf_counter()
    target = out_dir if out_dir is not None else spec.out
    if target is None:
        raise JobError("no output folder given (--out)")
    existed = Path(target).exists()
    out = prepare_output_dir(target)
    started = _StartedJob(spec, out, existed, None, [], None, began)
    try:
        started.source, started.edits = build_plugins(spec, registry)
        started.settings = EditSettings(**spec.settings)
    except BaseException:
        started.discard()
        raise
    started.setup_seconds = time.perf_counter() - began
    return started


def _finish_job(
    started: _StartedJob,
    result: Any,
    model: Any,
    load_seconds: float,
    *,
    registry: Any,
    command: Sequence[str] | None,
    elapsed: float | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Write a finished job's files. ``elapsed``: seconds to count as the job's time before
    writing (for a batched job, its own setup, load, source, batch denoising and decode);
    default: the wall time since the job started."""
    from .outputs import write_run

    began = started.began if elapsed is None else time.perf_counter() - elapsed
    return write_run(
        result,
        started.out,
        model,
        mode=started.spec.mode,
        save_attention=started.spec.save_attention,
        registry=registry,
        timings={"load_model": load_seconds},
        command=command,
        name=started.spec.name,
        started=began,
    )


def run_job(
    spec: JobSpec,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Any = None,
    models: ModelCache | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    command: Sequence[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Run one job and write its files (see :func:`p2p_framework.outputs.write_run`).

    The output folder is checked first, then the model is loaded (or taken from ``models``),
    the plugins are built and the run is made.

    Returns:
        ``(record, paths)``: the ``run.json`` record and the files written.
    """
    from .pipeline import run_edit
    from .registry import get_registry

    registry = registry if registry is not None else get_registry()
    started = _start_job(spec, out_dir, registry)
    try:
        models = models if models is not None else ModelCache()
        model, load_seconds = models.get(spec)
        if spec.identity and warn is not None:
            changed = model_changed(spec, model)
            if changed:
                warn(changed)
        result = run_edit(
            model,
            spec.prompts,
            started.edits,
            source=started.source,
            settings=started.settings,
            progress=progress,
        )
    except BaseException:
        started.discard()  # leave no empty folder behind a run that wrote nothing
        raise
    return _finish_job(started, result, model, load_seconds, registry=registry, command=command)


# -- pipeline files ---------------------------------------------------------------------------


@dataclass
class Pipeline:
    """A pipeline file: shared settings and the jobs, as written (resolved one by one)."""

    path: Path
    top: dict[str, Any]
    defaults: dict[str, Any]
    jobs: list[dict[str, Any]]

    def job_name(self, index: int) -> str:
        """The job's ``name``, or ``job-N`` (1-based)."""
        return str(self.jobs[index].get("name") or f"job-{index + 1}")


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and check a pipeline file (TOML; format in ``docs/cli.md``).

    Raises:
        JobError: unreadable, not TOML, unknown keys, no jobs, or duplicate job names.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise JobError(
            f"cannot read pipeline file {str(path)!r}: {error.strerror or error}"
        ) from None
    try:
        data = _toml_loads(text)
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise JobError(f"pipeline file {str(path)!r} is not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(PIPELINE_KEYS))
    if unknown:
        raise JobError(
            f"{path.name}: unknown top-level key(s) {', '.join(unknown)}; "
            f"expected: {', '.join(PIPELINE_KEYS)}"
        )
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise JobError(f"{path.name}: give at least one [[jobs]] table")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise JobError(f"{path.name}: [defaults] must be a table")
    top = {k: v for k, v in data.items() if k not in ("jobs", "defaults")}
    pipeline = Pipeline(path, top, dict(defaults), [dict(j) for j in jobs])
    names = [pipeline.job_name(i) for i in range(len(jobs))]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise JobError(f"{path.name}: job names must be unique; repeated: {', '.join(duplicates)}")
    return pipeline


@dataclass
class JobOutcome:
    """What became of one job of a pipeline."""

    name: str
    ok: bool
    record: dict[str, Any] | None = None
    paths: list[Path] = field(default_factory=list)
    error: str | None = None
    out: Path | None = None

    def as_line(self) -> dict[str, Any]:
        """The JSON object ``p2p-run run --json`` prints for this job."""
        if self.ok and self.record is not None:
            return {**self.record, "name": self.name, "out": str(self.out)}
        return {"name": self.name, "status": "failed", "error": self.error, "out": str(self.out)}


def pipeline_job_spec(
    pipeline: Pipeline,
    index: int,
    registry: Any = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    out_root: str | os.PathLike[str] | None = None,
) -> JobSpec:
    """Resolve job ``index`` of a pipeline. Each key comes from the job itself, else from
    ``overrides`` (the command line's ``--model``, ``--device``, ``--dtype``), else from the
    file's ``[defaults]``, else from the file's top level. Its output folder is its ``out``,
    else ``OUT_ROOT/NAME``."""
    shared = ("model", "revision", "device", "dtype", "compile")
    base = {k: v for k, v in pipeline.top.items() if k in shared}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    job = dict(pipeline.jobs[index])
    job.setdefault("name", pipeline.job_name(index))
    spec = job_from_options(job, registry, defaults={**base, **pipeline.defaults, **given})
    if spec.out is None:
        root = out_root or pipeline.top.get("out") or Path("p2p-out") / pipeline.path.stem
        spec.out = str(Path(root) / pipeline.job_name(index))
    return spec


def _error_text(error: BaseException) -> str:
    return str(error) if isinstance(error, P2PError) else f"{type(error).__name__}: {error}"


def _batch_label(names: Sequence[str]) -> str:
    """A progress label for a batch: the job's name, or ``N jobs: a, b, c``."""
    if len(names) == 1:
        return names[0]
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} jobs ({shown})"


def run_pipeline(
    pipeline: Pipeline,
    *,
    registry: Any = None,
    overrides: Mapping[str, Any] | None = None,
    out_root: str | os.PathLike[str] | None = None,
    models: ModelCache | None = None,
    on_start: Callable[[int, int, str], None] | None = None,
    on_done: Callable[[JobOutcome], None] | None = None,
    progress: Callable[[str], Callable[[int, int, dict[str, Any]], None] | None] | None = None,
    command: Sequence[str] | None = None,
    warn: Callable[[str], None] | None = None,
    max_batch_rows: int | str | None = 1,
) -> list[JobOutcome]:
    """Run every job of a pipeline; a failing job (a :class:`P2PError` or ``OSError``) is
    recorded and the others run. Other exceptions (bugs) propagate.

    First every job is resolved, its output folder checked and its plugins built (a job that
    fails there is done with). Then, model by model (in the order the file first names them,
    each loaded once), the jobs run through :func:`p2p_framework.pipeline.iter_edits`: jobs
    that share steps, guidance on/off, image size, scheduler and ``separate_uncond_pass`` go
    into one UNet batch of at most ``max_batch_rows`` rows, and each job's files are written as
    soon as its batch is done. Each job's images and record are what it gives alone (up to
    float rounding of the larger batch); its ``denoise`` timing is its batch's.

    Args:
        on_start: ``on_start(index, total, name)`` before each job is resolved.
        on_done: called with each job's outcome, when it has failed or its files are written.
        progress: ``progress(label)`` gives the per-step callback of a job or batch, or None;
            ``label`` is the job's name, or ``"N jobs (a, b, ...)"`` for a batch.
        max_batch_rows: most UNet rows per batch (a job of ``P`` prompts takes ``2 P`` with
            guidance); 1 runs the jobs one at a time (as ``p2p-run edit`` would); None: no
            limit; ``"auto"``: :data:`AUTO_BATCH_ROWS` for the model's device.

    Returns:
        The outcomes, in the file's job order.
    """
    from .pipeline import EditJob, iter_edits
    from .registry import get_registry

    registry = registry if registry is not None else get_registry()
    models = models if models is not None else ModelCache()
    total = len(pipeline.jobs)
    outcomes = [JobOutcome(pipeline.job_name(i), ok=False) for i in range(total)]
    started: dict[int, _StartedJob] = {}
    pending: set[int] = set()

    def finish(index: int, error: BaseException | None = None) -> None:
        outcome = outcomes[index]
        if error is not None:
            outcome.error = _error_text(error)
            if index in started:
                started[index].discard()
        pending.discard(index)
        if on_done is not None:
            on_done(outcome)

    # 1. Resolve every job, check its output folder and build its plugins.
    for index in range(total):
        if on_start is not None:
            on_start(index, total, outcomes[index].name)
        try:
            spec = pipeline_job_spec(
                pipeline, index, registry, overrides=overrides, out_root=out_root
            )
            outcomes[index].out = Path(spec.out) if spec.out else None
            started[index] = _start_job(spec, None, registry)
            pending.add(index)
        except (P2PError, OSError) as error:
            finish(index, error)

    # 2. Model by model, run the jobs in batches and write each job's files.
    by_model: dict[tuple[Any, ...], list[int]] = {}
    for index, job in started.items():
        by_model.setdefault(ModelCache.key(job.spec), []).append(index)
    try:
        for indices in by_model.values():
            first = started[indices[0]].spec
            try:
                model, load_seconds = models.get(first)
            except (P2PError, OSError) as error:
                for index in indices:
                    finish(index, error)
                continue
            if warn is not None:
                for index in indices:
                    changed = model_changed(started[index].spec, model)
                    if changed:
                        warn(changed)
            names = [outcomes[i].name for i in indices]
            callbacks: dict[str, Any] = {}

            def on_progress(
                done: int,
                steps: int,
                info: dict[str, Any],
                names: list[str] = names,
                callbacks: dict[str, Any] = callbacks,
            ) -> None:
                if "job" in info:
                    label = names[info["job"]]
                else:
                    label = _batch_label([names[i] for i in info.get("jobs", [])])
                if label not in callbacks:
                    callbacks[label] = progress(label) if progress is not None else None
                callback = callbacks[label]
                if callback is not None:
                    shown = {k: v for k, v in info.items() if k not in ("job", "jobs")}
                    callback(done, steps, shown)

            rows = max_batch_rows
            if rows == "auto":
                rows = AUTO_BATCH_ROWS.get(model.device.type, AUTO_BATCH_ROWS["cpu"])
            jobs = [
                EditJob(
                    started[i].spec.prompts,
                    started[i].edits,
                    started[i].source,
                    started[i].settings,
                )
                for i in indices
            ]
            for position, result in iter_edits(
                model,
                jobs,
                max_batch_rows=rows,  # type: ignore[arg-type]
                progress=on_progress,
                errors="return",
            ):
                index = indices[position]
                if isinstance(result, BaseException):
                    finish(index, result)
                    continue
                job = started[index]
                elapsed = job.setup_seconds + load_seconds + sum(result.timings.values())
                try:
                    record, paths = _finish_job(
                        job,
                        result,
                        model,
                        load_seconds,
                        registry=registry,
                        command=command,
                        elapsed=elapsed,
                    )
                except (P2PError, OSError) as error:
                    finish(index, error)
                    continue
                outcome = outcomes[index]
                load_seconds = 0.0  # the load counts once, for the first job written
                outcome.ok, outcome.record, outcome.paths = True, record, paths
                finish(index)
    finally:
        for index in pending:  # interrupted: leave no empty folder behind
            started[index].discard()
    return outcomes


__all__ = [
    "AUTO_BATCH_ROWS",
    "JOB_KEYS",
    "MODEL_ENV",
    "JobError",
    "JobOutcome",
    "JobSpec",
    "ModelCache",
    "Pipeline",
    "PluginSpec",
    "build_plugins",
    "job_from_options",
    "job_from_record",
    "load_pipeline",
    "model_from_env",
    "parse_assignments",
    "parse_cross_replace",
    "pipeline_job_spec",
    "read_record",
    "run_job",
    "run_pipeline",
]
