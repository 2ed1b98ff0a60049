"""Example third-party p2p-framework plugin: the ``suppress-word`` edit.

``suppress-word`` multiplies the cross-attention of the given words in every target prompt by
``factor`` (0 removes them), optionally renormalising each query's attention to sum to 1
again, and optionally only in some places of the UNet (``down``, ``mid``, ``up``). Like the
built-in ``reweight`` it acts on what is injected, so it composes after ``replace`` or
``refine``; alone, the targets take the source's attention with the words suppressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from p2p_framework import AttentionLayer, Edit, OptionError, RunContext, hookimpl
from p2p_framework.prompts import word_positions

__version__ = "0.1.0"

PLACES = ("down", "mid", "up")


@dataclass
class SuppressWord(Edit):
    """Scale down (or remove) the attention of words in the target prompts."""

    name = "suppress-word"

    words: list[str] = field(
        metadata={"help": "words of the target prompts to suppress; e.g. hat or hat,scarf"}
    )
    factor: float = field(
        default=0.0, metadata={"help": "attention multiplier for those words (0 removes them)"}
    )
    renormalize: bool = field(
        default=False, metadata={"help": "rescale each query's attention to sum to 1 again"}
    )
    places: list[str] = field(
        default_factory=lambda: list(PLACES),
        metadata={"help": "UNet places where it applies: down, mid, up"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.words, str):
            self.words = self.words.split()
        if not self.words or not all(isinstance(w, str) and w.strip() for w in self.words):
            raise OptionError(self.name, "words", "give at least one word, e.g. hat")
        value = self.factor
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise OptionError(self.name, "factor", f"must be a finite number, got {value!r}")
        self.factor = float(value)
        if not isinstance(self.renormalize, bool):
            raise OptionError(
                self.name, "renormalize", f"must be true or false, got {self.renormalize!r}"
            )
        if isinstance(self.places, str):
            self.places = self.places.split()
        wrong = [p for p in self.places if p not in PLACES]
        if wrong or not self.places:
            raise OptionError(
                self.name, "places", f"expected some of {', '.join(PLACES)}, got {self.places!r}"
            )

    def setup(self, run: RunContext) -> None:
        scale = torch.ones(run.num_targets, run.max_tokens)
        for target in range(run.num_targets):
            for word in self.words:
                # A word may be in some targets only; one found in none is an error below.
                positions = word_positions(run.tokenizer, run.prompts[target + 1], word)
                scale[target, positions] = self.factor
        if run.num_targets and not any(
            word_positions(run.tokenizer, prompt, word)
            for prompt in run.prompts[1:]
            for word in self.words
        ):
            raise OptionError(
                self.name,
                "words",
                f"none of {self.words!r} is a word of the target prompts {run.prompts[1:]!r}",
            )
        # (targets, 1, 1, tokens) to broadcast over heads and queries.
        self._scale = scale[:, None, None, :].to(run.device)

    def cross_attention(
        self, injected: torch.Tensor, targets: torch.Tensor, layer: AttentionLayer
    ) -> torch.Tensor:
        if layer.place not in self.places:
            return injected
        scaled = injected * self._scale.to(injected.dtype)
        if self.renormalize:
            scaled = scaled / scaled.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return scaled


@hookimpl
def register_edits(register):  # noqa: ANN001 - signature documented by p2p_framework.hookspecs
    register(SuppressWord)
