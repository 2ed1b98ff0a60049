"""One run, typed: :class:`RunSpec`, from the command line's words or from ``run.json``.

A :class:`RunSpec` holds the built plugin objects and an :class:`~p2p_framework.EditSettings`,
so every value in it has been validated once, by its annotation. It is made

- from a *job*, the vocabulary of ``p2p-run edit`` and of pipeline files (``prompt``,
  ``targets``, ``edits``, ``set`` and the :data:`SHORTCUTS`): :func:`spec_from_job`;
- from a ``run.json`` record (``p2p-run rerun``): :meth:`RunSpec.from_json`, the inverse of
  :meth:`RunSpec.to_json`.

The core names no plugin: a plugin declares the job keys that set its options
(``LocalBlend.shortcuts = {"blend": "words"}``), a source the keys that choose it when a job
names none (``chosen_by``), and an edit when it is the edit of a job that names none
(``default_for``); see :class:`p2p_framework.Plugin`.

Python API::

    from p2p_framework.spec import spec_from_job
    from p2p_framework.runner import run_job

    spec = spec_from_job({"prompt": "a cat on a mat", "targets": ["a dog on a mat"], "seed": 8})
    record, paths = run_job(spec, out_dir="out/dog")
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .edit import Edit
from .errors import OptionError, P2PError
from .model import SCHEDULERS
from .options import field_types, validate_value
from .outputs import READ_FORMATS, RECORD_FORMAT, plugin_record
from .pipeline import EditSettings
from .registry import PluginRegistry, get_registry
from .schedules import OWNER
from .source import Source

#: The run modes: ``edit`` (a source prompt and targets) and ``generate`` (plain generation).
MODES = ("edit", "generate")
#: Job keys that are not shortcuts: what a run is made of, and where.
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
    "edit",
    "edits",
    "set",
    "save_attention",
    "out",
)


class JobError(P2PError):
    """A job or pipeline file asks for something that cannot be run (the message says what)."""


def _word_pairs(value: Any) -> Any:
    """``("smiling=5", "doll=2")`` (repeated ``--reweight``) -> ``{"smiling": "5", ...}``."""
    if not isinstance(value, (list, tuple)):
        return value
    pairs = {}
    for item in value:
        word, sep, factor = str(item).partition("=")
        if not sep or not word.strip():
            raise ValueError(f"expected WORD=FACTOR, got {item!r}")
        pairs[word.strip()] = factor.strip()
    return pairs


@dataclass(frozen=True)
class Shortcut:
    """A job key and its ``p2p-run`` option, declared once: the click option of each command
    in ``commands`` and the pipeline-file key both come from it.

    Attributes:
        key: the job key; the option is ``--KEY`` with ``-`` for ``_``.
        help: the option's help (with an example).
        setting: the :class:`~p2p_framework.EditSettings` field it sets; None for a plugin
            option: the one that the plugins' ``shortcuts`` map the key to.
        commands: the commands that offer it.
        edit_only: only an edit job may give it (``generate`` makes plain images).
        convert: applied to the given value first (raises ValueError).
        click: more ``click.option`` arguments (type, metavar, multiple, is_flag, default).
    """

    key: str
    help: str
    setting: str | None = None
    commands: tuple[str, ...] = ("edit",)
    edit_only: bool = False
    convert: Callable[[Any], Any] | None = None
    click: Mapping[str, Any] = field(default_factory=dict)


_BOTH = ("edit", "generate")
#: The shortcuts of ``p2p-run edit``/``generate`` and pipeline jobs, in help order.
SHORTCUTS: tuple[Shortcut, ...] = (
    Shortcut(
        "cross_replace",
        "When cross-attention is injected, as a fraction of the steps: 0.8 means 0:0.8; "
        "per word with `default` for the rest. Default: 0.8. E.g. --cross-replace "
        "default=1.0,lion=0.4",
        setting="cross_replace_steps",
        edit_only=True,
        click={"metavar": "S|A:B|WORD=S,..."},
    ),
    Shortcut(
        "self_replace",
        "Fraction (or range a:b) of the steps in which targets take the source's "
        "self-attention. Default: 0.4. E.g. --self-replace 0.5",
        setting="self_replace_steps",
        edit_only=True,
        click={"metavar": "S|A:B"},
    ),
    Shortcut(
        "reweight",
        "Scale a word's attention in the targets (shortcut for reweight.weights; adds "
        "reweight to the edits); repeatable. E.g. --reweight smiling=5",
        convert=_word_pairs,
        click={"metavar": "WORD=FACTOR", "multiple": True},
    ),
    Shortcut(
        "blend",
        "Local blend: one word per prompt, source first (shortcut for --set "
        'local-blend.words=...; adds local-blend to the edits). E.g. --blend "squirrel lion"',
        click={"metavar": "WORDS"},
    ),
    Shortcut(
        "image",
        "Real photo to edit: shortcut for --set SOURCE.image=PATH (source null-text unless "
        "--source says otherwise; --prompt describes the photo). E.g. --image cat.jpg",
        convert=str,
        click={"metavar": "PATH"},
    ),
    Shortcut(
        "inversion",
        "Saved inversion (from `p2p-run invert`) to edit: shortcut for --set "
        "SOURCE.inversion=PATH. E.g. --inversion cat.p2pinv",
        convert=str,
        click={"metavar": "PATH"},
    ),
    Shortcut(
        "no_cache",
        "Invert the photo again even if the inversion cache holds it, and do not store it "
        "(shortcut for --set SOURCE.cache=false). Default: use the cache. E.g. --image cat.jpg "
        "--no-cache",
        convert=operator.not_,
        click={"is_flag": True},
    ),
    Shortcut(
        "seed",
        "Seed of the initial noise: shortcut for --set SOURCE.seed=N. "
        "Default: the source's own (8888 for seed). E.g. --seed 42",
        commands=_BOTH,
        click={"type": int, "metavar": "N"},
    ),
    Shortcut(
        "steps",
        "Diffusion steps. E.g. 25",
        setting="steps",
        commands=_BOTH,
        click={"type": int, "default": 50, "show_default": True},
    ),
    Shortcut(
        "guidance",
        "Classifier-free guidance scale; 1 or less turns it off. E.g. --guidance 5",
        setting="guidance",
        commands=_BOTH,
        click={"type": float, "default": 7.5, "show_default": True},
    ),
    Shortcut(
        "height",
        "Image height in pixels, a multiple of the model's VAE scale factor (8 for SD, 4 for "
        "the demo model). Default: the model's size (512 for SD 1.x, 64 for the demo model). "
        "E.g. --height 768",
        setting="height",
        commands=_BOTH,
        click={"type": int},
    ),
    Shortcut(
        "width",
        "Image width in pixels, a multiple of the model's VAE scale factor (as --height). "
        "Default: the model's size. E.g. --width 768",
        setting="width",
        commands=_BOTH,
        click={"type": int},
    ),
    Shortcut(
        "scheduler",
        "Sampler; ddim as in the papers, `model` for the model's own. E.g. --scheduler dpm-solver",
        setting="scheduler",
        commands=_BOTH,
        click={"type": click.Choice(SCHEDULERS), "default": "ddim", "show_default": True},
    ),
)
_BY_KEY = {shortcut.key: shortcut for shortcut in SHORTCUTS}


# -- what the plugins declare ---------------------------------------------------------------


def plugin_shortcuts(registry: PluginRegistry) -> dict[str, list[tuple[str, str, str]]]:
    """Every job key a registered plugin declares: key -> ``[(kind, plugin, option), ...]``."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for info in registry.plugins():
        for key, option in info.plugin_class.shortcuts.items():
            found.setdefault(key, []).append((info.kind, info.name, option))
    return found


