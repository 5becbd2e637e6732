"""Gradients of recipes/pg.py's loss on a crafted step, saved per rank (for test_pg_distributed.py).

    python tests/recipes/pg_ddp_gradients.py MODEL OUT                                    # 1 process
    accelerate launch --config_file launch/cpu_2proc.yaml tests/recipes/pg_ddp_gradients.py MODEL OUT

The step has 4 prompts with 2 completions each; rank r of W holds prompts [r*4/W, (r+1)*4/W), as
in the loop. For each loss aggregation and each of two reward tables (every group kept; the
second rank's groups all-equal, so that rank trains on a stand-in group at weight 0), the script
runs the loop's own pieces (kept advantages -> this rank's mini-batch -> train_on_batch) once and
writes OUT/grad_<world>_<rank>_<case>.pt: the gradient each rank holds after DDP's all-reduce,
and OUT/influences_<world>_<rank>.pt: the gradient weighting's influences of a 3-objective step.
The KL term is on (the policy is a perturbed copy of the reference), so a stand-in group that
leaked gradient through it would show.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from rlx.algos import pg
from rlx.config import AdapterConfig, PGConfig, load_config
from rlx.config.choices import LOSS_AGGREGATIONS
from rlx.policy import load_policy
from rlx.rollout.base import Completion

ROOT = Path(__file__).resolve().parents[2]
P, G = 4, 2
REWARDS = {
    "all_kept": [[0.0, 1.0], [1.0, 0.5], [0.2, 0.9], [0.7, 0.1]],
    "rank1_drops_all": [[0.0, 1.0], [1.0, 0.5], [0.3, 0.3], [0.6, 0.6]],
}
AGGREGATIONS = LOSS_AGGREGATIONS  # every one, each checked across two processes


def crafted_completions(vocab: int) -> list[Completion]:
    """P*G prompt-major completions; the last two prompts' completions are much shorter, so a
    per-rank token normalisation would weigh their tokens differently from the first two's."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(P * G):
        prompt = torch.randint(3, vocab, (3 + i // G,), generator=gen).tolist()
        length = 9 - 2 * i if i < 4 else 1 + i % 2
        tokens = torch.randint(3, vocab, (length,), generator=gen).tolist()
        logprobs = (-2.0 + 0.5 * torch.randn(length, generator=gen)).tolist()
        out.append(Completion(i // G, prompt, tokens, logprobs, "", "stop"))
    return out


def load_recipe():
    spec = importlib.util.spec_from_file_location("pg_recipe", ROOT / "recipes" / "pg.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def main(model_path: str, out: str) -> None:
    recipe = load_recipe()
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    base = [
        f"model.name={model_path}",
        f"rollout.num_samples={G}",
        f"prompts_per_step={P}",
        f"micro_batch_size={G}",  # one group per micro-batch: accumulation is exercised too
        "algo.kl_beta=0.1",
        "bf16_autocast=false",
    ]
    model_cfg = load_config(PGConfig, None, base).model
    model, tokenizer = load_policy(model_cfg, AdapterConfig())
    ref, _ = load_policy(model_cfg, AdapterConfig())
    ref.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same perturbation on every rank: policy != reference
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model = accelerator.prepare(model)
    policy = accelerator.unwrap_model(model)

    completions = crafted_completions(policy.config.vocab_size)
    lengths = torch.tensor([float(len(c.token_ids)) for c in completions]).view(P, G)
    p_local = P // world
    mine = slice(rank * p_local, (rank + 1) * p_local)
    local = completions[rank * p_local * G : (rank + 1) * p_local * G]
    for case, table in REWARDS.items():
        total = torch.tensor(table)
        for agg in AGGREGATIONS:
            cfg = load_config(PGConfig, None, [*base, f"algo.loss_aggregation={agg}"])
            per_fn = total[..., None]
            adv, keep = pg.kept_advantages(
                cfg.algo.learner, total, per_fn, lengths, [1.0], "sum_then_normalize", True
            )
            parts = recipe.mini_batch_parts(keep, 1)
            pad = tokenizer.pad_token_id
            (mini,) = recipe.local_mini_batches(cfg, local, parts[mine], adv[mine], pad, 1)
            model.zero_grad(set_to_none=True)
            stats = recipe.train_on_batch(cfg, accelerator, model, ref, mini, 1)
            stats = stats.over_ranks()
            grad = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
            result = {"grad": grad, "loss": stats["loss"], "keep": keep}
            torch.save(result, Path(out) / f"grad_{world}_{rank}_{case}_{agg}.pt")
    save_influences(recipe, accelerator, model, ref, local, lengths, base, mine, tokenizer, out)
    accelerator.wait_for_everyone()


def save_influences(recipe, accelerator, model, ref, local, lengths, base, mine, tok, out) -> None:
    """The gradient method's influences of a 3-objective step (the third is None throughout, so
    it keeps its weight), through the loop's own pieces; OUT/influences_<world>_<rank>.pt."""
    from functools import partial

    from rlx.weighting import DynamicWeighting, layer_parameters, trainable_parameters

    cfg = load_config(PGConfig, None, [*base, "weighting.method=gradient"])
    policy = accelerator.unwrap_model(model)
    per_fn = torch.stack(
        [torch.tensor(REWARDS["all_kept"]), torch.tensor(REWARDS["rank1_drops_all"])], dim=-1
    )
    per_fn = torch.cat([per_fn, torch.full((P, G, 1), float("nan"))], dim=-1)  # [P, G, 3]
    weighting = DynamicWeighting(cfg, ["a", "b", "none"], None)
    weighting.params = layer_parameters(policy, [1])
    weighting.trainable = trainable_parameters(policy)
    args = (cfg, accelerator, model, ref, local, mine, tok.pad_token_id)
    backward = partial(recipe.objective_backward, *args)
    full = {"per_fn": per_fn, "length": lengths}
    values = weighting.influences(full, backward, missing=[2])
    torch.save(
        values, Path(out) / f"influences_{accelerator.num_processes}_{accelerator.process_index}.pt"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
