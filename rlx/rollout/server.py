"""Rollouts on vLLM servers in their own processes (rollout.backend=server).

A rollout worker is vLLM's own OpenAI-compatible server (`rlx serve`, rlx/cli/serve.py, starts it)
with two of vLLM's optional route sets:
- the token-in / token-out endpoint `/inference/v1/generate` (`--enable-scale-out`): prompt token
  ids in; completion token ids, text, sampler logprobs and the weight version of every token out;
- the RL endpoints (`VLLM_SERVER_DEV_MODE=1`): /pause, /resume, /init_weight_transfer_engine,
  /start_weight_update, /update_weights, /finish_weight_update, /weight_info. These also expose
  /collective_rpc, so `rlx serve` binds 127.0.0.1 unless given a token (rollout.token or
  RLX_SERVE_TOKEN), which it then requires on every path but /health (rlx/rollout/auth.py).
  The trainer sends it on every call (rlx/rollout/http.py), and the weight-sync group checks that
  every member holds it before weights travel.

`ServerEngine` implements the RolloutEngine protocol over HTTP. Weight sync goes through vLLM's
weight-transfer API, over vLLM's nccl engine on GPUs (rlx/rollout/nccl_sender.py) or rlx's gloo
engine (rlx/rollout/weight_transfer.py), as rollout.sync_backend says. Only trainer rank 0 sends
weights. The design, in four parts (docs/scale.md has the operator's view):

Dispatch by load. All HTTP goes through one asyncio event loop in a background thread, and each
generation request goes to the server with the fewest in flight, at most rollout.max_in_flight
each (rlx/rollout/http.py).

Sync as a transaction. `weight_update(version)` pauses every server, starts an update, lets the
caller's `update_weights(chunk)` calls send the chunks, then finishes with the version and
resumes. A failure in any phase is recorded, not raised at once: the remaining chunks are
drained unsent (under ZeRO-3 the chunks are gathers that every rank must run), then every server
is finished and resumed (on its old version when no chunk had left, else marked incomplete),
the weight-sync group is dropped (the next sync re-makes it), and `SyncFailed` names the server
and the phase. rlx.rollout.sync.push_weights runs the whole update once more after a
`SyncFailed` (it can call the chunk source again); the second failure is the run's error. A
lone `update_weights(...)` outside `weight_update()` holds its whole update and retries alike.
While chunks travel, the servers' /update_weights answers are watched: one that fails ends the
send at once instead of at the timeout.

Versions. The servers' version is f"{run_id}:{step}": `run_id` is the run's (rlx.recipe.Run
keeps it in output_dir, so it survives a resume) and `step` the trainer step whose weights they
are (`Completion.weight_version`). From this engine's first sync on, every completion's version
is checked: another run's id, or a step more than `max_staleness` behind the engine's (0 for
the synchronous loop), or ahead of it, is refused with one line naming the server. A server that
reports no version of this run at all ("default": vLLM's version after a start; or a sync of ours
that it did not finish) was restarted or lost an update: `generate` raises `ServerRestarted` and
drops the weight-sync group, and the loop re-pushes its current weights
(rlx.rollout.sync.generate_synced), which re-makes the group with every server. An exception
rather than a stored callable, because re-pushing is a collective of every trainer rank under
ZeRO-3: only the loop can make all ranks do it together. With adapter.sync=adapter a restarted
server does not sample on its base weights: it refuses the request, since it lost the adapter
the request names (HTTP 404). So a generation that a server refused after a sync reads every
server's version (/weight_info, only then) and raises `ServerRestarted` for one with none of
this run; and unloading an adapter that a server no longer holds (404) is not an error. The
re-push then loads the base model again before the adapter (rlx.weight_sync.AdapterSync).

Deadlines. Every HTTP call and every open and send of the weight-sync group have one
(rollout.timeout_s); a dead or hung server gives one `RolloutWorkerError` naming the server or
the phase of the sync it was in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait

import torch

from rlx.config.common import RolloutConfig
from rlx.errors import UserError
from rlx.rollout.adapter_upload import ROUTE as UPLOAD_ROUTE
from rlx.rollout.adapter_upload import adapter_payload
from rlx.rollout.auth import resolve_token
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
from rlx.rollout.http import EventLoop, Refused, Server, dispatch
from rlx.rollout.weight_transfer import (
    GlooSender,
    RolloutWorkerError,
    SyncAuthError,
    aligned_order,
    raise_first_error,
    resolve_sync_backend,
    update_info,
)


class SyncFailed(RolloutWorkerError):
    """A weight update failed and was rolled back: every server resumed, the group dropped.
    rlx.rollout.sync.push_weights retries the update once on this."""


class ServerRestarted(RolloutWorkerError):
    """A server reports no weights of this run (restarted, or an update of ours it did not
    finish): the loop re-pushes the current weights (rlx.rollout.sync.generate_synced)."""


class _Update:
    """One weight update in progress: its version, and the first failure (then the rest of
    the update is drained unsent and rolled back)."""

    def __init__(self, version: int):
        self.version = version
        self.failure: RolloutWorkerError | None = None
        self.sent = False  # a chunk went out: a failure leaves the servers' weights mixed


class ServerEngine:
    """The RolloutEngine protocol over vLLM servers (see the module docstring)."""

    transactional = True  # rolls failed updates back, checks versions (rlx.rollout.sync)

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
        run_id: str | None = None,
        max_staleness: int = 0,
        max_in_flight: int = RolloutConfig.max_in_flight,
        token: str | None = None,
    ):
        import uuid

        from transformers import AutoTokenizer

        from rlx.models import resolve_model

        if not servers:
            raise UserError("rollout.backend=server needs rollout.servers=[host:port, ...]")
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self._loop = EventLoop()
        self.token = resolve_token(token)  # None or "": RLX_SERVE_TOKEN
        self.servers = [Server(a, timeout_s, self._loop, self.token) for a in servers]
        self.timeout_s = timeout_s
        self.sync_address, self.sync_port = sync_address, sync_port
        self.sync_backend = resolve_sync_backend(sync_backend)  # nccl asked without CUDA: here
        self.sender = sender  # only trainer rank 0 pushes weights
        # the servers' dtype: weights travel in it (vLLM would round them to it on loading anyway)
        self.wire_dtype = getattr(torch, dtype) if dtype else None
        self._limits = LoRALimits(max_loras, max_lora_rank) if enable_lora else None
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.max_staleness = max_staleness  # versions a completion may lag (0: synchronous)
        self.max_in_flight = max_in_flight  # generation requests per server at once
        self.weight_version = 0  # the trainer step of the weights last pushed
        self.synced = False  # versions are checked from this engine's first sync on
        self._sender = None  # GlooSender or NcclSender, once the servers joined
        self._update: _Update | None = None
        self._adapters: set[str] = set()
        try:
            self._check_servers(max_model_len)
        except BaseException:
            self._loop.close()
            raise

    def _check_servers(self, max_model_len: int) -> None:
        """Wait until every server is ready, and refuse one with a shorter context."""
        deadline = time.monotonic() + self.timeout_s
        models = _results([self._loop.submit(s.wait_ready(deadline)) for s in self.servers])
        for server, served in zip(self.servers, models, strict=True):
            if served.get("max_model_len", max_model_len) < max_model_len:
                raise RolloutWorkerError(
                    f"rollout server {server.url} serves max_model_len={served['max_model_len']}, "
                    f"below rollout.max_model_len={max_model_len}: start every server with the "
                    "trainer's rollout settings (rlx serve --config <the recipe's file>)"
                )

    @classmethod
    def from_config(cls, model: str, cfg, rank: int = 0, run_id: str | None = None) -> ServerEngine:
        """Build from a model name and an rlx.config.RolloutConfig (`rank`: the trainer rank;
        `run_id`: the run's, rlx.recipe.Run.run_id). Completions may lag
        rollout.max_staleness versions only with rollout.async=true."""
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
            run_id=run_id,
            max_staleness=cfg.max_staleness if cfg.async_ else 0,
            max_in_flight=cfg.max_in_flight,
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
        calls = [
            (
                f"generating for prompt {i}",
                {
                    "token_ids": ids,
                    "sampling_params": params,
                    "output_mode": "text",
                    "model": names[i] if names else None,
                },
            )
            for i, ids in enumerate(prompt_ids)
        ]
        try:
            answers = self._loop.run(dispatch(self.servers, calls, self.max_in_flight))
        except Refused:
            if self.synced:  # e.g. a restarted server that lost our adapter (module docstring)
                self._find_restarted()
            raise
        completions = []
        for index, (ids, answer) in enumerate(zip(prompt_ids, answers, strict=True)):
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                step = self._check_version(choice, answer)
                completions.append(_completion(index, ids, choice, sampling.logprobs, step))
        return completions

    def _check_version(self, choice: dict, answer: dict) -> int:
        """The trainer step of the weights `choice` was sampled with; raises when this engine
        synced and the version is not one it may train on (see the module docstring)."""
        spans = choice.get("weight_versions") or [{"version": "default"}]
        version = str(spans[0]["version"])  # the oldest: the first tokens'
        run, _, step = version.rpartition(":")
        if not self.synced:
            return int(step) if run == self.run_id and step.isdigit() else 0
        server = answer.get("_server", "a rollout server")
        if run and run != self.run_id and step.isdigit():
            raise RolloutWorkerError(
                f"rollout server {server} serves weights of another run ({version!r}, this run "
                f"is {self.run_id!r}): give each trainer its own rollout.servers"
            )
        if run != self.run_id or not step.isdigit():
            raise self._restarted(server, version)
        lag = self.weight_version - int(step)
        if lag > self.max_staleness or lag < 0:
            raise RolloutWorkerError(
                f"rollout server {server} sampled with the weights of step {step}, "
                f"{'ahead of' if lag < 0 else f'{lag} versions behind'} this trainer's step "
                f"{self.weight_version} (rollout.max_staleness={self.max_staleness}): did it "
                "miss a weight sync?"
            )
        return int(step)

    def _restarted(self, server: str, version: str) -> ServerRestarted:
        """The error for a server that holds weights of no version of this run; the weight-sync
        group is dropped, so the loop's re-push makes a new one with every server."""
        self._drop_sender()
        return ServerRestarted(
            f"rollout server {server} serves weights {version!r}, not this run's "
            f"({self.run_id}:{self.weight_version}): it was restarted or missed an update; "
            "the trainer pushes its weights again"
        )

    def _find_restarted(self) -> None:
        """After a server refused a generation: raise `ServerRestarted` for the first server
        whose version (/weight_info) names no run and step, as `_check_version` would. Servers
        that do not answer, or hold another run's weights, are left to the generation's own
        error."""
        patience = min(self.timeout_s, 10.0)
        probes = [
            self._loop.submit(
                s.acall("reading its weight version", "GET", "/weight_info", timeout_s=patience)
            )
            for s in self.servers
        ]
        wait(probes)
        for server, probe in zip(self.servers, probes, strict=True):
            if probe.exception() is None:
                version = str(probe.result().get("weight_version"))
                run, _, step = version.rpartition(":")
                if not (run and step.isdigit()):
                    raise self._restarted(server.url, version)

    def prompt_logprobs(
        self, token_ids: Sequence[Sequence[int]], adapter: Adapter | None = None
    ) -> list[list[float]]:
        """log p(t_i | t_<i) for i >= 1 of each sequence (raw model distribution; with `adapter`,
        the adapted model's). One sequence at a time, the servers in turn: several
        prompt-logprob requests batched together crash a LoRA-enabled vLLM-CPU engine
        (docs/vllm_cpu.md), and two entries of rollout.servers may be one server."""
        params = {"n": 1, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}
        name = self._load_adapters([adapter], 1)[0] if adapter is not None else None
        out = []
        for i, ids in enumerate(token_ids):
            server = self.servers[i % len(self.servers)]
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
        """Unload every adapter this engine loaded from every server. A server that no longer
        holds one (restarted: HTTP 404) is already where this leaves it."""
        for name in sorted(self._adapters):
            body = {"lora_name": name}
            jobs = self._submit_all(
                f"unloading adapter {name}", "/v1/unload_lora_adapter", json=body
            )
            wait(jobs)
            for job in jobs:
                err = job.exception()
                if err is not None and getattr(err, "status", None) != 404:
                    raise err
        self._adapters.clear()

    def perturb_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise unsupported("server", "perturb", "use es.evaluator=vllm_lora with rollout servers")

    def restore_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise unsupported("server", "perturb", "use es.evaluator=vllm_lora with rollout servers")

    # ---------------------------------------------------------------- weight sync

    def version_name(self, step: int) -> str:
        """The servers' version string of the weights of trainer step `step`."""
        return f"{self.run_id}:{step}"

    @contextlib.contextmanager
    def weight_update(self, version: int | None = None) -> Iterator[None]:
        """One update to `version` (the trainer step of the weights; None: the last + 1) as a
        transaction: pause every server and start an update; the `update_weights` calls inside
        send chunks of it; at the end finish it with the version and resume. On any failure,
        roll back and raise `SyncFailed` (module docstring)."""
        if self._update is not None:  # nested: part of the update in progress
            yield
            return
        version = self.weight_version + 1 if version is None else version
        if not self.sender:  # rank 0 sends; the others wait for it, then expect its version
            self._update = _Update(version)
            try:
                yield
            finally:
                self._update = None
            self.weight_version, self.synced = version, True
            return
        before = self.weight_version, self.synced
        update = self._update = _Update(version)
        try:
            self._step(update, self._connect)
            self._step(
                update,
                self._call_all,
                "pausing for a weight sync",
                "/pause",
                params={"mode": "wait"},
            )
            self._step(update, self._call_all, "starting a weight update", "/start_weight_update")
            yield
            body = {"weight_version": self.version_name(update.version)}
            self._step(
                update,
                self._call_all,
                "finishing a weight update",
                "/finish_weight_update",
                json=body,
            )
            if update.failure is None:
                self.weight_version, self.synced = update.version, True
                self._step(update, self._call_all, "resuming after a weight sync", "/resume")
        except BaseException:  # the caller's own error (the chunks' source): undo, re-raise
            self._roll_back(update, *before)
            raise
        finally:
            self._update = None
        if update.failure is not None:
            self._roll_back(update, *before)
            raise SyncFailed(str(update.failure))

    def _step(self, update: _Update, fn: Callable, *args, **kwargs) -> None:
        """One phase of `update`; skipped after a failure, and a failure is recorded."""
        if update.failure is not None:
            return
        try:
            fn(*args, **kwargs)
        except RolloutWorkerError as err:
            update.failure = err

    def _roll_back(self, update: _Update, version: int, synced: bool) -> None:
        """After a failed update: end it on every server (vLLM ends it itself when a chunk
        failed to load), label the servers' weights with the old version when no chunk had
        left, else as incomplete (which `generate` reports as a server to re-sync), resume
        every server, and drop the weight-sync group. Best effort: every server gets every call
        whatever the others answer. The engine keeps its old `version`."""
        self.weight_version, self.synced = version, synced
        old = self.version_name(version)
        marked = f"{self.version_name(update.version)}-incomplete" if update.sent else old
        # a server still receiving answers once its transport gives up (rollout.timeout_s)
        patience = 2 * self.timeout_s
        for what, path, body in (
            ("finishing an aborted weight update", "/finish_weight_update", {}),
            ("labelling aborted weights", "/update_weight_version", {"new_version": marked}),
            ("resuming after an aborted weight sync", "/resume", None),
        ):
            wait(self._submit_all(what, path, json=body, timeout_s=patience))
        self._drop_sender()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push one chunk of weights (HF names) to every server; outside `weight_update()` the
        chunk is a whole update of its own, retried once. Ranks other than 0 send nothing."""
        if not self.sender:
            if self._update is None:  # rank 0 made it a whole update: expect its version
                self.weight_version, self.synced = self.weight_version + 1, True
            return
        if self._update is None:
            tensors = list(named_tensors)
            retry_once(lambda: self._one_update(tensors))
            return
        update = self._update
        if update.failure is not None:
            return  # drained unsent: the update is rolled back at its end
        tensors = aligned_order([(name, self._wire(t.detach())) for name, t in named_tensors])
        info = update_info(tensors)
        update.sent = True
        receiving = self._submit_all(
            "receiving weights", "/update_weights", json={"update_info": info}
        )
        try:
            try:
                self._sender.send([t for _, t in tensors], info["dtype_names"], peers=receiving)
            except RuntimeError as err:
                if not isinstance(err, RolloutWorkerError):  # the transport's own error
                    # often first (a dead peer's socket reset): give the servers a moment to
                    # say which of them failed, for the error line
                    wait(receiving, timeout=min(self.timeout_s, 5.0), return_when=FIRST_EXCEPTION)
                raise_first_error(receiving)
                raise RolloutWorkerError(
                    f"weight sync ({self.sync_backend}) to the rollout servers failed while "
                    f"sending weights: {str(err)[:300]}"
                ) from None
            _results(receiving)
        except RolloutWorkerError as err:
            update.failure = err

    def _one_update(self, tensors) -> None:
        with self.weight_update():
            self.update_weights(tensors)

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.wire_dtype is None or not tensor.is_floating_point():
            return tensor
        return tensor.to(self.wire_dtype)

    def _submit_all(self, what: str, path: str, **kwargs) -> list[Future]:
        """POST `path` to every server at once (their futures, in server order)."""
        return [self._loop.submit(s.acall(what, "POST", path, **kwargs)) for s in self.servers]

    def _call_all(self, what: str, path: str, **kwargs) -> list:
        return _results(self._submit_all(what, path, **kwargs))

    def _connect(self) -> None:
        """Open the weight-sync group with every server's workers (once; again after a failed
        update or a restarted server dropped it)."""
        if self._sender is not None:
            return
        sizes = [
            answer["world_size"]
            for answer in _results(
                [
                    self._loop.submit(s.acall("reading its world size", "GET", "/get_world_size"))
                    for s in self.servers
                ]
            )
        ]
        offsets, world = rank_offsets(sizes)
        sender = make_sender(self.sync_backend, self.sync_address, self.sync_port, self.token)
        joining = [
            self._loop.submit(
                server.acall(
                    "joining the weight-sync group",
                    "POST",
                    "/init_weight_transfer_engine",
                    json={"init_info": sender.init_info(offset, world, self.timeout_s)},
                )
            )
            for server, offset in zip(self.servers, offsets, strict=True)
        ]
        try:
            sender.open(world, self.timeout_s, peers=joining)
        except RuntimeError as err:
            sender.close()
            self._explain_join_failure(joining, sender.port, err)
        try:
            _results(joining)
        except RolloutWorkerError:
            sender.close()
            raise
        self._sender = sender

    def _drop_sender(self) -> None:
        """Leave the weight-sync group; the next update makes a new one with every server (a
        server that restarted has none, the others replace theirs on joining)."""
        sender, self._sender = self._sender, None
        if sender is not None:
            with contextlib.suppress(Exception):
                sender.close()

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
            self._drop_sender()
        self._loop.close()


def retry_once(attempt: Callable[[], None]) -> None:
    """attempt(); after a `SyncFailed` (rolled back: every server resumed) once more; a second
    failure -> one RolloutWorkerError naming the server and the phase."""
    try:
        attempt()
        return
    except SyncFailed:
        pass
    try:
        attempt()
    except SyncFailed as err:
        raise RolloutWorkerError(f"weight sync failed, and again on its retry: {err}") from None


def _results(jobs: Sequence[Future]) -> list:
    """The answers of server calls in flight, in order; the first failure to come back is
    raised at once, without waiting for the others."""
    wait(jobs, return_when=FIRST_EXCEPTION)
    raise_first_error(jobs)
    return [job.result() for job in jobs]


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


def _completion(
    index: int, prompt_ids: list[int], choice: dict, logprobs: bool, step: int
) -> Completion:
    return Completion(
        prompt_index=index,
        prompt_token_ids=prompt_ids,
        token_ids=list(choice["token_ids"]),
        logprobs=[step["logprob"] for step in choice["logprobs"]["content"]] if logprobs else [],
        text=choice["text"],
        finish_reason="length" if choice["finish_reason"] == "length" else "stop",
        weight_version=step,
    )
