"""Training prompts for the loops: loading with a prompt-length check, and each step's prompts.

The order is a pure function of (seed, step), so a resumed run reads exactly the prompts an
uninterrupted run would have, with no data-loader state to save.
"""

from __future__ import annotations

import numpy as np

from rlx.config import ConfigError
from rlx.rollout import encode_prompts
from rlx.tasks import load_task_dataset


def load_prompts(
    task_cfg, split: str, num: int | None, tokenizer, max_tokens: int, long_prompts: str
):
    """A split of the task; prompts over `max_tokens` raise (long_prompts="error") or are dropped."""
    data = load_task_dataset(task_cfg.name, split, num, task_cfg.seed, **task_cfg.options)
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
