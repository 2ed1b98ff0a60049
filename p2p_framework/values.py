"""Plugin option values from text or from TOML/JSON, read by the option's annotated type.

``p2p-run --set PLUGIN.KEY=VALUE`` and pipeline files give option values as text (or as
TOML/JSON values); :func:`parse_option` turns them into what the plugin's dataclass field is
annotated with:

========================  ==========================================================
annotation                text accepted
========================  ==========================================================
``int`` / ``float``       ``5``, ``0.4`` (JSON numbers too)
``bool``                  ``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``
``str``                   the text as it is
``list[X]``               ``a,b,c``; without a comma, ``a b c``; or a JSON list
``dict[str, X]``          ``a=1,b=2`` or a JSON object
``X | None``              ``none`` or ``null`` for None, else as ``X``
``X | Y``                 the first of ``X``, ``Y`` that accepts the text
``Literal[...]``          one of the listed values
anything else             a JSON value, else the text
========================  ==========================================================
"""

from __future__ import annotations

import collections.abc
import json
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, Union

from .errors import OptionError

NoneType = type(None)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}
_SEQUENCES = {
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Iterable,
    collections.abc.Collection,
    collections.abc.Set,
}
_MAPPINGS = {dict, collections.abc.Mapping, collections.abc.MutableMapping}


def option_types(plugin_class: type) -> dict[str, Any]:
    """The resolved annotation of each field of a plugin dataclass (``Any`` if unresolvable)."""
    import dataclasses

    try:
        hints = typing.get_type_hints(plugin_class)
    except Exception:  # an annotation that does not resolve: read every value as JSON/text
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(plugin_class)}


def type_text(annotation: Any) -> str:
    """Short human text of an annotation: ``list[str]``, ``float | None``."""
    if annotation is Any:
        return "any"
    if annotation is NoneType:
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_text(a) for a in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def parse_option(plugin: str, option: str, annotation: Any, value: Any) -> Any:
    """Turn ``value`` (text, or a TOML/JSON value) into the option's type.

    Args:
        plugin, option: named in the error message.
        annotation: the field's annotation (see :func:`option_types`).
        value: text from the command line, or a value already typed by TOML/JSON (strings in
            it are read as text when the annotation does not want a string).

    Raises:
        OptionError: the value does not fit the annotation.
    """
    try:
        if isinstance(value, str):
            return _parse(annotation, value)
        return _coerce(annotation, value)
    except ValueError as error:
        raise OptionError(plugin, option, str(error)) from None


def _expected(annotation: Any, text: Any) -> ValueError:
    return ValueError(f"expected {type_text(annotation)}, got {text!r}")


def _json(text: str) -> Any:
    return json.loads(text)


def _json_or_text(text: str) -> Any:
    try:
        return _json(text)
    except ValueError:
        return text


def _split_items(text: str) -> list[str]:
    """``a,b,c`` (comma-separated) or, without a comma, ``a b c``."""
    if "," in text:
        return [part.strip() for part in text.split(",")]
    return text.split()


