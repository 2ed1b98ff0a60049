"""Token logic against hand-computed cases: word positions, replace mapper, refine alignment,
per-word schedules and self-replace windows."""

from __future__ import annotations

import pytest
import torch

from p2p_framework import OptionError, PromptError
from p2p_framework.prompts import (
    global_alignment,
    refinement_mapper,
    replacement_mapper,
    word_positions,
    word_spans,
)
from p2p_framework.schedules import cross_replace_table, self_replace_window

# In the tiny tokenizer every listed word is one token; "lionfish" is not listed and splits
# into 8 single-letter tokens (l i o n f i s h</w>).
SPLIT_WORD = "lionfish"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")


def test_split_word_is_several_tokens(tokenizer):
    assert len(tokenizer(SPLIT_WORD, add_special_tokens=False).input_ids) == 8


def test_word_spans_count_the_start_token(tokenizer):
    assert word_spans(tokenizer, "a cat") == [[1], [2]]
    spans = word_spans(tokenizer, f"a {SPLIT_WORD} on a cat")
    assert spans == [[1], list(range(2, 10)), [10], [11], [12]]


def test_word_positions_ignore_case_and_punctuation(tokenizer):
    prompt = "a painting of a squirrel eating a burger,"
    assert word_positions(tokenizer, prompt, "Squirrel") == [5]
    assert word_positions(tokenizer, prompt, "burger") == [8]  # not the comma's token 9
    assert word_positions(tokenizer, prompt, "a") == [1, 4, 7]
    assert word_positions(tokenizer, prompt, "a squirrel") == [4, 5]
    assert word_positions(tokenizer, prompt, "lion") == []
    assert word_positions(tokenizer, f"a {SPLIT_WORD}", SPLIT_WORD) == list(range(2, 10))


def test_replace_mapper_equal_lengths_is_identity(tokenizer):
    mapper = replacement_mapper(tokenizer, "a cat on a mat", "a dog on a mat")
    assert torch.equal(mapper, torch.eye(tokenizer.model_max_length))


def test_replace_mapper_with_a_split_word_spreads_and_shifts(tokenizer):
    # "cat" (1 token, position 2) -> "lionfish" (8 tokens, positions 2..9).
    mapper = replacement_mapper(tokenizer, "a cat sitting", f"a {SPLIT_WORD} sitting")
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2:10] = 1 / 8
    # after the swapped word, source position i maps to target position i + 7
    for i in range(3, 77 - 7):
        expected[i, i + 7] = 1
    assert torch.equal(mapper, expected)
    # each target token of the split word receives 1/8 of the source word's attention
    source = torch.zeros(77)
    source[2] = 1.0
    assert torch.allclose(source @ mapper, expected[2])


def test_replace_mapper_other_direction(tokenizer):
    mapper = replacement_mapper(tokenizer, f"a {SPLIT_WORD} sitting", "a cat sitting")
    assert torch.equal(mapper[2:10, 2], torch.ones(8))  # 1 / len(target tokens) = 1
    assert mapper[10, 3] == 1 and mapper[11, 4] == 1
    assert mapper[:, 5:].sum() == 77 - 5 - 7  # the shifted tail runs out at the end


def test_replace_needs_equal_word_counts(tokenizer):
    with pytest.raises(PromptError, match="same number of words"):
        replacement_mapper(tokenizer, "a cat", "a big cat")


def test_global_alignment_hand_case():
    # source: S a cat E ; target: S a big cat E -> "big" is new (-1)
    assert global_alignment([0, 1, 2, 9], [0, 1, 5, 2, 9]) == [0, 1, -1, 2, 3]
    # ties: left is preferred, so a mismatch becomes a gap pair rather than a diagonal
    assert global_alignment([7], [8]) == [-1]
    assert global_alignment([1, 2], [1, 2]) == [0, 1]


def test_refinement_mapper_adds_words(tokenizer):
    mapper, alphas = refinement_mapper(tokenizer, "a house", "a house at fall")
    # target tokens: S a house at fall E -> source S a house E (positions 0,1,2,3)
    assert mapper[:6].tolist() == [0, 1, 2, 0, 0, 3]
    assert alphas[:6].tolist() == [1, 1, 1, 0, 0, 1]
    assert mapper[6:].tolist() == list(range(6, 77))  # padding maps to itself
    assert alphas[6:].eq(1).all()


def test_refinement_with_split_word(tokenizer):
    mapper, alphas = refinement_mapper(tokenizer, "a soup", f"a {SPLIT_WORD} soup")
    assert alphas[:12].tolist() == [1, 1] + [0] * 8 + [1, 1]
    assert mapper[10].item() == 2 and mapper[11].item() == 3


def test_cross_table_fraction_and_pair(tokenizer):
    prompts = ["a cat", "a dog", "a lion"]
    table = cross_replace_table(0.8, prompts, 10, tokenizer)
    assert table.shape == (11, 2, 77)
    # rows int(0 * 11) <= t < int(0.8 * 11) = 8
    assert table[:8].eq(1).all() and table[8:].eq(0).all()
    table = cross_replace_table((0.2, 0.5), prompts, 10, tokenizer)
    assert table[:, 0, 0].tolist() == [0, 0, 1, 1, 1] + [0] * 6


def test_cross_table_per_word(tokenizer):
    prompts = ["a painting of a squirrel", "a painting of a lion", f"a painting of a {SPLIT_WORD}"]
    table = cross_replace_table({"default": 1.0, "lion": 0.4}, prompts, 10, tokenizer)
    # default (0, 1) -> rows 0..10 all on; "lion" only in target 0 at position 5: rows < 4
    assert table[:, 1].eq(1).all()
    assert table[:, 0, 5].tolist() == [1] * 4 + [0] * 7
    assert table[:, 0, 4].eq(1).all()
    # a dict without default gets (0, 1) elsewhere; a split word covers all its tokens
    table = cross_replace_table({SPLIT_WORD: (0.5, 1.0)}, prompts, 10, tokenizer)
    assert table[:, 1, 5:13].eq(table[:, 1, 5:6]).all()
    assert table[:, 1, 5].tolist() == [0] * 5 + [1] * 6
    assert table[:, 0].eq(1).all()


def test_cross_table_errors_name_the_option(tokenizer):
    with pytest.raises(OptionError, match="not a word of any target"):
        cross_replace_table({"zebra": 0.3}, ["a cat", "a dog"], 10, tokenizer)
    with pytest.raises(OptionError, match=r"cross_replace_steps: fractions must lie in \[0, 1\]"):
        cross_replace_table(1.5, ["a cat", "a dog"], 10, tokenizer)
    with pytest.raises(OptionError, match="after end"):
        cross_replace_table((0.6, 0.2), ["a cat", "a dog"], 10, tokenizer)


def test_self_replace_window():
    assert self_replace_window(0.4, 50) == (0, 20)
    assert self_replace_window((0.2, 0.5), 50) == (10, 25)
    with pytest.raises(OptionError, match="self_replace_steps"):
        self_replace_window(-0.1, 50)
