"""Plumbing shared by the training loops in recipes/ (pg.py, es.py): the command line, and the end
of a run (final model, held-out evaluation, report, shutdown)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlx.checkpoint import save_final_model
from rlx.config import ConfigError, describe, load_config
from rlx.evaluation import evaluate
from rlx.metrics import plot_reward_curves
from rlx.reporting import print_eval_table, write_eval


def run_recipe(config_cls: type, train: Callable[[Any], Any], argv: list[str] | None,
               description: str, prog: str) -> int:  # fmt: skip
    """`--config file.yaml key.sub=value ...` -> config -> train(cfg). Exit status 2 on a bad config."""
    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    parser.add_argument("--config", help=f"YAML recipe ({config_cls.__name__} keys)")
    parser.add_argument("--show-config", action="store_true", help="list every knob and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    if args.show_config:
        print(describe(config_cls))
        return 0
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


def finish_run(cfg, out: Path, model, tokenizer, engine, eval_data, reward_fns, results: dict,
               began: float, steps: int, title: str) -> dict:  # fmt: skip
    """Main process only: the trained model as a plain HF folder (out/final), the held-out "after"
    evaluation into eval.json and a before/after table, and the reward-curve plot."""
    print(f"final model: {save_final_model(model, tokenizer, out / 'final')}")
    if eval_data is not None:
        results["after"] = evaluate(
            engine, eval_data, reward_fns, cfg.eval.max_new_tokens, cfg.rollout.stop
        )
        results["train_minutes"] = (time.perf_counter() - began) / 60
        results["steps"] = steps
        write_eval(out / "eval.json", results)
        print_eval_table(results, title)
    if (out / "metrics.jsonl").exists():
        print(
            f"reward curves: {plot_reward_curves(out / 'metrics.jsonl', out / 'reward_curves.png')}"
        )
    return results


def shutdown(accelerator) -> None:
    """End the trackers and the process group (without the latter, gloo aborts the process at exit)."""
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
