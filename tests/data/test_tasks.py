"""Tests for rlx/tasks.py: the arithmetic generator, the registry and user-data loading."""

import json
import re

import datasets
import pytest

from rlx.rewards import load_reward
from rlx.tasks import (
    SYSTEM_PROMPT,
    TASKS,
    TaskError,
    build_arithmetic,
    equation_split,
    load_dataset_from_path,
    load_task_dataset,
    validate_prompts,
)


def operands(question: str) -> tuple[int, int]:
    """The two numbers of a generated question, in order (templates always write a before b)."""
    a, b = map(int, re.findall(r"\d+", question))
    return a, b


# --- arithmetic task --------------------------------------------------------------------------


def test_default_sizes_and_columns():
    train = load_task_dataset("arithmetic")
    test = load_task_dataset("arithmetic", split="test")
    assert (len(train), len(test)) == (2000, 200)
    assert train.column_names == ["prompt", "answer", "question"]
    assert len(set(train["question"])) == 2000  # no duplicate rows


def test_same_seed_same_data_and_different_seed_different_data():
    first = build_arithmetic("train", 100, seed=3)
    again = build_arithmetic("train", 100, seed=3)
    other = build_arithmetic("train", 100, seed=4)
    assert first.to_list() == again.to_list()
    assert first["question"] != other["question"]


@pytest.mark.parametrize("ops", [("+",), ("-",), ("*",), ("+", "-")])
def test_train_and_test_never_share_an_equation(ops):
    # Across seeds too: the split of an equation does not depend on the seed.
    train = build_arithmetic("train", 800, seed=0, ops=ops, max_operand=12)
    test = build_arithmetic("test", 200, seed=1, ops=ops, max_operand=12)
    assert not set(train["question"]) & set(test["question"])
    if len(ops) == 1:
        assert not {operands(q) for q in train["question"]} & {
            operands(q) for q in test["question"]
        }


@pytest.mark.parametrize(
    ("op", "apply"),
    [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)],
)
def test_answers_match_the_arithmetic(op, apply):
    dataset = build_arithmetic("train", 300, seed=7, ops=(op,), max_operand=9)
    for row in dataset:
        a, b = operands(row["question"])
        assert 1 <= a <= 9 and 1 <= b <= 9
        assert row["answer"] == str(apply(a, b))
        assert int(row["answer"]) >= 0
        assert equation_split(a, op, b) == "train"
        # one of a kind is singular: "1 bag", "1 apple" (the groups a product counts too)
        assert not re.search(r"\b1 (bags|days|rows|boxes|apples|books)\b", row["question"])


def test_products_score_with_the_default_rewards():
    """Multiplication answers reach max_operand squared; correctness reads them in the tags,
    with thousands separators, and as the last number of an untagged product."""
    correctness = load_reward("rewards/arithmetic.py:correctness")
    dataset = build_arithmetic("test", 100, seed=0, ops=("*",), max_operand=60)
    answers = dataset["answer"]
    assert max(map(int, answers)) > 1000
    tagged = [f"<answer>{int(a):,}</answer>" for a in answers]
    untagged = [
        "So {} x {} = {}.".format(*operands(q), a)
        for q, a in zip(dataset["question"], answers, strict=True)
    ]
    wrong = [f"<answer>{int(a) + 1}</answer>" for a in answers]
    for completions, expected in ((tagged, 1.0), (untagged, 1.0), (wrong, 0.0)):
        scores = correctness(prompts=dataset["prompt"], completions=completions, answer=answers)
        assert scores == [expected] * len(answers)


def test_gold_answers_score_full_marks_with_default_rewards():
    spec = TASKS["arithmetic"]
    fns = {s: load_reward(s) for s, _ in spec.default_rewards}
    dataset = build_arithmetic("test", 50, seed=0)
    gold = [f"<answer>{a}</answer>" for a in dataset["answer"]]
    for fn in fns.values():
        assert (
            fn(prompts=dataset["prompt"], completions=gold, answer=dataset["answer"]) == [1.0] * 50
        )


def test_prompt_messages_with_and_without_one_shot():
    shot = build_arithmetic("train", 5, seed=0)[0]
    plain = build_arithmetic("train", 5, seed=0, one_shot=False)[0]
    assert [m["role"] for m in shot["prompt"]] == ["system", "user", "assistant", "user"]
    assert "<answer>" in shot["prompt"][2]["content"]
    assert [m["role"] for m in plain["prompt"]] == ["system", "user"]
    assert shot["prompt"][0]["content"] == SYSTEM_PROMPT and "<answer>" in SYSTEM_PROMPT
    assert shot["prompt"][-1]["content"] == shot["question"] == plain["question"]


