"""The attention store: running sums of attention maps over layers and steps.

Only the resolutions that someone asked for are kept (local blend asks for the cross maps at
1/4 of the latent grid, the attention-map image for the same by default), and only as sums
averaged over heads, so memory does not grow with the number of steps or layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def level_grid(latent_size: tuple[int, int], downscale: int) -> tuple[int, int]:
    """The ``(height, width)`` grid of the UNet level at ``downscale`` of the latent.

    UNet levels halve the grid with ``ceil`` (stride-2 convolutions with padding 1), so a
    48x40 latent has grids 48x40, 24x20, 12x10, 6x5.
    """
    height, width = latent_size
    return math.ceil(height / downscale), math.ceil(width / downscale)


@dataclass(frozen=True)
class AttentionLayer:
    """Where an attention call happens, read at run time by the layer's processor.

    Attributes:
        name: the module path in the UNet, e.g.
            ``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
        place: ``"down"``, ``"mid"`` or ``"up"``.
        is_cross: True for cross-attention (queries attend to text tokens).
        grid: ``(height, width)`` of this layer's query grid, in latent cells at this layer.
        downscale: latent grid size divided by this layer's grid size (1, 2, 4, 8 for SD 1.x:
            at 512 px the grids are 64, 32, 16 and 8).
        index: 0-based position of this layer's transformer block in the UNet's forward
            order (down, mid, up); a block's self- and cross-attention share it (SD 1.x has
            16 blocks: 0-5 down, 6 mid, 7-15 up).
    """

    name: str
    place: str
    is_cross: bool
    grid: tuple[int, int]
    downscale: int
    index: int = 0

    @property
    def queries(self) -> int:
        """Number of queries ``N = height * width``."""
        return self.grid[0] * self.grid[1]


#: Most attention scores (queries x tokens x heads x prompts, over the kept layer calls) the
#: store computes in one batch: 2**26 float32 values are 256 MiB, about 42 of SDXL's 32x32
#: layers at 1024 px for one target, so its 60 such layers take two batches per call.
DEFERRED_SCORES = 2**26


@dataclass(frozen=True)
class DeferredMaps:
    """One layer call's cross-attention maps, kept as queries and keys until
    :meth:`AttentionStore.flush` computes those of many layers in one batch.

    Attributes:
        layer: where the call happened.
        query: ``(prompts, heads, queries, head_dim)`` of the job's conditional rows, source
            first; a target's row may hold its source's queries where ``target_map`` is None.
        key: ``(prompts, heads, tokens, head_dim)``, likewise.
        scale: the layer's softmax scale.
        source_map: ``(targets, tokens, tokens)``: a target's stored maps are
            ``A_src @ source_map + A_t @ target_map`` (head-averaged maps ``A``); None: the
            targets keep their own maps (no injection in this call).
        target_map: ``(targets, tokens, tokens)`` or None (zero) when ``source_map`` is set.
    """

    layer: AttentionLayer
    query: torch.Tensor
    key: torch.Tensor
    scale: float
    source_map: torch.Tensor | None = None
    target_map: torch.Tensor | None = None


class AttentionStore:
    """Running sums of the conditional rows' attention maps, averaged over heads.

    Maps are stored after the edit, i.e. the attention the model actually used. A key is
    ``(is_cross, downscale)``; the sum runs over every layer of that key and every step.

    Layers on the fused kernel hand over their queries and keys instead (:meth:`defer`);
    :meth:`flush` turns one UNet call's worth into maps in a few batched operations (the
    same maps up to float rounding) rather than about seven per layer. Reading
    (:meth:`average`) flushes first.
    """

    def __init__(self) -> None:
        #: Count layer calls in device tensors (what a compiled UNet needs: no Python value
        #: changing from call to call); False counts in Python, one kernel fewer per call.
        self.device_counts = True
        self._calls: dict[tuple[bool, int], int] = {}
        self._wanted: set[tuple[bool, int]] = set()
        self._sums: dict[tuple[bool, int], torch.Tensor] = {}
        self._counts: dict[tuple[bool, int], torch.Tensor] = {}
        self._confirmed: set[tuple[bool, int]] = set()
        self._grids: dict[tuple[bool, int], tuple[int, int]] = {}
        self._deferred: list[DeferredMaps] = []
        self._deferred_scores = 0

    def track(self, *, downscale: int, cross: bool = True) -> None:
        """Ask the store to keep maps of the layers at ``downscale`` (cross or self)."""
        self._wanted.add((cross, downscale))

    def wants(self, layer: AttentionLayer) -> bool:
        """Whether this layer's maps are kept."""
        return (layer.is_cross, layer.downscale) in self._wanted

    @property
    def tracking(self) -> bool:
        """Whether anything is tracked at all."""
        return bool(self._wanted)

    def reset(self) -> None:
        """Forget all sums (the tracked resolutions stay)."""
        self._sums.clear()
        self._counts.clear()
        self._calls.clear()
        self._confirmed.clear()
        self._grids.clear()
        self._deferred.clear()
        self._deferred_scores = 0

    def allocate(
        self, rows: int, tokens: int, latent_size: tuple[int, int], device: torch.device
    ) -> None:
        """Create zeroed sums for every tracked resolution before the first UNet call.

        The compiled path needs this: with the sums already there, :meth:`add` only adds in
        place, so the compiled UNet has one graph for every step (no new dict entries).

        Args:
            rows: conditional rows (prompts) whose maps are kept.
            tokens: text tokens per prompt.
            latent_size: ``(height, width)`` of the latent.
        """
        for is_cross, downscale in sorted(self._wanted):
            grid = level_grid(latent_size, downscale)
            keys = tokens if is_cross else grid[0] * grid[1]
            key = (is_cross, downscale)
            self._sums[key] = torch.zeros(rows, grid[0] * grid[1], keys, device=device)
            self._counts[key] = torch.zeros((), dtype=torch.int64, device=device)
            self._calls[key] = 0
            self._grids[key] = grid

    def add(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        """Add one layer call's maps.

        Args:
            probs: ``(prompts, heads, queries, tokens)`` attention probabilities.
        """
        self._add_maps(layer, probs.float().mean(dim=1), 1)

    def defer(self, maps: DeferredMaps) -> None:
        """Keep one layer call's queries and keys; their maps are added at :meth:`flush`,
        or at once when the kept calls' scores would pass :data:`DEFERRED_SCORES` values."""
        self._deferred.append(maps)
        self._deferred_scores += maps.query.shape[:-1].numel() * maps.key.shape[-2]
        if self._deferred_scores > DEFERRED_SCORES:
            self.flush()

    def flush(self) -> None:
        """Add the deferred layer calls' maps: layers of one shape and edit plan share one
        batched ``softmax(Q K^T * scale)``, head mean, token-map product and sum."""
        from .attention import attention_probabilities  # attention imports this module

        deferred, self._deferred = self._deferred, []
        self._deferred_scores = 0
        groups: dict[tuple, list[DeferredMaps]] = {}
        for item in deferred:
            signature = (
                item.layer.is_cross,
                item.layer.downscale,
                item.query.shape,
                item.key.shape,
                item.scale,
                id(item.source_map),
                id(item.target_map),
            )
            groups.setdefault(signature, []).append(item)
        for items in groups.values():
            first = items[0]
            query = torch.stack([item.query for item in items])  # (layers, prompts, ...)
            key = torch.stack([item.key for item in items])
            maps = attention_probabilities(query, key, first.scale).float().mean(dim=2)
            if first.source_map is not None:
                source = maps[:, :1]  # (layers, 1, queries, tokens)
                edited = torch.matmul(source, first.source_map.float())
                if first.target_map is not None:
                    edited = edited + torch.matmul(maps[:, 1:], first.target_map.float())
                maps = torch.cat([source, edited], dim=1)
            self._add_maps(first.layer, maps.sum(dim=0), len(items))

    def _add_maps(self, layer: AttentionLayer, maps: torch.Tensor, calls: int) -> None:
        """Add ``(prompts, queries, tokens)`` head-averaged maps summed over ``calls``
        layer calls of ``layer``'s resolution."""
        key = (layer.is_cross, layer.downscale)
        if key in self._sums:
            # In place, and the count is a tensor: nothing here depends on a Python value
            # that changes from call to call, so a compiled UNet is not recompiled.
            self._sums[key].add_(maps)
            if self.device_counts:
                self._counts[key].add_(calls)
        else:
            self._sums[key] = maps.clone()
            self._counts[key] = torch.full((), calls, dtype=torch.int64, device=maps.device)
            self._grids[key] = layer.grid
            self._calls[key] = 0
        if not self.device_counts:
            self._calls[key] = self._calls.get(key, 0) + calls

    def average(self, *, downscale: int, cross: bool = True) -> torch.Tensor:
        """Maps averaged over heads, layers and steps so far.

        Returns:
            ``(prompts, height, width, tokens)`` float32 tensor.

        Raises:
            KeyError: nothing was stored for that resolution (no layer there, or not tracked).
        """
        self.flush()
        key = (cross, downscale)
        if not self.device_counts:
            calls = self._calls.get(key, 0)
            if not calls:
                kind = "cross" if cross else "self"
                raise KeyError(
                    f"no {kind}-attention maps stored at 1/{downscale} of the latent grid"
                )
            # The count as a 0-d tensor on the sums' device, as the device count would be:
            # the same division kernel, the same quotient (a Python number may take a
            # reciprocal-multiply path on a GPU).
            total = self._sums[key] / self._sums[key].new_full((), float(calls))
        else:
            if key not in self._confirmed:  # checked once: reading a GPU count waits for it
                if key not in self._sums or not bool(self._counts[key]):
                    kind = "cross" if cross else "self"
                    raise KeyError(
                        f"no {kind}-attention maps stored at 1/{downscale} of the latent grid"
                    )
                self._confirmed.add(key)
            total = self._sums[key] / self._counts[key].to(self._sums[key].dtype)
        height, width = self._grids[key]
        return total.reshape(total.shape[0], height, width, total.shape[-1])

    def tensors(self) -> list[torch.Tensor]:
        """The sums and counts (for marking them as static inputs of a compiled UNet)."""
        return [*self._sums.values(), *self._counts.values()]

    def nbytes(self) -> int:
        """Bytes held by the running sums."""
        return sum(t.numel() * t.element_size() for t in self._sums.values())
