"""`rlx generate`: sample completions for a task's prompts, score them, summarise, save.

    rlx generate --config recipes/generate_demo.yaml rollout.num_samples=8
    rlx generate model.name=runs/grpo/final task.split=test rollout.backend=hf
    rlx generate --show-config

This is the rollout + reward half of every learner, run once: it gives the baseline reward of a
model on a task before any training. Outputs in `output_dir`: completions.jsonl (one row per
completion, with token ids, sampler logprobs and every reward), summary.json and config.yaml.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlx.atomic import atomic_write_json, atomic_write_jsonl
from rlx.cli.options import add_config_arguments, read_config, show_config
from rlx.config import GenerateConfig, save_config


def add_parser(commands) -> None:
    p = commands.add_parser(
        "generate",
        help="sample and score completions for a task",
        description="Overrides are key.sub=value, e.g. rollout.backend=hf task.num_prompts=16",
    )
    add_config_arguments(p, "YAML file with GenerateConfig keys")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.show_config:
        return show_config(GenerateConfig)
    run_generate(read_config(args, GenerateConfig))
    return 0


def summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("reward (weighted total)", f"{summary['reward_mean']:.3f}")
    for name, value in summary["rewards"].items():
        table.add_row(f"  {name}", f"{value:.3f}")
    table.add_row("reward best-of-n", f"{summary['reward_best_of_n']:.3f}")
    per_prompt = summary["num_completions"] // max(summary["num_prompts"], 1)
    table.add_row("prompts x samples", f"{summary['num_prompts']} x {per_prompt}")
    table.add_row("completion tokens (mean)", f"{summary['completion_tokens_mean']:.1f}")
    table.add_row("stopped (eos / stop string)", f"{summary['stopped_fraction']:.2f}")
    table.add_row(
        "generation",
        f"{summary['generate_seconds']:.1f} s, {summary['tokens_per_second']:.0f} tok/s",
    )
    return table


def run_generate(cfg: GenerateConfig, console: Console | None = None) -> dict:
    """Generate, score, print the summary table and write the outputs; return the summary."""
    # deferred: torch, datasets and the rollout engines load only when the command runs
    from rlx.evaluation import summarize
    from rlx.rewards import resolve_rewards, score_rollout
    from rlx.rollout import Sampling, make_engine
    from rlx.tasks import load_task_dataset

    console = console or Console()
    dataset = load_task_dataset(
        cfg.task.name, cfg.task.split, cfg.task.num_prompts, cfg.task.seed, **cfg.task.options
    )
    reward_fns = resolve_rewards(
        cfg.task.name, cfg.rewards
    )  # fail on a bad reward before starting the engine
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
        rows.append(
            {
                "prompt_index": c.prompt_index,
                "completion": c.text,
                "reward": _finite_or_none(scores.total[i]),
                "rewards": rewards,
                "finish_reason": c.finish_reason,
                "token_ids": c.token_ids,
                "logprobs": c.logprobs,
            }
        )
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
