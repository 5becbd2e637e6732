"""Plumbing shared by the training loops in recipes/ (pg.py, es.py): the command line, and the end
of a run (final model, held-out evaluation, report, shutdown)."""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlx.checkpoint import save_final_model
from rlx.config import ConfigError, describe, load_config
from rlx.errors import report_user_errors
from rlx.evaluation import evaluate
from rlx.metrics import plot_reward_curves
from rlx.reporting import print_eval_table, write_eval


def run_recipe(
    config_cls: type,
    train: Callable[[Any], Any],
    argv: list[str] | None,
    description: str,
    prog: str,
) -> int:
    """`--config file.yaml key.sub=value ...` -> config -> train(cfg). A user error (bad config,
    data, reward, model, checkpoint) prints one line and returns 2 (rlx/errors.py)."""
    parser = argparse.ArgumentParser(prog=prog, description=description.split("\n")[0])
    parser.add_argument("--config", help=f"YAML recipe ({config_cls.__name__} keys)")
    parser.add_argument("--show-config", action="store_true", help="list every knob and exit")
    parser.add_argument("--debug", action="store_true", help="tracebacks for user errors too")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    if args.show_config:
        print(describe(config_cls))
        return 0

    def run() -> None:
        train(load_config(config_cls, args.config, args.overrides))

    return report_user_errors(prog, run, debug=args.debug)


class RunClock:
    """The wall-time limits of a run, the same decision on every process.

    `max_minutes` bounds the training loop. `max_run_minutes` bounds the whole run, start-up and
    the final held-out evaluation included: training stops before the step that would leave too
    little time for that evaluation, which is expected to take as long as the first one did.
    """

    MARGIN_S = 15.0  # saving the final model and plotting, after the last evaluation

    def __init__(self, max_minutes: float, max_run_minutes: float):
        import psutil

        self.max_minutes, self.max_run_minutes = max_minutes, max_run_minutes
        # the run began when this process did: imports and set-up count too
        process_age = max(time.time() - psutil.Process().create_time(), 0.0)
        self.run_began = time.perf_counter() - process_age
        self.train_began = self.run_began
        self.final_eval_s = 0.0

    def start_training(self, eval_seconds: float = 0.0) -> None:
        """Training starts now; the final evaluation will take about `eval_seconds`."""
        self.train_began = time.perf_counter()
        self.final_eval_s = eval_seconds

    def out_of_time(self, last_step_s: float, accelerator=None) -> str | None:
        """Why training must stop now (None: go on), judged before another step like the last."""
        now = time.perf_counter()
        reason = None
        if self.max_minutes and (now - self.train_began) / 60 >= self.max_minutes:
            reason = f"max_minutes={self.max_minutes} reached"
        elif self.max_run_minutes:
            needed = last_step_s + 1.1 * self.final_eval_s + self.MARGIN_S
            if now - self.run_began + needed > 60 * self.max_run_minutes:
                reason = (
                    f"max_run_minutes={self.max_run_minutes}: another step and the final "
                    f"evaluation (about {self.final_eval_s:.0f} s) would not fit"
                )
        if accelerator is not None and accelerator.num_processes > 1:  # main decides for all
            flag = torch.tensor([1.0 if reason else 0.0], device=accelerator.device)
            if accelerator.reduce(flag, reduction="max").item() and reason is None:
                reason = "another process ran out of time"
        return reason


RUN_OUTPUTS = (
    "metrics.jsonl",
    "eval.json",
    "config.yaml",
    "reward_curves.png",
    "checkpoints",
    "final",
)
"""What a run writes into output_dir (besides tracker logs)."""


def prepare_output_dir(cfg, accelerator) -> Path:
    """Check `output_dir` before anything is written to it, on every process. It must be a folder;
    a new run (no resume_from) refuses one that already holds a run, unless overwrite_output_dir
    is set, in which case the main process removes that run's outputs first."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file, not a folder; choose another output_dir")
    held = [name for name in ("metrics.jsonl", "checkpoints") if (out / name).exists()]
    if held and not cfg.resume_from:
        if not cfg.overwrite_output_dir:
            raise ConfigError(
                f"output_dir={out} already holds a run ({', '.join(held)}): continue it with "
                "resume_from=latest, start over with overwrite_output_dir=true, or choose "
                "another output_dir"
            )
        accelerator.wait_for_everyone()  # every rank has checked before the main one removes
        if accelerator.is_main_process:
            for name in RUN_OUTPUTS:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return out


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
