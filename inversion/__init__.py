"""Inversion of real photos for editing: DDIM, null-text, negative-prompt and direct.

This package knows nothing of edits: it turns a photo and its description into an
:class:`Inversion` (starting latent plus what each denoising step needs to reconstruct the
photo), which a source plugin hands to the editing loop::

    from p2p_framework import load_model
    from p2p_framework.inversion import invert

    model = load_model("CompVis/stable-diffusion-v1-4")
    inversion = invert(model, "cat.jpg", "a cat sitting next to a mirror", "null-text")
    inversion.save("cat.p2pinv")

See ``docs/inversion.md``.
"""

from .api import invert
from .cache import InversionCache, cache_key, default_cache_dir
from .ddim import check_ddim_scheduler, scheduler_signature
from .errors import ImageError, InversionError, InversionFileError, InversionMismatchError
from .images import MIN_SIDE, image_hash, image_to_tensor, load_image, parse_crop, prepare_image
from .methods import METHODS, NullTextOptions, method_options, resolve_options
from .result import SUFFIX, Inversion

__all__ = [
    "METHODS",
    "MIN_SIDE",
    "SUFFIX",
    "ImageError",
    "Inversion",
    "InversionCache",
    "InversionError",
    "InversionFileError",
    "InversionMismatchError",
    "NullTextOptions",
    "cache_key",
    "check_ddim_scheduler",
    "default_cache_dir",
    "image_hash",
    "image_to_tensor",
    "invert",
    "load_image",
    "method_options",
    "parse_crop",
    "prepare_image",
    "resolve_options",
    "scheduler_signature",
]
