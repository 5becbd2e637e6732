"""Per-step metrics: `<output_dir>/metrics.jsonl`, accelerate trackers, and the reward-curve plot.

metrics.jsonl gets one JSON object per step, appended with a single write and fsync, so a crash
loses at most the step being written. On resume, rows past the checkpoint's step are dropped
(atomically) so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch

from rlx.atomic import atomic_write_text


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib() -> float:
    """The peak GPU memory torch has allocated in this process so far, in GiB (0 without CUDA)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return torch.cuda.max_memory_allocated() / 2**30


class Stats:
    """Named step statistics, merged over micro-batches, updates and ranks: each name is a sum,
    unless it is one of `maxima` (max; these are of non-negative values and start at 0) or
    `minima` (min; start at +inf). Every rank declares the same names, so the rank merge lines
    them up without exchanging the names."""

    def __init__(self, sums=(), maxima=(), minima=()):
        self.maxima, self.minima = frozenset(maxima), frozenset(minima)
        self.values = {k: 0.0 for k in (*sums, *maxima)} | {k: math.inf for k in minima}

    def add(self, values: dict) -> Stats:
        """Merge `values` in (a micro-batch's, an update's); new names are sums."""
        for key, value in values.items():
            if key in self.maxima:
                self.values[key] = max(self.values[key], value)
            elif key in self.minima:
                self.values[key] = min(self.values[key], value)
            else:
                self.values[key] = self.values.get(key, 0.0) + value
        return self

    def over_ranks(self) -> Stats:
        """The same statistics of the whole step: every rank's merged (a collective)."""
        from rlx import distributed

        if not distributed.active():
            return self
        keys = sorted(self.values)
        rows = distributed.gather(
            torch.tensor([[self.values[k] for k in keys]], dtype=torch.float64)
        )
        merged = Stats(maxima=self.maxima, minima=self.minima)
        merged.values = dict.fromkeys(keys, 0.0) | {k: math.inf for k in self.minima}
        for row in rows.tolist():
            merged.add(dict(zip(keys, row, strict=True)))
        return merged

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def get(self, key: str, default: float = math.nan) -> float:
        return self.values.get(key, default)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line without its newline is a row whose append was
    cut short by a crash: it is dropped, so that a run can resume after such a crash."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only the rows with step <= last_step (used when resuming from a checkpoint)."""
    rows = [row for row in read_metrics(path) if row["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


class MetricsLog:
    """Append step metrics to metrics.jsonl and forward them to accelerate's trackers."""

    def __init__(self, path: str | Path, accelerator=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.accelerator = accelerator

    def log(self, metrics: dict) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.accelerator is not None:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            self.accelerator.log(scalars, step=metrics["step"])


def plot_reward_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Total and per-function training reward per step, saved as a PNG."""
    import matplotlib  # deferred: matplotlib (a second to import) loads only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward_mean"] for r in rows], label="reward (weighted total)", lw=2)
    for key in sorted({k for r in rows for k in r if k.startswith("reward/")}):
        ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("mean training reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_weighting(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Dynamic reward weighting: the weights per step (rows with `weight/<reward>`); with the
    hypervolume method also the validation points of the first two objectives, coloured by step,
    and the meta-reward and hypervolume per step. None when the run used static weights."""
    rows = read_metrics(metrics_path)
    weighted = [r for r in rows if any(k.startswith("weight/") for k in r)]
    validated = [r for r in rows if r.get("meta_reward") is not None]
    names = sorted({k for r in validated for k in r if k.startswith("val/")})
    panels = ["weights"] if weighted else []
    panels += ["front", "meta"] if validated and len(names) >= 2 else []
    if not panels:
        return None
    import matplotlib  # deferred: matplotlib loads only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "weights":
            keys = sorted({k for r in weighted for k in r if k.startswith("weight/")})
            for key in keys:
                ax.plot([r["step"] for r in weighted], [r.get(key) for r in weighted], label=key)
            ax.set_ylabel("weight of the step's update")
        elif panel == "front":
            steps = [r["step"] for r in validated]
            x, y = [r[names[0]] for r in validated], [r[names[1]] for r in validated]
            fig.colorbar(ax.scatter(x, y, c=steps), ax=ax, label="step")
            ax.set_xlabel(f"{names[0]} (validation mean)")
            ax.set_ylabel(f"{names[1]} (validation mean)")
        else:
            steps = [r["step"] for r in validated]
            ax.plot(steps, [r["meta_reward"] for r in validated], label="meta-reward")
            ax.plot(steps, [r["hypervolume"] for r in validated], label="hypervolume of the buffer")
        if panel != "front":
            ax.set_xlabel("step")
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
