"""`rlx diagnose`: spectral diagnostics of a fine-tune against its base model.

    rlx diagnose --base smollm2 --finetuned runs/grpo_smollm2/final [--top-k 16] [--out DIR]

For every decoder-layer matrix of the two checkpoints (read one at a time from their safetensors):
bf16 update sparsity, overlap of the update mask with the principal and low-magnitude masks,
spectral drift, principal-subspace rotation, update alignment and principal share
(rlx/adapters/diagnostics.py). Prints the per-layer-type table, writes DIR/diagnostics.json
(every matrix, the summary) and DIR/diagnostics.png (each metric against the layer index).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from rlx.errors import UserError
from rlx.models import resolve_model


def add_parser(commands) -> None:
    p = commands.add_parser(
        "diagnose",
        help="spectral diagnostics of a fine-tune: where did the update go",
        description="Compares every decoder-layer matrix of --finetuned with --base.",
    )
    p.add_argument("--base", required=True, help="the model before fine-tuning (alias or folder)")
    p.add_argument("--finetuned", required=True, help="the fine-tuned model folder")
    p.add_argument("--top-k", dest="top_k", type=int, default=16, help="principal subspace size")
    p.add_argument("--out", default="runs/diagnose", help="folder for diagnostics.json / .png")
    p.add_argument(
        "--modules",
        default=None,
        help="comma-separated module names to compare (default: every 2-D decoder weight)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    modules = args.modules.split(",") if args.modules else None
    diagnose(args.base, args.finetuned, args.top_k, args.out, modules)
    return 0


def _local_folder(name: str, role: str) -> str:
    path = Path(resolve_model(name))
    if not path.is_dir():
        raise UserError(f"--{role} {name}: not a local model folder (rlx diagnose reads files)")
    return str(path)


def diagnose(base: str, finetuned: str, top_k: int, out: str, modules=None, progress=True) -> dict:
    """Diagnostics of every matrix; prints the table, writes the JSON and PNG; returns the JSON."""
    # deferred: torch loads only when the command runs
    from rlx.adapters.diagnostics import matrix_diagnostics, summarize
    from rlx.adapters.diff import LazyWeights, check_same_matrices, matrix_names

    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    before = LazyWeights(_local_folder(base, "base"))
    after = LazyWeights(_local_folder(finetuned, "finetuned"))
    names = matrix_names(before, modules)
    if not names:
        what = f"named {modules}" if modules else "in decoder layers"
        raise UserError(f"--base {base}: no 2-D weights {what}")
    check_same_matrices(before, after, names)
    rows = {}
    for name in tqdm(names, desc="diagnose", unit="matrix", disable=not progress):
        rows[name] = matrix_diagnostics(before[name].float(), after[name].float(), top_k)
    result = {"base": base, "finetuned": finetuned, "top_k": top_k}
    result |= {"summary": summarize(rows), "matrices": rows}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diagnostics.json").write_text(json.dumps(result, indent=2, default=str))
    plot_diagnostics(rows, out_dir / "diagnostics.png", f"{finetuned} vs {base} (k={top_k})")
    print_table(result["summary"])
    print(f"wrote {out_dir / 'diagnostics.json'} and {out_dir / 'diagnostics.png'}")
    return result


def print_table(summary: dict) -> None:
    from rlx.adapters.diagnostics import METRICS  # deferred: torch, when the command runs

    table = Table(title="update diagnostics per layer type (mean over layers)")
    table.add_column("type")
    for metric in METRICS:
        table.add_column(metric, justify="right")
    for group, values in summary.items():
        cells = [f"{values[m]:.3g}" if not math.isnan(values[m]) else "-" for m in METRICS]
        table.add_row(group, *cells, end_section=group == "all")
    Console(width=max(Console().width, 160)).print(table)


def plot_diagnostics(rows: dict, path: Path, title: str) -> None:
    """One panel per metric, the value against the layer index, a line per layer type."""
    # deferred: matplotlib (a second to import) and torch, when the command runs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlx.adapters.diagnostics import METRICS, layer_index, layer_type

    fig, axes = plt.subplots(2, 4, figsize=(18, 7), squeeze=False)
    types = sorted({layer_type(n) for n in rows})
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        for kind in types:
            points = sorted(
                (layer_index(n), r[metric]) for n, r in rows.items() if layer_type(n) == kind
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=kind)
        ax.set_title(metric)
        ax.set_xlabel("layer")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
