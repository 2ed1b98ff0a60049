"""Several edit jobs in one UNet batch: the controller composite and the batch planner.

:class:`ControllerGroup` stands where one :class:`~p2p_framework.attention.AttentionController`
stands for :class:`~p2p_framework.attention.ControlledAttnProcessor` (which calls ``route``,
``wants_inputs``, ``attention_inputs``, ``attend``, ``defer_maps`` and the FAST route's
helpers, and reads ``latent_size``). It
holds one controller per job, each with the rows its job occupies in the UNet batch, so every
job keeps its own edits, schedules and attention store, and each controller sees the batch
exactly as it would alone, only with its rows further down.

:func:`plan_batches` decides which jobs share a batch. The denoising loop that uses both is
:func:`p2p_framework.pipeline.iter_edits`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from .attention import FUSED, AttentionController, ProcessorInstaller
from .errors import OptionError
from .store import AttentionLayer


class ControllerGroup(ProcessorInstaller):
    """One :class:`AttentionController` per job, over one UNet batch.

    The jobs' conditional rows lie one after the other in the order given: with ``rows =
    [2, 3]`` and conditional rows ``slice(5, 10)``, job 0 has rows 5-6 and job 1 rows 7-9
    (source first in each). The unconditional rows are laid out the same way and are never
    edited.

    Any exception (not only :class:`~p2p_framework.errors.P2PError`: a third-party edit's
    ``ZeroDivisionError`` too) raised by a job's controller, that is by one of its edits'
    hooks or ``uses_*`` predicates, is kept in :attr:`errors` and that job's controller is not
    called again, so the other jobs of the batch go on; the loop decides whether to raise it
    and names the plugin. ``KeyboardInterrupt`` and other ``BaseException`` s are not caught.

    Args:
        controllers: the jobs' controllers, in batch order; all for the same latent size.
        rows: prompts (conditional rows) of each job.
    """

    def __init__(self, controllers: Sequence[AttentionController], rows: Sequence[int]) -> None:
        if len(controllers) != len(rows) or not controllers:
            raise ValueError("give one row count per controller, and at least one controller")
        sizes = {tuple(c.latent_size) for c in controllers}
        if len(sizes) != 1:
            raise OptionError(
                "pipeline", "height", f"jobs of one batch need one latent size, got {sizes}"
            )
        self.controllers = list(controllers)
        self.rows = [int(r) for r in rows]
        self.offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.latent_size: tuple[int, int] = tuple(controllers[0].latent_size)  # type: ignore[assignment]
        self.static = any(c.static for c in self.controllers)
        # Jobs batch only with jobs of the same fused_edits setting (pipeline.batch_key).
        self.fused = all(c.fused for c in self.controllers)
        #: job position -> the exception its controller raised (the job is out of the batch).
        self.errors: dict[int, Exception] = {}

    @property
    def total_rows(self) -> int:
        """Conditional rows of the whole batch (the sum of the jobs' prompts)."""
        return sum(self.rows)

    # -- per call -------------------------------------------------------------------------
    def job_rows(self, index: int, first: int = 0) -> slice:
        """Rows of job ``index`` in a block of per-job rows starting at row ``first``."""
        start = first + self.offsets[index]
        return slice(start, start + self.rows[index])

    def begin_call(self, step: int, cond_rows: slice | None) -> None:
        """Tell every job's controller the step and its own conditional rows.

        Args:
            step: 0-based diffusion step.
            cond_rows: the conditional rows of the whole batch (``total_rows`` of them), or
                None for a call without conditional rows.
        """
        self._encoder_cache = None
        for index, controller in enumerate(self.controllers):
            rows = None if cond_rows is None else self.job_rows(index, cond_rows.start or 0)
            if index in self.errors:
                continue
            try:
                controller.begin_call(step, rows)
            except Exception as error:  # an edit's per-step declaration: its job only
                self.errors[index] = error

    def _active(self) -> Iterator[tuple[int, AttentionController]]:
        for index, controller in enumerate(self.controllers):
            if index not in self.errors:
                yield index, controller

    def _each(self, method: str, layer: AttentionLayer) -> Iterator[Any]:
        """Each active job's controller's answer to ``method(layer)``; a controller that
        raises (an edit's ``uses_*`` or declarations) drops its job and gives no answer."""
        for index, controller in self._active():
            try:
                yield getattr(controller, method)(layer)
            except Exception as error:  # a plugin's bug fails its job only
                self.errors[index] = error

    def _asks(self, question: str, layer: AttentionLayer) -> bool:
        """Whether any active job's controller answers yes to ``question`` (``wants`` or
        ``wants_inputs``); a controller that raises (an edit's ``uses_*``) drops its job."""
        return any(self._each(question, layer))

    def wants(self, layer: AttentionLayer) -> bool:
        """Whether any job reads or changes this layer's probabilities in the current call."""
        return self._asks("wants", layer)

    def route(self, layer: AttentionLayer) -> int:
        """The layer's route for the whole batch: :data:`~p2p_framework.attention.MATERIALISE`
        if any job needs the probabilities, else :data:`~p2p_framework.attention.FAST` if any
        job's edit rides on the fused kernel, else
        :data:`~p2p_framework.attention.FUSED`."""
        # A loop, not max(..., default=): Dynamo cannot trace max's default keyword.
        route = FUSED
        for answer in self._each("route", layer):
            route = max(route, answer)
        return route

    def edited_rows(self, layer: AttentionLayer) -> list[tuple[int, int]]:
        """Every active job's :meth:`~p2p_framework.attention.AttentionController.edited_rows`."""
        return [rows for found in self._each("edited_rows", layer) for rows in found]

    def _cross_key_rows(self) -> list[tuple[int, int, int]]:
        return [rows for _, c in self._active() for rows in c._cross_key_rows()]

    def _substituted_rows(self, layer: AttentionLayer) -> list[tuple[int, int, int]]:
        return [rows for found in self._each("_substituted_rows", layer) for rows in found]

    def _edit_encoder_values(self, states: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        for _, controller in self._active():
            values = controller._edit_encoder_values(states, values)
        return values

    def add_source_terms(
        self,
        hidden: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer: AttentionLayer,
    ) -> torch.Tensor:
        """Each job's :meth:`~p2p_framework.attention.AttentionController.add_source_terms`."""
        for index, controller in self._active():
            try:
                hidden = controller.add_source_terms(hidden, query, key, value, layer)
            except Exception as error:  # a plugin's bug (its uses_*) fails its job only
                self.errors[index] = error
        return hidden

    def defer_maps(
        self, query: torch.Tensor, key: torch.Tensor, scale: float, layer: AttentionLayer
    ) -> None:
        """Each active job's :meth:`~p2p_framework.attention.AttentionController.defer_maps`
        (each takes its own rows)."""
        for index, controller in self._active():
            try:
                controller.defer_maps(query, key, scale, layer)
            except Exception as error:  # a plugin's bug (its uses_*) fails its job only
                self.errors[index] = error

    def wants_inputs(self, layer: AttentionLayer) -> bool:
        """Whether any job changes this layer's queries, keys or values in the current call."""
        return self._asks("wants_inputs", layer)

    def attention_inputs(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: AttentionLayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply, job after job, the controllers that change this layer's inputs; each
        changes only its own rows (shapes as in
        :meth:`~p2p_framework.attention.AttentionController.attention_inputs`)."""
        for index, controller in self._active():
            try:
                if controller.wants_inputs(layer):
                    query, key, value = controller.attention_inputs(query, key, value, layer)
            except Exception as error:  # a plugin's bug fails its job only
                self.errors[index] = error
        return query, key, value

    def attend(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """Apply, job after job, the controllers that want this layer; each edits and records
        only its own rows.

        Args:
            probs: ``(batch, heads, queries, tokens)`` for the whole UNet batch.

        Returns:
            the same shape.
        """
        for index, controller in self._active():
            try:
                if controller.wants(layer):
                    probs = controller.attend(probs, layer)
            except Exception as error:  # a plugin's bug fails its job only
                self.errors[index] = error
        return probs


def plan_batches(
    keys: Sequence[Hashable | None],
    rows: Sequence[int],
    max_batch_rows: int | None = None,
) -> list[list[int]]:
    """Group jobs into UNet batches.

    Jobs with equal keys may share a batch; a batch takes jobs in their given order until the
    next would take it over ``max_batch_rows`` UNet rows (None: no limit). A job with more rows
    than the limit runs alone. Jobs whose key is None are left out.

    Args:
        keys: one key per job (what must be equal to share a batch), or None.
        rows: UNet rows of each job.
        max_batch_rows: most UNet rows per batch; None for no limit.

    Returns:
        Batches as lists of job indices, in the order of each batch's first job.

    Raises:
        OptionError: ``max_batch_rows`` is not a positive integer.
    """
    if max_batch_rows is not None and (
        isinstance(max_batch_rows, bool)
        or not isinstance(max_batch_rows, int)
        or max_batch_rows < 1
    ):
        raise OptionError(
            "pipeline",
            "max_batch_rows",
            f"must be a positive integer or None, got {max_batch_rows!r}",
        )
    open_batches: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []
    for index, key in enumerate(keys):
        if key is None:
            continue
        batch = open_batches.get(key)
        if batch is not None and (
            max_batch_rows is None or sum(rows[i] for i in batch) + rows[index] <= max_batch_rows
        ):
            batch.append(index)
            continue
        batch = [index]
        batches.append(batch)
        open_batches[key] = batch
    return batches


__all__ = ["ControllerGroup", "plan_batches"]
