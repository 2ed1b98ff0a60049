"""The attention hook: one diffusers attention processor per UNet attention layer.

:class:`AttentionController` installs a :class:`ControlledAttnProcessor` on every attention
module of a UNet with ``set_attn_processor`` (no patching of model code) and restores the
original processors on :meth:`AttentionController.remove`. The denoising loop tells the
controller the step index and which rows of the UNet batch are conditional before each UNet
call (:meth:`AttentionController.begin_call`), so nothing depends on counting layer calls.

Per layer call, the processor asks the controller whether anything reads or changes this
layer's attention probabilities now; if not, it takes the fused
``scaled_dot_product_attention`` path, exactly like diffusers' ``AttnProcessor2_0``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from .edit import EditRun, RunContext, Step
from .store import AttentionLayer, AttentionStore, level_grid


def layer_place(name: str) -> str:
    """``"down"``, ``"mid"`` or ``"up"`` from a UNet module path."""
    head = name.split(".", 1)[0]
    for place in ("down", "mid", "up"):
        if head.startswith(place):
            return place
    return head


def grid_for(queries: int, latent_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """The query grid and downscale of a layer with ``queries`` queries (see
    :func:`~p2p_framework.store.level_grid`)."""
    height, width = latent_size
    downscale = 1
    while downscale <= max(height, width):
        grid = level_grid(latent_size, downscale)
        if grid[0] * grid[1] == queries:
            return grid, downscale
        downscale *= 2
    raise ValueError(f"{queries} queries match no grid of the {height}x{width} latent")


def block_indices(names: Sequence[str]) -> dict[str, int]:
    """Each attention module's transformer-block index in forward order (down, mid, up).

    ``unet.attn_processors`` lists the mid block after the up blocks (module registration
    order), so places are sorted first; a block's modules (``attn1``, ``attn2``) share one
    index.
    """
    order = {"down": 0, "mid": 1, "up": 2}
    ranked = sorted(
        enumerate(names), key=lambda item: (order.get(layer_place(item[1]), 3), item[0])
    )
    blocks: dict[str, int] = {}
    result = {}
    for _, name in ranked:
        block = name.rsplit(".", 1)[0]
        result[name] = blocks.setdefault(block, len(blocks))
    return result


class ControlledAttnProcessor:
    """Attention processor that lets an :class:`AttentionController` see and change the
    attention probabilities ``(batch, heads, queries, tokens)`` of one layer."""

    def __init__(self, controller: AttentionController, name: str, index: int = 0) -> None:
        self.controller = controller
        self.name = name
        self.place = layer_place(name)
        self.index = index

    def layer(self, queries: int, is_cross: bool) -> AttentionLayer:
        """This layer's description for a call with ``queries`` queries.

        Computed on every call rather than cached: it costs microseconds, and under
        ``torch.compile`` it folds to constants, where a cache filled during the first
        compiled call would force a second compilation.
        """
        grid, downscale = grid_for(queries, self.controller.latent_size)
        return AttentionLayer(self.name, self.place, is_cross, grid, downscale, self.index)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Mirrors diffusers' AttnProcessor2_0 step by step, with the probabilities exposed.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        layer = self.layer(query.shape[2], is_cross)
        if self.controller.wants_inputs(layer):
            query, key, value = self.controller.attention_inputs(query, key, value, layer)
        if self.controller.wants(layer):
            probs = attention_probabilities(query, key, attn.scale, attention_mask)
            probs = self.controller.attend(probs, layer)
            hidden_states = torch.matmul(probs.to(value.dtype), value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask)``, computed in float32 for half-precision inputs.

    Args:
        query: ``(batch, heads, queries, head_dim)``.
        key: ``(batch, heads, tokens, head_dim)``.

    Returns:
        ``(batch, heads, queries, tokens)`` probabilities (float32 if the inputs were half).
    """
    if query.dtype in (torch.float16, torch.bfloat16):
        query, key = query.float(), key.float()
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    return scores.softmax(dim=-1)


_Installer = TypeVar("_Installer", bound="ProcessorInstaller")


