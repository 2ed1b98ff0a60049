"""When attention is injected: the cross-replace schedule and the self-replace window.

Both are value objects, parsed once from whatever the user gave (command-line text, a
TOML/JSON value, a Python value), written to ``run.json`` by ``to_json()``, and turned into
step indices once per run, so the controller only indexes them by the step it is told (never
by counting layer calls).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import OptionError
from .prompts import word_positions

#: The settings' owner name in error messages (``--set pipeline.KEY=VALUE``).
OWNER = "pipeline"
#: How ``run.json`` files written before the value objects named the default window.
_OLD_DEFAULT_KEY = "default_"


def _core_schema(cls: Any) -> Any:
    """A pydantic core schema that validates with ``cls.parse`` (looked up at each call) and
    serialises with ``to_json``."""
    from pydantic_core import core_schema

    return core_schema.no_info_plain_validator_function(
        lambda value: cls.parse(value),
        serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.to_json()),
    )


@dataclass(frozen=True)
class StepWindow:
    """Fractions ``[start, end]`` of a run's steps, each in [0, 1], ``start <= end``.

    A single fraction ``s`` means ``StepWindow(0, s)``. :meth:`parse` reads ``0.4``,
    ``"0.4"``, ``"0.2:0.6"``, ``"[0.2, 0.6]"``, ``[0.2, 0.6]`` and ``(0.2, 0.6)``.
    """

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        bounds = (self.start, self.end)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in bounds):
            raise ValueError(f"expected two numbers, got {list(bounds)!r}")
        if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in bounds):
            raise ValueError(f"fractions must lie in [0, 1], got {list(bounds)!r}")
        if self.start > self.end:
            raise ValueError(f"start {self.start} is after end {self.end}")
        object.__setattr__(self, "start", float(self.start))
        object.__setattr__(self, "end", float(self.end))

    @classmethod
    def parse(
        cls, value: Any, *, owner: str = OWNER, option: str = "self_replace_steps"
    ) -> StepWindow:
        """A window from a fraction, a pair, or their text.

        Raises:
            OptionError: naming ``owner`` and ``option``, for anything else.
        """
        if isinstance(value, StepWindow):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.startswith("["):
                    value = json.loads(text)
                elif ":" in text:
                    start, _, end = text.partition(":")
                    value = (float(start), float(end))
                else:
                    value = float(text)
            except ValueError:
                raise OptionError(
                    owner, option, f"expected a fraction such as 0.8 or a range a:b, got {value!r}"
                ) from None
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return cls(0.0, value)
            if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
                return cls(value[0], value[1])
        except ValueError as error:
            raise OptionError(owner, option, f"{error}") from None
        raise OptionError(owner, option, f"expected a fraction or a pair, got {value!r}")

    def to_json(self) -> float | list[float]:
        """``end`` when the window starts at 0, else ``[start, end]``."""
        return self.end if self.start == 0.0 else [self.start, self.end]

    def steps(self, num_steps: int) -> tuple[int, int]:
        """Steps ``[int(T * start), int(T * end))`` of a ``T``-step run (the self-replace
        rule of the reference code)."""
        return int(num_steps * self.start), int(num_steps * self.end)

    def rows(self, rows: int) -> tuple[int, int]:
        """Rows ``[int(start * rows), int(end * rows))`` of a ``rows``-row table (the
        cross-replace rule: ``rows = T + 1``)."""
        return int(self.start * rows), int(self.end * rows)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return _core_schema(cls)


@dataclass(frozen=True)
class CrossReplace:
    """When targets take the source's cross-attention: a default window for every token and
    per-word windows that override it at that word's tokens.

    ``CrossReplace(0.8)`` injects in the first 80 % of the steps;
    ``CrossReplace(1.0, {"lion": 0.4})`` everywhere, but only in the first 40 % at "lion".
    :meth:`parse` reads the command line's text (``0.8``, ``0.2:0.8``,
    ``default=1.0,lion=0.4``, ``lion=0.1:0.4``; ``default`` is the default window, ``(0, 1)``
    when absent from a per-word value), a JSON list or object, a TOML value, or a Python
    float, pair or dict.

    Attributes:
        default: the window of every token that no word names.
        words: word -> its window, in the order given (a later word wins where two share a
            token).
    """

    default: StepWindow = StepWindow()
    words: Mapping[str, StepWindow] = field(default_factory=dict)

    def __post_init__(self) -> None:
        option = "cross_replace_steps"
        default = StepWindow.parse(self.default, option=option)
        if not isinstance(self.words, Mapping):
            raise OptionError(OWNER, option, f"words: expected a mapping, got {self.words!r}")
        words = {
            str(w): StepWindow.parse(v, option=f"{option}[{w!r}]") for w, v in self.words.items()
        }
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "words", words)

    def __hash__(self) -> int:
        return hash((self.default, tuple(self.words.items())))

    @classmethod
    def parse(cls, value: Any) -> CrossReplace:
        """A schedule from text, a TOML/JSON value or a Python value (see the class).

        Raises:
            OptionError: naming ``pipeline`` and ``cross_replace_steps``.
        """
        option = "cross_replace_steps"
        if isinstance(value, CrossReplace):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("{", "[")):
                try:
                    value = json.loads(text)
                except ValueError as error:
                    raise OptionError(OWNER, option, f"bad JSON {text!r}: {error}") from None
            elif "=" in text:
                value = _word_windows(text)
        if isinstance(value, Mapping):
            words = dict(value)
            default = StepWindow()
            for key in ("default", _OLD_DEFAULT_KEY):  # "default_": run.json before 0.2
                if key in words:
                    default = StepWindow.parse(words.pop(key), option=f"{option}[{key!r}]")
            return cls(default, words)
        return cls(StepWindow.parse(value, option=option))

    def to_json(self) -> Any:
        """A fraction or pair without words; else ``{"default": ..., word: ..., ...}``."""
        if not self.words:
            return self.default.to_json()
        return {"default": self.default.to_json()} | {w: v.to_json() for w, v in self.words.items()}

    def table(self, prompts: Sequence[str], num_steps: int, tokenizer: Any) -> torch.Tensor:
        """The 0/1 table ``alpha[t, target, token]`` of cross-attention injection.

        Args:
            prompts: source prompt first, then the targets.
            num_steps: diffusion steps ``T``; the table has ``T + 1`` rows.
            tokenizer: the model's tokenizer (``model_max_length`` columns).

        Returns:
            ``(num_steps + 1, targets, max_tokens)`` float tensor; for a window ``(a, b)``
            the rows ``int(a * (T + 1)) <= t < int(b * (T + 1))`` are 1.

        Raises:
            OptionError: a word that is in no target prompt.
        """
        targets = prompts[1:]
        rows = num_steps + 1
        table = torch.zeros(rows, len(targets), tokenizer.model_max_length)

        def fill(window: StepWindow, target: int, positions: Any) -> None:
            start, end = window.rows(rows)
            table[:, target, positions] = 0.0
            table[start:end, target, positions] = 1.0

        for target in range(len(targets)):
            fill(self.default, target, slice(None))
        for word, window in self.words.items():
            hits = 0
            for target, prompt in enumerate(targets):
                positions = word_positions(tokenizer, prompt, word)
                if positions:
                    hits += 1
                    fill(window, target, positions)
            if not hits:
                raise OptionError(
                    OWNER,
                    "cross_replace_steps",
                    f"{word!r} is not a word of any target prompt {list(targets)!r}",
                )
        return table

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return _core_schema(cls)


def _word_windows(text: str) -> dict[str, str]:
    """``default=1.0,lion=0.1:0.4`` -> ``{"default": "1.0", "lion": "0.1:0.4"}``."""
    found = {}
    for item in (part for part in text.split(",") if part.strip()):
        word, sep, bounds = item.partition("=")
        if not sep or not word.strip():
            raise OptionError(
                OWNER, "cross_replace_steps", f"expected word=fraction pairs, got {text!r}"
            )
        found[word.strip()] = bounds
    return found


def cross_replace_table(
    cross_replace_steps: Any, prompts: Sequence[str], num_steps: int, tokenizer: Any
) -> torch.Tensor:
    """``CrossReplace.parse(cross_replace_steps).table(prompts, num_steps, tokenizer)``."""
    return CrossReplace.parse(cross_replace_steps).table(prompts, num_steps, tokenizer)


def self_replace_window(self_replace_steps: Any, num_steps: int) -> tuple[int, int]:
    """Steps ``[int(T * a), int(T * b))`` in which targets take the source's self-attention,
    for a window ``(a, b)`` (:meth:`StepWindow.steps`)."""
    return StepWindow.parse(self_replace_steps).steps(num_steps)
