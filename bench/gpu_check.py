"""The GPU check of the PG loop: what only NCCL and CUDA can show, in a few minutes on one GPU.

Three runs of recipes/pg.py, each 3 GRPO steps with the KL term on (algo.kl_beta=0.01), HF
rollouts (the GPU machine has no vLLM), on a SmolLM2-135M-shaped model with seeded random weights
(the checkpoint is too large to carry to a lent GPU machine; time and memory depend on the shapes):

    plain  torchrun, one process, NCCL backend: every rlx.distributed collective (rewards, loss
           divisors, stats, skip and stop agreement) goes through NCCL with CUDA tensors
    zero2  accelerate launch --config_file launch/gpu_zero2.yaml --num_processes 1 (DeepSpeed)
    zero3  the same with launch/gpu_zero3.yaml: sharded policy, reference model wrapped by DeepSpeed

For each: whether it finished, the backend it reported, median step time and peak GPU memory
(metrics.jsonl's step_time_s and peak_gpu_gib). The last line is `gpu_check=<runs passed>/3`.

    python bench/gpu_check.py --shape DIR [--out OUT] [--device cpu]

DIR holds the model's config.json and tokenizer files (no weights). `--device cpu` runs the same
three launches over gloo on this CPU (a dry run of the script; DeepSpeed on CPU needs g++).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# random weights never answer: the reward is the completion's length in characters
REWARD = """
def longer(prompts, completions, **kw):
    return [min(len(c), 400) / 400 for c in completions]
"""


def random_model(shape: Path, folder: Path) -> Path:
    """A seeded random model with `shape`'s config and tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(shape)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(shape).save_pretrained(folder)
    return folder


def launcher(run: str, device: str) -> list[str]:
    """The launch command of one run, before the recipe's path."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    if run == "plain":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    config = f"launch/{'gpu' if device == 'cuda' else 'cpu_2proc'}_zero{run[-1]}.yaml"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    return accelerate + ["--num_processes=1", f"--main_process_port={get_free_port()}"]


def one_run(run: str, model: Path, out: Path, device: str) -> dict:
    reward = out / "reward.py"
    reward.write_text(REWARD)
    folder = out / run
    args = [str(ROOT / "recipes" / "pg.py"), "--config", str(ROOT / "recipes" / "grpo.yaml")]
    args += [f"model.name={model}", "rollout.backend=hf", "steps=3", "algo.kl_beta=0.01"]
    args += ["eval.enabled=false", "log_with=[]", "max_run_minutes=0", "max_minutes=0"]
    args += ["prompts_per_step=8", "micro_batch_size=16", "rollout.max_new_tokens=64"]
    args += [f"output_dir={folder}", "overwrite_output_dir=true", "save_every=0"]
    args += [f"rewards=[{{func: '{reward}:longer', weight: 1.0}}]"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with (out / f"{run}.log").open("w") as log:
        code = subprocess.run(
            launcher(run, device) + args, cwd=ROOT, env=env, stdout=log, stderr=log, timeout=420
        ).returncode
    text = (out / f"{run}.log").read_text()
    rows = []
    if (folder / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "skipped" not in r]
    return {
        "run": run,
        "ok": code == 0 and len(rows) == 3,
        "backend": next((b for b in ("nccl", "gloo") if f"collectives over {b}" in text), "none"),
        "step_s": statistics.median(r["step_time_s"] for r in rows) if rows else float("nan"),
        "peak_gpu_gib": max((r.get("peak_gpu_gib", 0.0) for r in trained), default=0.0),
        "kl_last": trained[-1]["kl"] if trained else float("nan"),
        "wall_s": time.perf_counter() - t0,
        "error": "" if code == 0 else text[-1500:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", required=True, help="folder with config.json + tokenizer files")
    p.add_argument("--out", default="/tmp/rlx_gpu_check")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--runs", default="plain,zero2,zero3")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(Path(args.shape), out / "model")
    results = [one_run(run, model, out, args.device) for run in args.runs.split(",")]
    print(f"{'run':6} {'ok':3} {'backend':7} {'step s':>7} {'peak GPU GiB':>12} {'kl':>9} wall s")
    for r in results:
        print(
            f"{r['run']:6} {'yes' if r['ok'] else 'NO':3} {r['backend']:7} {r['step_s']:7.2f} "
            f"{r['peak_gpu_gib']:12.2f} {r['kl_last']:9.2e} {r['wall_s']:7.0f}"
        )
        if r["error"]:
            print(f"--- {r['run']} failed:\n{r['error']}")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(f"gpu_check={sum(r['ok'] for r in results)}/{len(results)}")


if __name__ == "__main__":
    main()