class ProcessorInstaller:
    """Installs :class:`ControlledAttnProcessor` objects answering to ``self`` on a UNet.

    Base of :class:`AttentionController` and of
    :class:`~p2p_framework.batch.ControllerGroup`: anything with ``wants``, ``attend`` and
    ``latent_size`` can stand behind the processors.
    """

    _unet: Any = None
    _original: dict[str, Any] | None = None

    def install(self, unet: Any) -> None:
        """Put a controlled processor on every attention layer of ``unet``."""
        if self._unet is not None:
            raise RuntimeError(f"this {type(self).__name__} is already installed")
        self._original = dict(unet.attn_processors)
        names = [key.rsplit(".processor", 1)[0] for key in self._original]
        blocks = block_indices(names)
        processors = {
            key: ControlledAttnProcessor(self, name, blocks[name])  # type: ignore[arg-type]
            for key, name in zip(self._original, names)
        }
        unet.set_attn_processor(processors)
        self._unet = unet

    def remove(self) -> None:
        """Restore the processors the UNet had before :meth:`install`."""
        if self._unet is not None and self._original is not None:
            self._unet.set_attn_processor(self._original)
        self._unet = None
        self._original = None

    @contextmanager
    def installed(self: _Installer, unet: Any) -> Iterator[_Installer]:
        """Context manager: install on ``unet`` and always remove afterwards."""
        self.install(unet)
        try:
            yield self
        finally:
            self.remove()


