"""Prompts and their tokens: word positions, the replace mapper and the refine alignment.

Token positions are indices into the padded token sequence the text encoder sees, so position 0
is the start token and a prompt's first word starts at position 1. ``max_tokens`` is the
tokenizer's ``model_max_length`` (77 for CLIP); nothing here assumes that number.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import torch

from .errors import OptionError, PromptError

_PUNCTUATION = string.punctuation + "“”‘’"


def _normalise(word: str) -> str:
    return word.lower().strip(_PUNCTUATION)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with start and end tokens, unpadded and untruncated."""
    return [tokenizer.bos_token_id, *_ids(tokenizer, prompt), tokenizer.eos_token_id]


def _shorten(text: str, limit: int = 48) -> str:
    return (
        text if len(text) <= limit else f"{text[: limit // 2 - 2]} ... {text[-(limit // 2 - 3) :]}"
    )


def check_prompt_lengths(tokenizer: Any, prompts: Sequence[str]) -> None:
    """Refuse prompts longer than the text encoder reads (``model_max_length`` tokens, 77 for
    CLIP, start and end tokens included).

    The encoder would silently drop the end of such a prompt, and an edit that changes words
    past the limit would change nothing, or, with the end token cut, change the image where
    the prompts agree. One rule for every edit and for plain generation: refuse.

    Raises:
        PromptError: naming the prompt, its token count and the limit.
    """
    max_tokens = int(tokenizer.model_max_length)
    for index, prompt in enumerate(prompts):
        count = len(token_ids(tokenizer, prompt))
        if count > max_tokens:
            raise PromptError(
                f"prompt {index} ({_shorten(prompt)!r}) has {count} tokens; this model's text "
                f"encoder reads at most {max_tokens} (start and end tokens included), so "
                f"{count - max_tokens} would be cut off: shorten it"
            )


#: A tokenizer with fewer entries than this has a closed vocabulary (a model trained on a
#: fixed set of words, such as the demo model's 582); CLIP's has 49,408.
CLOSED_VOCABULARY_SIZE = 5000


def unknown_words(tokenizer: Any, prompt: str) -> list[str]:
    """Words of ``prompt`` that a closed-vocabulary tokenizer does not know as a whole word.

    On a tokenizer with fewer than :data:`CLOSED_VOCABULARY_SIZE` entries (a model trained on
    a fixed set of words, such as the demo model), a word that splits into several tokens was
    never seen in training: the model reads it as letters, which changes the image in ways
    nothing predicts. On a large vocabulary (CLIP's 49,408) splitting is ordinary BPE
    ("croutons" is two tokens) and nothing is reported. Surrounding punctuation is ignored.

    Returns:
        The unknown words (normalised: lower case, no surrounding punctuation), in order,
        each once; empty for a large vocabulary.
    """
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    if not isinstance(size, int) or size >= CLOSED_VOCABULARY_SIZE:
        return []
    found: list[str] = []
    for raw in prompt.split():
        word = _normalise(raw)
        if word and word not in found and len(_ids(tokenizer, word)) > 1:
            found.append(word)
    return found


def word_spans(tokenizer: Any, prompt: str) -> list[list[int]]:
    """Token positions of each whitespace-separated word of ``prompt``.

    Returns one list per word (``prompt.split()``); positions count the start token as 0.
    Positions past the tokenizer's length limit are dropped, so a truncated word has fewer
    (or no) positions.
    """
    words = prompt.split()
    max_tokens = tokenizer.model_max_length
    spans: list[list[int]] = []
    position = 1
    whole = _ids(tokenizer, prompt)
    pieces: list[int] = []
    for word in words:
        ids = _ids(tokenizer, word)
        pieces.extend(ids)
        spans.append([p for p in range(position, position + len(ids)) if p < max_tokens - 1])
        position += len(ids)
    if pieces != whole:
        # Our word spans assume the tokenizer splits on whitespace first (CLIP's BPE does).
        raise PromptError(
            f"cannot map the words of {prompt!r} to tokens: this tokenizer does not split "
            "on whitespace first"
        )
    return spans


