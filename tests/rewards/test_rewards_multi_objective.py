"""Tests for rewards/multi_objective.py: batch-relative conciseness and the length objective."""

import math

import pytest

from rlx.rewards import RewardFunction, load_reward, score_completions

# Loaded through the spec loader on purpose: this is how the trainer will find them.
concise = load_reward("rewards/multi_objective.py:concise")
completion_length = load_reward("rewards/multi_objective.py:completion_length")


def test_concise_uses_token_ids_when_given():
    # token lengths 2, 4, 6 -> mean 4: only the first is strictly shorter; the tie scores 0.0
    ids = [[1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]
    # the texts' character lengths (9, 1, 1) would give the opposite answer
    texts = ["long text", "a", "b"]
    assert concise([""] * 3, texts, completion_ids=ids) == [1.0, 0.0, 0.0]
    assert completion_length([""] * 3, texts, completion_ids=ids) == [2.0, 4.0, 6.0]


def test_concise_falls_back_to_characters():
    # characters 1, 3, 5, 7 -> mean 4
    texts = ["a", "abc", "abcde", "abcdefg"]
    assert concise([""] * 4, texts) == [1.0, 1.0, 0.0, 0.0]
    assert completion_length([""] * 4, texts) == [1.0, 3.0, 5.0, 7.0]


def test_concise_all_equal_lengths_score_zero():
    assert concise(["p", "p"], ["ab", "cd"]) == [0.0, 0.0]
    assert concise([], []) == []


def test_lengths_of_conversational_completions():
    # the last message is the completion: 5 and 2 characters, mean 3.5
    completions = [
        [{"role": "assistant", "content": "hello"}],
        [{"role": "assistant", "content": "hi"}],
    ]
    assert completion_length(["p", "p"], completions) == [5.0, 2.0]
    assert concise(["p", "p"], completions) == [0.0, 1.0]


def test_mismatched_completion_ids_raise():
    with pytest.raises(ValueError, match="completion_ids"):
        concise(["p", "p"], ["a", "b"], completion_ids=[[1]])


def test_scored_through_score_completions_with_columns():
    # the scorer passes dataset columns as keyword arguments; both functions must accept them
    scores = score_completions(
        [RewardFunction("concise", concise), RewardFunction("length", completion_length)],
        prompts=["p", "p"],
        completions=["x", "y"],
        columns={"answer": ["1", "2"]},
        completion_ids=[[1], [1, 2, 3]],
    )
    assert scores.per_function.tolist() == [[1.0, 1.0], [0.0, 3.0]]


step_format = load_reward("rewards/multi_objective.py:step_format")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("First, 3 + 4 = 7. Then we are done.\n<answer>7</answer>", 1.0),  # two ordinals
        ("1. Ana has 3.\n2. She buys 4, so 3 + 4 = 7.\n<answer>7</answer>", 1.0),  # enumerators
        ("3 + 4 = 7 and 7 + 0 = 7.\n<answer>7</answer>", 1.0),  # two worked equations
        ("Step 1: add.\nStep 2: check.\n<answer> 7 </answer>", 1.0),
        # the one-shot example's shape: one step only
        ("Ana starts with 3 pears and buys 4 more, so 3 + 4 = 7.\n<answer>7</answer>", 0.0),
        ("First 3 + 4 = 7, then done.", 0.0),  # no answer tag
        ("First, then.\n<answer>seven</answer>", 0.0),  # not a number
        ("First, then.\n<answer>7</answer><answer>7</answer>", 0.0),  # two tags
        ("First, then.\n<answer>7</answer> and more text", 0.0),  # text after the answer
        ("The answer is 7. It has 3. Done.\n<answer>7</answer>", 0.0),  # numbers with full stops
    ],
)
def test_step_format(text, expected):
    assert step_format(["p"], [text]) == [expected]


concise_correct = load_reward("rewards/multi_objective.py:concise_correct")


def test_concise_correct_pays_only_correct_answers_shorter_than_their_groups_correct_mean():
    """Group "a": correct lengths 2, 4, 6 (mean 4) -> only the 2-token one; the short wrong one
    scores 0. Group "b": one correct answer (its own mean) and a wrong one: 0 each. Group "c":
    all wrong, however short: 0 (no push toward short answers where none is right)."""
    prompts = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    texts = ["<answer>5</answer>"] * 3 + ["<answer>6</answer>"]
    texts += ["<answer>7</answer>", "<answer>1</answer>", "<answer>0</answer>", "x"]
    ids = [[1] * n for n in (2, 4, 6, 1, 9, 1, 1, 1)]
    answers = ["5"] * 4 + ["7"] * 2 + ["3"] * 2
    rewards = concise_correct(prompts, texts, answer=answers, completion_ids=ids)
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_concise_correct_is_none_without_a_ground_truth_and_accepts_columns():
    scores = score_completions(
        [RewardFunction("concise_correct", concise_correct)],
        prompts=["p", "p", "q"],
        completions=["<answer>2</answer>", "so 2", "3"],
        columns={"answer": ["2", "2", None], "other": [1, 2, 3]},
        completion_ids=[[1, 2, 3], [1], [1]],
    )
    assert scores.per_function[:2, 0].tolist() == [0.0, 1.0]
    assert math.isnan(scores.per_function[2, 0])
