"""The attention hook: one diffusers attention processor per UNet attention layer.

:class:`AttentionController` installs a :class:`ControlledAttnProcessor` on every attention
module of a UNet with ``set_attn_processor`` (no patching of model code) and restores the
original processors on :meth:`AttentionController.remove`. The denoising loop tells the
controller the step index and which rows of the UNet batch are conditional before each UNet
call (:meth:`AttentionController.begin_call`), so nothing depends on counting layer calls.

Per layer call, the processor asks the controller for the layer's route: if nothing reads
or changes this layer's attention probabilities now, the fused
``scaled_dot_product_attention`` path, exactly like diffusers' ``AttnProcessor2_0``; if the
edits there are declared linear or copy the source (eager runs), the same fused kernel with
the targets' queries, keys and value embeddings rewritten; else explicit probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from .edit import EditRun, RunContext, Step
from .store import AttentionLayer, AttentionStore, DeferredMaps, level_grid


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


#: How a layer call computes attention (:meth:`AttentionController.route`).
FUSED = 0  # the fused kernel, nothing changed (diffusers' own computation)
FAST = 1  # the fused kernel with the edits moved onto queries, keys and text embeddings
MATERIALISE = 2  # explicit probabilities, edited and recorded by ``attend``


class ControlledAttnProcessor:
    """Attention processor that lets an :class:`AttentionController` see and change the
    attention probabilities ``(batch, heads, queries, tokens)`` of one layer."""

    def __init__(self, controller: AttentionController, name: str, index: int = 0) -> None:
        self.controller = controller
        self.name = name
        self.place = layer_place(name)
        self.index = index
        self._layers: dict[tuple[int, bool, tuple[int, int]], AttentionLayer] = {}

    def layer(self, queries: int, is_cross: bool) -> AttentionLayer:
        """This layer's description for a call with ``queries`` queries.

        Eager runs keep it once per size and latent; a compiled (static) run computes it on
        every call: it folds to constants there, where a cache filled during the first
        compiled call would force a second compilation.
        """
        latent_size = self.controller.latent_size
        if self.controller.static:
            grid, downscale = grid_for(queries, latent_size)
            return AttentionLayer(self.name, self.place, is_cross, grid, downscale, self.index)
        key = (queries, is_cross, latent_size)
        layer = self._layers.get(key)
        if layer is None:
            grid, downscale = grid_for(queries, latent_size)
            layer = AttentionLayer(self.name, self.place, is_cross, grid, downscale, self.index)
            self._layers[key] = layer
        return layer

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
        controller = self.controller
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

        layer = self.layer(hidden_states.shape[1], is_cross)
        route = controller.route(layer)
        if route == FAST and (
            attention_mask is not None
            or (is_cross and (attn.norm_cross or getattr(attn.to_v, "bias", None) is not None))
        ):
            # The fused edit assumes no mask, and moves token maps in front of a value
            # projection without bias or norm; anything else takes the materialised path.
            route = MATERIALISE
        query_states = hidden_states
        if route == FAST:
            rows = controller.query_rows(layer, hidden_states)
            if rows is not None:  # targets take their source's queries (self: and keys)
                query_states = hidden_states.index_select(0, rows)
        query = attn.to_q(query_states)
        if encoder_hidden_states is None:
            key_states, value_states = query_states, hidden_states
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key_states = value_states = encoder_hidden_states
            if route == FAST:
                key_states, value_states = controller.encoder_states(encoder_hidden_states)
        key = attn.to_k(key_states)
        value = attn.to_v(value_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(value.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if route == MATERIALISE:
            if controller.wants_inputs(layer):
                query, key, value = controller.attention_inputs(query, key, value, layer)
            probs = attention_probabilities(query, key, attn.scale, attention_mask)
            probs = controller.attend(probs, layer)
            if controller.fused:
                # Rows no edit changed here take the fused kernel as on every other route, so
                # the unconditional rows and each source are the same whatever the edits (and
                # equal plain generation); only edited rows multiply their probabilities out.
                hidden_states = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
                )
                for first, stop in controller.edited_rows(layer):
                    hidden_states[first:stop] = torch.matmul(
                        probs[first:stop].to(value.dtype), value[first:stop]
                    )
            else:  # every row as the reference implementation computes it
                hidden_states = torch.matmul(probs.to(value.dtype), value)
        else:
            # A job's own FAST route excludes its attention_inputs hooks; in a batch another
            # job's hooks may still change its own rows here.
            if controller.wants_inputs(layer):
                query, key, value = controller.attention_inputs(query, key, value, layer)
            main_value = value if value.shape[0] == batch_size else value[:batch_size]
            hidden_states = F.scaled_dot_product_attention(
                query, key, main_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            if route == FAST:
                hidden_states = controller.add_source_terms(hidden_states, query, key, value, layer)
            if controller.fused:  # maps kept here are computed later, many layers at once
                controller.defer_maps(query, key, attn.scale, layer)

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
    #: Whether the UNet runs compiled (a fixed plan: no FAST route, no per-size caches).
    static: bool = False
    #: Whether edits may ride on the fused kernel (``EditSettings.fused_edits``).
    fused: bool = False
    # The text embeddings of the current call and what FAST cross layers project instead.
    _encoder_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def encoder_states(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text embeddings FAST cross-attention layers project to keys and to values in
        this call (computed at the first such layer, then reused: every cross-attention
        layer of a UNet call gets the same embeddings).

        Args:
            states: ``(batch, tokens, dim)`` text embeddings of the UNet call.

        Returns:
            ``(key_states, value_states)``; ``value_states`` may have extra rows after the
            batch's (see :meth:`AttentionController.add_source_terms`).
        """
        cache = self._encoder_cache
        if cache is None or cache[0] is not states:
            triples = self._cross_key_rows()
            keys = states
            if triples:
                keys = states.index_select(0, self._row_index(triples, states))
            values = self._edit_encoder_values(states, states)
            cache = self._encoder_cache = (states, keys, values)
        return cache[1], cache[2]

    def query_rows(self, layer: AttentionLayer, states: torch.Tensor) -> torch.Tensor | None:
        """FAST route: the row of ``states`` (``(batch, ...)``, the layer's input) each row
        takes its queries from (in self-attention its keys too): a target takes its
        source's; None when no row changes."""
        triples = self._substituted_rows(layer)
        return self._row_index(triples, states) if triples else None

    def _row_index(self, triples: list[tuple[int, int, int]], states: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` row indices: rows ``first:stop`` of each ``(source, first, stop)``
        read row ``source``; kept per layout, so built once per run."""
        batch = states.shape[0]
        key = (batch, tuple(triples), states.device)
        cache = self.__dict__.setdefault("_row_indices", {})
        index = cache.get(key)
        if index is None:
            rows = list(range(batch))
            for source, first, stop in triples:
                rows[first:stop] = [source] * (stop - first)
            index = cache[key] = torch.tensor(rows, device=states.device)
        return index

    def _cross_key_rows(self) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def edited_rows(self, layer: AttentionLayer) -> list[tuple[int, int]]:
        """``(first, stop)`` rows whose probabilities :meth:`attend` may change at this layer
        call (the targets of each job editing it)."""
        raise NotImplementedError

    def _substituted_rows(self, layer: AttentionLayer) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def _edit_encoder_values(self, states: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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


@dataclass(frozen=True)
class _CrossPlan:
    """One step's cross-attention edit as token maps (see
    :meth:`AttentionController._edit_encoder_states`).

    Attributes:
        source_map: ``(targets, tokens, tokens)``: the source's maps' part, blend weights in.
        target_map: ``(targets, tokens, tokens)``: the targets' own maps' part; None when it
            is zero (every token injected, no run keeping any of the target's maps).
    """

    source_map: torch.Tensor
    target_map: torch.Tensor | None


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
        fused: eager runs only: let edits the fused kernel can carry take it (the FAST route)
            and rows no edit changes on a materialised layer take it too. Faster where the
            GPU waits on kernel launches, but rounded differently from the reference
            implementation; off, every row of a materialised layer multiplies out its
            probabilities, as the reference does (:attr:`EditSettings.fused_edits`).
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
        fused: bool = False,
    ) -> None:
        self.runs = list(runs)
        self.injecting = [run for run in self.runs if run.injects_cross_attention]
        self.store = store if store is not None else AttentionStore()
        self.cross_table = cross_table if self.injecting else None
        self.latent_size = latent_size
        self.static = static
        self.fused = fused and not static
        if num_steps is None:
            num_steps = self.cross_table.shape[0] - 1 if self.cross_table is not None else 0
        self.num_steps = num_steps
        self._cross_active = (
            [bool(row.any()) for row in self.cross_table] if self.cross_table is not None else []
        )
        # Steps in which every token of every target is injected (weight 1): there the
        # targets' own cross-attention maps drop out of the blend.
        self._cross_full = (
            [bool((row == 1).all()) for row in self.cross_table]
            if self.cross_table is not None
            else []
        )
        # This call's plan (eager mode): the blend weights of the step and, where every
        # injecting run declares its step linear, the composed token maps.
        self._alpha_now: torch.Tensor | None = None
        self._cross_plan: _CrossPlan | None = None
        self._extra_rows = 0
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
        self.store.flush()  # the last call's deferred maps: no more than a call's are kept
        self.step = step
        self.cond_rows = cond_rows
        self._encoder_cache = None
        self._cross_plan = None
        if self.static:
            assert self._step_index is not None
            self._step_index.fill_(step)  # on the device: no host sync, no new graph
            return
        self._alpha_now = None
        if cond_rows is not None and self._cross_injecting():
            assert self._cross_alpha is not None
            self._alpha_now = self._cross_alpha[step]
            if self.fused:
                self._cross_plan = self._plan_cross(step)

    def _plan_cross(self, step: int) -> _CrossPlan | None:
        """Compose the injecting runs' linear maps with the step's blend weights, once per
        step: the targets' maps become ``A_t @ target_map + A_src @ source_map``. None when a
        run does not declare its step linear (the layers then materialise)."""
        declared = [run.linear_cross_attention(step) for run in self.injecting]
        if any(maps is None for maps in declared):
            return None
        injected: torch.Tensor | None = None  # None: the identity (the source's maps)
        own: torch.Tensor | None = None  # None: zero
        for maps in declared:
            assert maps is not None
            step_map = maps.injected_map
            injected = step_map if injected is None else torch.matmul(injected, step_map)
            if own is not None:
                own = torch.matmul(own, step_map)
            if maps.target_map is not None:
                own = maps.target_map if own is None else own + maps.target_map
        assert injected is not None and self._alpha_now is not None
        # (targets, 1, tokens): the blend weight of each target token (a column scale).
        alpha = self._alpha_now[:, 0].to(injected.dtype)
        source_map = injected * alpha
        if own is None and self._cross_full[step]:
            return _CrossPlan(source_map, None)
        target_map = torch.diag_embed(1 - alpha[:, 0])
        if own is not None:
            target_map = target_map + own * alpha
        return _CrossPlan(source_map, target_map)

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

    def route(self, layer: AttentionLayer) -> int:
        """How this layer call computes attention: :data:`FUSED` (nothing changed; a fused
        run's kept cross-attention maps are deferred, :meth:`defer_maps`), :data:`FAST`
        (fused runs only: edits that the fused kernel can carry, i.e. self-attention taken
        from the source, cross-attention whose runs declared the step linear) or
        :data:`MATERIALISE` (:meth:`attend` sees the probabilities)."""
        if not self.wants(layer):
            return FUSED
        if not self.fused or self.wants_inputs(layer):
            return MATERIALISE
        if layer.is_cross:
            if not self._cross_injecting():
                return FUSED  # only the store reads it: its maps are deferred (defer_maps)
            return FAST if self._cross_plan is not None else MATERIALISE
        if self.store.wants(layer):  # self-attention maps are kept as computed
            return MATERIALISE
        step = self.step
        for run in self.runs:
            if run.uses_self_attention(layer, step) and not run.self_attention_is_source(
                layer, step
            ):
                return MATERIALISE
        return FAST

    def _targets(self) -> tuple[int, int, int] | None:
        """``(source, first, stop)`` rows of this job's source and targets in this call."""
        rows = self.cond_rows
        if rows is None:
            return None
        source = rows.start or 0
        return (source, source + 1, rows.stop) if rows.stop > source + 1 else None

    def edited_rows(self, layer: AttentionLayer) -> list[tuple[int, int]]:
        rows = self._targets()
        if rows is None:
            return []
        if layer.is_cross:
            editing = self._cross_injecting()
        else:
            step = self._asked_step
            editing = any(run.uses_self_attention(layer, step) for run in self.runs)
        return [rows[1:]] if editing else []

    def _cross_key_rows(self) -> list[tuple[int, int, int]]:
        plan, rows = self._cross_plan, self._targets()
        if plan is None or rows is None or plan.target_map is not None:
            return []
        return [rows]

    def _substituted_rows(self, layer: AttentionLayer) -> list[tuple[int, int, int]]:
        if layer.is_cross:
            return self._cross_key_rows()
        rows = self._targets()
        return [rows] if rows is not None and self.route(layer) == FAST else []

    def _edit_encoder_values(self, states: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """This job's part of :meth:`encoder_states`' values: writes its target rows (copying
        ``values`` first while it is still ``states``) and may append extra rows.

        With ``A`` the softmax maps, ``E`` a row's text embeddings and ``W`` the value
        projection (no bias), ``(A_t @ T + A_src @ S) @ (E_t W)`` equals
        ``A_t @ ((T E_t) W) + A_src @ ((S E_t) W)``: a target row keeps its queries and keys
        and projects ``T E_t``, and an extra row projects ``S E_t``, attended to with the
        source's queries and keys (:meth:`add_source_terms`). Without a target part
        (``T = 0``: every token injected) the target row takes the source's queries and
        keys (:meth:`query_rows`, :meth:`encoder_states`) and projects ``S E_t``.
        """
        plan, rows = self._cross_plan, self._targets()
        if plan is None or rows is None:
            return values
        _, first, stop = rows
        targets = states[first:stop]
        mixed = plan.source_map.to(states.dtype)
        if values is states:
            values = states.clone()
        if plan.target_map is None:
            torch.bmm(mixed, targets, out=values[first:stop])
            return values
        torch.bmm(plan.target_map.to(states.dtype), targets, out=values[first:stop])
        self._extra_rows = values.shape[0]
        return torch.cat([values, torch.bmm(mixed, targets)])

    def add_source_terms(
        self,
        hidden: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer: AttentionLayer,
    ) -> torch.Tensor:
        """FAST route, after the fused kernel: add the source's part to the targets' output
        where the targets keep part of their own maps (:meth:`_edit_encoder_states`).

        Args:
            hidden: ``(batch, heads, queries, head_dim)`` attention output (changed in place).
            query, key: ``(batch, heads, ...)`` after the heads were split.
            value: ``(batch + extra, heads, tokens, head_dim)``.
        """
        plan, rows = self._cross_plan, self._targets()
        if not layer.is_cross or rows is None or plan is None or plan.target_map is None:
            return hidden
        if self.route(layer) != FAST:
            return hidden
        source, first, stop = rows
        count = stop - first
        extra = value[self._extra_rows : self._extra_rows + count]
        q, k = query[source : source + 1], key[source : source + 1]
        if count > 1:
            q, k = q.expand(count, -1, -1, -1), k.expand(count, -1, -1, -1)
        hidden[first:stop].add_(F.scaled_dot_product_attention(q, k, extra))
        return hidden

    def defer_maps(
        self, query: torch.Tensor, key: torch.Tensor, scale: float, layer: AttentionLayer
    ) -> None:
        """Fused runs, on the FUSED and FAST routes: hand the store this call's queries and
        keys where it keeps this layer's cross-attention maps, with the step's token maps
        (:class:`~p2p_framework.store.DeferredMaps`); it computes the maps of the whole UNet
        call together, before they are read.

        Args:
            query: ``(batch, heads, queries, head_dim)`` as attended (targets may hold their
                source's queries, see :meth:`query_rows`).
            key: ``(batch, heads, tokens, head_dim)``.
        """
        rows = self.cond_rows
        if rows is None or not layer.is_cross or not self.store.wants(layer):
            return
        plan = self._cross_plan if self._cross_injecting() else None
        self.store.defer(
            DeferredMaps(
                layer,
                query[rows],
                key[rows],
                scale,
                plan.source_map if plan is not None else None,
                plan.target_map if plan is not None else None,
            )
        )

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
                alpha = self._alpha_now
                if alpha is None:
                    alpha = RunContext.at_step(self._cross_alpha, step)
                # alpha * injected + (1 - alpha) * targets in one kernel; lerp is exact at
                # both ends (0: the target's own maps, 1: the injected ones).
                alpha = alpha.to(targets.dtype)
                if self.static or probs.requires_grad or _shares_memory(injected, probs):
                    new_targets = torch.lerp(targets, injected, alpha)
                else:  # into the probabilities themselves: no copy back
                    targets.lerp_(injected, alpha)
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
