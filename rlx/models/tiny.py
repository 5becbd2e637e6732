"""Tiny random causal LMs and a small tokenizer, built in seconds, for tests and benchmarks.

Nothing here downloads: the tokenizer is trained with `tokenizers` on a built-in corpus and the
model weights are random. The shapes are chosen so vLLM's CPU kernels accept them (head_dim 64,
matrix sizes multiples of 32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format SmolLM2 and Qwen2 use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Sam has 7 apples and buys 5 more. How many apples does Sam have now?",
    "The answer is <answer>12</answer>. Let me think step by step.",
    "You are a helpful assistant. Put your final answer inside <answer></answer> tags.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = plus minus times",
    "Mia had 14 pencils and gave away 6. How many pencils are left? 14 - 6 = 8.",
    "The quick brown fox jumps over the lazy dog. Hello world, what is the sum?",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a small corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str, vocab_size: int, tie_embeddings: bool):
    """A 2-layer config of the given architecture ("llama" or "qwen2")."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common, head_dim=64)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}: use 'llama' or 'qwen2'")


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    tie_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random tiny causal LM and its tokenizer to `out_dir` (an HF model folder)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    # Round the vocabulary up to a multiple of 32 so vLLM's packed CPU GEMM accepts lm_head.
    vocab_size = -(-len(tokenizer) // 32) * 32
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, tie_embeddings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
