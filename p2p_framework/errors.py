"""Errors meant for people: each says what is wrong and, where a plugin is at fault, which one.

Every error raised for bad input derives from :class:`P2PError`; the command line prints its
message on one line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base class of the errors caused by bad input rather than by a bug."""


class PromptError(P2PError):
    """A prompt cannot be used as asked (word not found, word counts differ, too long...)."""


class OptionError(P2PError):
    """A plugin or pipeline option has a bad value.

    Args:
        plugin: name of the plugin whose option is at fault (``"pipeline"`` for run settings).
        option: the option's name.
        message: what is wrong, in words.
    """

    def __init__(self, plugin: str, option: str, message: str) -> None:
        self.plugin = plugin
        self.option = option
        self.message = message
        super().__init__(f"{plugin}: {option}: {message}")


class PluginError(P2PError):
    """A plugin is unknown, broken, or registered something invalid."""


class ModelLoadError(P2PError):
    """A model folder or hub id cannot be loaded as a supported diffusers pipeline."""


class PluginRunError(P2PError):
    """A plugin raised an unexpected exception (a bug in it, not bad input) during a run.

    The run's loop wraps any exception other than :class:`P2PError` and ``OSError`` that it
    traces to one of a job's plugins (an edit, its per-run state, a source or its step guide),
    so only that job fails and the message names the plugin. ``p2p-run`` reports it with exit
    status 1 (a failed job), not 2 (bad input). The original exception is ``__cause__``.

    Args:
        plugin: the plugin object (an :class:`~p2p_framework.Edit` or
            :class:`~p2p_framework.Source`) whose code raised.
        kind: ``"edit"`` or ``"source"``.
        error: what it raised.
        hook: the method that raised (e.g. ``"cross_attention"``), or None if unknown.
    """

    def __init__(self, plugin: object, kind: str, error: BaseException, hook: str | None) -> None:
        self.plugin = plugin
        self.kind = kind
        self.error = error
        self.hook = hook
        self.name: str = getattr(type(plugin), "name", "") or type(plugin).__name__
        self.package = "unknown"
        self.version = "unknown"
        super().__init__(self._text())
        self.__cause__ = error

    def resolve(self, registry: object) -> PluginRunError:
        """Fill in the plugin's registered name, package and version from ``registry`` (a
        :class:`~p2p_framework.PluginRegistry`); returns ``self``."""
        infos = getattr(registry, "plugins", None)
        info = None
        if callable(infos):
            info = next((i for i in infos(self.kind) if i.plugin_class is type(self.plugin)), None)
        if info is not None:
            self.name, self.package, self.version = info.name, info.package, info.version
            self.args = (self._text(),)
        return self

    def _text(self) -> str:
        where = f" in {self.hook}" if self.hook else ""
        detail = " ".join(str(self.error).split())
        return (
            f"plugin {self.name!r} (package {self.package}) failed{where}: "
            f"{type(self.error).__name__}: {detail}"
        )

    def as_json(self) -> dict[str, object]:
        """``{"name", "kind", "package", "version", "hook", "exception"}`` for records."""
        return {
            "name": self.name,
            "kind": self.kind,
            "package": self.package,
            "version": self.version,
            "hook": self.hook,
            "exception": type(self.error).__name__,
        }
