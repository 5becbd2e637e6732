"""Quantisation settings A/B: token KL of each quantised model to the fine-tuned model.

Held-out reward (bench/quant.py) moves by about +-0.03 retention between calibration draws, and a
400-prompt evaluation cannot tell two settings a few points apart. This bench ranks settings by a
finer measure on the same held-out prompts:
  1. the fine-tuned model (float32, HF transformers) decodes each prompt greedily once;
  2. each variant (a set of QuantizeConfig overrides) is quantised once per calibration seed with
     `rlx.quant.quantize_model`, and its fake-quantised float32 model (bit-identical to what the
     export decodes to) is run teacher-forced on those completions;
  3. per variant, the mean over seeds of: KL(fine-tuned || quantised) per completion token,
     top-1 agreement per token, and the fraction of completions the quantised model would
     reproduce token for token under greedy decoding ("same greedy").
With `--reference-rows` the table also shows where simpler perturbations of the fine-tuned model
land: all its weights rounded to bf16, and its linears rounded to nearest at 8, 6 and 5 bits with
the export's group sizes (no calibration, one row each).
The prompts share a long prefix (system prompt and one-shot example); it is run once per batch
and its KV cache reused, which cuts the forward work by about 3x.

Command (from the repository root; about 3 minutes per variant on an idle 2-core machine):
    .venv/bin/python bench/quant_kl.py --finetuned runs/grpo_smollm2/final \\
        --task-options '{max_operand: 99, ops: ["+"]}' \\
        --variant quantlrm method=quantlrm --variant awq method=awq \\
        --variant quantlrm+clip method=quantlrm clip=true

The last line is `kl_ratio=<first variant's mean KL / second variant's>` (below 1: the first is
closer to the fine-tuned model).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import yaml


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--finetuned", required=True, help="the fine-tuned model folder")
    p.add_argument("--base", default="smollm2", help="the model before fine-tuning (QuantLRM dW)")
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("LABEL", "KEY=VALUE"),
        help="a label and QuantizeConfig overrides; repeat for each variant (at least two)",
    )
    p.add_argument(
        "--task-options",
        type=yaml.safe_load,
        default={},
        help="arithmetic task options, for the held-out prompts and the calibration data",
    )
    p.add_argument("--prompts", type=int, default=300, help="held-out prompts")
    p.add_argument("--seeds", type=int, default=3, help="calibration seeds per variant")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument(
        "--reference-rows",
        action="store_true",
        help="also rows for the fine-tuned model with its weights rounded to bf16 and with its "
        "linears rounded to nearest at 8, 6 and 5 bits (same group sizes): a scale for the KL",
    )
    args = p.parse_args()
    if len(args.variant) < 2:
        p.error("give at least two --variant LABEL [KEY=VALUE ...]")
    return args


def shared_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest token prefix every prompt shares, less one token (each suffix keeps >= 1)."""
    first = sequences[0]
    n = len(first)
    for seq in sequences[1:]:
        n = next(
            (i for i, (a, b) in enumerate(zip(first[:n], seq, strict=False)) if a != b),
            min(n, len(seq)),
        )
    return first[: max(n - 1, 0)]


class TeacherForced:
    """Per-token log-probabilities of fixed completions, batched, with the shared prefix cached."""

    def __init__(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        pad_id: int,
        batch_size: int = 50,
    ):
        import torch

        self.prefix = shared_prefix(prompts)
        self.batches = []
        p = len(self.prefix)
        for i in range(0, len(prompts), batch_size):
            pairs = list(
                zip(prompts[i : i + batch_size], completions[i : i + batch_size], strict=True)
            )
            width = max(len(a) + len(b) for a, b in pairs) - p
            ids = torch.full((len(pairs), width), pad_id)
            attention = torch.zeros((len(pairs), p + width), dtype=torch.long)
            attention[:, :p] = 1
            predicts = torch.zeros((len(pairs), width), dtype=torch.bool)  # next token = completion
            for j, (prompt, completion) in enumerate(pairs):
                tail = (prompt + completion)[p:]
                ids[j, : len(tail)] = torch.tensor(tail)
                attention[j, p : p + len(tail)] = 1
                predicts[j, len(prompt) - p - 1 : len(tail) - 1] = True
            self.batches.append((ids, attention, predicts))

    def logprobs(self, model) -> list:
        """Per batch: log-softmax [completion tokens, vocab] of `model` at the completion tokens."""
        import torch

        out = []
        with torch.no_grad():
            for ids, attention, predicts in self.batches:
                cache = None
                if self.prefix:
                    cache = model.model(
                        input_ids=torch.tensor([self.prefix]), use_cache=True
                    ).past_key_values
                    cache.batch_repeat_interleave(ids.shape[0])
                hidden = model.model(
                    input_ids=ids, attention_mask=attention, past_key_values=cache
                ).last_hidden_state
                logits = model.lm_head(hidden[predicts]).float()
                out.append(torch.log_softmax(logits, -1))
        return out

    def compare(self, reference: list, model) -> dict[str, float]:
        """Token KL(reference || model), top-1 agreement, and the same-greedy fraction."""
        import torch

        kl, agree, same, tokens, seqs = 0.0, 0, 0, 0, 0
        for ref, got, (_ids, _att, predicts) in zip(
            reference, self.logprobs(model), self.batches, strict=True
        ):
            kl += float((ref.exp() * (ref - got)).sum())
            match = ref.argmax(-1) == got.argmax(-1)
            agree += int(match.sum())
            tokens += ref.shape[0]
            miss = torch.zeros(predicts.shape, dtype=torch.bool)
            miss[predicts] = ~match
            same += int((~miss.any(-1)).sum())
            seqs += predicts.shape[0]
        return {"kl": kl / tokens, "agree": agree / tokens, "same_greedy": same / seqs}


