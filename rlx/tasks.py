"""Tasks: named, seeded prompt datasets with default rewards, plus loading of user data from disk.

The built-in "arithmetic" task generates one-step addition/subtraction (on request also
multiplication) word problems sized for SmolLM2-135M-Instruct. Its train and test splits never
share an equation: each (a, op, b) is hashed into one split, independent of the seed, so test
accuracy measures sums the policy never trained on.

    load_task_dataset("arithmetic", split="test", seed=0)
    load_task_dataset("data/my_prompts.jsonl")           # needs a `prompt` column
"""

from __future__ import annotations

import hashlib
import inspect
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from rlx.errors import UserError

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math word problems. Think briefly, step by step, "
    "then write the final answer as a single number inside <answer></answer> tags, "
    "for example <answer>42</answer>."
)

FORMAT_HINT = "Put the final number inside <answer></answer> tags."

# A 135M model never produces the tags zero-shot, so prompts can carry this worked example.
ONE_SHOT_QUESTION = "Ana has 3 pears and buys 4 more. How many pears does Ana have now?"
ONE_SHOT_ANSWER = "Ana starts with 3 pears and buys 4 more, so 3 + 4 = 7.\n<answer>7</answer>"
ONE_SHOT_EQUATION = (3, "+", 4)

TEST_FRACTION = 0.2
"""Share of all (a, op, b) equations reserved for the test split."""

DEFAULT_SIZES = {"train": 2000, "test": 200}

NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lina", "Ben", "Maya", "Ivan", "Kofi")
OBJECTS = (
    ("apple", "apples"),
    ("marble", "marbles"),
    ("book", "books"),
    ("pencil", "pencils"),
    ("cookie", "cookies"),
    ("sticker", "stickers"),
    ("shell", "shells"),
    ("coin", "coins"),
)
# {a} always precedes {b}, so the first number in a question is a and the second is b.
TEMPLATES = {
    "+": (
        "{name} has {a} {obj_a} and buys {b} more. How many {objs} does {name} have now?",
        "{name} collected {a} {obj_a} in the morning and {b} {obj_b} in the afternoon. "
        "How many {objs} did {name} collect in total?",
        "There are {a} {obj_a} in a box. {name} puts in {b} more. How many {objs} are in the box now?",
        "{name} found {a} {obj_a}, then a friend gave {name} {b} more. How many {objs} does {name} have?",
    ),
    "-": (
        "{name} has {a} {obj_a} and gives {b} to a friend. How many {objs} does {name} have left?",
        "There are {a} {obj_a} on the table. {name} takes away {b}. How many {objs} are on the table now?",
        "{name} had {a} {obj_a} and lost {b} of them. How many {objs} does {name} have now?",
        "{name} bought {a} {obj_a} and sold {b}. How many {objs} does {name} still have?",
    ),
    "*": (
        "{name} has {a} {bags} with {b} {obj_b} in each. How many {objs} does {name} have in total?",
        "For {a} {days}, {name} collects {b} {obj_b} each day. How many {objs} does {name} collect?",
        "There are {a} {rows} with {b} {obj_b} in each row. How many {objs} are there in all?",
        "{name} fills {a} {boxes} with {b} {obj_b} each. How many {objs} does {name} need?",
    ),
}
# What a product's templates count a of ("{a} {bags}"): singular for a == 1, plural otherwise.
GROUPS = {
    "bags": ("bag", "bags"),
    "days": ("day", "days"),
    "rows": ("row", "rows"),
    "boxes": ("box", "boxes"),
}
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
"""Each op's result: the `answer` column of (a, op, b)."""


class TaskError(UserError, ValueError):
    """A task name, task option or user dataset is invalid."""


@dataclass
class TaskSpec:
    """A registered task: how to build its data and which rewards score it by default."""

    name: str
    """Registry key, e.g. "arithmetic"."""
    build: Callable[..., datasets.Dataset]
    """build(split, num_examples, seed, **options) -> Dataset with a `prompt` column."""
    default_rewards: list[tuple[str, float]] = field(default_factory=list)
    """(reward spec, weight) pairs, specs in rlx.rewards.load_reward form."""
    description: str = ""
    """One line for `rlx tasks` listings."""


