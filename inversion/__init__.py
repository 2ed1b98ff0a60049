"""Inversion of real photos for editing: the invertible-source base class and its machinery.

Every inversion method is a source plugin subclassing :class:`InvertingSource` (built-ins:
``null-text``, ``negative-prompt``, ``direct``, ``ddim``; a plugin package may add more). It
turns a photo and its description into an :class:`Inversion` (starting latent plus what each
denoising step needs to reconstruct the photo, saved as a ``.p2pinv`` file), and hands the
editing loop a :class:`~p2p_framework.StepGuide` made from it::

    from p2p_framework import load_model
    from p2p_framework.inversion import invert

    model = load_model("CompVis/stable-diffusion-v1-4")
    inversion = invert(model, "cat.jpg", "a cat sitting next to a mirror", "null-text")
    inversion.save("cat.p2pinv")

See ``docs/inversion.md``.
"""

from .api import invert, invertible_sources, inverting_source
from .cache import InversionCache, cache_key, default_cache_dir
from .ddim import (
    DDIMMath,
    UNetCounter,
    check_ddim_scheduler,
    resolve_precision,
    scheduler_signature,
)
from .errors import ImageError, InversionError, InversionFileError, InversionMismatchError
from .images import MIN_SIDE, image_hash, image_to_tensor, load_image, parse_crop, prepare_image
from .methods import null_text_learning_rate, null_text_optimisation
from .result import SUFFIX, Inversion
from .source import COMMON_OPTIONS, InversionContext, InversionOutput, InvertingSource

__all__ = [
    "COMMON_OPTIONS",
    "DDIMMath",
    "MIN_SIDE",
    "SUFFIX",
    "ImageError",
    "Inversion",
    "InversionCache",
    "InversionError",
    "InversionFileError",
    "InversionMismatchError",
    "InversionContext",
    "InversionOutput",
    "InvertingSource",
    "UNetCounter",
    "cache_key",
    "check_ddim_scheduler",
    "default_cache_dir",
    "image_hash",
    "image_to_tensor",
    "invert",
    "load_image",
    "invertible_sources",
    "inverting_source",
    "null_text_learning_rate",
    "null_text_optimisation",
    "parse_crop",
    "prepare_image",
    "resolve_precision",
    "scheduler_signature",
]
