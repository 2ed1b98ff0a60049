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


class NumericalError(P2PError):
    """A run's numbers overflowed: NaN or infinite latents or pixels (typically float16 on a
    model or size it has too little range for). Nothing is written; the message says what to
    change (``--dtype float32``, a VAE decoded in float32)."""


class P2PWarning(UserWarning):
    """Something a user should know about a run that still runs (words the model does not
    know, a photo its VAE cannot represent). Issued with :func:`warnings.warn`; ``p2p-run``
    prints each as one ``Warning:`` line on stderr."""
