"""The edit-plugin API: what an edit plugin implements and what it is given.

An edit has two parts:

- its **options** (:class:`Edit`): a dataclass whose fields are what the user set, validated
  on construction (:mod:`p2p_framework.options`) and never changed by a run, so one object
  may serve many runs;
- its **per-run state** (:class:`EditRun`): what :meth:`Edit.bind` computes for one run from
  the prompts and the model (token mappers, masks, tensors on the device), and the hooks the
  denoising loop calls on it.

The hooks of :class:`EditRun`, all optional, each given the step:

==========================  ===============================================================
hook                        called
==========================  ===============================================================
``attention_inputs``        at each attention layer where ``uses_attention_inputs`` says so,
                            with the layer's queries, keys and values before attention
``self_attention``          at each self-attention layer where ``uses_self_attention`` says
                            so, with the probabilities
``cross_attention``         at each cross-attention layer of every step in which the run's
                            ``cross_replace_steps`` schedule injects; the result is blended
                            into the targets' maps by that schedule
``after_step``              after each scheduler step, with the latents
==========================  ===============================================================

A layer whose probabilities no hook (and no attention map) reads runs on the fused attention
kernel. Two optional declarations, :meth:`EditRun.linear_cross_attention` and
:meth:`EditRun.self_attention_is_source`, let an eager run keep an edited layer there too
(the edit moves onto queries, keys and the text embeddings behind the values). Tensor
shapes use ``(prompts, heads, queries, tokens)``, where prompt 0 is the source and prompts
1.. are the targets; only the conditional rows of the UNet batch are shown.

**The step.** Hooks called inside the UNet get ``step`` as an ``int`` (0-based) in an eager
run; under ``model.compile()`` they get a ``(1,)`` int64 tensor on the device holding it, so
one compiled graph serves every step. :meth:`RunContext.at_step` reads a per-step table in
both cases; ``uses_*`` predicates are asked with ``step=None`` under compile ("at any step of
the run"), once per layer. ``after_step`` always gets an ``int``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .options import Plugin
from .prompts import require_word_positions, word_positions
from .store import AttentionLayer, AttentionStore

#: A step as hooks inside the UNet get it: an int, or a ``(1,)`` int64 tensor under compile.
Step = int | torch.Tensor


@dataclass
class RunContext:
    """What an edit may know about the run it is bound to.

    Attributes:
        prompts: the source prompt, then the target prompts.
        tokenizer: the model's tokenizer (``model_max_length`` tokens per prompt).
        num_steps: number of diffusion steps ``T``; steps are numbered ``0 .. T-1``.
        latent_size: ``(height, width)`` of the latent, in latent cells.
        attention_store: running sums of attention maps; call ``track`` in ``bind`` to have
            the maps of a resolution kept.
        device: where the latents live.
        self_replace_window: steps ``[start, end)`` of the run's ``self_replace_steps``
            (``int(T * a)``, ``int(T * b)``), in which Prompt-to-Prompt edits give the targets
            the source's self-attention.
        self_replace_min_downscale: those edits replace self-attention only in layers whose
            grid is the latent grid divided by at least this (4: 16x16 at 512 px SD 1.x).
        compiled: whether the UNet runs under ``torch.compile`` (hooks then get the step as a
            tensor, see the module docstring).
        cross_attention_levels: the ``downscale`` of each UNet level that has cross-attention
            layers at this latent size (``(1, 2, 4, 8)`` for SD 1.x), so that ``bind`` can
            refuse a level the model lacks before the first step; None when unknown.
    """

    prompts: list[str]
    tokenizer: Any
    num_steps: int
    latent_size: tuple[int, int]
    attention_store: AttentionStore
    device: torch.device
    self_replace_window: tuple[int, int] = (0, 0)
    self_replace_min_downscale: int = 4
    compiled: bool = False
    cross_attention_levels: tuple[int, ...] | None = None

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

    def find_word(self, prompt_index: int, word: str) -> list[int]:
        """Token positions of ``word`` in prompt ``prompt_index``; empty when it is not there."""
        return word_positions(self.tokenizer, self.prompts[prompt_index], word)

    @staticmethod
    def at_step(table: torch.Tensor, step: Step) -> torch.Tensor:
        """``table[step]`` for an int step, or read on the device for a ``(1,)`` step tensor
        (under compile: no host sync, one graph for every step)."""
        if isinstance(step, torch.Tensor):
            return torch.index_select(table, 0, step)[0]
        return table[step]


@dataclass(frozen=True)
class LinearCrossAttention:
    """A run's :meth:`EditRun.cross_attention` at one step, declared linear in the maps.

    ``cross_attention(injected, targets, layer, step)`` must equal
    ``injected @ injected_map + targets @ target_map`` (per target, over the token axis) at
    every cross-attention layer of that step, up to float rounding. The controller then
    keeps such layers on the fused attention kernel: the maps are never materialised, the
    token maps are applied to the text embeddings behind the values instead (exact in real
    arithmetic for attention without a value bias; float rounding differs, see
    :meth:`EditRun.linear_cross_attention`).

    Attributes:
        injected_map: ``(targets, tokens, tokens)``; ``injected_map[i, j, k]`` is how much of
            the injected maps' token ``j`` goes to token ``k`` of target ``i``.
        target_map: ``(targets, tokens, tokens)``, the same for the target's own maps; None
            for none (most edits: the result depends on the injected maps only).
    """

    injected_map: torch.Tensor
    target_map: torch.Tensor | None = None


class EditRun:
    """One edit's state and hooks for one run (see the module docstring for when each hook
    is called). Override only what the edit needs; the defaults change nothing.

    Tensors the hooks read must be listed by :meth:`tensors` (by default every tensor
    attribute of the object): a compiled UNet marks them as static inputs.
    """

    def attention_inputs(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer: AttentionLayer,
        step: Step,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Change a layer's queries, keys or values before attention.

        Args:
            query: ``(prompts, heads, queries, head_dim)``.
            key, value: ``(prompts, heads, tokens, head_dim)`` (``tokens`` is the number of
                queries for self-attention, of text tokens for cross-attention).

        Returns:
            the three tensors, same shapes. Return new tensors; do not write into these.
        """
        return query, key, value

    def uses_attention_inputs(self, layer: AttentionLayer, step: int | None) -> bool:
        """Whether :meth:`attention_inputs` is called at ``layer`` and ``step`` (None: at any
        step of the run). Default: at every layer, if the hook is overridden."""
        return _overrides(self, "attention_inputs")

    def self_attention(
        self, source: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        """Return the targets' self-attention probabilities at one layer.

        Args:
            source: ``(1, heads, queries, queries)``: the source's maps.
            targets: ``(targets, heads, queries, queries)``: the targets' maps, as changed by
                the edits before this one.

        Returns:
            ``(targets, heads, queries, queries)``.
        """
        return targets

    def uses_self_attention(self, layer: AttentionLayer, step: int | None) -> bool:
        """Whether :meth:`self_attention` is called at self-attention ``layer`` and ``step``
        (None: at any step of the run). Default: everywhere, if the hook is overridden."""
        return _overrides(self, "self_attention")

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        """Return the maps to inject into the targets at one cross-attention layer.

        Args:
            injected: ``(targets, heads, queries, tokens)``: the source's maps broadcast to
                every target, as changed by the edits before this one.
            targets: ``(targets, heads, queries, tokens)``: the targets' own maps.

        Returns:
            ``(targets, heads, queries, tokens)`` maps to inject; the loop blends them into
            the targets' maps by the ``cross_replace_steps`` schedule.
        """
        return injected

    def linear_cross_attention(self, step: int) -> LinearCrossAttention | None:
        """Declare :meth:`cross_attention` at ``step`` linear in the maps, or return None.

        Optional, for speed: when every injecting run of a job declares its step linear and
        no attention map of a layer is kept, an eager run keeps that layer on the fused
        attention kernel, with no probabilities materialised (fewer operations per layer
        and less memory; results agree with the materialised path to float rounding).
        Compiled runs always materialise. Called once per step with the step as an
        ``int``; the maps must hold at every cross-attention layer of that step. Default:
        None (the controller materialises and calls :meth:`cross_attention`).
        """
        return None

    def self_attention_is_source(self, layer: AttentionLayer, step: int) -> bool:
        """Whether :meth:`self_attention` at ``layer`` and ``step`` gives every target the
        source's maps unchanged (``source.expand_as(targets)``), whatever the targets.

        Optional, for speed: asked in eager runs only, where :meth:`uses_self_attention`
        is True; when every run changing the layer says so and no map of it is kept, the
        targets take the source's queries and keys and the layer stays on the fused
        attention kernel. Default: False.
        """
        return False

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """Change the latents after scheduler step ``step`` (0-based).

        Args:
            latents: ``(prompts, channels, height, width)``.

        Returns:
            latents of the same shape.
        """
        return latents

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the hooks read inside the UNet (static inputs under compile)."""
        return [value for value in vars(self).values() if isinstance(value, torch.Tensor)]

    @property
    def injects_cross_attention(self) -> bool:
        """Whether this run overrides :meth:`cross_attention`."""
        return _overrides(self, "cross_attention")


def _overrides(run: EditRun, hook: str) -> bool:
    return getattr(type(run), hook) is not getattr(EditRun, hook)


class Edit(Plugin):
    """Base class of edit plugins: a dataclass whose fields are the edit's options.

    Subclasses implement :meth:`bind`.
    """

    def bind(self, run: RunContext) -> EditRun:
        """Check the options against the run and return this edit's state for it.

        Raise :class:`~p2p_framework.errors.OptionError` for options that do not fit the run
        (e.g. a word missing from a prompt). Must not change ``self``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement bind(run)")


class SelfReplaceRun(EditRun):
    """Prompt-to-Prompt's self-attention injection: in the run's ``self_replace_window``, at
    self-attention layers of downscale ``>= self_replace_min_downscale``, the targets take the
    source's self-attention maps.

    The per-run state of :class:`PromptToPromptEdit` subclasses derives from this; call
    ``super().__init__(run, enabled)`` from their ``__init__``.
    """

    def __init__(self, run: RunContext, enabled: bool = True) -> None:
        start, end = run.self_replace_window if enabled else (0, 0)
        self._self_window = (start, end)
        self._self_min_downscale = run.self_replace_min_downscale
        steps = torch.arange(max(run.num_steps, 1), device=run.device)
        # (steps,) flags, read with at_step under compile.
        self._self_on = (steps >= start) & (steps < end)

    def uses_self_attention(self, layer: AttentionLayer, step: int | None) -> bool:
        start, end = self._self_window
        if layer.downscale < self._self_min_downscale:
            return False
        return start < end if step is None else start <= step < end

    def self_attention_is_source(self, layer: AttentionLayer, step: int) -> bool:
        return True  # asked only inside the window, where the targets take the source's maps

    def self_attention(
        self, source: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer, step: Step
    ) -> torch.Tensor:
        replaced = source.expand_as(targets)
        if isinstance(step, torch.Tensor):  # compiled: the window is a table on the device
            return torch.where(RunContext.at_step(self._self_on, step), replaced, targets)
        return replaced


@dataclass(frozen=True)
class PromptToPromptEdit(Edit):
    """Base of the Prompt-to-Prompt edits (``replace``, ``refine``, ``reweight``): they share
    the ``self_replace`` option, the paper's self-attention injection in the run's
    ``self_replace_steps`` window. Their per-run state derives from :class:`SelfReplaceRun`.

    Subclasses are ``@dataclass(frozen=True)`` too (a dataclass cannot mix frozen and not).
    Self-replacement is on in a run when any of its Prompt-to-Prompt edits has
    ``self_replace`` on (they share the run's window, so applying it twice changes nothing).
    """

    self_replace: bool = field(
        default=True,
        kw_only=True,
        metadata={
            "help": "targets take the source's self-attention in the run's self_replace_steps "
            "window (the paper's)"
        },
    )
