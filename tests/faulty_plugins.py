"""Edit plugins that fail on purpose, for the reliability tests (tests/test_run_safety.py).

* ``explode``: raises an ordinary exception (``ZeroDivisionError`` or ``RuntimeError``) in the
  hook named by its ``hook`` option, as a buggy third-party plugin would.
* ``send-signal``: sends a signal (``INT`` or ``TERM``) to its own process after denoising step
  ``at_step``, directly or from inside a ``__del__`` (where Python ignores the
  ``KeyboardInterrupt`` that Ctrl-C raises: "Exception ignored in ...").

Run as a script it is ``p2p-run`` with these plugins registered (no entry points), so the
signal tests can run the real command line in a subprocess::

    python tests/faulty_plugins.py edit --edit replace --edit send-signal ...
"""

from __future__ import annotations

import os
import signal
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from p2p_framework import Edit, EditRun, PluginRegistry, hookimpl

#: Package name the plugins are registered under (shown in error messages).
PACKAGE = "p2p-faulty-plugins"


def _fail(exception: str) -> None:
    if exception == "runtime":
        raise RuntimeError("explode: this plugin is broken on purpose")
    print(1 / 0)  # ZeroDivisionError: division by zero


@dataclass
class Explode(Edit):
    """Raises an ordinary exception in one of its hooks."""

    name = "explode"

    hook: str = field(
        default="cross_attention",
        metadata={"help": "bind, uses_self_attention, cross_attention or after_step"},
    )
    exception: str = field(default="zero", metadata={"help": "zero or runtime"})
    at_step: int = field(default=1, metadata={"help": "step at which after_step raises"})

    def bind(self, run: Any) -> EditRun:
        if self.hook == "bind":
            _fail(self.exception)
        return ExplodeRun(self)


class ExplodeRun(EditRun):
    def __init__(self, edit: Explode) -> None:
        self.edit = edit

    def uses_self_attention(self, layer: Any, step: int | None) -> bool:
        if self.edit.hook == "uses_self_attention":
            _fail(self.edit.exception)
        return False

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: Any, step: Any
    ) -> torch.Tensor:
        if self.edit.hook == "cross_attention":
            _fail(self.edit.exception)
        return injected

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        if self.edit.hook == "after_step" and step == self.edit.at_step:
            _fail(self.edit.exception)
        return latents


class _SignalOnDelete:
    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        # The handler runs at the next bytecode: inside __del__, where its exception is
        # printed as "Exception ignored in ..." and dropped.
        for _ in range(1000):
            pass


@dataclass
class SendSignal(Edit):
    """Sends a signal to its own process after a denoising step."""

    name = "send-signal"

    signal: str = field(default="TERM", metadata={"help": "INT or TERM"})
    at_step: int = field(default=1, metadata={"help": "after this step (0-based)"})
    via_del: bool = field(default=False, metadata={"help": "send it from a __del__"})

    def bind(self, run: Any) -> EditRun:
        return SendSignalRun(self)


class SendSignalRun(EditRun):
    def __init__(self, edit: SendSignal) -> None:
        self.edit = edit

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        if step == self.edit.at_step:
            signum = getattr(signal, f"SIG{self.edit.signal}")
            if self.edit.via_del:
                holder = _SignalOnDelete(signum)
                del holder
            else:
                os.kill(os.getpid(), signum)
        return latents


def plugin_module() -> types.ModuleType:
    """A plugin module registering ``explode`` and ``send-signal``."""
    module = types.ModuleType("faulty_plugins_module")

    def register_edits(register: Any) -> None:
        register(Explode)
        register(SendSignal)

    module.register_edits = hookimpl(register_edits)  # type: ignore[attr-defined]
    return module


def registry() -> PluginRegistry:
    """The built-in plugins plus these."""
    plugins = PluginRegistry(entry_points=False)
    plugins.add(plugin_module(), name="faulty-plugins", package=PACKAGE, version="0.0.1")
    return plugins


if __name__ == "__main__":
    from p2p_framework.cli import cli

    cli.main(args=sys.argv[1:], prog_name="p2p-run", obj=registry())