def test_one_shot_equation_is_never_held_out():
    assert equation_split(3, "+", 4) == "train"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "validation"}, "splits"),
        ({"max_operand": 0}, "max_operand"),
        ({"ops": ("/",)}, "ops"),
        ({"ops": ()}, "ops"),
        ({"colour": "red"}, "does not accept"),
        ({"num_examples": 0}, "num_examples"),
        ({"num_examples": 500, "max_operand": 1, "ops": ("+",)}, "distinct"),
    ],
)
def test_arithmetic_option_errors(kwargs, message):
    with pytest.raises(TaskError, match=message):
        load_task_dataset("arithmetic", **kwargs)


def test_unknown_task_lists_registered_tasks():
    with pytest.raises(TaskError, match="neither a registered task \\(arithmetic"):
        load_task_dataset("gsm9k")


# --- user data --------------------------------------------------------------------------------

CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4", "source": "a"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}],
        "answer": "6",
        "source": "b",
    },
]
TEXT_ROWS = [
    {"prompt": "2+2?", "answer": "4", "difficulty": 1},
    {"prompt": "9-3?", "answer": "6", "difficulty": 2},
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_load_jsonl_and_json_keep_extra_columns(tmp_path):
    jsonl = load_dataset_from_path(write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS))
    assert jsonl.to_list() == CHAT_ROWS
    (tmp_path / "d.json").write_text(json.dumps(TEXT_ROWS))
    assert load_dataset_from_path(tmp_path / "d.json").to_list() == TEXT_ROWS


def test_load_parquet_and_saved_folders(tmp_path):
    datasets.Dataset.from_list(TEXT_ROWS).to_parquet(str(tmp_path / "d.parquet"))
    assert load_task_dataset(str(tmp_path / "d.parquet")).to_list() == TEXT_ROWS

    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "single"))
    assert load_dataset_from_path(tmp_path / "single").to_list() == CHAT_ROWS

    splits = {"train": CHAT_ROWS, "test": CHAT_ROWS[:1]}
    dict_dir = tmp_path / "dict"
    datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
    ).save_to_disk(str(dict_dir))
    assert load_task_dataset(str(dict_dir), split="test").to_list() == CHAT_ROWS[:1]
    assert len(load_task_dataset(str(dict_dir))) == 2
    with pytest.raises(TaskError, match=r"holds splits \['test', 'train'\]"):
        load_dataset_from_path(dict_dir)
    with pytest.raises(TaskError, match="holds splits"):
        load_dataset_from_path(dict_dir, split="validation")


def test_num_examples_and_split_on_user_files(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS))
    assert load_task_dataset(path, num_examples=1).to_list() == CHAT_ROWS[:1]
    with pytest.raises(TaskError, match="asked for 5 rows but it has 2"):
        load_task_dataset(path, num_examples=5)
    with pytest.raises(TaskError, match="no 'test' split"):
        load_task_dataset(path, split="test")
    with pytest.raises(TaskError, match="only apply to registered tasks"):
        load_task_dataset(path, max_operand=3)


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("d.csv", "prompt\nhi\n", "unsupported extension '.csv'"),
        (
            "d.jsonl",
            '{"question": "hi", "answer": "1"}\n',
            r"no 'prompt' column; it has columns \['question', 'answer'\]",
        ),
        ("d.jsonl", '{"prompt": "hi"}\n{"prompt": "  "}\n', "row 1: prompt must be"),
        (
            "d.jsonl",
            '{"prompt": [{"role": "user", "content": "hi"}]}\n{"prompt": []}\n',
            "row 1: prompt must be",
        ),
        ("d.jsonl", '{"prompt": [{"role": "user"}]}\n', "row 0: prompt must be"),
        ("d.jsonl", '{"prompt": "hi"}\n{"prompt": \n', "could not be read as jsonl"),
        ("d.jsonl", "", "file is empty"),
    ],
)
def test_user_data_errors_name_the_file_and_problem(tmp_path, filename, content, message):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(TaskError, match=message) as info:
        load_dataset_from_path(path)
    assert str(path) in str(info.value)


def test_missing_path_and_non_dataset_folder(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        load_dataset_from_path(tmp_path / "nope.jsonl")
    with pytest.raises(TaskError, match="not a folder written by"):
        load_dataset_from_path(tmp_path)
    # Empty parquet/saved folders fail inside datasets' readers; check the validator directly.
    empty = datasets.Dataset.from_dict({"prompt": []})
    with pytest.raises(TaskError, match="mine.jsonl: has no rows"):
        validate_prompts(empty, "mine.jsonl")
