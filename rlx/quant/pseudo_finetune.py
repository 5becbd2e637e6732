"""Short fine-tunes: QuantLRM's pseudo-fine-tuning, and the supervised stand-in for an RL run.

Pseudo-fine-tuning (QuantLRM section 6: a model with no pre-fine-tuning checkpoint gets dW from a
short fine-tune; the paper's exact recipe is not given). The recipe chosen here:
- data: the calibration blocks themselves (the text the quantised model must serve), next-token
  cross-entropy on every token;
- trainable: only the seven quantised projections of every layer (embeddings and norms frozen: dW
  is read only from those matrices, and freezing the rest halves optimizer memory);
- optimizer: AdamW, lr 1e-5, no weight decay, 16 steps of 4 blocks, grad-norm clip 1.0, float32
  master weights under bfloat16 autocast.
Why: this is what a real fine-tune of the served model looks like at its smallest: the same
optimizer and learning rate RL fine-tunes use, on the distribution the quantised model must serve,
so dW points where fine-tuning moves the weights. A few steps suffice because QuantLRM only needs
the ranking of update sizes per channel (and the zero counts, which appear when the updates are
compared at a bf16 checkpoint's precision). Plain SGD would make |dW| proportional to gradient
magnitude, which mostly re-encodes activation size (AWQ's signal) instead.

`sft_arithmetic` is not part of QuantLRM: it makes the fine-tuned model bench/quant.py needs
until the RL learners land (supervised, loss on the worked answers of the arithmetic train split).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlx.models import load_model_and_tokenizer
from rlx.quant.calibration import encode_examples
from rlx.quant.checks import LINEAR_NAMES
from rlx.rollout import encode_prompts
from rlx.tasks import load_task_dataset


def _is_quantised_weight(name: str) -> bool:
    return name.endswith(".weight") and any(f".{n}." in f".{name}" for n in LINEAR_NAMES)


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not -100.

    The LM head runs only on those positions: with SFT prompts 5x longer than the answers this
    saves about a fifth of the step (SmolLM2's 49k x 576 head is a fifth of its FLOPs).
    """
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]  # [B, T-1]: token t+1 is predicted at position t
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])  # [K, V]
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def train_steps(
    model,
    batches,
    steps: int,
    lr: float,
    desc: str,
    trainable=lambda name: True,
    autocast: bool = True,
) -> list[float]:
    """AdamW on `model` for `steps` batches of (input_ids, attention_mask, labels); the losses."""
    params = [p for n, p in model.named_parameters() if trainable(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(n))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _, (ids, mask, labels) in zip(bar, batches, strict=False):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = lm_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def _cycle_blocks(blocks: torch.Tensor, batch: int):
    """Batches of `batch` calibration blocks, forever (LM loss on every token)."""
    start = 0
    while True:
        idx = [(start + i) % blocks.shape[0] for i in range(batch)]
        ids = blocks[idx]  # [B, L]
        yield ids, torch.ones_like(ids), ids
        start += batch


def pseudo_finetune(
    model, blocks: torch.Tensor, steps: int = 16, lr: float = 1e-5, batch: int = 4
) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of `model` on the calibration blocks; its quantised weights (the "after").

    The caller's model is untouched; dW = returned weight - model's weight.
    """
    tuned = copy.deepcopy(model)
    train_steps(
        tuned, _cycle_blocks(blocks, batch), steps, lr, "pseudo-fine-tune", _is_quantised_weight
    )
    return {n: p.detach() for n, p in tuned.named_parameters() if _is_quantised_weight(n)}


def _sft_batches(examples: list[tuple[list[int], int]], batch: int, pad_id: int, seed: int):
    """Right-padded batches; labels -100 on prompt tokens and padding."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    while True:
        for start in range(0, len(order) - batch + 1, batch):
            rows = [examples[i] for i in order[start : start + batch]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((batch, width), pad_id)
            mask = torch.zeros((batch, width), dtype=torch.long)
            labels = torch.full((batch, width), -100)
            for r, (seq, prompt_len) in enumerate(rows):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                labels[r, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])
            yield ids, mask, labels


def sft_arithmetic(
    base: str, out_dir: str | Path, steps: int = 12, batch: int = 8, lr: float = 3e-5, seed: int = 0
) -> Path:
    """Supervised fine-tune `base` on the arithmetic train split; cached in `out_dir`.

    Returns at once if `out_dir` already holds a model made with the same settings.
    """
    out_dir = Path(out_dir)
    recipe = {"base": base, "steps": steps, "batch": batch, "lr": lr, "seed": seed}
    stamp = out_dir / "rlx_sft.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return out_dir
    torch.manual_seed(seed)
    model, tokenizer = load_model_and_tokenizer(base, "float32")
    data = load_task_dataset("arithmetic", split="train", num_examples=steps * batch, seed=seed)
    full = encode_examples(tokenizer, data, "arithmetic")
    prompt_lens = [len(ids) for ids in encode_prompts(tokenizer, data["prompt"])]
    examples = list(zip(full, prompt_lens, strict=True))
    batches = _sft_batches(examples, batch, tokenizer.pad_token_id or 0, seed)
    losses = train_steps(model, batches, steps, lr, "supervised fine-tune (arithmetic)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlx_sft.json").write_text(json.dumps({**recipe}))
        (tmp / "rlx_sft_losses.json").write_text(json.dumps(losses))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
