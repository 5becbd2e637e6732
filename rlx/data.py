"""Training prompts for the loops: loading with a prompt-length check, and each step's prompts.

The order is a pure function of (seed, step), so a resumed run reads exactly the prompts an
uninterrupted run would have, with no data-loader state to save.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlx.config import ConfigError
from rlx.rollout import encode_prompts
from rlx.tasks import TASKS, load_task_dataset


def load_prompts(
    task_cfg, split: str, num: int | None, tokenizer, max_tokens: int, long_prompts: str
):
    """A split of the task; prompts over `max_tokens` raise (long_prompts="error") or are dropped."""
    data = load_task_dataset(task_cfg.name, split, num, task_cfg.seed, **task_cfg.options)
    return _check_lengths(data, split, tokenizer, max_tokens, long_prompts)


def load_held_out(cfg, tokenizer):
    """The held-out prompts of a training run (`cfg`: a RunConfig): the task's `eval.split` split,
    or the prompts of `eval.data` (a file, or that split of a saved DatasetDict folder). At most
    `eval.num_prompts` of them; None when the evaluation is off."""
    held_out = cfg.eval
    if not held_out.enabled:
        return None
    if held_out.data is None:
        task = cfg.task
        # a built-in task builds exactly num_prompts; user data has as many rows as it has
        num = held_out.num_prompts if task.name in TASKS else None
        data = load_task_dataset(task.name, held_out.split, num, task.seed, **task.options)
    else:
        source = Path(held_out.data)
        saved_dict = (source / "dataset_dict.json").is_file()  # a DatasetDict folder has splits
        data = load_task_dataset(held_out.data, held_out.split if saved_dict else None)
    data = data.select(range(min(held_out.num_prompts, len(data))))
    return _check_lengths(data, "held-out", tokenizer, cfg.max_prompt_tokens, cfg.long_prompts)


def _check_lengths(data, split: str, tokenizer, max_tokens: int, long_prompts: str):
    lengths = [len(ids) for ids in encode_prompts(tokenizer, data["prompt"])]
    long_rows = [i for i, n in enumerate(lengths) if n > max_tokens]
    if not long_rows:
        return data
    if long_prompts == "error":
        raise ConfigError(
            f"{len(long_rows)} {split} prompt(s) exceed max_prompt_tokens={max_tokens} "
            f"(longest {max(lengths)} tokens, first at row {long_rows[0]}): raise max_prompt_tokens "
            "or set long_prompts=skip"
        )
    print(f"skipping {len(long_rows)} {split} prompts longer than {max_tokens} tokens")
    dropped = set(long_rows)
    return data.select([i for i in range(len(data)) if i not in dropped])


def step_prompt_indices(step: int, per_step: int, dataset_size: int, seed: int) -> list[int]:
    """The step's prompts: consecutive slices of a per-epoch shuffled order."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, dataset_size)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(dataset_size)[offset]))
    return out
