"""eval.json (before / after held-out results) and the before/after table printed at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlx.atomic import atomic_write_json


def read_eval(path: str | Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def write_eval(path: str | Path, results: dict) -> None:
    atomic_write_json(path, results)


def eval_table(results: dict, title: str) -> Table:
    """Rows: reward, accuracy, each reward function, length; columns: before, after, change."""
    before, after = results.get("before", {}), results.get("after", {})
    table = Table(title=title)
    for col in ("held-out metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "held-out metric" else "right")

    def row(name: str, b, a):
        cells = [f"{v:.3f}" if _number(v) else "-" for v in (b, a)]
        change = f"{a - b:+.3f}" if _number(a) and _number(b) else "-"
        table.add_row(name, *cells, change)

    row("reward (mean, in [0, 1])", before.get("reward_mean"), after.get("reward_mean"))
    row("accuracy", before.get("accuracy"), after.get("accuracy"))
    for name in after.get("rewards", before.get("rewards", {})):
        row(f"  {name}", before.get("rewards", {}).get(name), after.get("rewards", {}).get(name))
    row(
        "completion tokens",
        before.get("completion_tokens_mean"),
        after.get("completion_tokens_mean"),
    )
    return table


def _number(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def print_eval_table(results: dict, title: str, console: Console | None = None) -> None:
    console = console or Console()
    console.print(eval_table(results, title))
    if "train_minutes" in results:
        console.print(f"training wall time: {results['train_minutes']:.1f} min")
