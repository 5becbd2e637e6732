"""The skeleton both training loops (recipes/pg.py, recipes/es.py) share.

    run_recipe   the command line: config -> train(cfg), user errors as one line (exit status 2)
    Run          one run on every process: the Accelerator, output_dir, resume, metrics, the
                 before/after evaluation, skipped steps, checkpoints and the time limits
    RunClock     the wall-time limits (max_minutes, max_run_minutes)

A loop builds its models and engine, then: `run.resume(...)`, `run.start(...)`, per step
`run.score(...)` (None: the step was skipped), one `run.log_step(...)` or `run.skip(...)` and
`run.end_step(...)` after it, `run.finish(...)`. `load_data` and `StepClock` serve both loops.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from rlx import distributed, sharding
from rlx.atomic import atomic_write_text
from rlx.checkpoint import (
    checkpoint,
    find_checkpoint,
    load_checkpoint,
    load_loop_tensors,
    save_final_model,
)
from rlx.config import ConfigError, describe, load_config, save_config, to_dict
from rlx.data import load_held_out, load_prompts
from rlx.errors import report_user_errors
from rlx.evaluation import evaluate
from rlx.metrics import MetricsLog, plot_reward_curves, plot_weighting, truncate_metrics
from rlx.policy import export_weights
from rlx.reporting import print_eval_table, read_eval, write_eval
from rlx.rewards import RewardError, resolve_rewards, score_rollout

CRASH_AFTER_CHECKPOINT = "RLX_TEST_CRASH_AFTER_CHECKPOINT"
"""Tests only: a step number; every process SIGKILLs itself right after that step's checkpoint."""


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


class Run:
    """One training run, on every process. `step` is the number of steps done."""

    def __init__(self, cfg, nan_on_skip: tuple[str, ...] = ()):
        """`nan_on_skip`: the loop's metrics a skipped step logs as NaN, beside reward_mean and
        step_time_s."""
        from accelerate import Accelerator  # deferred: a second to import; --help answers first

        self.cfg = cfg
        self.clock = RunClock(cfg.max_minutes, cfg.max_run_minutes)
        # DDP over gloo on CPU, or DeepSpeed when launched with a launch/*zero*.yaml config
        self.accelerator = Accelerator(
            log_with=list(cfg.log_with) or None,
            project_dir=cfg.output_dir,
            **sharding.accelerator_kwargs(),
        )
        self.out = prepare_output_dir(cfg, self.accelerator)
        self._run_id = read_run_id(self.out, bool(cfg.resume_from), self.accelerator)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.main = self.accelerator.is_main_process
        self.nan_on_skip = ("reward_mean", "step_time_s", *nan_on_skip)
        self.step, self.results, self.log, self.bar, self.began = 0, {}, None, None, 0.0
        self.resumed_state: dict = {}  # state.json of the checkpoint resumed from
        self.resumed_tensors: dict = {}  # and the loop's tensor state saved with it
        torch.manual_seed(cfg.seed)

    @property
    def run_id(self) -> str:
        """This run's id, the same on every rank and after a resume (output_dir/run_id): rollout
        servers label the weights they serve with it (rlx/rollout/server.py)."""
        return self._run_id

    def resume(self, model, optimizer, scheduler) -> int:
        """With resume_from: restore the checkpoint into these and drop the metrics rows after
        it. Returns the step to start from (0 for a new run)."""
        if not self.cfg.resume_from:
            return 0
        ckpt = find_checkpoint(self.out, self.cfg.resume_from)
        self.resumed_state = load_checkpoint(ckpt, model, optimizer, scheduler, self.rank)
        self.resumed_tensors = load_loop_tensors(ckpt)
        self.step = self.resumed_state["step"]
        if self.main:
            truncate_metrics(self.out / "metrics.jsonl", self.step)
            print(f"resumed from {ckpt} at step {self.step}")
        return self.step

    def start(self, engine, eval_data, reward_fns) -> None:
        """Write config.yaml, open metrics.jsonl and the trackers, evaluate the held-out prompts
        before training (a resumed run keeps its first evaluation), start the clock."""
        cfg = self.cfg
        if self.main:
            save_config(cfg, str(self.out / "config.yaml"))
            self.log = MetricsLog(self.out / "metrics.jsonl", self.accelerator)
        self.accelerator.init_trackers("rlx", config={k: str(v) for k, v in to_dict(cfg).items()})
        self.results = read_eval(self.out / "eval.json") if self.step else {}
        if eval_data is not None and self.main and "before" not in self.results:
            stop = cfg.rollout.stop
            before = evaluate(engine, eval_data, reward_fns, cfg.eval.max_new_tokens, stop)
            self.results["before"] = before
            write_eval(self.out / "eval.json", self.results)
        self.began = time.perf_counter()
        self.clock.start_training(self.results.get("before", {}).get("generate_seconds", 0.0))
        self.bar = tqdm(total=cfg.steps, initial=self.step, desc="training", disable=not self.main)

    def score(self, rows, completions, reward_fns):
        """This rank's rewards of the step (rlx.rewards.score_rollout), or None when the step is
        skipped because a reward function failed on any rank (bad_steps=skip; every rank agrees
        before any acts); bad_steps=error raises on every rank."""
        failure = scores = None
        try:
            scores = score_rollout(rows, completions, reward_fns)
        except RewardError as err:
            failure = err
        if not distributed.agree(failure is not None):
            return scores
        if self.cfg.bad_steps == "error":
            raise failure or RewardError("a reward function failed on another process")
        self.skip(f"reward function failed: {failure or 'on another process'}")
        return None

    def skip(self, reason: str) -> None:
        """bad_steps=skip: log this step as skipped (one metrics row and one line on stderr, from
        the main process) and count it done. Every rank calls it for the same step: the decision
        is agreed first (rlx.distributed.agree)."""
        self.step += 1
        if self.main:
            row = {"step": self.step, "skipped": reason}
            self.log.log(row | {k: math.nan for k in self.nan_on_skip})
            self.bar.update(1)
            print(f"step {self.step} skipped: {reason}", file=sys.stderr)

    def log_step(self, row: dict, **postfix: float) -> None:
        """Main process: one metrics.jsonl row for the step just done, and the progress bar."""
        if self.main:
            self.log.log(row)
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()})

    def end_step(
        self,
        step_seconds: float,
        model,
        optimizer,
        scheduler,
        extra: dict | None = None,
        tensors: Callable[[], dict] | None = None,
    ) -> bool:
        """After a step: checkpoint when due (save_every, the last step, out of time), with the
        loop's `extra` state (JSON) in state.json and the tensor state `tensors()` returns (called
        only when a checkpoint is written) beside it. True when training must stop now because
        another step would not fit the time limits."""
        cfg = self.cfg
        out_of_time = self.clock.out_of_time(step_seconds)
        due = cfg.save_every and self.step % cfg.save_every == 0
        if due or self.step == cfg.steps or out_of_time:
            args = (self.accelerator, self.out, self.step, model, optimizer, scheduler, cfg)
            checkpoint(*args, extra=extra, tensors=tensors() if tensors else None)
            if os.environ.get(CRASH_AFTER_CHECKPOINT) == str(self.step):
                os.kill(os.getpid(), signal.SIGKILL)  # the resume tests' crash, at a known point
        if out_of_time and self.main:
            print(f"stopping after {self.step} steps: {out_of_time}")
        return bool(out_of_time)

    def finish(self, model, tokenizer, engine, eval_data, reward_fns, title: str) -> dict:
        """Main process: the trained model as a plain HF folder (out/final, LoRA merged), the
        held-out evaluation after training into eval.json with a before/after table, and the
        reward-curve plot. Returns eval.json's content."""
        self.bar.close()
        state = None
        if sharding.zero_stage(self.accelerator) == 3:  # a gather: every rank iterates
            state = {}
            for chunk in sharding.weight_chunks(model, export_weights):
                state.update(chunk if self.main else {})
        if not self.main:
            return self.results
        cfg, out, results = self.cfg, self.out, self.results
        print(f"final model: {save_final_model(model, tokenizer, out / 'final', state)}")
        if eval_data is not None:
            stop = cfg.rollout.stop
            results["after"] = evaluate(
                engine, eval_data, reward_fns, cfg.eval.max_new_tokens, stop
            )
            results["train_minutes"] = (time.perf_counter() - self.began) / 60
            results["steps"] = self.step
            write_eval(out / "eval.json", results)
            print_eval_table(results, title)
        if (out / "metrics.jsonl").exists():
            plot = plot_reward_curves(out / "metrics.jsonl", out / "reward_curves.png")
            print(f"reward curves: {plot}")
            weighting = plot_weighting(out / "metrics.jsonl", out / "weighting.png")
            if weighting is not None:
                print(f"reward weighting: {weighting}")
        return results

    def close(self) -> None:
        shutdown(self.accelerator)


