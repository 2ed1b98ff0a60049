"""Page controls generated from a plugin's declared options, without UI code per plugin.

A plugin's options are dataclass fields with annotations (``Annotated[float, Field(ge=0,
le=1)]``) and a one-line help (:mod:`p2p_framework.options`). :func:`option_controls` turns
each into a :class:`Control`, a description independent of any UI toolkit: a checkbox for a
``bool``, a slider for a number bounded on both sides, a number field otherwise, a dropdown
for a ``Literal``, a group of checkboxes for a list of ``Literal`` values, and a text field
(read like a ``--set`` value: ``a b``, ``a=1,b=2``, JSON) for anything else. The web app
(:mod:`p2p_framework.web.app`) renders them; :func:`control_value` turns what a control holds
back into the value given to the plugin, which validates it as on every other path.

Options declared as paths (``field(metadata={"path": True})``: a photo, a saved inversion, a
cache folder) get **no** control: the page never reads or writes a server path a user typed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from ..options import _arms, describe_options, field_types, type_text

NoneType = type(None)

#: The kinds of :class:`Control`.
KINDS = ("checkbox", "slider", "number", "dropdown", "checkboxgroup", "text")


@dataclass(frozen=True)
class Control:
    """One option as a page control.

    Attributes:
        plugin: the plugin's registered name.
        option: the option (dataclass field) name.
        kind: one of :data:`KINDS`.
        label: what the page shows (the option name).
        info: the option's help and type, e.g. ``"mask threshold (float >= 0 <= 1)"``.
        default: the control's initial value (for ``text``: the default as text; ``""``
            for a required option or a None default).
        required: the option has no default (its text must be filled in).
        optional: None is a valid value (an empty text or number means None).
        minimum, maximum: a number's bounds (both set for a slider).
        step: a slider's step (1 for an int, 0.01 for a float).
        integer: the number is an int.
        choices: a dropdown's or checkbox group's values.
    """

    plugin: str
    option: str
    kind: str
    label: str
    info: str
    default: Any
    required: bool = False
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    integer: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def key(self) -> str:
        """``PLUGIN.OPTION``, as ``--set`` writes it."""
        return f"{self.plugin}.{self.option}"


def _bounds(annotation: Any) -> tuple[float | None, float | None]:
    """The ``ge``/``gt`` and ``le``/``lt`` limits of an ``Annotated`` number."""
    low = high = None
    if typing.get_origin(annotation) is Annotated:
        for extra in typing.get_args(annotation)[1:]:
            for meta in getattr(extra, "metadata", [extra]):
                for attr in ("ge", "gt"):
                    if getattr(meta, attr, None) is not None:
                        low = float(getattr(meta, attr))
                for attr in ("le", "lt"):
                    if getattr(meta, attr, None) is not None:
                        high = float(getattr(meta, attr))
    return low, high


def _literal_values(annotation: Any) -> tuple[Any, ...] | None:
    arms = [arm for arm in _arms(annotation) if arm is not NoneType]
    if arms and all(typing.get_origin(arm) is Literal for arm in arms):
        return tuple(value for arm in arms for value in typing.get_args(arm))
    return None


def _list_of_literals(annotation: Any) -> tuple[Any, ...] | None:
    arms = [arm for arm in _arms(annotation) if arm is not NoneType]
    if len(arms) != 1 or typing.get_origin(arms[0]) not in (list, tuple, set, frozenset):
        return None
    args = typing.get_args(arms[0])
    if typing.get_origin(arms[0]) is tuple and (len(args) != 2 or args[1] is not Ellipsis):
        return None  # a fixed-length tuple (crop offsets): text
    return _literal_values(args[0]) if args else None


def _number(annotation: Any) -> type | None:
    """``int`` or ``float`` when the annotation is one (possibly Annotated, or | None)."""
    arms = [arm for arm in _arms(annotation) if arm is not NoneType]
    if len(arms) == 1 and arms[0] in (int, float):
        return arms[0]
    return None


def _bare(annotation: Any) -> Any:
    """The annotation without ``| None`` (the Annotated limits kept)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(annotation) if a is not NoneType]
        if len(arms) == 1:
            return arms[0]
    return annotation


def default_text(value: Any) -> str:
    """A default shown in a text control, written as ``--set`` reads it back."""
    from ..spec import option_text

    return "" if value is None else option_text(value)


def is_path_option(plugin_class: type, option: str) -> bool:
    """Whether ``option`` of ``plugin_class`` is declared as a path (``metadata["path"]``)."""
    for f in dataclasses.fields(plugin_class):
        if f.name == option:
            return bool(f.metadata.get("path"))
    return False


def option_controls(
    plugin: str, plugin_class: type, *, skip: typing.Collection[str] = ()
) -> list[Control]:
    """The controls of a plugin's options, in declaration order; path options (and the
    names in ``skip``) have none.

    Args:
        plugin: the plugin's registered name.
        plugin_class: its dataclass.
        skip: options the page sets itself (e.g. an inversion source's common options).
    """
    types_ = field_types(plugin_class)
    controls = []
    for info in describe_options(plugin_class):
        if info.name in skip or is_path_option(plugin_class, info.name):
            continue
        annotation = types_[info.name]
        optional = any(arm is NoneType for arm in _arms(annotation))
        text = f"{info.help} ({info.type})" if info.help else info.type
        common = {
            "plugin": plugin,
            "option": info.name,
            "label": info.name,
            "info": text,
            "required": info.required,
            "optional": optional,
        }
        number = _number(annotation)
        literals = _literal_values(annotation)
        listed = _list_of_literals(annotation)
        if _bare(annotation) is bool or annotation is bool:
            control = Control(kind="checkbox", default=bool(info.default), **common)
        elif number is not None:
            low, high = _bounds(_bare(annotation))
            both = low is not None and high is not None and not optional
            control = Control(
                kind="slider" if both else "number",
                default=info.default,
                minimum=low,
                maximum=high,
                step=(1 if number is int else 0.01) if both else None,
                integer=number is int,
                **common,
            )
        elif literals is not None:
            choices = literals + ((None,) if optional else ())
            control = Control(kind="dropdown", default=info.default, choices=choices, **common)
        elif listed is not None:
            default = list(info.default) if info.default is not None else []
            control = Control(kind="checkboxgroup", default=default, choices=listed, **common)
        else:
            control = Control(kind="text", default=default_text(info.default), **common)
        controls.append(control)
    return controls


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: What :func:`control_value` gives for an empty control: the option is not set (its
#: default applies, or the plugin reports a required option).
MISSING: Any = _Missing()


def control_value(control: Control, value: Any) -> Any:
    """The option value a control's content stands for: text as it is (the plugin's
    validation reads it by the annotation, as ``--set`` does), an empty optional control
    None, an empty required or defaulted one :data:`MISSING`."""
    if control.kind == "text":
        text = "" if value is None else str(value)
        if not text.strip():
            if control.optional and not control.required and control.default != "":
                return None  # cleared on purpose: None rather than the default
            return MISSING
        return text
    if control.kind == "number":
        if value is None or value == "":
            return None if control.optional else MISSING
        return int(value) if control.integer and float(value).is_integer() else value
    if control.kind == "slider" and control.integer and value is not None:
        return int(value) if float(value).is_integer() else value
    if control.kind == "checkboxgroup":
        return list(value or [])
    return value


__all__ = [
    "KINDS",
    "MISSING",
    "Control",
    "control_value",
    "default_text",
    "is_path_option",
    "option_controls",
    "type_text",
]
