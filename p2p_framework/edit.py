"""The edit-plugin API: what an edit plugin implements and what it is given.

An edit plugin is a dataclass subclassing :class:`Edit`; its fields are its options (with
defaults), and it is registered with the ``register_edits`` hook. Per run, the pipeline calls
:meth:`Edit.setup` once, then, for every cross-attention layer call of every step in the
injection window, :meth:`Edit.cross_attention`, and after every scheduler step
:meth:`Edit.after_step`. Tensor shapes use ``(prompts, heads, queries, tokens)``, where
prompt 0 is the source and prompts 1.. are the targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .options import Plugin
from .prompts import require_word_positions
from .store import AttentionLayer, AttentionStore


@dataclass
class RunContext:
    """What an edit may know about the run it is part of.

    Attributes:
        prompts: the source prompt, then the target prompts.
        tokenizer: the model's tokenizer (``model_max_length`` tokens per prompt).
        num_steps: number of diffusion steps ``T``; steps are numbered ``0 .. T-1``.
        latent_size: ``(height, width)`` of the latent, in latent cells.
        attention_store: running sums of attention maps; call ``track`` in ``setup`` to have
            the maps of a resolution kept.
        device: where the latents live.
    """

    prompts: list[str]
    tokenizer: Any
    num_steps: int
    latent_size: tuple[int, int]
    attention_store: AttentionStore
    device: torch.device

    @property
    def num_targets(self) -> int:
        """Number of target prompts (the batch has ``num_targets + 1`` rows)."""
        return len(self.prompts) - 1

    @property
    def max_tokens(self) -> int:
        """Tokens per prompt seen by the text encoder (77 for CLIP)."""
        return int(self.tokenizer.model_max_length)

    def word_positions(
        self, prompt_index: int, word: str, *, plugin: str, option: str
    ) -> list[int]:
        """Token positions of ``word`` in prompt ``prompt_index``.

        Raises:
            OptionError: naming ``plugin`` and ``option``, when the word is not in that prompt.
        """
        return require_word_positions(
            self.tokenizer, self.prompts[prompt_index], word, plugin=plugin, option=option
        )


class Edit(Plugin):
    """Base class of edit plugins. Subclasses are dataclasses whose fields are their options.

    Override only what the edit needs:

    - :meth:`setup` to check options against the prompts and precompute tensors;
    - :meth:`cross_attention` to take part in cross-attention injection (replace, refine and
      reweight do); the pipeline blends its result into the targets' maps under the
      ``cross_replace_steps`` schedule;
    - :meth:`after_step` to change the latents after each scheduler step (local blend does).
    """

    def setup(self, run: RunContext) -> None:
        """Validate options against the run and precompute what the other methods need.

        Raise :class:`~p2p_framework.errors.OptionError` for bad options.
        """

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer
    ) -> torch.Tensor:
        """Return the maps to inject into the targets at one cross-attention layer.

        Args:
            injected: ``(targets, heads, queries, tokens)``: the source's maps broadcast to
                every target, as changed by the edits before this one in the pipeline.
            targets: ``(targets, heads, queries, tokens)``: the targets' own maps.
            layer: where this call happens.

        Returns:
            ``(targets, heads, queries, tokens)`` maps to inject.
        """
        return injected

    def after_step(self, latents: torch.Tensor, step: int, run: RunContext) -> torch.Tensor:
        """Change the latents after scheduler step ``step`` (0-based).

        Args:
            latents: ``(prompts, channels, height, width)``.

        Returns:
            latents of the same shape.
        """
        return latents

    @property
    def injects_cross_attention(self) -> bool:
        """Whether this edit overrides :meth:`cross_attention`."""
        return type(self).cross_attention is not Edit.cross_attention