def load_data(cfg, tokenizer):
    """A run's training prompts, its held-out ones (None without eval) and its reward functions."""
    task = cfg.task
    train_data = load_prompts(
        task, task.split, task.num_prompts, tokenizer, cfg.max_prompt_tokens, cfg.long_prompts
    )
    return train_data, load_held_out(cfg, tokenizer), resolve_rewards(task.name, cfg.rewards)


class StepClock:
    """Wall time of a step's stages: lap(name) closes the stage that ran since the last lap."""

    def __init__(self):
        self.began = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self.last = now - self.last, now

    def total(self) -> float:
        return time.perf_counter() - self.began


class RunClock:
    """The wall-time limits of a run, the same decision on every process.

    `max_minutes` bounds the training loop. `max_run_minutes` bounds the whole run, start-up and
    the final held-out evaluation included: training stops before the step that would leave too
    little time for that evaluation, which is expected to take as long as the first one did.
    """

    MARGIN_S = 15.0  # saving the final model and plotting, after the last evaluation

    def __init__(self, max_minutes: float, max_run_minutes: float):
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

    def out_of_time(self, last_step_s: float) -> str | None:
        """Why training must stop now (None: go on), judged before another step like the last;
        when any rank must stop, every rank stops."""
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
        if distributed.agree(reason is not None) and reason is None:
            reason = "another process ran out of time"
        return reason


RUN_OUTPUTS = (
    "run_id",
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


def read_run_id(out: Path, resuming: bool, accelerator) -> str:
    """The run's id: a resumed run's is read back from `out`/run_id; a new run writes a fresh one
    there (the main process, atomically; the others read it after a barrier)."""
    path = out / "run_id"
    if accelerator.is_main_process and not (resuming and path.exists()):
        atomic_write_text(path, uuid.uuid4().hex[:12] + "\n")
    accelerator.wait_for_everyone()
    return path.read_text().strip()


def shutdown(accelerator) -> None:
    """End the trackers and the process group (without the latter, gloo aborts the process at exit)."""
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
