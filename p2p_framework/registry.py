"""The plugin registry: built-ins, entry-point plugins, validation and listing.

Built-in plugins (``p2p_framework.plugins.*``) are registered by the same code path as
third-party packages that declare an entry point in the group ``p2p_framework``. A plugin that
fails to import, has a misspelled hook implementation, or registers something invalid is
reported by name in :attr:`PluginRegistry.errors`; the others keep working.

Set ``P2P_FRAMEWORK_LOAD_PLUGINS`` to a comma-separated list of entry-point names to load only
those, or to an empty string to load none (to recover from a broken plugin).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .edit import Edit
from .errors import OptionError, PluginError
from .filters import Filter
from .options import OptionInfo, describe_options
from .source import Source

ENTRY_POINT_GROUP = "p2p_framework"
LOAD_PLUGINS_ENV = "P2P_FRAMEWORK_LOAD_PLUGINS"
BUILTIN_MODULES = (
    "p2p_framework.plugins.seed",
    "p2p_framework.plugins.replace",
    "p2p_framework.plugins.refine",
    "p2p_framework.plugins.reweight",
    "p2p_framework.plugins.local_blend",
    "p2p_framework.plugins.inversion_sources",
    "p2p_framework.plugins.filters",
)
KINDS = {
    "edit": (Edit, "register_edits"),
    "source": (Source, "register_sources"),
    "filter": (Filter, "register_filters"),
}
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginInfo:
    """One registered edit, source or filter.

    Attributes:
        name: what users type (``--edit replace``).
        kind: ``"edit"``, ``"source"`` or ``"filter"``.
        plugin_class: the dataclass to instantiate with the options.
        plugin: name of the pluggy plugin (module) that registered it.
        package, version: the distribution it comes from.
        summary: first line of the class docstring.
        options: the options it accepts, with defaults.
    """

    name: str
    kind: str
    plugin_class: type
    plugin: str
    package: str
    version: str
    summary: str
    options: tuple[OptionInfo, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (options' defaults included)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "plugin": self.plugin,
            "package": self.package,
            "version": self.version,
            "summary": self.summary,
            "options": [dataclasses.asdict(option) for option in self.options],
        }


@dataclass(frozen=True)
class PluginLoadError:
    """A plugin that could not be used, and why."""

    plugin: str
    message: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r}: {self.message}"


def _own_version() -> str:
    try:
        return importlib.metadata.version("p2p-framework")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class PluginRegistry:
    """Knows every available edit, source and filter plugin.

    Args:
        builtins: register the built-in plugins.
        entry_points: load plugins declared in the ``p2p_framework`` entry-point group
            (narrowed by the ``P2P_FRAMEWORK_LOAD_PLUGINS`` environment variable).
    """

    def __init__(self, *, builtins: bool = True, entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._origins: dict[str, tuple[str, str]] = {}
        self._load_errors: list[PluginLoadError] = []
        self._collected: dict[str, dict[str, PluginInfo]] | None = None
        self._collect_errors: list[PluginLoadError] = []
        if builtins:
            version = _own_version()
            for module_name in BUILTIN_MODULES:
                self.add(
                    importlib.import_module(module_name),
                    name=module_name,
                    package="p2p-framework",
                    version=version,
                )
        if entry_points:
            self._load_entry_points()

    # -- loading --------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        wanted = os.environ.get(LOAD_PLUGINS_ENV)
        allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and entry_point.name not in allowed:
                continue
            dist = entry_point.dist
            package = dist.name if dist is not None else "unknown"
            version = dist.version if dist is not None else "unknown"
            try:
                plugin = entry_point.load()
            except Exception as error:  # any import failure is that plugin's, not ours
                self._load_errors.append(
                    PluginLoadError(
                        entry_point.name, f"failed to import: {type(error).__name__}: {error}"
                    )
                )
                continue
            try:
                self.add(plugin, name=entry_point.name, package=package, version=version)
            except PluginError as error:
                self._load_errors.append(PluginLoadError(entry_point.name, str(error)))

    def add(
        self,
        plugin: object,
        *,
        name: str | None = None,
        package: str = "unknown",
        version: str = "unknown",
    ) -> str:
        """Register a plugin module or object with ``@hookimpl`` functions.

        Returns:
            the plugin's name in the registry (for :meth:`remove`).

        Raises:
            PluginError: the name is taken, or a hook implementation matches no hook
                (a misspelled hook name or argument).
        """
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if self._pm.has_plugin(name):
            raise PluginError(f"plugin {name!r} is already registered")
        try:
            self._pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as error:
            raise PluginError(f"plugin {name!r}: {error}") from None
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as error:
            self._pm.unregister(name=name)
            raise PluginError(f"plugin {name!r}: {error}") from None
        self._origins[name] = (package, version)
        self._collected = None
        return name

    def remove(self, name: str) -> None:
        """Unregister the plugin registered as ``name``."""
        if not self._pm.has_plugin(name):
            raise PluginError(f"plugin {name!r} is not registered")
        self._pm.unregister(name=name)
        self._origins.pop(name, None)
        self._collected = None

    # -- collecting -----------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, PluginInfo]]:
        if self._collected is not None:
            return self._collected
        tables: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        errors: list[PluginLoadError] = []
        for kind, (base, hook_name) in KINDS.items():
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                plugin_name = impl.plugin_name
                register = self._registrar(kind, base, plugin_name, tables[kind], errors)
                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as error:  # a plugin's bug must not stop the others
                    errors.append(
                        PluginLoadError(
                            plugin_name, f"{hook_name} failed: {type(error).__name__}: {error}"
                        )
                    )
        self._collected, self._collect_errors = tables, errors
        return tables

    def _registrar(
        self,
        kind: str,
        base: type,
        plugin_name: str,
        table: dict[str, PluginInfo],
        errors: list[PluginLoadError],
    ) -> Callable[..., None]:
        package, version = self._origins.get(plugin_name, ("unknown", "unknown"))

        def register(plugin_class: Any, name: str | None = None) -> None:
            problem = None
            if not (isinstance(plugin_class, type) and issubclass(plugin_class, base)):
                problem = f"registered {plugin_class!r}, which is not a subclass of {base.__name__}"
            elif not dataclasses.is_dataclass(plugin_class):
                problem = f"{plugin_class.__name__} must be a dataclass (its fields are options)"
            else:
                name = name or plugin_class.name
                if not isinstance(name, str) or not _NAME.match(name):
                    problem = f"{plugin_class.__name__} has a bad {kind} name {name!r}"
                elif name in table:
                    problem = (
                        f"{kind} {name!r} is already registered by plugin "
                        f"{table[name].plugin!r}; keeping that one"
                    )
            if problem is not None:
                errors.append(PluginLoadError(plugin_name, problem))
                return
            assert name is not None
            doc = (plugin_class.__doc__ or "").strip().splitlines()
            table[name] = PluginInfo(
                name=name,
                kind=kind,
                plugin_class=plugin_class,
                plugin=plugin_name,
                package=package,
                version=version,
                summary=doc[0] if doc else "",
                options=tuple(describe_options(plugin_class)),
            )

        return register

    # -- queries --------------------------------------------------------------------------
    @property
    def errors(self) -> list[PluginLoadError]:
        """Plugins that failed to load or register, with the reason."""
        self._collect()
        return [*self._load_errors, *self._collect_errors]

    def plugins(self, kind: str | None = None) -> list[PluginInfo]:
        """Every registered edit, source and filter (or only one ``kind``), sorted by kind and
        name."""
        tables = self._collect()
        kinds = [kind] if kind else list(KINDS)
        return [tables[k][n] for k in kinds for n in sorted(tables[k])]

    def get(self, kind: str, name: str) -> PluginInfo:
        """The plugin ``name`` of ``kind``.

        Raises:
            PluginError: unknown name; the message lists the available ones.
        """
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind {kind!r}; expected one of {list(KINDS)}")
        table = self._collect()[kind]
        if name not in table:
            available = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {kind} plugin {name!r}; available: {available}")
        return table[name]

    def build(self, kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
        """Instantiate plugin ``name`` with ``options``.

        Raises:
            PluginError: unknown plugin.
            OptionError: an option the plugin does not have, a missing required one, or a
                bad value (naming the plugin and the option).
        """
        info = self.get(kind, name)
        options = dict(options or {})
        known = {option.name for option in info.options}
        for key in options:
            if key not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise OptionError(name, key, f"unknown option; {name} accepts: {listed}")
        for option in info.options:
            if option.required and option.name not in options:
                raise OptionError(name, option.name, "is required")
        try:
            return info.plugin_class(**options)
        except OptionError:
            raise
        except (TypeError, ValueError) as error:
            raise OptionError(name, "options", str(error)) from None

    def build_edits(self, specs: Iterable[tuple[str, dict[str, Any]]]) -> list[Edit]:
        """Instantiate edits from ``(name, options)`` pairs, in order."""
        return [self.build("edit", name, options) for name, options in specs]


_default: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide registry, created (and entry points loaded) on first use."""
    global _default
    if _default is None:
        _default = PluginRegistry()
    return _default