def build_arithmetic(
    split: str = "train",
    num_examples: int | None = None,
    seed: int = 0,
    max_operand: int = 20,
    ops: tuple[str, ...] | list[str] = ("+", "-"),
    one_shot: bool = True,
    format_hint: bool = False,
) -> datasets.Dataset:
    """Generate arithmetic word problems: columns `prompt` (chat messages), `answer`, `question`.

    Knobs: operands come from 1..max_operand; `ops` picks from "+", "-" and "*" (subtraction
    results are never negative; products reach max_operand squared); one_shot prepends a worked
    example that shows the tag format; format_hint repeats the tag instruction at the end of the
    question (small models follow the user turn more than the system prompt). The same
    (split, seed, options) always gives the same rows; no question appears in more than one row.
    """
    if split not in DEFAULT_SIZES:
        raise TaskError(f"arithmetic has splits {sorted(DEFAULT_SIZES)}, not {split!r}")
    if isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 1:
        raise TaskError(f"arithmetic: max_operand must be a positive int, got {max_operand!r}")
    ops = tuple(ops)
    if not ops or any(op not in TEMPLATES for op in ops):
        raise TaskError(
            f"arithmetic: ops must be a non-empty subset of {sorted(TEMPLATES)}, got {ops!r}"
        )
    num_examples = DEFAULT_SIZES[split] if num_examples is None else num_examples

    rng = random.Random(f"arithmetic:{split}:{seed}")  # str seeds are stable across processes
    questions: dict[str, int] = {}
    attempts = 0
    while len(questions) < num_examples:
        attempts += 1
        if attempts > 100 * num_examples + 10_000:
            raise TaskError(
                f"arithmetic: only {len(questions)} distinct {split} questions exist for "
                f"max_operand={max_operand}, ops={ops}; ask for fewer or raise max_operand"
            )
        a, op, b = _sample_equation(rng, max_operand, ops)
        if equation_split(a, op, b) == split:
            question = _render_question(rng, a, op, b)
            questions.setdefault(question, APPLY[op](a, b))

    rows = [
        {
            "prompt": arithmetic_prompt(q, one_shot, format_hint),
            "answer": str(result),
            "question": q,
        }
        for q, result in questions.items()
    ]
    return datasets.Dataset.from_list(rows)


