"""Tests for rewards/arithmetic.py, rewards/length.py and the loader/scorer in rlx/rewards.py."""

import math
import textwrap

import numpy as np
import pytest

from rlx.rewards import (
    RewardError,
    RewardFunction,
    completion_text,
    load_reward,
    score_completions,
)

# Loaded through the spec loader on purpose: this is how the trainer will find them.
extract_answer = load_reward("rewards/arithmetic.py:extract_answer")
parse_number = load_reward("rewards/arithmetic.py:parse_number")
correctness = load_reward("rewards/arithmetic.py:correctness")
answer_format = load_reward("rewards/arithmetic.py:answer_format")
conciseness = load_reward("rewards/length.py:conciseness")
make_conciseness = load_reward("rewards/length.py:make_conciseness")


def write_reward(tmp_path, body: str, name: str = "reward_file"):
    """Write a reward module into tmp_path and return its path as a string."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


# --- extraction -------------------------------------------------------------------------------

EXTRACTION_CASES = [
    ("<answer>12</answer>", 12.0),
    ("Thinking... 3 + 4 = 7 <answer> 7 </answer>", 7.0),
    ("<answer>1</answer> wait, no: <answer>2</answer>", 2.0),  # last tag wins
    ("The total is 12. <answer>15</answer> and 99 later", 15.0),  # tag beats later numbers
    ("<answer>12 apples</answer>", 12.0),
    ("<ANSWER>-4</ANSWER>", -4.0),
    ("<answer>1,234</answer>", 1234.0),
    ("<answer>$3.50</answer>", 3.5),
    ("<answer>3/4</answer>", 0.75),
    ("<answer>x = 12</answer>", 12.0),
    ("So the answer is \\boxed{12}.", 12.0),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("Sam has 7 and buys 5, so he has 12.", 12.0),  # last number, trailing period
    ("It drops to -3 degrees", -3.0),
    ("12-5=7", 7.0),
    ("Total: 1,234,567 grains", 1234567.0),
    ("He pays $12 in all", 12.0),
    ("The result is − 4 or −4", -4.0),  # unicode minus
    ("I don't know", None),
    ("", None),
    ("<answer></answer>", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_answer(text, expected):
    extracted = extract_answer(text)
    assert (None if extracted is None else parse_number(extracted)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.50", 3.5),
        ("12.", 12.0),
        ("= 12", 12.0),
        ("$1,000", 1000.0),
        ("-$5", -5.0),
        ("\\boxed{-2}", -2.0),
        ("$\\frac{1}{2}$", 0.5),
        ("6 / 8", 0.75),
        ("+7", 7.0),
        ("12 apples", None),
        ("1/0", None),
        ("1,23", None),
        ("twelve", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# --- reward values ----------------------------------------------------------------------------


def test_correctness_values_and_not_applicable():
    completions = [
        "<answer>12</answer>",
        "so 12.0",
        "<answer>13</answer>",
        "no idea",
        "<answer>5</answer>",
        "<answer>0.75</answer>",
        "<answer>b</answer>",
    ]
    truth = ["12", "12", "12", "12", None, "3/4", "B"]
    rewards = correctness(prompts=[""] * 7, completions=completions, answer=truth)
    assert rewards == [1.0, 1.0, 0.0, 0.0, None, 1.0, 1.0]
    assert correctness(prompts=[""], completions=["<answer>1</answer>"], answer=["  "]) == [None]


def test_rewards_accept_trl_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "3 + 4 = 7 <answer>7</answer>"}],
        [{"role": "assistant", "content": "thinking"}, {"role": "assistant", "content": "8"}],
    ]
    assert correctness(prompts=[[], []], completions=completions, answer=["7", "7"]) == [1.0, 0.0]
    assert answer_format(prompts=[[], []], completions=completions) == [1.0, 0.0]
    # Six words against a 1-word target is past 4x, so 0.0; "8" is one word.
    assert conciseness(prompts=[[], []], completions=completions, target_tokens=1) == [0.0, 1.0]
    assert completion_text([]) == ""
    with pytest.raises(TypeError):
        completion_text(42)


def test_answer_format_values():
    completions = [
        "work <answer>7</answer>",
        "<answer>7</answer> <answer>8</answer>",
        "<answer>seven</answer>",
        "<answer>7 apples</answer>",
        "the answer is 7",
        "<answer>7",
    ]
    assert answer_format(prompts=[""] * 6, completions=completions) == [
        1.0,
        0.5,
        0.5,
        0.5,
        0.0,
        0.0,
    ]


def test_conciseness_uses_token_counts_when_given():
    ids = [[0] * 10, [0] * 25, [0] * 40, [0] * 100, []]
    rewards = conciseness(
        prompts=[""] * 5, completions=[""] * 5, completion_ids=ids, target_tokens=10
    )
    # 25 tokens: 15 over a 30-token ramp (10 -> 40) leaves 0.5.
    assert rewards == [1.0, 0.5, 0.0, 0.0, 1.0]


def test_conciseness_falls_back_to_word_counts():
    words = ["one two", " ".join(["w"] * 7), " ".join(["w"] * 20)]
    rewards = conciseness(prompts=[""] * 3, completions=words, target_tokens=4)
    assert rewards == pytest.approx([1.0, 1.0 - 3 / 12, 0.0])


def test_make_conciseness_fixes_target_and_name():
    reward = make_conciseness(2)
    assert reward.__name__ == "conciseness_2"
    assert reward(prompts=[""], completions=[""], completion_ids=[[1, 2, 3, 4, 5]]) == [0.5]
    with pytest.raises(ValueError, match="positive int"):
        make_conciseness(0)
    with pytest.raises(ValueError, match="positive int"):
        conciseness(prompts=[""], completions=["x"], target_tokens=2.5)


# --- load_reward ------------------------------------------------------------------------------


def test_load_reward_resolves_repo_files_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fn = load_reward("rewards/arithmetic.py:correctness")
    assert fn(prompts=[""], completions=["<answer>3</answer>"], answer=["3"]) == [1.0]
    assert fn is correctness  # module cache: the same file is imported once


def test_load_reward_prefers_cwd_relative_files_and_dotted_modules(tmp_path, monkeypatch):
    write_reward(
        tmp_path, "def fn(prompts, completions, **kw):\n    return [0.25] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_reward("reward_file.py:fn")(prompts=[""], completions=[""]) == [0.25]
    assert load_reward("rlx.rewards:completion_text") is completion_text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rewards/arithmetic.py", "malformed"),
        ("rewards/arithmetic.py:", "malformed"),
        ("nowhere/missing.py:fn", "not found"),
        ("rlx.no_such_module:fn", "importing reward module"),
    ],
)
def test_load_reward_spec_errors(spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward(spec)


def test_load_reward_missing_function_lists_defined_callables(tmp_path):
    path = write_reward(
        tmp_path,
        """
        import math
        from os.path import join
        LIMIT = 3
        def alpha(prompts, completions, **kw):
            return []
        def beta(prompts, completions, **kw):
            return []
        """,
    )
    with pytest.raises(RewardError, match="callables defined there: alpha, beta$"):
        load_reward(f"{path}:gamma")
    with pytest.raises(RewardError, match="'LIMIT' .* is a int, not a function"):
        load_reward(f"{path}:LIMIT")


def test_load_reward_import_failure_is_chained(tmp_path):
    path = write_reward(tmp_path, "raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardError, match="boom at import") as info:
        load_reward(f"{path}:fn")
    assert isinstance(info.value.__cause__, RuntimeError)


# --- score_completions ------------------------------------------------------------------------


def test_score_completions_weights_and_nan_handling(tmp_path):
    path = write_reward(
        tmp_path,
        """
        def first(prompts, completions, score, **kw):
            return [s if s >= 0 else None for s in score]
        def second(prompts, completions, **kw):
            return [None, 0.5, 1.0, None]
        """,
    )
    fns = [
        RewardFunction("first", load_reward(f"{path}:first"), weight=2.0),
        RewardFunction("second", load_reward(f"{path}:second"), weight=-1.0),
    ]
    scores = score_completions(fns, ["p"] * 4, ["c"] * 4, columns={"score": [1.0, -1, 0.25, -1]})
    assert scores.names == ["first", "second"]
    assert scores.per_function.dtype == np.float64
    expected = np.array([[1.0, np.nan], [np.nan, 0.5], [0.25, 1.0], [np.nan, np.nan]])
    np.testing.assert_array_equal(scores.per_function, expected)
    # Row by row: 2*1 + 0; 0 - 0.5; 2*0.25 - 1; all None -> NaN.
    np.testing.assert_array_equal(scores.total, [2.0, -0.5, -0.5, np.nan])


def test_score_completions_passes_completion_ids_only_when_given(tmp_path):
    path = write_reward(
        tmp_path,
        """
        def seen(prompts, completions, **kw):
            return [float("completion_ids" in kw)] * len(completions)
        """,
    )
    fns = [RewardFunction("seen", load_reward(f"{path}:seen"))]
    assert score_completions(fns, ["p"], ["c"], {}).total.tolist() == [0.0]
    assert score_completions(fns, ["p"], ["c"], {}, completion_ids=[[1, 2]]).total.tolist() == [1.0]


def test_score_completions_with_shipped_rewards():
    fns = [
        RewardFunction("correctness", correctness, 1.0),
        RewardFunction("answer_format", answer_format, 0.2),
    ]
    completions = ["<answer>7</answer>", "7", "<answer>8</answer>"]
    scores = score_completions(fns, ["p"] * 3, completions, {"answer": ["7", "7", "7"]})
    np.testing.assert_allclose(scores.total, [1.2, 1.0, 0.2])


BAD_REWARDS = {
    "raises": ("raise KeyError('answer')", "raised KeyError"),
    "not_a_list": ("return {'a': 1.0}", "returned dict; it must return a list"),
    "array": ("import numpy\n    return numpy.zeros(len(completions))", "returned ndarray"),
    "too_short": ("return [1.0]", "returned 1 values, expected 3"),
    "text": ("return [1.0, 'high', 0.0]", "non-numeric value at index 1: 'high'"),
    "nan": ("return [0.0, 1.0, float('nan')]", "nan at index 2"),
    "inf": ("return [float('inf'), 1.0, 0.0]", "inf at index 0"),
    "boolean": ("return [1.0, True, 0.0]", "bool True at index 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_REWARDS))
def test_score_completions_rejects_misbehaving_functions(tmp_path, case):
    body, message = BAD_REWARDS[case]
    path = write_reward(tmp_path, f"def bad(prompts, completions, **kw):\n    {body}\n")
    fns = [RewardFunction("bad_fn", load_reward(f"{path}:bad"))]
    with pytest.raises(RewardError, match=message) as info:
        score_completions(fns, ["p"] * 3, ["c"] * 3, {})
    assert "'bad_fn'" in str(info.value)
    if case == "raises":
        assert isinstance(info.value.__cause__, KeyError)


def test_score_completions_rejects_misaligned_inputs():
    fns = [RewardFunction("format", answer_format)]
    with pytest.raises(RewardError, match="at least one"):
        score_completions([], ["p"], ["c"], {})
    with pytest.raises(RewardError, match="2 prompts for 1 completions"):
        score_completions(fns, ["p", "q"], ["c"], {})
    with pytest.raises(RewardError, match="column 'answer' has 2 values for 1"):
        score_completions(fns, ["p"], ["c"], {"answer": ["1", "2"]})
    with pytest.raises(RewardError, match="clashes"):
        score_completions(fns, ["p"], ["c"], {"completions": ["x"]})
    with pytest.raises(RewardError, match="finite number"):
        RewardFunction("w", answer_format, weight=math.nan)
