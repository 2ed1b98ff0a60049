"""Errors of the inversion front end; all are :class:`p2p_framework.errors.P2PError`."""

from __future__ import annotations

from p2p_framework.errors import P2PError


class InversionError(P2PError):
    """Base class of the inversion errors."""


class ImageError(InversionError):
    """An input image is missing, unreadable, truncated or too small (the message names it)."""


class InversionFileError(InversionError):
    """A ``.p2pinv`` file is missing, unreadable or not an inversion (the message names it)."""


class InversionMismatchError(InversionError):
    """A saved inversion was made for another model, scheduler, step count, size or prompt."""