def equation_split(a: int, op: str, b: int) -> str:
    """The split that owns equation (a, op, b): a seed-independent hash, so splits never overlap."""
    if (a, op, b) == ONE_SHOT_EQUATION:
        return "train"  # every prompt shows this equation's answer, so it cannot be held out
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def arithmetic_prompt(
    question: str, one_shot: bool = True, format_hint: bool = False
) -> list[dict[str, str]]:
    """Chat messages for one question: system prompt, optional worked example, the question."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    if one_shot:
        messages += [
            {"role": "user", "content": ONE_SHOT_QUESTION},
            {"role": "assistant", "content": ONE_SHOT_ANSWER},
        ]
    messages.append(
        {"role": "user", "content": f"{question} {FORMAT_HINT}" if format_hint else question}
    )
    return messages


def _sample_equation(
    rng: random.Random, max_operand: int, ops: tuple[str, ...]
) -> tuple[int, str, int]:
    """Draw (a, op, b) with operands in 1..max_operand and b <= a for subtraction."""
    op = rng.choice(ops)
    a = rng.randint(1, max_operand)
    b = rng.randint(1, a) if op == "-" else rng.randint(1, max_operand)
    return a, op, b


def _render_question(rng: random.Random, a: int, op: str, b: int) -> str:
    """Fill a random template for this operation with a random name and object."""
    singular, plural = rng.choice(OBJECTS)
    groups = {key: one if a == 1 else many for key, (one, many) in GROUPS.items()}
    return rng.choice(TEMPLATES[op]).format(
        name=rng.choice(NAMES),
        a=a,
        b=b,
        obj_a=singular if a == 1 else plural,
        obj_b=singular if b == 1 else plural,
        objs=plural,
        **groups,
    )


TASKS: dict[str, TaskSpec] = {
    "arithmetic": TaskSpec(
        name="arithmetic",
        build=build_arithmetic,
        # Correctness dominates so that a right answer without tags beats tidy tags on a wrong one;
        # the weights sum to 1 so the total reward lies in [0, 1].
        default_rewards=[
            ("rewards/arithmetic.py:correctness", 0.8),
            ("rewards/arithmetic.py:answer_format", 0.2),
        ],
        description="One-step addition/subtraction (or multiplication) word problems, answer in "
        "<answer> tags.",
    ),
}


def load_task_dataset(
    name_or_path: str,
    split: str = "train",
    num_examples: int | None = None,
    seed: int = 0,
    **options: Any,
) -> datasets.Dataset:
    """Build a registered task's split, or load user data from a file or saved-dataset folder.

    For user data, `split` picks a split of a saved DatasetDict; a single file or Dataset only has
    "train", so asking it for another split is an error rather than silently reusing training rows.
    `num_examples` keeps the first rows; `seed` and `options` apply to registered tasks only.
    """
    if num_examples is not None and (isinstance(num_examples, bool) or num_examples < 1):
        raise TaskError(f"num_examples must be a positive int or None, got {num_examples!r}")
    if name_or_path in TASKS:
        spec = TASKS[name_or_path]
        try:
            inspect.signature(spec.build).bind(split, num_examples, seed, **options)
        except TypeError as err:
            raise TaskError(f"task {spec.name!r} does not accept these options: {err}") from err
        return spec.build(split, num_examples, seed, **options)
    if not Path(name_or_path).exists():
        raise TaskError(
            f"{name_or_path!r} is neither a registered task ({', '.join(sorted(TASKS))}) "
            "nor an existing file or folder"
        )
    if options:
        raise TaskError(f"options {sorted(options)} only apply to registered tasks, not to files")
    dataset = load_dataset_from_path(name_or_path, split=split)
    if num_examples is None:
        return dataset
    if num_examples > len(dataset):
        raise TaskError(f"{name_or_path}: asked for {num_examples} rows but it has {len(dataset)}")
    return dataset.select(range(num_examples))


def load_dataset_from_path(path: str | Path, split: str | None = None) -> datasets.Dataset:
    """Load prompts from .jsonl/.json/.parquet or a save_to_disk folder and validate `prompt`.

    A DatasetDict folder needs `split`. For single-split data, split must be None or "train".
    Every other column is kept, so reward functions receive it as a keyword argument.
    """
    path = Path(path)
    if not path.exists():
        raise TaskError(f"{path}: no such file or folder")
    if path.is_dir():
        dataset = _load_saved_folder(path, split)
    else:
        if split not in (None, "train"):
            raise TaskError(f"{path}: a single file has no {split!r} split; pass a separate file")
        dataset = _load_file(path)
    validate_prompts(dataset, str(path))
    return dataset


def validate_prompts(dataset: datasets.Dataset, source: str) -> None:
    """Check that `prompt` exists and every row is a non-empty string or a list of chat messages."""
    if "prompt" not in dataset.column_names:
        raise TaskError(f"{source}: no 'prompt' column; it has columns {dataset.column_names}")
    if len(dataset) == 0:
        raise TaskError(f"{source}: has no rows")
    for index, prompt in enumerate(dataset["prompt"]):
        if not _is_valid_prompt(prompt):
            raise TaskError(
                f"{source}: row {index}: prompt must be a non-empty string or a non-empty list of "
                f"{{'role': str, 'content': str}} messages, got {str(prompt)[:80]!r}"
            )


def _is_valid_prompt(prompt: Any) -> bool:
    """A non-empty string, or a non-empty list of messages with string role and content."""
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in prompt
        )
    )


def _load_file(path: Path) -> datasets.Dataset:
    """Read one .jsonl/.json/.parquet file, turning reader failures into TaskError."""
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": datasets.Dataset.from_json,
        ".json": datasets.Dataset.from_json,
        ".parquet": datasets.Dataset.from_parquet,
    }
    if suffix not in readers:
        raise TaskError(f"{path}: unsupported extension {suffix!r}; use .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        raise TaskError(f"{path}: file is empty")  # the JSON reader fails with a bare StopIteration
    try:
        return readers[suffix](str(path))
    except Exception as err:
        raise TaskError(
            f"{path}: could not be read as {suffix[1:]}: {type(err).__name__}: {err}"
        ) from err


def _load_saved_folder(path: Path, split: str | None) -> datasets.Dataset:
    """Load a Dataset or DatasetDict written by save_to_disk, picking `split` from a DatasetDict."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise TaskError(f"{path}: not a folder written by Dataset.save_to_disk ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise TaskError(
                f"{path}: holds splits {sorted(loaded)}; choose one with split=, got {split!r}"
            )
        return loaded[split]
    if split not in (None, "train"):
        raise TaskError(
            f"{path}: holds a single dataset, no {split!r} split; pass a separate folder"
        )
    return loaded
