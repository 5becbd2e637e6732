"""Held-out evaluation and rollout summaries, shared by `rlx generate`, the learners and `rlx eval`.

`evaluate` is the held-out measurement every learner reports before and after training: greedy
decoding (one completion per prompt) on the task's test split, scored with the task's rewards.
"""

from __future__ import annotations

import math
import time

import numpy as np

from rlx.rewards import RewardFunction, RewardScores, score_rollout
from rlx.rollout import Completion, RolloutEngine, Sampling

ACCURACY_REWARD = "correctness"
"""The reward whose mean is reported as accuracy, when a task has one."""


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
