"""Plugin options: every plugin is a dataclass whose fields are its options.

This module holds the base class both plugin kinds share and the description of options
used by the plugin listing (name, type, default, help from ``field(metadata={"help": ...})``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar


class Plugin:
    """Shared base of :class:`~p2p_framework.Edit` and :class:`~p2p_framework.Source`."""

    name: ClassVar[str] = ""

    def options(self) -> dict[str, Any]:
        """This plugin's options as plain values, for the run record."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {f.name: getattr(self, f.name) for f in fields if f.init}


@dataclass(frozen=True)
class OptionInfo:
    """One option of a plugin, as listed to users.

    Attributes:
        name: the dataclass field name (what ``--set PLUGIN.NAME=VALUE`` uses).
        type: the annotation as text, e.g. ``"float"`` or ``"dict[str, float]"``.
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
    try:
        hints = typing.get_type_hints(plugin_class)
    except Exception:  # unresolvable annotations: fall back to their text
        hints = {}
    infos = []
    for f in dataclasses.fields(plugin_class):
        if not f.init:
            continue
        annotation = hints.get(f.name, f.type)
        type_text = annotation if isinstance(annotation, str) else _type_text(annotation)
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        infos.append(OptionInfo(f.name, type_text, default, required, f.metadata.get("help", "")))
    return infos


def _type_text(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None)
    if text and not typing.get_args(annotation):
        return text
    return str(annotation).replace("typing.", "")
