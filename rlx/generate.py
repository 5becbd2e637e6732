"""`rlx generate`: sample completions for a task's prompts, score them, summarise, save.

This is the rollout + reward half of every learner, run once: it gives the baseline reward of a
model on a task before any training. Outputs in `output_dir`: completions.jsonl (one row per
completion, with token ids, sampler logprobs and every reward), summary.json and config.yaml.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rlx.atomic import atomic_write_json, atomic_write_jsonl
from rlx.config import GenerateConfig, save_config
from rlx.rewards import RewardFunction, RewardScores, load_reward_functions, score_completions
from rlx.rollout import Completion, Sampling, make_engine
from rlx.tasks import TASKS, TaskError, load_task_dataset


def task_reward_functions(cfg: GenerateConfig) -> list[RewardFunction]:
    """The configured rewards, or the task's defaults when none are configured."""
    if cfg.rewards:
        return load_reward_functions([(r.func, r.weight) for r in cfg.rewards])
    if cfg.task.name in TASKS:
        return load_reward_functions(TASKS[cfg.task.name].default_rewards)
    raise TaskError(
        f"{cfg.task.name} is user data with no default rewards: name them, e.g. "
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


def summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("reward (weighted total)", f"{summary['reward_mean']:.3f}")
    for name, value in summary["rewards"].items():
        table.add_row(f"  {name}", f"{value:.3f}")
    table.add_row("reward best-of-n", f"{summary['reward_best_of_n']:.3f}")
    table.add_row("prompts x samples", f"{summary['num_prompts']} x "
                  f"{summary['num_completions'] // max(summary['num_prompts'], 1)}")  # fmt: skip
    table.add_row("completion tokens (mean)", f"{summary['completion_tokens_mean']:.1f}")
    table.add_row("stopped (eos / stop string)", f"{summary['stopped_fraction']:.2f}")
    table.add_row("generation", f"{summary['generate_seconds']:.1f} s, "
                  f"{summary['tokens_per_second']:.0f} tok/s")  # fmt: skip
    return table


def run_generate(cfg: GenerateConfig, console: Console | None = None) -> dict:
    """Generate, score, print the summary table and write the outputs; return the summary."""
    console = console or Console()
    dataset = load_task_dataset(
        cfg.task.name, cfg.task.split, cfg.task.num_prompts, cfg.task.seed, **cfg.task.options
    )
    reward_fns = task_reward_functions(cfg)  # fail on a bad reward before starting the engine
    engine = make_engine(cfg.rollout.backend, cfg.model.name, cfg.rollout)
    try:
        start = time.perf_counter()
        with console.status(f"generating {len(dataset)} x {cfg.rollout.num_samples} completions"):
            completions = engine.generate(dataset["prompt"], Sampling.from_config(cfg.rollout))
        seconds = time.perf_counter() - start
    finally:
        engine.close()
    scores = score_rollout(dataset, completions, reward_fns)
    summary = summarize(completions, scores, seconds)

    out = Path(cfg.output_dir)
    rows = []
    for i, c in enumerate(completions):
        rewards = {
            n: _finite_or_none(v) for n, v in zip(scores.names, scores.per_function[i], strict=True)
        }
        rows.append({"prompt_index": c.prompt_index, "completion": c.text,
                     "reward": _finite_or_none(scores.total[i]), "rewards": rewards,
                     "finish_reason": c.finish_reason, "token_ids": c.token_ids,
                     "logprobs": c.logprobs})  # fmt: skip
    atomic_write_jsonl(out / "completions.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    save_config(cfg, str(out / "config.yaml"))

    title = f"{cfg.model.name} on {cfg.task.name} ({cfg.task.split}), {cfg.rollout.backend}"
    console.print(summary_table(summary, title))
    for row in rows[: cfg.show_examples]:
        console.print(f"[dim]example (reward {row['reward']}):[/dim] {row['completion']!r}")
    console.print(f"wrote {out / 'completions.jsonl'} and {out / 'summary.json'}")
    return summary


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
