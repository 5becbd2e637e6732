"""Why an ES run learns or does not: the diagnosis table of a finished `recipes/es.py` run.

    .venv/bin/python bench/es_diagnose.py --run runs/es_smollm2 --grpo runs/grpo_smollm2
    .venv/bin/python bench/es_diagnose.py --run runs/es_smollm2 --skip-scaled   # no vLLM engine

Rows (all from the run's own config.yaml, so the same model, task, population and noise):
  fitness std across reseeds   The base model's population on the run's first step (its prompts,
                               members and noise), scored --reseeds times with sampled decoding at
                               --temperature, and twice greedy. Per member: the std of its fitness
                               over the reseeds (mean over members), against the std across members
                               of their mean fitness (each prompt centred over its members). Beside
                               it the share of the fitness variance that reseeding alone produces
                               (noise / (noise + between members); 1 = all noise).
  fitness_snr                  metrics.jsonl: median over steps of (var of antithetic pair
                               differences) / (var of pair sums), 1 = no signal
                               (rlx.algos.eggroll.fitness_snr).
  update RMS / sigma           metrics.jsonl: the weights' RMS change per step over sigma (the
                               noise's RMS per entry), median, and the whole run's net change
                               RMS(W_T - W_0) / sigma.
  held-out at c x the update   W_0 + c (W_T - W_0) for c = 0, 0.5, 1, 2 on the run's held-out set
                               (vLLM engine, greedy): a gain growing with c means the steps were too
                               small; a loss at 2x, that the direction is noise.
  completions per 10 minutes   metrics.jsonl: completions / step time x 600 for the ES run and, with
                               --grpo, for a PG run (its rollout.num_samples x prompts per step).
Run it on an idle machine; about 3 minutes for SmolLM2 with 64 members.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALES = (0.0, 0.5, 1.0, 2.0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished recipes/es.py output_dir")
    p.add_argument("--grpo", default=None, help="a finished recipes/pg.py output_dir to compare")
    p.add_argument("--reseeds", type=int, default=4, help="sampled evaluations of one population")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled evaluations")
    p.add_argument("--skip-scaled", action="store_true", help="leave out the c x update row")
    return p.parse_args()


def read_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step_time_s") is not None and not r.get("skipped")]


def load_recipe():
    spec = importlib.util.spec_from_file_location("es_recipe", ROOT / "recipes" / "es.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reseed_noise(cfg, reseeds: int, temperature: float) -> dict:
    """The run's step-1 population on the base weights, scored `reseeds` times sampled and twice
    greedy: fitness std across reseeds of one member vs across members."""
    from rlx.algos.eggroll import NoiseSpec, evolved_parameters
    from rlx.data import load_prompts, step_prompt_indices
    from rlx.es import plan_population, score_matrix
    from rlx.models import load_model_and_tokenizer
    from rlx.rewards import resolve_rewards, score_rollout
    from rlx.rollout import Sampling, encode_prompts

    es, task = cfg.es, cfg.task
    master, tokenizer = load_model_and_tokenizer(cfg.model.name, dtype=cfg.model.dtype)
    params = evolved_parameters(master, es.target_modules)
    limit = cfg.max_prompt_tokens
    data = load_prompts(task, task.split, task.num_prompts, tokenizer, limit, cfg.long_prompts)
    rows = data.select(step_prompt_indices(0, cfg.prompts_per_step, len(data), cfg.seed))
    reward_fns = resolve_rewards(task.name, cfg.rewards)
    noise = NoiseSpec(cfg.seed, es.sigma, es.rank, es.noise_reuse, es.noise)
    no_eval = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, enabled=False))
    members = list(range(es.population_size))
    engine, backend = load_recipe().build_population(
        no_eval, master, tokenizer, params, noise, len(members)
    )
    plan = plan_population(
        es.population_size, len(rows), es.prompt_assignment, members, cfg.rollout.num_samples
    )
    prompts = encode_prompts(tokenizer, rows["prompt"])

    def scores(temp: float, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        sampling = Sampling.from_config(cfg.rollout, n=1, temperature=temp)
        completions = backend.evaluate(prompts, plan, 0, sampling)
        totals = score_rollout(rows, completions, reward_fns).total
        return score_matrix(plan, totals, len(rows))  # [N, P], NaN where not answered

    out = {}
    for name, temp, seeds in (("sampled", temperature, range(reseeds)), ("greedy", 0.0, (0, 1))):
        s = torch.stack([scores(temp, seed) for seed in seeds])  # [reseeds, N, P]
        f = s.nanmean(dim=2)  # [reseeds, N] raw fitness
        # across members: each prompt centred over its members first (the prompt's difficulty
        # is no member's doing), as the fitness shaping does
        per_member = s.mean(dim=0)  # [N, P] over reseeds
        centred = (per_member - per_member.nanmean(dim=0, keepdim=True)).nanmean(dim=1)
        across_reseeds = float(f.std(dim=0, unbiased=True).mean())
        across_members = float(centred.std(unbiased=True))
        within = float(f.var(dim=0, unbiased=True).mean())
        total = within + float(centred.var(unbiased=True))
        out[name] = {
            "temperature": temp,
            "reseeds": len(seeds),
            "std_across_reseeds": across_reseeds,
            "std_across_members": across_members,
            "noise_share": within / total if total > 0 else math.nan,
            "fitness_mean": float(f.mean()),
        }
    backend.close()
    if engine is not None:
        engine.close()
    return out


def scaled_updates(cfg, run: Path) -> dict:
    """Held-out reward of W_0 + c (W_T - W_0) for c in SCALES, and RMS(W_T - W_0)."""
    from transformers import AutoModelForCausalLM

    from rlx.algos.eggroll import evolved_parameters
    from rlx.data import load_held_out
    from rlx.evaluation import evaluate
    from rlx.models import load_model_and_tokenizer
    from rlx.rewards import resolve_rewards
    from rlx.rollout import make_engine

    base, tokenizer = load_model_and_tokenizer(cfg.model.name, dtype="float32")
    final = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    w0 = evolved_parameters(base, cfg.es.target_modules)
    wt = dict(final.named_parameters())
    w0 = {n: p.detach().double() for n, p in w0.items()}  # exact: W_0 + 1 x (W_T - W_0) = W_T
    deltas = {n: wt[n].detach().double() - p for n, p in w0.items()}
    sq = sum(float(d.double().pow(2).sum()) for d in deltas.values())
    net_rms = math.sqrt(sq / sum(d.numel() for d in deltas.values()))
    eval_data = load_held_out(cfg, tokenizer)
    reward_fns = resolve_rewards(cfg.task.name, cfg.rewards)
    engine = make_engine(cfg.rollout.backend, cfg.model.name, cfg.rollout)
    held_out = {}
    for c in SCALES:
        engine.update_weights([(n, (w0[n] + c * d).float()) for n, d in deltas.items()])
        result = evaluate(engine, eval_data, reward_fns, cfg.eval.max_new_tokens, cfg.rollout.stop)
        held_out[c] = result["reward_mean"]
        print(f"  held-out reward at {c:g} x the update: {held_out[c]:.3f}", flush=True)
    engine.close()
    return {"held_out": held_out, "net_rms_over_sigma": net_rms / cfg.es.sigma}


def completions_per_10min(run: Path, samples: int | None = None) -> float:
    """Completions per 600 s of training steps: ES rows carry tokens and the mean completion length;
    PG rows are `samples` completions per group."""
    rows = read_rows(run)
    if samples is None:
        done = sum(r["tokens"] / max(r["completion_tokens_mean"], 1e-9) for r in rows)
    else:
        done = sum(r["groups_total"] * samples for r in rows)
    return 600 * done / sum(r["step_time_s"] for r in rows)


def main() -> None:
    args = parse_args()
    from rlx.config import ESConfig, PGConfig, load_config

    run = Path(args.run)
    cfg = load_config(ESConfig, str(run / "config.yaml"))
    rows = read_rows(run)
    results = json.loads((run / "eval.json").read_text())
    print(f"run {run}: {len(rows)} steps, held-out reward {results['before']['reward_mean']:.3f}"
          f" -> {results.get('after', {}).get('reward_mean', math.nan):.3f}")  # fmt: skip
    table = []
    if not args.skip_scaled:
        scaled = scaled_updates(cfg, run)
        for c, reward in scaled["held_out"].items():
            table.append((f"held-out reward at {c:g} x the update", f"{reward:.3f}"))
        table.append(("net update RMS(W_T - W_0) / sigma", f"{scaled['net_rms_over_sigma']:.3f}"))
    per_step = [r["update_rms_over_sigma"] for r in rows if "update_rms_over_sigma" in r]
    if per_step:
        table.append(("update RMS / sigma per step (median)", f"{statistics.median(per_step):.4f}"))
    snr = [r["fitness_snr"] for r in rows if "fitness_snr" in r]
    if snr:
        table.append(
            ("fitness_snr per step (median; 1 = no signal)", f"{statistics.median(snr):.3f}")
        )
    noise = reseed_noise(cfg, args.reseeds, args.temperature)
    for name, n in noise.items():
        label = f"{name} (T={n['temperature']:g}, {n['reseeds']} reseeds)"
        table.append((f"fitness std across reseeds, {label}", f"{n['std_across_reseeds']:.4f}"))
        table.append((f"fitness std across members, {label}", f"{n['std_across_members']:.4f}"))
        table.append(
            (f"share of fitness variance from reseeding, {name}", f"{n['noise_share']:.3f}")
        )
    table.append(("ES completions per 10 min", f"{completions_per_10min(run):.0f}"))
    if args.grpo:
        pg = load_config(PGConfig, str(Path(args.grpo) / "config.yaml"))
        grpo = completions_per_10min(Path(args.grpo), pg.rollout.num_samples)
        table.append(("GRPO completions per 10 min", f"{grpo:.0f}"))

    width = max(len(k) for k, _ in table)
    print(f"\n{'measure':{width}} value")
    for k, v in table:
        print(f"{k:{width}} {v}")


if __name__ == "__main__":
    main()
