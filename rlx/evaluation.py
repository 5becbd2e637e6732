"""Scoring rollouts and held-out evaluation, shared by `rlx generate`, the learners and `rlx eval`.

`evaluate` is the held-out measurement every learner reports before and after training: greedy
decoding (one completion per prompt) on the task's test split, scored with the task's rewards.
"""

from __future__ import annotations

import math
import time

import numpy as np

from rlx.rewards import (
    RewardError,
    RewardFunction,
    RewardScores,
    load_reward_functions,
    score_completions,
)
from rlx.rollout import Completion, RolloutEngine, Sampling
from rlx.tasks import TASKS, TaskError

ACCURACY_REWARD = "correctness"
"""The reward whose mean is reported as accuracy, when a task has one."""


def resolve_rewards(task_name: str, reward_cfgs) -> list[RewardFunction]:
    """The configured rewards (rlx.config.RewardConfig list), else the task's default rewards."""
    if reward_cfgs:
        weights = [r.weight for r in reward_cfgs]
        if not sum(weights) > 0:
            raise RewardError(
                f"reward weights {weights} sum to {sum(weights)}: they must sum to a positive "
                "number (give the rewards you want to raise positive weights)"
            )
        return load_reward_functions([(r.func, r.weight) for r in reward_cfgs])
    if task_name in TASKS:
        return load_reward_functions(TASKS[task_name].default_rewards)
    raise TaskError(
        f"{task_name} is user data with no default rewards: name them, e.g. "
        "rewards='[{func: rewards/arithmetic.py:correctness, weight: 1.0}]'"
    )


def score_rollout(dataset, completions: list[Completion], reward_fns) -> RewardScores:
    """Score completions, passing each completion its prompt and its row's dataset columns."""
    rows = [c.prompt_index for c in completions]
    columns = {
        name: [dataset[name][i] for i in rows] for name in dataset.column_names if name != "prompt"
    }
    prompts = [dataset["prompt"][i] for i in rows]
    return score_completions(
        reward_fns,
        prompts=prompts,
        completions=[c.text for c in completions],
        columns=columns,
        completion_ids=[c.token_ids for c in completions],
    )


def summarize(completions: list[Completion], scores: RewardScores, seconds: float) -> dict:
    """Mean of each reward over the samples it applies to, total reward, best-of-n, lengths."""
    lengths = np.array([len(c.token_ids) for c in completions])
    total = scores.total
    prompt_ids = np.array([c.prompt_index for c in completions])
    best = [np.nanmax(total[prompt_ids == p]) for p in np.unique(prompt_ids)]
    per_fn = {}
    for k, name in enumerate(scores.names):
        column = scores.per_function[:, k]
        applicable = ~np.isnan(column)
        per_fn[name] = float(column[applicable].mean()) if applicable.any() else math.nan
    return {
        "num_prompts": len(best),
        "num_completions": len(completions),
        "reward_mean": float(np.nanmean(total)),
        "reward_std": float(np.nanstd(total)),
        "reward_best_of_n": float(np.mean(best)),
        "rewards": per_fn,
        "completion_tokens_mean": float(lengths.mean()),
        "stopped_fraction": float(np.mean([c.finish_reason == "stop" for c in completions])),
        "generate_seconds": seconds,
        "tokens_per_second": float(lengths.sum() / seconds),
    }


def evaluate(
    engine: RolloutEngine,
    dataset,
    reward_fns: list[RewardFunction],
    max_new_tokens: int,
    stop: list[str],
) -> dict:
    """Greedy held-out evaluation: summary metrics plus `accuracy` (mean correctness, if scored)."""
    sampling = Sampling(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop))
    start = time.perf_counter()
    completions = engine.generate(dataset["prompt"], sampling)
    scores = score_rollout(dataset, completions, reward_fns)
    metrics = summarize(completions, scores, time.perf_counter() - start)
    metrics["accuracy"] = metrics["rewards"].get(ACCURACY_REWARD, math.nan)
    return metrics