def perturbed(model, group_sizes: dict[str, int], bits: int | None):
    """A copy of `model` with every weight rounded to bf16 (bits None), or with its quantised
    linears fake-quantised to nearest at `bits` with the export's group sizes."""
    import copy

    import torch

    from rlx.quant import fake_quantize

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            linear = ".".join(name.split(".")[-3:-1])  # e.g. self_attn.q_proj
            if bits is None:
                p.copy_(p.to(torch.bfloat16).float())
            elif name.endswith(".weight") and linear in group_sizes:
                p.copy_(fake_quantize(p, bits, group_sizes[linear]))
    return out


def main() -> None:
    args = parse_args()
    import torch
    from rich.console import Console
    from rich.table import Table

    from rlx.config import load_config
    from rlx.models import resolve_model
    from rlx.quant import QuantizeConfig, plan_quantization, quantize_model
    from rlx.rollout import Sampling, encode_prompts
    from rlx.rollout.hf_backend import HFEngine
    from rlx.tasks import load_task_dataset

    console = Console(width=140)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_task_dataset(
        "arithmetic", split="test", num_examples=args.prompts, **args.task_options
    )
    t = time.perf_counter()
    engine = HFEngine(args.finetuned, batch_size=150)
    prompts = list(dataset["prompt"])
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=64, stop=["</answer>"])
    completions = [c.token_ids for c in engine.generate(prompts, sampling)]
    forced = TeacherForced(
        encode_prompts(engine.tokenizer, prompts), completions, engine.tokenizer.pad_token_id or 0
    )
    reference = forced.logprobs(engine.model)
    console.print(
        f"reference: {len(prompts)} greedy completions, shared prefix "
        f"{len(forced.prefix)} tokens ({time.perf_counter() - t:.0f} s)"
    )

    base = resolve_model(args.base)
    results: dict[str, list[dict]] = {}
    labels = [(label, " ".join(overrides)) for label, *overrides in args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        if args.reference_rows:
            plan = plan_quantization(QuantizeConfig(finetuned=args.finetuned, out=f"{tmp}/q"))
            for bits in (None, 8, 6, 5):
                label = "fine-tuned, bf16 weights" if bits is None else f"rtn W{bits} (reference)"
                row = forced.compare(reference, perturbed(engine.model, plan.group_sizes, bits))
                results[label] = [{**row, "seconds": None}]
                labels.append((label, ""))
                console.print(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        for label, *overrides in args.variant:
            settings = load_config(QuantizeConfig, None, overrides)
            calib = dataclasses.replace(settings.calib, options=args.task_options)
            for seed in range(args.seeds):
                cfg = dataclasses.replace(
                    settings,
                    base=base,
                    finetuned=args.finetuned,
                    bits=args.bits,
                    calib=dataclasses.replace(calib, seed=seed),
                    out=f"{tmp}/q",
                    overwrite=True,
                )
                result = quantize_model(cfg, show_progress=False)
                row = forced.compare(reference, result.model)
                row["seconds"] = result.seconds["total"]
                results.setdefault(label, []).append(row)
                console.print(
                    f"{label} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
                )

    title = (
        f"W{args.bits}, {len(prompts)} held-out prompts, mean over "
        f"{args.seeds} calibration seeds (KL: per completion token)"
    )
    table = Table(title=title)
    left = ("variant", "overrides")
    right = ("KL", "KL per seed", "top-1 agree", "same greedy", "quant s")
    for col in left + right:
        table.add_column(col, justify="left" if col in left else "right")
    means = {}
    for label, overrides in labels:
        rows = results[label]
        means[label] = statistics.mean(r["kl"] for r in rows)
        timed = rows[0]["seconds"] is not None
        seconds = f"{statistics.mean(r['seconds'] for r in rows):.1f}" if timed else ""
        table.add_row(
            label,
            overrides,
            f"{means[label]:.4f}",
            " ".join(f"{r['kl']:.4f}" for r in rows),
            f"{statistics.mean(r['agree'] for r in rows):.4f}",
            f"{statistics.mean(r['same_greedy'] for r in rows):.3f}",
            seconds,
        )
    console.print(table)
    first, second = (v[0] for v in args.variant[:2])
    print(f"kl_ratio={means[first] / means[second]:.3f}")


if __name__ == "__main__":
    main()