class AttentionController(ProcessorInstaller):
    """Applies one job's edit runs to the attention of a UNet's conditional rows.

    Two modes give the same result:

    - eager (``static=False``): per call, Python decides from the step whether a layer's
      probabilities are needed; untouched layers take the fused attention kernel.
    - static (``static=True``, used with a compiled UNet): which layers materialise their
      probabilities is fixed for the whole run, and the per-step schedules are tensors
      indexed by a step tensor on the device (hooks get that tensor as ``step``), so
      ``torch.compile`` traces one graph for every step (no graph breaks, no recompilation
      per step, CUDA-graph friendly). Outside the injection window the blend weights are 0
      and the targets keep their own maps.

    Args:
        runs: the job's edit runs (from :meth:`~p2p_framework.Edit.bind`), in pipeline order.
        store: where attention maps are accumulated (only resolutions it tracks).
        cross_table: ``(steps + 1, targets, tokens)`` 0/1 injection schedule, or None.
        latent_size: ``(height, width)`` of the latent.
        num_steps: diffusion steps of the run (static mode sizes its tables with it); default
            from ``cross_table``.
        static: the mode, see above.
    """

    def __init__(
        self,
        runs: Sequence[EditRun] = (),
        *,
        store: AttentionStore | None = None,
        cross_table: torch.Tensor | None = None,
        latent_size: tuple[int, int] = (64, 64),
        num_steps: int | None = None,
        static: bool = False,
    ) -> None:
        self.runs = list(runs)
        self.injecting = [run for run in self.runs if run.injects_cross_attention]
        self.store = store if store is not None else AttentionStore()
        self.cross_table = cross_table if self.injecting else None
        self.latent_size = latent_size
        self.static = static
        if num_steps is None:
            num_steps = self.cross_table.shape[0] - 1 if self.cross_table is not None else 0
        self.num_steps = num_steps
        self._cross_active = (
            [bool(row.any()) for row in self.cross_table] if self.cross_table is not None else []
        )
        # (steps + 1, targets, 1, 1, tokens) blend weights.
        self._cross_alpha: torch.Tensor | None = None
        self._step_index: torch.Tensor | None = None
        self.step = 0
        self.cond_rows: slice | None = None
        self.to(torch.device("cpu"))

    # -- per call -------------------------------------------------------------------------
    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> AttentionController:
        """Move the schedule tables to ``device`` (done once per run, not per call)."""
        if self.cross_table is not None:
            table = self.cross_table.to(device=device, dtype=dtype)
            self._cross_alpha = table[:, :, None, None, :]
        # Shape (1,), used with index_select: indexing with a 0-d tensor would make
        # torch.compile read its value and compile one graph per step.
        self._step_index = torch.zeros(1, dtype=torch.int64, device=device)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a controlled UNet call reads or updates: the schedule, the step
        index, the edit runs' tensors and the store's sums (a compiled UNet marks them as
        static inputs)."""
        tables = [self._cross_alpha, self._step_index]
        run_tensors = [tensor for run in self.runs for tensor in run.tensors()]
        return [t for t in tables if t is not None] + run_tensors + self.store.tensors()

    def begin_call(self, step: int, cond_rows: slice | None) -> None:
        """Say which step the next UNet call belongs to and which of its rows are conditional.

        Args:
            step: 0-based diffusion step.
            cond_rows: rows of the UNet batch holding the conditional prompts, source first;
                None for a call with no conditional rows (a separate unconditional pass).
        """
        self.step = step
        self.cond_rows = cond_rows
        if self.static:
            assert self._step_index is not None
            self._step_index.fill_(step)  # on the device: no host sync, no new graph

    @property
    def _hook_step(self) -> Step:
        """The step as hooks get it: an int, or the ``(1,)`` device tensor in static mode."""
        if self.static:
            assert self._step_index is not None
            return self._step_index
        return self.step

    @property
    def _asked_step(self) -> int | None:
        """The step as ``uses_*`` predicates get it: None in static mode (any step)."""
        return None if self.static else self.step

    def _cross_injecting(self) -> bool:
        if self.static:
            return self.cross_table is not None
        return bool(self._cross_active) and self._cross_active[self.step]

    def _self_editors(self, layer: AttentionLayer) -> list[EditRun]:
        step = self._asked_step
        return [run for run in self.runs if run.uses_self_attention(layer, step)]

    def wants_inputs(self, layer: AttentionLayer) -> bool:
        """Whether an edit changes this layer's queries, keys or values in the current call."""
        if self.cond_rows is None:
            return False
        step = self._asked_step
        return any(run.uses_attention_inputs(layer, step) for run in self.runs)

    def attention_inputs(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: AttentionLayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Let the edits change the conditional rows' queries, keys and values.

        Args:
            query: ``(batch, heads, queries, head_dim)`` for the whole UNet batch.
            key, value: ``(batch, heads, tokens, head_dim)``.

        Returns:
            the three tensors for the whole batch, only the job's conditional rows changed.
        """
        assert self.cond_rows is not None
        rows = self.cond_rows
        q, k, v = query[rows], key[rows], value[rows]
        step, asked = self._hook_step, self._asked_step
        for run in self.runs:
            if run.uses_attention_inputs(layer, asked):
                q, k, v = run.attention_inputs(q, k, v, layer, step)
        query, key, value = query.clone(), key.clone(), value.clone()
        query[rows], key[rows], value[rows] = q, k, v
        return query, key, value

    def wants(self, layer: AttentionLayer) -> bool:
        """Whether this layer's probabilities are read or changed in the current call."""
        if self.cond_rows is None:
            return False
        if self.store.wants(layer):
            return True
        if layer.is_cross:
            return self._cross_injecting()
        step = self._asked_step
        return any(run.uses_self_attention(layer, step) for run in self.runs)

    def attend(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """Edit and record one layer call's probabilities.

        Args:
            probs: ``(batch, heads, queries, tokens)`` for the whole UNet batch.

        Returns:
            the same shape, with the conditional targets' rows edited.
        """
        assert self.cond_rows is not None
        cond = probs[self.cond_rows]
        source, targets = cond[:1], cond[1:]
        step = self._hook_step
        new_targets = None
        if targets.shape[0]:
            if layer.is_cross and self._cross_injecting():
                assert self._cross_alpha is not None
                injected = source.expand_as(targets)
                for run in self.injecting:
                    injected = run.cross_attention(injected, targets, layer, step)
                alpha = RunContext.at_step(self._cross_alpha, step)
                # alpha * injected + (1 - alpha) * targets in one kernel; lerp is exact at
                # both ends (0: the target's own maps, 1: the injected ones).
                new_targets = torch.lerp(targets, injected, alpha.to(targets.dtype))
            elif not layer.is_cross:
                for run in self._self_editors(layer):
                    current = targets if new_targets is None else new_targets
                    new_targets = run.self_attention(source, current, layer, step)
        if new_targets is not None:
            if probs.requires_grad:
                probs = probs.clone()
            first_target = (self.cond_rows.start or 0) + 1
            probs[first_target : first_target + new_targets.shape[0]] = new_targets
            cond = probs[self.cond_rows]
        if self.store.wants(layer):
            self.store.add(layer, cond)
        return probs
