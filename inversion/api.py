"""``invert``: one call for every invertible source, built-in or third-party.

The command ``p2p-run invert`` calls it; it is the same code path as a source inverting its
``image`` inside a run (:meth:`~p2p_framework.inversion.InvertingSource.invert`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from p2p_framework.errors import OptionError, PluginError
from p2p_framework.model import StableDiffusionModel

from .images import ImageInput
from .result import Inversion
from .source import COMMON_OPTIONS, InvertingSource

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


def invertible_sources(registry: Any = None) -> list[str]:
    """Names of the registered sources that can invert a photo (subclasses of
    :class:`InvertingSource`), sorted.

    Args:
        registry: a :class:`~p2p_framework.PluginRegistry`; default
            :func:`~p2p_framework.get_registry`.
    """
    if registry is None:
        from p2p_framework.registry import get_registry

        registry = get_registry()
    return [
        info.name
        for info in registry.plugins("source")
        if issubclass(info.plugin_class, InvertingSource)
    ]


def inverting_source(
    method: str,
    options: dict[str, Any] | None = None,
    *,
    image_label: str = "<image>",
    crop: Sequence[int] | str | None = None,
    registry: Any = None,
) -> InvertingSource:
    """Build the invertible source ``method`` from the registry with its method ``options``
    (validated like any plugin's options; text is read by the option's type).

    Args:
        method: a registered invertible source's name.
        options: its method options (not ``image``, ``inversion``, ``cache``, ``cache_dir``;
            ``crop`` is its own argument).
        image_label: what the source's ``image`` option is set to (only recorded).
        crop: the crop offsets.
        registry: default :func:`~p2p_framework.get_registry`.

    Raises:
        OptionError: unknown or non-invertible method (listing the invertible sources), an
            unknown option (listing the method's options) or a bad value.
    """
    if registry is None:
        from p2p_framework.registry import get_registry

        registry = get_registry()
    available = invertible_sources(registry)
    if not isinstance(method, str) or method not in available:
        try:
            known = isinstance(method, str) and registry.get("source", method) is not None
        except PluginError:
            known = False
        what = "cannot invert a photo" if known else "unknown method"
        raise OptionError(
            "inversion",
            "method",
            f"{what} {method!r}; the sources that can invert: {', '.join(available)}",
        )
    options = dict(options or {})
    info = registry.get("source", method)
    accepted = [o.name for o in info.options if o.name not in COMMON_OPTIONS]
    for key in options:
        if key not in accepted:
            listed = ", ".join(accepted) or "none"
            raise OptionError(method, key, f"unknown option; {method} accepts: {listed}")
    return registry.build(
        "source", method, {**options, "image": image_label, "cache": False, "crop": crop}
    )


def invert(
    model: StableDiffusionModel,
    image: ImageInput | torch.Tensor,
    prompt: str,
    method: str | InvertingSource = "null-text",
    *,
    num_steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    crop: Sequence[int] | str | None = None,
    scheduler: Any = None,
    progress: ProgressCallback | None = None,
    registry: Any = None,
    **options: Any,
) -> Inversion:
    """Invert a real photo for editing with the source prompt ``prompt``.

    Args:
        model: from :func:`p2p_framework.load_model`.
        image: a path, a PIL image (prepared with :func:`prepare_image`: EXIF orientation,
            RGB, ``crop``, centre crop and resize) or an already prepared ``(1, 3, H, W)``
            tensor in [0, 1] of the run's size.
        prompt: the source prompt (the photo's description).
        method: the name of a registered invertible source (``null-text``, the default;
            ``negative-prompt``, ``direct``, ``ddim``, or a plugin's, e.g. ``fixed-point``),
            or an :class:`InvertingSource` object (its ``image``/``inversion`` options are not
            used; ``options`` must then be empty).
        num_steps, guidance: the DDIM steps and guidance scale of the edits to come.
        height, width: image size in pixels; default the model's own size.
        crop: ``(left, right, top, bottom)`` pixels to cut off the photo first (default: a
            source object's own ``crop``).
        scheduler: a DDIM scheduler whose config to use; default
            ``model.make_scheduler("ddim")``. It is not modified.
        progress: ``progress(done, total, info)`` after each step; ``total`` is
            ``num_steps * progress_phases`` of the source (``2 * num_steps`` for null-text:
            the DDIM inversion, then the optimisation); ``info`` has ``phase`` (e.g.
            ``ddim-inversion`` or ``null-text``) and, during null-text optimisation, ``loss``
            and ``inner_steps``.
        registry: where to look ``method`` up; default :func:`~p2p_framework.get_registry`.
        **options: the method's options; ``null-text``: ``num_inner_steps`` (10),
            ``early_stop_epsilon`` (1e-5), ``reuse_cond`` (False), ``batch_cond`` (False),
            ``unet_precision`` (``auto``: float16 for a model loaded in float16, else float32;
            recorded resolved).

    Returns:
        The :class:`Inversion` (float32 tensors on the CPU); its ``method`` is the source's
        name, its ``options`` the source's resolved method options.

    Raises:
        OptionError: unknown method or option, bad value.
        ImageError: unreadable, truncated or too small an image, bad crop.
        InversionError: a scheduler other than DDIM.
    """
    if isinstance(method, InvertingSource):
        if options:
            raise OptionError(
                method.name,
                next(iter(options)),
                "give the options in the source object, not to invert()",
            )
        source = method if crop is None else dataclasses.replace(method, crop=crop)
    else:
        if isinstance(image, (str, os.PathLike)):
            label = os.fspath(image)
        else:
            label = getattr(image, "filename", "") or "<image>"
        source = inverting_source(method, options, image_label=label, crop=crop, registry=registry)
    return source.invert(
        model,
        image,
        prompt,
        num_steps=num_steps,
        guidance=guidance,
        height=height,
        width=width,
        scheduler=scheduler,
        progress=progress,
    )
