"""When attention is injected: the cross-replace table and the self-replace window.

Both are computed once per run from the user's fractions of the step count, so the
controller only indexes them by the step it is told (never by counting layer calls).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import OptionError
from .prompts import word_positions

Bounds = float | Sequence[float]
CrossReplaceSteps = Bounds | Mapping[str, Bounds]

DEFAULT_WORD_KEY = "default_"


def parse_bounds(value: Any, *, plugin: str, option: str) -> tuple[float, float]:
    """A fraction ``s`` means ``(0, s)``; a pair ``(a, b)`` is kept. Both must lie in [0, 1]."""
    if isinstance(value, bool):
        raise OptionError(plugin, option, f"expected a fraction or a pair, got {value!r}")
    if isinstance(value, (int, float)):
        bounds = (0.0, float(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        try:
            bounds = (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            raise OptionError(plugin, option, f"expected two numbers, got {value!r}") from None
    else:
        raise OptionError(plugin, option, f"expected a fraction or a pair, got {value!r}")
    start, end = bounds
    if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in bounds):
        raise OptionError(plugin, option, f"fractions must lie in [0, 1], got {value!r}")
    if start > end:
        raise OptionError(plugin, option, f"start {start} is after end {end}")
    return bounds


def cross_replace_table(
    cross_replace_steps: CrossReplaceSteps,
    prompts: Sequence[str],
    num_steps: int,
    tokenizer: Any,
    *,
    plugin: str = "pipeline",
    option: str = "cross_replace_steps",
) -> torch.Tensor:
    """The 0/1 table ``alpha[t, target, token]`` of cross-attention injection.

    Args:
        cross_replace_steps: a fraction ``s`` (``(0, s)``), a pair ``(a, b)``, or a dict from
            words to either, with the key ``"default_"`` for all other tokens (``(0, 1)`` when
            absent). A word's entry overrides the default at that word's token positions in
            each target prompt that contains it.
        prompts: source prompt first, then the targets.
        num_steps: diffusion steps ``T``; the table has ``T + 1`` rows.

    Returns:
        ``(num_steps + 1, targets, max_tokens)`` float tensor; for bounds ``(a, b)`` the rows
        ``int(a * (T + 1)) <= t < int(b * (T + 1))`` are 1.
    """
    max_tokens = tokenizer.model_max_length
    targets = prompts[1:]
    rows = num_steps + 1
    table = torch.zeros(rows, len(targets), max_tokens)

    def fill(bounds: tuple[float, float], target: int, positions: Any) -> None:
        start, end = int(bounds[0] * rows), int(bounds[1] * rows)
        table[:, target, positions] = 0.0
        table[start:end, target, positions] = 1.0

    if isinstance(cross_replace_steps, Mapping):
        per_word = dict(cross_replace_steps)
        default = per_word.pop(DEFAULT_WORD_KEY, (0.0, 1.0))
    else:
        per_word, default = {}, cross_replace_steps
    default_bounds = parse_bounds(default, plugin=plugin, option=option)
    for target in range(len(targets)):
        fill(default_bounds, target, slice(None))
    for word, value in per_word.items():
        bounds = parse_bounds(value, plugin=plugin, option=f"{option}[{word!r}]")
        hits = 0
        for target, prompt in enumerate(targets):
            positions = word_positions(tokenizer, prompt, str(word))
            if positions:
                hits += 1
                fill(bounds, target, positions)
        if not hits:
            raise OptionError(
                plugin, option, f"{word!r} is not a word of any target prompt {list(targets)!r}"
            )
    return table


def self_replace_window(self_replace_steps: Bounds, num_steps: int) -> tuple[int, int]:
    """Steps ``[start, end)`` in which targets take the source's self-attention.

    ``start = int(T * a)``, ``end = int(T * b)`` for bounds ``(a, b)`` (a fraction ``s`` is
    ``(0, s)``).
    """
    start, end = parse_bounds(self_replace_steps, plugin="pipeline", option="self_replace_steps")
    return int(num_steps * start), int(num_steps * end)
