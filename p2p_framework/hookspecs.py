"""Hook specifications of p2p-framework, and the ``hookimpl`` marker plugins import.

Hooks are for discovery and wiring only: a plugin registers its classes once, and all
per-layer, per-step work is plain method calls on those classes' instances (see
:class:`p2p_framework.Edit` and :class:`p2p_framework.Source`).

A plugin is a module (or object) with ``@hookimpl`` functions, registered either as a
built-in or through an entry point in the group ``p2p_framework``::

    [project.entry-points.p2p_framework]
    my_plugin = "my_package.my_module"
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "p2p_framework"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_edits(register: Callable[..., None]) -> None:
    """Register edit plugins.

    Called once when the registry collects plugins.

    Args:
        register: call ``register(EditClass)`` for each edit this plugin provides, or
            ``register(EditClass, name="other-name")`` to override ``EditClass.name``.
            ``EditClass`` must be a dataclass subclassing :class:`p2p_framework.Edit`; its
            fields are the edit's options. Names are lower-case words joined by ``-``.

    Returns:
        Nothing; what counts is the calls to ``register``.
    """


@hookspec
def register_sources(register: Callable[..., None]) -> None:
    """Register source plugins (where an edit's starting latent comes from).

    Called once when the registry collects plugins.

    Args:
        register: call ``register(SourceClass)`` for each source this plugin provides, or
            ``register(SourceClass, name="other-name")``. ``SourceClass`` must be a
            dataclass subclassing :class:`p2p_framework.Source`; its fields are its options.

    Returns:
        Nothing; what counts is the calls to ``register``.
    """


@hookspec
def register_filters(register: Callable[..., None]) -> None:
    """Register filter plugins (scores of a before/after pair that decide which dataset
    samples ``p2p-run dataset`` keeps).

    Called once when the registry collects plugins.

    Args:
        register: call ``register(FilterClass)`` for each filter this plugin provides, or
            ``register(FilterClass, name="other-name")``. ``FilterClass`` must be a dataclass
            subclassing :class:`p2p_framework.filters.Filter`; its fields are its options.

    Returns:
        Nothing; what counts is the calls to ``register``.
    """
