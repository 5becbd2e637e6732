"""GRPO's weight update versus a supervised fine-tune of the same model on the same task, against
the claims of "The Path Not Taken: RLVR Provably Learns Off the Principals" (2025).

    .venv/bin/python bench/rl_vs_sft_spectra.py --base smollm2 --grpo runs/grpo_smollm2/final
    .venv/bin/python bench/rl_vs_sft_spectra.py --base BASE --grpo RUN/final --sft SFT_FOLDER

The supervised fine-tune is bench/quant.py's stand-in unless --sft names one:
rlx.quant.pseudo_finetune.sft_arithmetic (cross-entropy on the worked answers of the arithmetic
train split, AdamW lr 3e-5, --sft-steps steps of 8 examples; cached under the rlx cache). Both
updates are read against the base with rlx diagnose's metrics (every decoder matrix, top-k
principal subspace; rlx/adapters/diagnostics.py) and printed side by side (mean over matrices and
per layer type), then one yes/no per claim and model:

    off-principal      the update mask overlaps the principal mask less than a random mask of
                       its density would (principal_overlap < update_density)
    spectrum preserved spectral_drift < --drift-max (relative change of all singular values)
    little rotation    rotation_deg < --rotation-max (largest principal angle, top-k subspaces)
    bf16 sparsity      bf16_sparsity >= --sparsity-min (the paper's RL runs: 36-92%, SFT 0.6-19%)

and whether the paper's contrast holds (GRPO on the claim's side of SFT). Writes the two
diagnostics.json / .png under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHOWN = (
    "alignment",
    "principal_share",
    "principal_overlap",
    "update_density",
    "low_magnitude_overlap",
    "spectral_drift",
    "rotation_deg",
    "bf16_sparsity",
)


CLAIMS = ("off-principal", "spectrum preserved", "little rotation", "bf16 sparsity")


def yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2", help="the model both fine-tunes started from")
    p.add_argument("--grpo", default="runs/grpo_smollm2/final", help="a GRPO run's final model")
    p.add_argument("--sft", default=None, help="a supervised fine-tune (default: the stand-in)")
    p.add_argument("--sft-steps", type=int, default=12, help="steps of the stand-in fine-tune")
    p.add_argument("--top-k", type=int, default=16, help="principal subspace size")
    p.add_argument("--drift-max", type=float, default=0.01)
    p.add_argument("--rotation-max", type=float, default=5.0, help="degrees")
    p.add_argument("--sparsity-min", type=float, default=0.36)
    p.add_argument("--out", default="runs/rl_vs_sft_spectra", help="diagnostics of both here")
    return p.parse_args()


def claims(s: dict, args) -> dict[str, bool | None]:
    """The paper's claims on one update's "all" summary (None: undefined, e.g. no update)."""
    if not s["update_density"] > 0:
        return dict.fromkeys(CLAIMS)
    return {
        "off-principal": s["principal_overlap"] < s["update_density"],
        "spectrum preserved": s["spectral_drift"] < args.drift_max,
        "little rotation": s["rotation_deg"] < args.rotation_max,
        "bf16 sparsity": s["bf16_sparsity"] >= args.sparsity_min,
    }


def contrast(grpo: dict, sft: dict) -> dict[str, bool | None]:
    """GRPO on each claim's side of SFT (the paper: RL does, SFT does the opposite)."""
    if not (grpo["update_density"] > 0 and sft["update_density"] > 0):
        return dict.fromkeys(CLAIMS)
    return {
        "off-principal": grpo["principal_overlap"] / max(grpo["update_density"], 1e-12)
        < sft["principal_overlap"] / max(sft["update_density"], 1e-12),
        "spectrum preserved": grpo["spectral_drift"] < sft["spectral_drift"],
        "little rotation": grpo["rotation_deg"] < sft["rotation_deg"],
        "bf16 sparsity": grpo["bf16_sparsity"] > sft["bf16_sparsity"],
    }


def main() -> None:
    args = parse_args()
    from rlx.cli.diagnose import diagnose
    from rlx.models import resolve_model
    from rlx.models.smollm2 import cache_root

    base = resolve_model(args.base)
    sft = args.sft
    if sft is None:
        from rlx.quant.pseudo_finetune import sft_arithmetic

        folder = cache_root() / "bench" / "spectra" / f"{Path(base).name}-sft{args.sft_steps}"
        sft = str(sft_arithmetic(base, folder, steps=args.sft_steps))
    print(f"base {base}\ngrpo {args.grpo}\nsft  {sft}")
    summaries = {}
    for name, folder in (("grpo", args.grpo), ("sft", sft)):
        out = str(Path(args.out) / name)
        with contextlib.redirect_stdout(io.StringIO()):
            summaries[name] = diagnose(base, folder, args.top_k, out)["summary"]
    grpo, sft_s = summaries["grpo"], summaries["sft"]

    print(f"\nupdate diagnostics, top-{args.top_k}, mean over matrices (grpo | sft)")
    print(f"{'type':10}" + "".join(f" {m[:19]:>19}" for m in SHOWN))
    for group in sorted(grpo, key=lambda g: g != "all"):
        cells = "".join(f" {grpo[group][m]:>9.3g}|{sft_s[group][m]:<9.3g}" for m in SHOWN)
        print(f"{group:10}{cells}")

    verdict = {n: claims(s["all"], args) for n, s in summaries.items()}
    holds = contrast(grpo["all"], sft_s["all"])
    print(f"\n{'claim (paper: RL yes, SFT no)':32} {'grpo':>5} {'sft':>5} {'grpo beyond sft':>16}")
    for claim in CLAIMS:
        cells = [yes_no(verdict["grpo"][claim]), yes_no(verdict["sft"][claim])]
        print(f"{claim:32} {cells[0]:>5} {cells[1]:>5} {yes_no(holds[claim]):>16}")
    print(f"contrast_holds={sum(bool(v) for v in holds.values())}/{len(CLAIMS)}")


if __name__ == "__main__":
    main()
