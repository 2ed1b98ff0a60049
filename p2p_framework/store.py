"""The attention store: running sums of attention maps over layers and steps.

Only the resolutions that someone asked for are kept (local blend asks for the cross maps at
1/4 of the latent grid, the attention-map image for the same by default), and only as sums
averaged over heads, so memory does not grow with the number of steps or layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """

    name: str
    place: str
    is_cross: bool
    grid: tuple[int, int]
    downscale: int

    @property
    def queries(self) -> int:
        """Number of queries ``N = height * width``."""
        return self.grid[0] * self.grid[1]


class AttentionStore:
    """Running sums of the conditional rows' attention maps, averaged over heads.

    Maps are stored after the edit, i.e. the attention the model actually used. A key is
    ``(is_cross, downscale)``; the sum runs over every layer of that key and every step.
    """

    def __init__(self) -> None:
        self._wanted: set[tuple[bool, int]] = set()
        self._sums: dict[tuple[bool, int], torch.Tensor] = {}
        self._counts: dict[tuple[bool, int], int] = {}
        self._grids: dict[tuple[bool, int], tuple[int, int]] = {}

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
        self._grids.clear()

    def add(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        """Add one layer call's maps.

        Args:
            probs: ``(prompts, heads, queries, tokens)`` attention probabilities.
        """
        key = (layer.is_cross, layer.downscale)
        maps = probs.float().mean(dim=1)
        if key in self._sums:
            self._sums[key] += maps
            self._counts[key] += 1
        else:
            self._sums[key] = maps.clone()
            self._counts[key] = 1
            self._grids[key] = layer.grid

    def average(self, *, downscale: int, cross: bool = True) -> torch.Tensor:
        """Maps averaged over heads, layers and steps so far.

        Returns:
            ``(prompts, height, width, tokens)`` float32 tensor.

        Raises:
            KeyError: nothing was stored for that resolution (no layer there, or not tracked).
        """
        key = (cross, downscale)
        if key not in self._sums:
            kind = "cross" if cross else "self"
            raise KeyError(f"no {kind}-attention maps stored at 1/{downscale} of the latent grid")
        total = self._sums[key] / self._counts[key]
        height, width = self._grids[key]
        return total.reshape(total.shape[0], height, width, total.shape[-1])

    def nbytes(self) -> int:
        """Bytes held by the running sums."""
        return sum(t.numel() * t.element_size() for t in self._sums.values())
