"""`rlx eval`: held-out reward of any models (full precision or quantised) through vLLM, as a table.

    rlx eval --model smollm2 --model runs/q4 --task arithmetic
    rlx eval --model runs/q4 --task data/held_out.jsonl rewards='[{func: my.py:score}]'
    rlx eval --show-config

Each model gets its own in-process vLLM engine, one at a time (one engine per process), greedy
decoding on the task's test split with the task's default rewards (rlx.evaluation.evaluate, the
same measurement the learners report). Int4 compressed-tensors checkpoints are served by vLLM's
int4 kernel in bfloat16 where the installed vLLM build has it, else dequantized to float32 on the
same engine (`int4`, rlx/quant/serve.py); one line of output says which.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlx.atomic import atomic_write_json
from rlx.cli.options import add_config_arguments, read_config, show_config
from rlx.config import EvalCommandConfig
from rlx.models import resolve_model

# flag -> config key (--model may repeat: a list)
FLAGS = {
    "model": "models",
    "task": "task.name",
    "split": "task.split",
    "num_prompts": "task.num_prompts",
}


def add_parser(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="held-out reward of models (fp or quantised) through vLLM",
        description="Flags set config keys; key.sub=value overrides win over --config and flags.",
    )
    add_config_arguments(p, "YAML file with EvalCommandConfig keys")
    p.add_argument("--model", action="append", help="model to evaluate (repeat for several)")
    p.add_argument("--task", help="task name or data file (default arithmetic)")
    p.add_argument("--split", help="split to evaluate (default test)")
    p.add_argument("--num-prompts", dest="num_prompts", type=int, help="prompts (default 200)")
    p.set_defaults(func=run)


def run(args) -> int:
    """`rlx eval`: parse, evaluate, print."""
    if args.show_config:
        return show_config(EvalCommandConfig)
    evaluate_models(read_config(args, EvalCommandConfig, FLAGS))
    return 0


def describe_weights(model: str) -> str:
    """A short description of how a model folder stores its weights."""
    path = Path(resolve_model(model))
    config_file = path / "config.json"
    if not config_file.is_file():
        return "?"
    config = json.loads(config_file.read_text())
    quant = config.get("quantization_config")
    meta_file = path / "rlx_quant.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    method = meta.get("config", {}).get("method")
    if quant:
        groups = quant.get("config_groups", {}).values()
        bits = {g["weights"]["num_bits"] for g in groups}
        sizes = sorted({g["weights"]["group_size"] for g in groups})
        fmt = quant.get("format")
        text = f"int{'/'.join(map(str, sorted(bits)))} g{'/'.join(map(str, sizes))} {fmt}"
    elif meta:
        text = f"W{meta['config']['bits']} dequantized ({config.get('dtype') or config.get('torch_dtype')})"
    else:
        text = str(config.get("dtype") or config.get("torch_dtype") or "?")
    return f"{text}, {method}" if method else text


def weights_megabytes(model: str) -> float:
    """Size of the model's weight files in MB (nan when not a local folder)."""
    path = Path(resolve_model(model))
    files = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files) / 1e6 if files else math.nan


def evaluate_models(cfg, console=None) -> list[dict]:
    """Evaluate every model of an EvalCommandConfig; one result row per model, printed as a table."""
    # deferred: torch, datasets and vLLM load only when the command runs
    from rlx.evaluation import evaluate
    from rlx.quant.serve import serving_engine, serving_plan
    from rlx.rewards import resolve_rewards
    from rlx.tasks import load_task_dataset

    console = console or Console(width=max(Console().width, 120))  # piped output is 80 wide
    t = cfg.task
    dataset = load_task_dataset(t.name, t.split, t.num_prompts, t.seed, **t.options)
    reward_fns = resolve_rewards(t.name, cfg.rewards)  # fail on a bad reward before any engine
    for name in cfg.models:  # fail on an int4 model this vLLM cannot serve before any engine
        serving_plan(name, cfg.int4, cfg.dtype)
    rows = []
    for name in cfg.models:
        serve = serving_engine(
            name,
            int4=cfg.int4,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            kv_cache_gib=cfg.kv_cache_gib,
            say=console.print,
        )
        with serve as (engine, how):
            status = f"evaluating {name} on {len(dataset)} {t.name} ({t.split}) prompts"
            with console.status(status):
                metrics = evaluate(engine, dataset, reward_fns, cfg.max_new_tokens, cfg.stop)
        label = Path(name).name if Path(name).expanduser().exists() else name
        weights = describe_weights(name) + (
            " (evaluated dequantized)" if how == "dequantize" else ""
        )
        row = {"model": name, "label": label, "weights": weights, "served": how}
        rows.append(row | {"size_mb": weights_megabytes(name), **metrics})
    console.print(results_table(rows, f"{t.name} ({t.split}, {len(dataset)} prompts, greedy)"))
    if cfg.output_json:
        atomic_write_json(cfg.output_json, rows)
    return rows


def results_table(rows: list[dict], title: str):
    """A rich table: one row per model, one column per reward."""
    names = list(rows[0]["rewards"]) if rows else []
    table = Table(title=title)
    for col in ["model", "weights", "MB", "reward", *names, "tok/s"]:
        table.add_column(col, justify="left" if col in ("model", "weights") else "right")
    for r in rows:
        table.add_row(
            r["label"],
            r["weights"],
            f"{r['size_mb']:.0f}",
            f"{r['reward_mean']:.3f}",
            *(f"{r['rewards'][n]:.3f}" for n in names),
            f"{r['tokens_per_second']:.0f}",
        )
    return table
