"""Plugin options: every plugin is a dataclass whose fields are its options.

An option is declared once, as a dataclass field: its annotation is its type, pydantic
``Field`` constraints in an ``Annotated`` annotation are its limits, and
``field(metadata={"help": ...})`` is its one-line help::

    threshold: Annotated[float, Field(ge=0, le=1)] = field(
        default=0.3, metadata={"help": "mask threshold, relative to max"}
    )

:func:`validate_fields` checks and converts every field of such a dataclass with pydantic
(``TypeAdapter`` of the annotation, lax mode): it runs for every plugin before the plugin's own
``__post_init__``, on every path (direct construction in Python, ``registry.build``, the
command line, pipeline files, run.json), so a plugin writes no type or range checks of its
own; ``__post_init__`` is left for rules across options. Values given as text (the command
line) are read by the annotation too: ``0.4``, ``true``, ``a b c`` or ``a,b,c`` for a list,
``a=1,b=2`` for a dict, ``none`` for an optional value (see :func:`parse_text`).
"""

from __future__ import annotations

import collections.abc as abc
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

import pydantic

from .errors import OptionError

NoneType = type(None)
_NONE_TEXT = {"none", "null"}


class Plugin:
    """Shared base of :class:`~p2p_framework.Edit` and :class:`~p2p_framework.Source`.

    Subclasses are dataclasses whose fields are options; their values are validated and
    converted (:func:`validate_fields`) before the subclass's own ``__post_init__`` runs.
    """

    name: ClassVar[str] = ""
    #: Job keys (``p2p-run`` options, pipeline-file keys) that set one of this plugin's
    #: options: ``{"blend": "words"}``. An edit's key adds the edit to the run; a source's key
    #: sets that option of the run's source (docs/plugins.md, "Shortcuts").
    shortcuts: ClassVar[Mapping[str, str]] = {}
    #: A source's: job keys that make it the source of a job that names none, e.g.
    #: ``{"image": True}``; ``"*"``: when no other source's key is given; a callable value
    #: ``f(value) -> name`` names the source instead (e.g. the one a saved file was made with).
    chosen_by: ClassVar[Mapping[str, bool | Callable[[Any], str]]] = {}
    #: A source's: options whose value fixes the source prompt, ``{option: f(value) ->
    #: prompt}``, e.g. a saved inversion's (``{"inversion": read_prompt}``). A job that sets
    #: the option and gives no source prompt takes this one; a different one is refused.
    prompt_from: ClassVar[Mapping[str, Callable[[Any], str]]] = {}
    #: An edit's: ``f(prompts) -> bool``, true when it is the edit of a job that names none.
    default_for: ClassVar[Callable[[Sequence[str]], bool] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_validates_options", False):
            # A subclass's own __post_init__ runs after the options are validated, whether
            # or not it calls super().__post_init__().
            @functools.wraps(own)
            def __post_init__(self: Plugin, *args: Any, _own: Any = own) -> None:
                validate_fields(self, type(self).name or type(self).__name__)
                _own(self, *args)

            __post_init__._validates_options = True  # type: ignore[attr-defined]
            cls.__post_init__ = __post_init__  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        validate_fields(self, type(self).name or type(self).__name__)

    def option_values(self) -> dict[str, Any]:
        """This plugin's options as set (after validation), in declaration order."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.init
        }


# -- validation ---------------------------------------------------------------------------
@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each init field of dataclass ``cls`` (``Any`` when it
    cannot be resolved), ``Annotated`` constraints kept."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # an annotation that does not resolve: accept any value
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _adapter(annotation: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(annotation)


def _arms(annotation: Any) -> tuple[Any, ...]:
    """The types a value may have at the top level of ``annotation``."""
    if typing.get_origin(annotation) is Annotated:
        return _arms(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return tuple(arm for a in typing.get_args(annotation) for arm in _arms(a))
    return (annotation,)


def _takes(annotation: Any, kind: type) -> bool:
    for arm in _arms(annotation):
        if arm is Any or arm is object or isinstance(arm, str):
            return True
        origin = typing.get_origin(arm) or arm
        if origin is Literal:
            if any(isinstance(a, kind) for a in typing.get_args(arm)):
                return True
        elif origin is kind or (
            # bool is an int subclass, but an int option does not take True
            isinstance(origin, type) and kind is not bool and issubclass(kind, origin)
        ):
            return True
    return False


_SEQUENCES = (
    list,
    tuple,
    set,
    frozenset,
    abc.Sequence,
    abc.MutableSequence,
    abc.Iterable,
    abc.Collection,
    abc.Set,
)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def _container(annotation: Any) -> type | None:
    """``list`` or ``dict`` if an arm of ``annotation`` is a sequence or a mapping type."""
    for arm in _arms(annotation):
        origin = typing.get_origin(arm) or arm
        if origin in _MAPPINGS:
            return dict
        if origin in _SEQUENCES:
            return list
    return None


def _items(text: str) -> list[str]:
    """``a,b,c`` (comma-separated) or, without a comma, ``a b c``."""
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text.split()


def parse_text(annotation: Any, text: str) -> Any:
    """Read text from the command line by the shape of ``annotation``, for pydantic to
    validate: a JSON list or object as is; ``a=1,b=2`` for a mapping; ``a,b,c`` or ``a b c``
    for a sequence; ``none``/``null`` for None where the annotation allows it; JSON or text
    for ``Any``; anything else stays text (pydantic reads ``0.4``, ``true``...)."""
    stripped = text.strip()
    if stripped.lower() in _NONE_TEXT and _takes(annotation, NoneType):
        return None
    kind = _container(annotation)
    if kind is None:
        if any(arm is Any or arm is object for arm in _arms(annotation)):
            try:
                return json.loads(stripped)
            except ValueError:
                return text
        return text
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    if kind is dict:
        entries: dict[str, Any] = {}
        for item in (part for part in stripped.split(",") if part.strip()):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected key=value pairs such as a=1,b=2, got {text!r}")
            entries[key.strip()] = value.strip()
        if not entries:
            raise ValueError(f"expected key=value pairs such as a=1,b=2, got {text!r}")
        return entries
    return _items(stripped)


def type_text(annotation: Any) -> str:
    """Short human text of an annotation: ``list[str]``, ``float | None``, ``float >= 0``."""
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        limits = [
            f"{sign} {getattr(m, attr)}"
            for extra in extras
            for m in getattr(extra, "metadata", [extra])
            for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if getattr(m, attr, None) is not None
        ]
        return " ".join([type_text(base), *limits]) if limits else type_text(base)
    if annotation is Any:
        return "any"
    if annotation is NoneType:
        return "None"
    if isinstance(annotation, str):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_text(a) for a in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _message(error: pydantic.ValidationError, value: Any, annotation: Any) -> str:
    errors = error.errors()
    if len(errors) > 1 and all(len(e["loc"]) == 1 for e in errors):
        # The value fits no arm of a top-level union (each error names an arm): say what
        # the arms are rather than why the first one refused.
        return f"expected {type_text(annotation)}, got {value!r}"
    first = errors[0]
    where = "".join(f"[{part!r}]" for part in first["loc"])
    shown = first.get("input", value) if where else value
    text = str(first["msg"]).removeprefix("Value error, ")  # a validator's own message
    text = text[:1].lower() + text[1:]  # keep the case of names in it (VAE, SD)
    return f"{where + ': ' if where else ''}{text}, got {shown!r}"


def validate_value(owner: str, option: str, annotation: Any, value: Any) -> Any:
    """``value`` checked and converted to ``annotation`` (text is read by
    :func:`parse_text` first where the annotation does not take text as it is).

    Raises:
        OptionError: naming ``owner`` and ``option``, when the value does not fit.
    """
    if isinstance(value, bool) and not _takes(annotation, bool):
        # pydantic's lax mode reads True as 1; an option that wants a number does not.
        raise OptionError(owner, option, f"expected {type_text(annotation)}, got {value!r}")
    if isinstance(value, str) and not _takes(annotation, str):
        try:
            value = parse_text(annotation, value)
        except ValueError as error:
            raise OptionError(owner, option, str(error)) from None
    try:
        return _adapter(annotation).validate_python(value)
    except pydantic.ValidationError as error:
        raise OptionError(owner, option, _message(error, value, annotation)) from None


def validate_fields(obj: Any, owner: str) -> None:
    """Check and convert, in place, every init field of dataclass instance ``obj`` by its
    annotation (frozen dataclasses included).

    Raises:
        OptionError: the first field whose value does not fit, naming ``owner``.
    """
    for name, annotation in field_types(type(obj)).items():
        value = getattr(obj, name)
        checked = validate_value(owner, name, annotation, value)
        if checked is not value:
            object.__setattr__(obj, name, checked)


# -- listing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionInfo:
    """One option of a plugin, as listed to users.

    Attributes:
        name: the dataclass field name (what ``--set PLUGIN.NAME=VALUE`` uses).
        type: the annotation as text, e.g. ``"float >= 0"`` or ``"dict[str, float]"``.
        default: the default value, or None when the option is required.
        required: whether the option has no default.
        help: one line from the field's ``metadata["help"]``.
    """

    name: str
    type: str
    default: Any
    required: bool
    help: str


def describe_options(plugin_class: type) -> list[OptionInfo]:
    """The options of a plugin class, in declaration order."""
    types_ = field_types(plugin_class)
    infos = []
    for f in dataclasses.fields(plugin_class):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        infos.append(
            OptionInfo(
                f.name, type_text(types_[f.name]), default, required, f.metadata.get("help", "")
            )
        )
    return infos