def word_positions(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt``.

    Matching ignores case and surrounding punctuation ("burger," matches "burger"); the
    tokens of that punctuation are not included. ``word`` may hold several words
    ("red car"), matched as a consecutive sequence. Returns ``[]`` when it does not occur.
    """
    wanted = [_normalise(w) for w in word.split()]
    if not wanted or not all(wanted):
        return []
    words = prompt.split()
    spans = word_spans(tokenizer, prompt)
    found: list[int] = []
    for start in range(len(words) - len(wanted) + 1):
        chunk = words[start : start + len(wanted)]
        if [_normalise(w) for w in chunk] != wanted:
            continue
        for offset, (raw, core) in enumerate(zip(chunk, wanted)):
            span = spans[start + offset]
            if raw.lower() != core:
                # Keep only the tokens of the word itself, not of its punctuation.
                lead = raw.lower().find(core)
                head = len(_ids(tokenizer, raw[:lead])) if lead > 0 else 0
                span = span[head : head + len(_ids(tokenizer, core))]
            found.extend(span)
    return found


def require_word_positions(
    tokenizer: Any, prompt: str, word: str, *, plugin: str, option: str
) -> list[int]:
    """Like :func:`word_positions`, but a word that is absent is an :class:`OptionError`."""
    positions = word_positions(tokenizer, prompt, word)
    if not positions:
        words = ", ".join(repr(w) for w in prompt.split())
        raise OptionError(plugin, option, f"{word!r} is not a word of {prompt!r} (words: {words})")
    return positions


def replacement_mapper(tokenizer: Any, source: str, target: str) -> torch.Tensor:
    """Token mapper of a word swap: ``edit = A_src @ M`` over the token axis.

    Source and target must have the same number of words and fit the tokenizer's length
    (:func:`check_prompt_lengths`). Equal words map one to one; a
    swapped word whose token counts match maps one to one; otherwise every (source token,
    target token) pair of the swapped words gets ``1 / len(target tokens)``, and the positions
    after it shift accordingly.

    Returns:
        ``(max_tokens, max_tokens)`` float tensor ``M[source_position, target_position]``.
    """
    check_prompt_lengths(tokenizer, [source, target])
    src_words, tgt_words = source.split(), target.split()
    if len(src_words) != len(tgt_words):
        raise PromptError(
            f"replace needs prompts with the same number of words: {source!r} has "
            f"{len(src_words)}, {target!r} has {len(tgt_words)} (use refine to add words)"
        )
    max_tokens = tokenizer.model_max_length
    src_spans, tgt_spans = word_spans(tokenizer, source), word_spans(tokenizer, target)
    mapper = torch.zeros(max_tokens, max_tokens)
    # Start token, then word by word, then end and padding tokens shifted by the
    # difference in length the swapped words introduced.
    mapper[0, 0] = 1.0
    i = j = 1
    for src_word, tgt_word, src_span, tgt_span in zip(src_words, tgt_words, src_spans, tgt_spans):
        n_src, n_tgt = len(_ids(tokenizer, src_word)), len(_ids(tokenizer, tgt_word))
        if src_word == tgt_word or n_src == n_tgt:
            for a, b in zip(src_span, tgt_span):
                mapper[a, b] = 1.0
        else:
            for a in src_span:
                for b in tgt_span:
                    mapper[a, b] = 1.0 / n_tgt
        i += n_src
        j += n_tgt
    while i < max_tokens and j < max_tokens:
        mapper[i, j] = 1.0
        i += 1
        j += 1
    return mapper


def global_alignment(source_ids: Sequence[int], target_ids: Sequence[int]) -> list[int]:
    """Needleman-Wunsch alignment of two token sequences, as Prompt-to-Prompt's refine does.

    Scores: gap 0, match 1, mismatch -1. On ties the traceback prefers left (a target token
    without a source), then up (a dropped source token), then diagonal.

    Returns:
        For each target position, the index of its aligned source token, or -1 for a new token.
    """
    n, m = len(source_ids), len(target_ids)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    left, up, diagonal, stop = 1, 2, 3, 4
    for j in range(1, m + 1):
        trace[0][j] = left
    for i in range(1, n + 1):
        trace[i][0] = up
    trace[0][0] = stop
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            from_left = score[i][j - 1]
            from_up = score[i - 1][j]
            from_diag = score[i - 1][j - 1] + (1 if source_ids[i - 1] == target_ids[j - 1] else -1)
            best = max(from_left, from_up, from_diag)
            score[i][j] = best
            trace[i][j] = left if best == from_left else up if best == from_up else diagonal
    mapping = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        move = trace[i][j]
        if move == diagonal:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif move == left:
            j -= 1
        elif move == up:
            i -= 1
        else:
            break
    return mapping


def refinement_mapper(
    tokenizer: Any, source: str, target: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token alignment of a refinement (words added to the source prompt).

    Returns:
        ``(mapper, alphas)``: ``mapper`` ``(max_tokens,)`` long, the source position each target
        position takes its attention from (padding positions map to themselves); ``alphas``
        ``(max_tokens,)`` float, 1 for aligned positions and 0 for new tokens.
    """
    max_tokens = tokenizer.model_max_length
    check_prompt_lengths(tokenizer, [source, target])
    src, tgt = token_ids(tokenizer, source), token_ids(tokenizer, target)
    aligned = global_alignment(src, tgt)
    mapper = torch.arange(max_tokens)
    alphas = torch.ones(max_tokens)
    for position, source_position in enumerate(aligned):
        mapper[position] = max(source_position, 0)
        alphas[position] = 0.0 if source_position < 0 else 1.0
    return mapper, alphas
