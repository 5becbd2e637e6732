"""The held-out prompts of a training run (rlx.data.load_held_out): the task's `eval.split` split,
or the training run's own file or saved dataset through `eval.data`."""

from __future__ import annotations

import json

import datasets
import pytest

from rlx.config import PGConfig, load_config
from rlx.data import load_held_out, load_prompts
from rlx.tasks import TaskError, load_task_dataset

PROMPTS = [f"Held-out question number {i}: what is {i} + {i}?" for i in range(5)]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "held_out.jsonl"
    rows = [{"prompt": p, "answer": str(2 * i)} for i, p in enumerate(PROMPTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def dataset_dict(tmp_path):
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [{"prompt": f"train prompt {i}", "answer": str(i)} for i in range(6)]
            ),
            "test": datasets.Dataset.from_list(
                [{"prompt": f"test prompt {i}", "answer": str(i)} for i in range(4)]
            ),
        }
    ).save_to_disk(str(path))
    return path


def config(*overrides):
    return load_config(PGConfig, None, list(overrides))


def test_eval_data_file_gives_its_prompts_in_order(jsonl, tokenizer):
    held_out = load_held_out(config(f"eval.data={jsonl}"), tokenizer)
    assert held_out["prompt"] == PROMPTS
    assert held_out["answer"] == ["0", "2", "4", "6", "8"]  # other columns reach the rewards


def test_eval_num_prompts_keeps_the_first_rows_of_the_file(jsonl, tokenizer):
    held_out = load_held_out(config(f"eval.data={jsonl}", "eval.num_prompts=3"), tokenizer)
    assert held_out["prompt"] == PROMPTS[:3]


def test_eval_data_is_independent_of_the_training_task(jsonl, tokenizer, dataset_dict):
    """eval.data replaces the task's split whatever the task is (a registered task or a folder)."""
    for task in ("arithmetic", str(dataset_dict)):
        cfg = config(f"task.name={task}", f"eval.data={jsonl}", "eval.num_prompts=4")
        assert load_held_out(cfg, tokenizer)["prompt"] == PROMPTS[:4]


def test_without_eval_data_the_task_test_split_is_used(tokenizer):
    options = '{one_shot: true, max_operand: 99, ops: ["+"]}'
    cfg = config("task.name=arithmetic", f"task.options={options}", "eval.num_prompts=30")
    assert cfg.eval.data is None and cfg.eval.split == "test"
    held_out = load_held_out(cfg, tokenizer)
    assert len(held_out) == 30
    test_split = load_task_dataset("arithmetic", "test", 30, cfg.task.seed, **cfg.task.options)
    assert held_out["prompt"] == test_split["prompt"]
    assert held_out["question"] == test_split["question"]

    train = load_prompts(
        cfg.task, cfg.task.split, None, tokenizer, cfg.max_prompt_tokens, cfg.long_prompts
    )
    assert cfg.task.split == "train" and len(train) > 100
    train_questions = set(train["question"])
    train_prompts = {json.dumps(p) for p in train["prompt"]}
    assert not train_questions & set(held_out["question"])
    assert not train_prompts & {json.dumps(p) for p in held_out["prompt"]}
    # The options reached the held-out split too: sums only, so no subtraction wording.
    minus_words = ("gives", "takes away", "lost", "sold")
    assert not [q for q in held_out["question"] if any(w in q for w in minus_words)]
    assert all(int(a) >= 2 for a in held_out["answer"])
    default = load_held_out(config("task.name=arithmetic", "eval.num_prompts=30"), tokenizer)
    assert default["prompt"] != held_out["prompt"]  # the options changed the prompts


def test_eval_disabled_gives_none(jsonl, tokenizer):
    assert load_held_out(config("eval.enabled=false"), tokenizer) is None
    assert load_held_out(config("eval.enabled=false", f"eval.data={jsonl}"), tokenizer) is None


def test_missing_eval_data_file_raises_task_error(tmp_path, tokenizer):
    cfg = config(f"eval.data={tmp_path / 'nope.jsonl'}")
    with pytest.raises(TaskError, match="nope.jsonl"):
        load_held_out(cfg, tokenizer)


def test_eval_data_without_a_prompt_column_raises_task_error(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "1 + 1?"}\n')
    with pytest.raises(TaskError, match="prompt"):
        load_held_out(config(f"eval.data={path}"), tokenizer)


def test_eval_data_folder_gives_the_eval_split(dataset_dict, tokenizer):
    cfg = config(f"eval.data={dataset_dict}", "eval.split=test")
    assert load_held_out(cfg, tokenizer)["prompt"] == [f"test prompt {i}" for i in range(4)]
    cfg = config(f"eval.data={dataset_dict}", "eval.split=train", "eval.num_prompts=2")
    assert load_held_out(cfg, tokenizer)["prompt"] == ["train prompt 0", "train prompt 1"]
    with pytest.raises(TaskError, match="validation"):
        load_held_out(config(f"eval.data={dataset_dict}", "eval.split=validation"), tokenizer)


def test_long_held_out_prompts_follow_long_prompts(tmp_path, tokenizer):
    from rlx.config import ConfigError
    from rlx.rollout import encode_prompts

    prompts = ["7 + 5?", PROMPTS[0], "1 + 1?", PROMPTS[1]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    limit = max(len(ids) for ids in encode_prompts(tokenizer, ["7 + 5?", "1 + 1?"]))
    assert limit < min(len(ids) for ids in encode_prompts(tokenizer, PROMPTS[:2]))
    with pytest.raises(ConfigError, match="held-out"):
        load_held_out(config(f"eval.data={path}", f"max_prompt_tokens={limit}"), tokenizer)
    cfg = config(f"eval.data={path}", f"max_prompt_tokens={limit}", "long_prompts=skip")
    assert load_held_out(cfg, tokenizer)["prompt"] == ["7 + 5?", "1 + 1?"]


# --- user data with fewer held-out rows than num_prompts, a single-Dataset folder


def test_task_folder_with_fewer_test_rows_than_num_prompts(dataset_dict, tokenizer):
    cfg = config(f"task.name={dataset_dict}", "eval.split=test")  # eval.num_prompts=200
    assert load_held_out(cfg, tokenizer)["prompt"] == [f"test prompt {i}" for i in range(4)]


def test_eval_data_single_dataset_folder(tmp_path, tokenizer):
    path = tmp_path / "single"
    datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]).save_to_disk(str(path))
    assert load_held_out(config(f"eval.data={path}"), tokenizer)["prompt"] == PROMPTS