def _parse(annotation: Any, text: str) -> Any:  # noqa: C901 - one branch per kind of type
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    stripped = text.strip()
    if annotation is Any or annotation is object or isinstance(annotation, str):
        return _json_or_text(stripped)
    if origin in (Union, types.UnionType):
        if NoneType in args and stripped.lower() in _NONE:
            return None
        for arm in (a for a in args if a is not NoneType):
            try:
                return _parse(arm, text)
            except (ValueError, TypeError):
                continue
        raise _expected(annotation, text)
    if origin is Literal:
        for choice in args:
            if str(choice) == stripped or (
                not isinstance(choice, str) and _safe(stripped) == choice
            ):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}, got {text!r}")
    if annotation is NoneType:
        if stripped.lower() in _NONE:
            return None
        raise _expected(annotation, text)
    if annotation is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise _expected(annotation, text)
    if annotation is int:
        try:
            return int(stripped)
        except ValueError:
            value = _safe(stripped)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _expected(annotation, text) from None
    if annotation is float:
        try:
            return float(stripped)
        except ValueError:
            raise _expected(annotation, text) from None
    if annotation is str:
        return text
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return annotation(stripped)
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        if stripped.startswith("["):
            try:
                items = _json(stripped)
            except ValueError as error:
                raise ValueError(f"bad JSON list {text!r}: {error}") from None
            return _coerce(annotation, items)
        items = [
            _parse(_item_type(annotation, i), part) for i, part in enumerate(_split_items(text))
        ]
        return tuple(items) if origin is tuple else items
    if origin in _MAPPINGS or annotation in _MAPPINGS:
        if stripped.startswith("{"):
            try:
                mapping = _json(stripped)
            except ValueError as error:
                raise ValueError(f"bad JSON object {text!r}: {error}") from None
            return _coerce(annotation, mapping)
        key_type, value_type = (args + (Any, Any))[:2] if args else (Any, Any)
        result = {}
        for pair in (p for p in text.split(",") if p.strip()):
            key, sep, raw = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected key=value pairs such as a=1,b=2, got {text!r}")
            result[_parse(key_type, key.strip())] = _parse(value_type, raw)
        if not result:
            raise ValueError(f"expected key=value pairs such as a=1,b=2, got {text!r}")
        return result
    # Another class: JSON if it parses, else the text; the plugin validates.
    return _json_or_text(stripped)


def _safe(text: str) -> Any:
    try:
        return _json(text)
    except ValueError:
        return None


def _item_type(annotation: Any, index: int) -> Any:
    args = typing.get_args(annotation)
    if not args:
        return Any
    if typing.get_origin(annotation) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[index] if index < len(args) else Any
    return args[0]


def _fits(annotation: Any, value: Any) -> bool:
    """Whether a typed value (from TOML/JSON) is of the annotation's top-level kind."""
    origin = typing.get_origin(annotation)
    if annotation is Any or isinstance(annotation, str):
        return True
    if annotation is NoneType:
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(arm, value) for arm in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        return isinstance(value, (list, tuple))
    if origin in _MAPPINGS or annotation in _MAPPINGS:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        if issubclass(annotation, PurePath):
            return isinstance(value, (str, PurePath))
        return isinstance(value, annotation)
    return True


def _coerce(annotation: Any, value: Any) -> Any:
    """Bring a typed value to the annotation: strings are parsed as text where the annotation
    does not take a string, ints become floats, containers are coerced item by item. A value
    of another kind is left for the plugin to reject with its own message."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or isinstance(annotation, str):
        return value
    if origin in (Union, types.UnionType):
        if value is None and NoneType in args:
            return None
        for arm in (a for a in args if a is not NoneType):
            if _fits(arm, value):
                return _coerce(arm, value)
        if isinstance(value, str):
            return _parse(annotation, value)
        raise _expected(annotation, value)
    if isinstance(value, str) and not _fits(annotation, value):
        return _parse(annotation, value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return annotation(value) if isinstance(value, (str, PurePath)) else value
    if (origin in _SEQUENCES or annotation in _SEQUENCES) and isinstance(value, (list, tuple)):
        items = [_coerce(_item_type(annotation, i), item) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if (origin in _MAPPINGS or annotation in _MAPPINGS) and isinstance(value, dict):
        key_type, value_type = (args + (Any, Any))[:2] if args else (Any, Any)
        return {_coerce(key_type, k): _coerce(value_type, v) for k, v in value.items()}
    if not _fits(annotation, value):
        raise _expected(annotation, value)
    return value


def json_ready(value: Any) -> Any:
    """A JSON-serialisable copy of an option value (tuples become lists, paths strings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (PurePath, Path)):
        return str(value)
    if isinstance(value, collections.abc.Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return json_ready(item())
    if hasattr(value, "tolist"):
        return json_ready(value.tolist())
    return repr(value)
