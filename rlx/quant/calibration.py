"""Calibration text for quantisation: a task's prompts with worked answers, packed into blocks.

Each row becomes chat-templated prompt + completion + EOS. The completion is the row's
`completion` column when there is one; for the built-in arithmetic task it is a worked answer in
the one-shot format (`arithmetic_completion`); otherwise the prompt alone. Rows are concatenated
and cut into `num_sequences` blocks of `seq_len` tokens (AWQ packs its calibration text the same
way), so no padding or attention mask is needed. The paper uses 128 x 512 tokens; the CPU default
here is 8 x 256 (see `rlx.config.CalibrationConfig`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rlx.quant.checks import QuantError
from rlx.rollout.base import encode_prompts
from rlx.tasks import TASKS, TaskError, load_task_dataset


def check_calibration_source(source: str) -> None:
    """QuantError unless `source` is a registered task or an existing file / folder."""
    if source in TASKS:
        return
    if not Path(source).exists():
        raise QuantError(
            f"calibration source {source!r} is neither a registered task "
            f"({', '.join(sorted(TASKS))}) nor an existing file or folder"
        )


def arithmetic_completion(question: str, answer: str) -> str:
    """The worked answer the arithmetic one-shot example shows: "... so a + b = c.\\n<answer>c</answer>"."""
    a, b = (int(n) for n in re.findall(r"\d+", question)[:2])
    op = "+" if a + b == int(answer) else "-"
    return f"We need {a} {op} {b}, so {a} {op} {b} = {answer}.\n<answer>{answer}</answer>"


def calibration_texts(dataset, source: str) -> list[str | None]:
    """The completion appended to each row's prompt (None: prompt only)."""
    if "completion" in dataset.column_names:
        return list(dataset["completion"])
    if source == "arithmetic":
        return [
            arithmetic_completion(q, a)
            for q, a in zip(dataset["question"], dataset["answer"], strict=True)
        ]
    return [None] * len(dataset)


def encode_examples(tokenizer, dataset, source: str) -> list[list[int]]:
    """Token ids of prompt + completion + EOS for every row."""
    prompts = encode_prompts(tokenizer, dataset["prompt"])
    out = []
    for ids, completion in zip(prompts, calibration_texts(dataset, source), strict=True):
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        out.append(list(ids) + tail + [tokenizer.eos_token_id])
    return out


def calibration_blocks(
    tokenizer,
    source: str,
    num_sequences: int,
    seq_len: int,
    split: str = "train",
    seed: int = 0,
    options: dict | None = None,
) -> torch.Tensor:
    """Token blocks [num_sequences, seq_len] packed from the calibration source's rows
    (`options`: a registered task's options, as in `rlx.tasks.load_task_dataset`)."""
    check_calibration_source(source)
    need = num_sequences * seq_len
    try:
        dataset = load_task_dataset(source, split=split, seed=seed, **(options or {}))
    except TaskError as err:
        raise QuantError(f"calibration source {source!r}: {err}") from err
    stream: list[int] = []
    for ids in encode_examples(tokenizer, dataset, source):
        stream.extend(ids)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise QuantError(
            f"calibration source {source!r} ({split}) has {len(stream)} tokens; "
            f"{num_sequences} x {seq_len} = {need} needed: lower calib.num_sequences (or "
            "tune.num_sequences, when tuning) or calib.seq_len"
        )
    return torch.tensor(stream[:need]).view(num_sequences, seq_len)