def job_keys(registry: PluginRegistry) -> list[str]:
    """Every key a job accepts: :data:`JOB_KEYS`, :data:`SHORTCUTS` and the plugins' own."""
    return list(dict.fromkeys([*JOB_KEYS, *_BY_KEY, *plugin_shortcuts(registry)]))


def default_source(registry: PluginRegistry, job: Mapping[str, Any]) -> str:
    """The source of a job that names none: the first source whose ``chosen_by`` has a key
    the job gives (its value may name another source), else the one with ``"*"``."""
    fallback = None
    for info in registry.plugins("source"):
        for key, pick in info.plugin_class.chosen_by.items():
            if key == "*":
                fallback = fallback or info.name
            elif _given(job.get(key)):
                return str(pick(job[key])) if callable(pick) else info.name
    if fallback is None:
        raise JobError("no source given (--source), and no registered source is a default")
    return fallback


def default_edit(registry: PluginRegistry, prompts: list[str]) -> list[str]:
    """The edit of a job that names none: the first whose ``default_for(prompts)`` holds."""
    for info in registry.plugins("edit"):
        test = info.plugin_class.default_for
        if test is not None and test(prompts):
            return [info.name]
    return []


# -- the typed run --------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One run, fully resolved and validated.

    Attributes:
        mode: ``"edit"`` (prompt 0 is the source, the others its edits) or ``"generate"``
            (independent prompts, no edit).
        prompts: the prompts, source first.
        source: the source plugin object.
        edits: the edit plugin objects, in order.
        settings: the run's settings.
        model, revision, device, dtype, compile: what :func:`~p2p_framework.load_model` is
            given (``model`` None: ``$P2P_FRAMEWORK_MODEL``, else the demo model).
        save_attention: write ``attention.png``.
        out: output folder (None: the caller decides).
        name: the job's name in a pipeline file.
        identity: for a rerun, the model identity recorded by the first run (to warn when
            the model folder changed); not compared.
    """

    mode: str
    prompts: list[str]
    source: Source
    edits: list[Edit]
    settings: EditSettings
    model: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    save_attention: bool = False
    out: str | None = None
    name: str | None = None
    identity: dict[str, Any] | None = field(default=None, compare=False)

    def to_json(self, registry: PluginRegistry | None = None) -> dict[str, Any]:
        """The run as JSON, in ``run.json``'s layout (a record :meth:`from_json` reads)."""
        registry = registry if registry is not None else get_registry()
        return {
            "format": RECORD_FORMAT,
            "name": self.name,
            "mode": self.mode,
            "model": {
                "model": self.model,
                "revision": self.revision,
                "device": self.device,
                "dtype": self.dtype,
                "compile": self.compile,
            },
            "prompts": list(self.prompts),
            "source": plugin_record(self.source, "source", registry),
            "edits": [plugin_record(edit, "edit", registry) for edit in self.edits],
            "settings": self.settings.to_json(),
            "save_attention": self.save_attention,
            "out": self.out,
        }

    @classmethod
    def from_json(
        cls, record: Mapping[str, Any], registry: PluginRegistry | None = None
    ) -> RunSpec:
        """The run a ``run.json`` record (or :meth:`to_json`'s dict) describes, its plugins
        built. The model is the recorded one (a hub model at its recorded commit when known),
        on the recorded device and dtype, so a rerun on the same machine gives the same
        pixels. Records written before the schedules were value objects (with
        ``"default_"``) are read too.

        Raises:
            JobError: not a run record, or an incomplete one.
            PluginError, OptionError: a recorded plugin or option this installation lacks.
        """
        registry = registry if registry is not None else get_registry()
        if not isinstance(record, Mapping) or record.get("format") not in READ_FORMATS:
            found = record.get("format") if isinstance(record, Mapping) else type(record)
            raise JobError(f"not a p2p-run record (format {found!r}; expected {RECORD_FORMAT!r})")
        try:
            model = dict(record["model"])
            return cls(
                mode=record.get("mode", "edit"),
                prompts=list(record["prompts"]),
                source=_build(registry, "source", record["source"]),
                edits=[_build(registry, "edit", edit) for edit in record["edits"]],
                settings=EditSettings.from_json(record["settings"]),
                model=model.get("model"),
                revision=model.get("commit") or model.get("revision"),
                device=model.get("device") or "auto",
                dtype=model.get("dtype") or "auto",
                compile=bool(model.get("compile")),
                save_attention=bool(record.get("save_attention", False)),
                out=record.get("out"),
                name=record.get("name"),
                identity=model,
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise JobError(
                f"run record is incomplete or malformed ({type(error).__name__}: {error})"
            ) from None


def _build(registry: PluginRegistry, kind: str, entry: Mapping[str, Any]) -> Any:
    return registry.build(kind, entry["name"], dict(entry["options"]))


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``run.json`` (or the folder holding one); :class:`JobError` if it is missing or
    not JSON."""
    path = Path(path)
    path = path / "run.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise JobError(f"cannot read run record {str(path)!r}: {error.strerror or error}") from None
    except ValueError as error:
        raise JobError(f"run record {str(path)!r} is not JSON: {error}") from None


# -- from the command line's words ----------------------------------------------------------


def _given(value: Any) -> bool:
    """Whether a job key is set: not None, an unset flag or an empty repeat."""
    return value is not None and value is not False and value != () and value != []


def _as_list(value: Any, key: str) -> list[Any]:
    if not _given(value):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise JobError(f"{key}: expected text or a list of texts, got {value!r}")


def parse_assignments(value: Any) -> list[tuple[str, str, Any]]:
    """``set`` entries: ``"PLUGIN.KEY=VALUE"`` texts, or ``{plugin: {key: value}}`` tables."""
    if isinstance(value, Mapping):
        found = []
        for plugin, options in value.items():
            if not isinstance(options, Mapping):
                raise JobError(
                    f"set.{plugin}: expected a table of options such as {{ threshold = 0.4 }}"
                )
            found.extend((str(plugin), str(k), v) for k, v in options.items())
        return found
    found = []
    for item in _as_list(value, "set"):
        target, sep, text = str(item).partition("=")
        plugin, dot, key = target.strip().rpartition(".")
        if not sep or not dot or not plugin or not key:
            raise JobError(
                f"--set expects PLUGIN.KEY=VALUE (e.g. local-blend.threshold=0.4), got {item!r}"
            )
        found.append((plugin, key, text))
    return found


def _fixed_prompt(
    registry: PluginRegistry, source: str, job: Mapping[str, Any]
) -> tuple[str, str] | None:
    """The source prompt the job's source fixes (its ``prompt_from``), with the option that
    fixes it: the value of a shortcut for that option (``--inversion``) or of a ``set``
    entry (``--set null-text.inversion=...``). None when it fixes none."""
    plugin = registry.get("source", source).plugin_class
    for option, read in plugin.prompt_from.items():
        value = None
        for key, target in plugin.shortcuts.items():
            if target == option and _given(job.get(key)):
                value = job[key]
        for name, key, given in parse_assignments(job.get("set")):
            if name == source and key == option:
                value = given
        if value is not None:
            return read(value), option
    return None


def _prompts(job: Mapping[str, Any], mode: str, fixed: tuple[str, str] | None = None) -> list[str]:
    if mode == "edit":
        prompt = job.get("prompt")
        if isinstance(prompt, (list, tuple)) and len(prompt) == 1:
            prompt = prompt[0]
        if fixed is not None:
            known, option = fixed
            if prompt is None:
                prompt = known
            elif prompt != known:
                raise JobError(
                    f"the source prompt {prompt!r} is not the one the {option} was made with "
                    f"({known!r}), and its latents belong to that one; leave out --prompt "
                    "(prompt = ...) to use it"
                )
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobError(
                'give the source prompt (--prompt / prompt = "..."), or a saved inversion '
                "(--inversion FILE), whose prompt is used"
            )
        prompts = [prompt, *_as_list(job.get("targets"), "targets")]
        prompts += _as_list(job.get("target"), "target")
    else:
        prompts = _as_list(job.get("prompts"), "prompts") + _as_list(job.get("prompt"), "prompt")
        if not prompts:
            raise JobError("give at least one prompt (--prompt / prompts = [...])")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobError(f"prompts must be non-empty texts, got {prompt!r}")
    return prompts


def _flag(value: Any, key: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise JobError(f"{key} must be true or false, got {value!r}")
    return value


class _Plan:
    """The plugins of a job being resolved and the values given to them and to settings."""

    def __init__(self, registry: PluginRegistry, source: str, edits: list[str]) -> None:
        self.registry, self.source, self.edits = registry, source, edits
        self.options: dict[str, dict[str, Any]] = {}
        self.settings: dict[str, Any] = {}

    def kind_of(self, plugin: str) -> str | None:
        return "source" if plugin == self.source else "edit" if plugin in self.edits else None

    def set(self, plugin: str, option: str, value: Any) -> None:
        if plugin == OWNER:
            self.setting(option, value)
        elif self.kind_of(plugin) is None:
            kinds = [
                kind
                for kind in ("edit", "source")
                if plugin in {info.name for info in self.registry.plugins(kind)}
            ]
            hint = (
                " or ".join(f"--{kind} {plugin}" for kind in kinds)
                if kinds
                else f"no installed plugin is called {plugin!r} (see `p2p-run plugins`)"
            )
            raise JobError(
                f"option {plugin}.{option} is for plugin {plugin!r}, which is not in this run "
                f"(source: {self.source}; edits: {', '.join(self.edits) or 'none'}); "
                + (f"add it with {hint}" if kinds else hint)
            )
        else:
            self.options.setdefault(plugin, {})[option] = value

    def setting(self, name: str, value: Any) -> None:
        if name not in field_types(EditSettings):
            listed = ", ".join(field_types(EditSettings))
            raise OptionError(OWNER, name, f"unknown setting; settings are: {listed}")
        self.settings[name] = value

    def source_option(self, key: str, declared: list[tuple[str, str, str]]) -> str | None:
        """The option of the run's source that a source shortcut sets, if it has one."""
        info = self.registry.get("source", self.source)
        own = info.plugin_class.shortcuts.get(key)
        names = {option.name for option in info.options}
        return own or next((o for kind, _, o in declared if kind == "source" and o in names), None)

    def build(self, kind: str, name: str) -> Any:
        return self.registry.build(kind, name, self.options.get(name, {}))


def _apply_shortcuts(
    plan: _Plan, merged: Mapping[str, Any], job: Mapping[str, Any], mode: str
) -> None:
    """Each given shortcut: a setting, an edit's option (adding the edit), or an option of
    the run's source (a key from ``[defaults]`` that the source lacks is skipped)."""
    declared = plugin_shortcuts(plan.registry)
    for key in dict.fromkeys([*_BY_KEY, *declared]):
        value = merged.get(key)
        if not _given(value):
            continue
        shortcut = _BY_KEY.get(key, Shortcut(key, ""))
        edit = next(((p, o) for kind, p, o in declared.get(key, []) if kind == "edit"), None)
        if mode == "generate" and (shortcut.edit_only or edit is not None):
            raise JobError(f"generate makes plain images: {key} needs `p2p-run edit`")
        try:
            value = shortcut.convert(value) if shortcut.convert else value
        except ValueError as error:
            raise JobError(f"{key}: {error}") from None
        if shortcut.setting is not None:
            plan.setting(shortcut.setting, value)
        elif edit is not None:
            plan.edits += [] if edit[0] in plan.edits else [edit[0]]
            plan.set(*edit, value)
        elif key in declared:
            option = plan.source_option(key, declared[key])
            if option is not None:
                plan.set(plan.source, option, value)
            elif _given(job.get(key)):
                wanted = declared[key][0][2]
                raise JobError(f"{key}: source {plan.source!r} has no option {wanted!r}")


def spec_from_job(
    job: Mapping[str, Any],
    registry: PluginRegistry | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> RunSpec:
    """Resolve a job given in the command line's vocabulary into a :class:`RunSpec`.

    Keys: :data:`JOB_KEYS`, the :data:`SHORTCUTS` and the keys plugins declare
    (:func:`job_keys`). ``set`` gives any plugin's option (``PLUGIN.KEY=VALUE`` texts or
    ``{plugin = {key = value}}``), or an :class:`~p2p_framework.EditSettings` field as
    ``pipeline.KEY``. Without ``source``, :func:`default_source`; without ``edits``, an edit
    job with targets uses :func:`default_edit` (``replace`` when the targets have the
    source's word count, else ``refine``).

    Args:
        job: the job's keys; values are text (as typed on the command line) or TOML/JSON
            values.
        registry: plugin registry (default: :func:`~p2p_framework.get_registry`).
        defaults: keys used where ``job`` lacks them (a pipeline file's ``[defaults]``).

    Raises:
        JobError, PluginError, OptionError: with a one-line message.
    """
    registry = registry if registry is not None else get_registry()
    merged = {**(defaults or {}), **{k: v for k, v in job.items() if v is not None}}
    accepted = job_keys(registry)
    unknown = sorted(set(merged) - set(accepted))
    if unknown:
        raise JobError(
            f"unknown job key(s) {', '.join(unknown)}; a job accepts: {', '.join(accepted)}"
        )
    mode = merged.get("mode", "edit")
    if mode not in MODES:
        raise JobError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    source = merged.get("source") or default_source(registry, merged)
    if not isinstance(source, str):
        raise JobError(f"source: expected a plugin name, got {source!r}")
    registry.get("source", source)
    fixed = _fixed_prompt(registry, source, merged) if mode == "edit" else None
    prompts = _prompts(merged, mode, fixed)
    edits = _as_list(merged.get("edits"), "edits") + _as_list(merged.get("edit"), "edit")
    if mode == "generate" and edits:
        raise JobError("generate makes plain images: edits need `p2p-run edit`")
    if mode == "edit" and not edits and len(prompts) > 1:
        edits = default_edit(registry, prompts)
    for name in edits:
        if not isinstance(name, str):
            raise JobError(f"edits: expected plugin names, got {name!r}")
        registry.get("edit", name)
    plan = _Plan(registry, source, edits)
    _apply_shortcuts(plan, merged, job, mode)
    for plugin, key, value in parse_assignments(merged.get("set")):
        plan.set(plugin, key, value)
    save_attention = validate_value(
        OWNER, "save_attention", bool, merged.get("save_attention", False)
    )
    if save_attention:
        plan.settings["attention_maps"] = True
    settings = EditSettings(**plan.settings)
    return RunSpec(
        mode=mode,
        prompts=prompts,
        source=plan.build("source", source),
        edits=[plan.build("edit", name) for name in plan.edits],
        settings=settings,
        model=str(merged["model"]) if merged.get("model") else None,
        revision=merged.get("revision"),
        device=str(merged.get("device") or "auto"),
        dtype=str(merged.get("dtype") or "auto"),
        compile=_flag(merged.get("compile"), "compile"),
        save_attention=save_attention,
        out=str(merged["out"]) if merged.get("out") else None,
        name=str(merged["name"]) if merged.get("name") else None,
    )


# -- back to the command line's words -------------------------------------------------------


def option_text(value: Any) -> str:
    """A value written as ``--set`` (and the shortcut options) read it back: ``true``,
    ``0.4``, ``none``, text as it is, ``a,b`` for a list of plain words, ``a=1,b=2`` for a
    mapping of plain words to numbers, a schedule as ``0.2:0.8`` or ``default=1.0,lion=0.4``,
    JSON for anything else."""
    if hasattr(value, "to_json"):
        value = value.to_json()
        if isinstance(value, list) and len(value) == 2 and not isinstance(value[0], list):
            return f"{option_text(value[0])}:{option_text(value[1])}"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, Mapping) and value and all(_plain(k) for k in value):
        parts = [(str(k), v.to_json() if hasattr(v, "to_json") else v) for k, v in value.items()]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in parts):
            return ",".join(f"{k}={v}" for k, v in parts)
    if (
        isinstance(value, (list, tuple))
        and len(value) > 1
        and all(isinstance(v, str) and _plain(v) for v in value)
    ):
        return ",".join(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _plain(text: Any) -> bool:
    """A word that the text forms ``a,b`` and ``a=1`` keep as it is."""
    return isinstance(text, str) and bool(text) and not any(c in text for c in " ,=:[]{}\"'\n")


def spec_argv(
    spec: RunSpec,
    registry: PluginRegistry | None = None,
    *,
    paths: Mapping[str, str | None] | None = None,
) -> list[str]:
    """The ``p2p-run edit`` (or ``generate``) arguments that make ``spec`` again:
    :func:`spec_from_job` of the command line's job equals ``spec`` (the inverse of the
    command line, for "copy as command" in front ends).

    Every edit is named (``--edit``), in order; options and settings that differ from their
    defaults are given by their shortcut option when there is one (``--seed``,
    ``--cross-replace``, ``--image``...), else as ``--set PLUGIN.KEY=VALUE`` or ``--set
    pipeline.KEY=VALUE``. The model, device and dtype are given unless default.

    Args:
        spec: the run.
        registry: where plugins are looked up (default: the global registry).
        paths: for the source's path options (``image``, ``inversion``, ``cache_dir``...):
            the text to write instead of the value (e.g. the photo's own file name rather
            than a server's copy of it), or None to leave the option out.
    """
    registry = registry if registry is not None else get_registry()
    paths = dict(paths or {})
    argv = ["p2p-run", spec.mode]
    if spec.mode == "edit":
        argv += ["--prompt", spec.prompts[0]]
        for target in spec.prompts[1:]:
            argv += ["--target", target]
    else:
        for prompt in spec.prompts:
            argv += ["--prompt", prompt]
    job: dict[str, Any] = {}
    argv += _source_argv(spec.source, spec.mode, registry, paths, job)
    chosen = default_source(registry, job)
    if chosen != spec.source.name:
        argv += ["--source", spec.source.name]
    for edit in spec.edits:
        argv += ["--edit", registry_name(registry, "edit", edit)]
    for edit in spec.edits:
        name = registry_name(registry, "edit", edit)
        for option, value in _changed(edit).items():
            argv += ["--set", f"{name}.{option}={option_text(value)}"]
    argv += _settings_argv(spec)
    if spec.save_attention:
        argv.append("--save-attention")
    from .demo import DEMO_MODEL_DIR

    if spec.model and Path(spec.model) != Path(DEMO_MODEL_DIR):
        argv += ["--model", spec.model]
    if spec.revision:
        argv += ["--revision", spec.revision]
    for key in ("device", "dtype"):
        if getattr(spec, key) != "auto":
            argv += [f"--{key}", getattr(spec, key)]
    if spec.compile:
        argv.append("--compile")
    return argv


def registry_name(registry: PluginRegistry, kind: str, plugin: Any) -> str:
    """The name ``plugin``'s class is registered under (else its ``name``)."""
    for info in registry.plugins(kind):
        if info.plugin_class is type(plugin):
            return info.name
    return str(getattr(plugin, "name", type(plugin).__name__))


def _changed(plugin: Any) -> dict[str, Any]:
    """The options of a plugin object that differ from their defaults."""
    import dataclasses

    changed = {}
    for f in dataclasses.fields(plugin):
        if not f.init:
            continue
        value = getattr(plugin, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is dataclasses.MISSING or value != _validated(plugin, f.name, default):
            changed[f.name] = value
    return changed


def _validated(plugin: Any, option: str, value: Any) -> Any:
    """A default as the option's validation converts it (a list default to a tuple...)."""
    try:
        return validate_value("", option, field_types(type(plugin))[option], value)
    except OptionError:
        return value


def _source_argv(
    source: Source,
    mode: str,
    registry: PluginRegistry,
    paths: dict[str, str | None],
    job: dict[str, Any],
) -> list[str]:
    """The source's changed options: by their shortcut option where it has one (filling
    ``job`` with the shortcut keys given, to find the default source), else ``--set``."""
    name = registry_name(registry, "source", source)
    by_option = {option: key for key, option in type(source).shortcuts.items()}
    argv: list[str] = []
    for option, value in _changed(source).items():
        shown = value
        if option in paths:
            if paths[option] is None:
                continue
            shown = paths[option]
        key = by_option.get(option)
        shortcut = _BY_KEY.get(key) if key else None
        if shortcut is not None and mode in shortcut.commands:
            flag = "--" + shortcut.key.replace("_", "-")
            if shortcut.click.get("is_flag"):
                converted = shortcut.convert(True) if shortcut.convert else True
                if converted == value:
                    argv.append(flag)
                    job[shortcut.key] = True
                    continue
            else:
                argv += [flag, option_text(shown)]
                job[shortcut.key] = value  # the real value: a saved file names its source
                continue
        argv += ["--set", f"{name}.{option}={option_text(shown)}"]
    return argv


def _settings_argv(spec: RunSpec) -> list[str]:
    """The settings that differ from :class:`~p2p_framework.EditSettings`' defaults."""
    import dataclasses

    defaults = EditSettings()
    by_setting = {s.setting: s for s in SHORTCUTS if s.setting and spec.mode in s.commands}
    argv: list[str] = []
    for f in dataclasses.fields(EditSettings):
        value = getattr(spec.settings, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name == "attention_maps" and spec.save_attention:
            continue  # --save-attention turns it on
        shortcut = by_setting.get(f.name)
        if shortcut is not None:
            argv += ["--" + shortcut.key.replace("_", "-"), option_text(value)]
        else:
            argv += ["--set", f"{OWNER}.{f.name}={option_text(value)}"]
    return argv


__all__ = [
    "JOB_KEYS",
    "MODES",
    "SHORTCUTS",
    "JobError",
    "RunSpec",
    "Shortcut",
    "default_edit",
    "default_source",
    "job_keys",
    "option_text",
    "parse_assignments",
    "plugin_shortcuts",
    "read_record",
    "registry_name",
    "spec_argv",
    "spec_from_job",
]
