"""The config sections every command shares: model, rollout engine, task, rewards, optimizer, the
held-out evaluation of the training loops, and the run fields both loops have (RunConfig)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rlx.config.choices import AutoDtype, Dtype, LrSchedule, OnError, RolloutBackend, SyncBackend
from rlx.config.core import AUTO_DTYPE, knob, require


@dataclasses.dataclass
class ModelConfig:
    """The policy model."""

    name: str = knob("smollm2", help='alias ("smollm2"), a local HF model directory, or a hub id')
    dtype: Dtype = knob("float32", help="trainer-side parameter dtype")

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "a non-empty string", self.name)


@dataclasses.dataclass
class RolloutConfig:
    """How completions are sampled."""

    backend: RolloutBackend = knob(
        "vllm",
        help="generation engine: vllm in this process; server = vLLM servers started with "
        "`rlx serve` (rollout.servers); hf is the slow fallback",
    )
    servers: list[str] = knob(
        [], help="rollout.backend=server: the servers' host:port; each step's prompts are split"
    )
    timeout_s: float = knob(
        600.0, help="rollout.backend=server: longest wait for any server call (weight sync too)"
    )
    sync_address: str = knob(
        "127.0.0.1",
        help="rollout.backend=server: this trainer's address as the servers reach it (weight sync)",
    )
    sync_port: int = knob(0, help="rollout.backend=server: weight-sync rendezvous port; 0 = free")
    sync_backend: SyncBackend = knob(
        "auto",
        help="rollout.backend=server: weight-sync transport, the same on the trainer and its "
        "servers (both read this file); auto = nccl where a GPU is present, else gloo; gloo also "
        "runs on GPUs (slower, through host memory)",
    )
    token: str = knob(
        "",
        help="rollout.backend=server: the token `rlx serve` requires on every call but /health; "
        "empty = the RLX_SERVE_TOKEN environment variable (servers beyond loopback need one)",
    )
    async_: bool = knob(
        False,
        help="generate the next batches while the learner trains (a producer thread on the "
        "newest synced weights); the loss corrects the lag with the sampler's logprobs",
    )
    max_staleness: int = knob(
        1,
        help="rollout.async=true: drop (and count) completions sampled more than this many weight "
        "versions before the trainer's current weights; the synchronous loop accepts none",
    )
    max_in_flight: int = knob(
        64,
        help="rollout.backend=server: most generation requests (one prompt's num_samples "
        "completions each) one server holds at once; the rest wait in the trainer and go to "
        "the first server with a free slot. Raise it when max_in_flight x num_samples is below "
        "the sequences a server's engine batches (rollout.max_num_seqs), so its batches stay "
        "full; lower it to let faster servers take more of the prompts",
    )
    num_samples: int = knob(8, help="completions sampled per prompt (the group size)")
    max_new_tokens: int = knob(64, help="most tokens generated per completion")
    temperature: float = knob(1.0, help="sampling temperature; 0 = greedy")
    top_p: float = knob(1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    top_k: int = knob(-1, help="sample from the k most likely tokens; -1 = off")
    stop: list[str] = knob(["</answer>"], help="stop after any of these strings (kept in output)")
    dtype: AutoDtype = knob(
        "auto",
        help=f"engine dtype; {AUTO_DTYPE} (the HF backend: float32)",
    )
    max_model_len: int = knob(1024, help="engine context length: prompt plus completion tokens")
    kv_cache_gib: int = knob(1, help="KV cache size in whole GiB (vLLM CPU backend)")
    block_size: int | None = knob(
        None,
        help="vLLM KV block size in tokens; prompts share cached prefixes in whole blocks; "
        "null = 32 on CPU (vLLM-CPU's own default is 128), vLLM's default on GPU",
    )
    gpu_memory_utilization: float = knob(
        0.3,
        help="vLLM on a GPU: the share of GPU memory the engine may take (weights + KV cache); "
        "the in-process engine shares the GPU with the trainer, so keep it below 1 - the "
        "trainer's share; ignored on CPU (kv_cache_gib sizes the cache)",
    )
    sleep: bool = knob(
        False,
        help="in-process vLLM on a GPU: free the engine's GPU memory (vLLM sleep mode, level 1) "
        "while the trainer steps and wake it before generating; not available on CPU",
    )
    max_num_seqs: int | None = knob(
        None, help="most sequences vLLM runs at once; null = vLLM's default"
    )
    seed: int = knob(0, help="sampling seed")
    enable_lora: bool = knob(False, help="let the engine serve LoRA adapters")
    max_loras: int = knob(1, help="LoRA adapters the engine holds at once")
    max_lora_rank: int = knob(8, help="largest LoRA rank the engine accepts")

    def __post_init__(self) -> None:
        require(self.num_samples >= 1, "num_samples", ">= 1", self.num_samples)
        require(self.max_staleness >= 0, "max_staleness", ">= 0", self.max_staleness)
        require(self.max_in_flight >= 1, "max_in_flight", ">= 1", self.max_in_flight)
        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        room = f"< max_model_len ({self.max_model_len}), leaving room for the prompt"
        require(
            self.max_new_tokens < self.max_model_len, "max_new_tokens", room, self.max_new_tokens
        )
        require(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        require(self.top_k == -1 or self.top_k >= 1, "top_k", "-1 (off) or >= 1", self.top_k)
        require(all(self.stop), "stop", "a list of non-empty strings", self.stop)
        require(self.kv_cache_gib >= 1, "kv_cache_gib", ">= 1", self.kv_cache_gib)
        b = self.block_size
        require(b is None or (b >= 16 and b % 16 == 0), "block_size", "null or a multiple of 16", b)
        require(self.max_loras >= 1, "max_loras", ">= 1", self.max_loras)
        require(self.max_lora_rank >= 1, "max_lora_rank", ">= 1", self.max_lora_rank)
        require(self.timeout_s > 0, "timeout_s", "> 0", self.timeout_s)
        gpu = self.gpu_memory_utilization
        require(0 < gpu <= 1, "gpu_memory_utilization", "in (0, 1]", gpu)
        n = self.max_num_seqs
        require(n is None or n >= 1, "max_num_seqs", "null or >= 1", n)
        require(
            not self.sleep or self.backend == "vllm",
            "sleep",
            "false unless rollout.backend=vllm (the in-process engine)",
            self.sleep,
        )
        require(0 <= self.sync_port < 65536, "sync_port", "0 (free) or a port", self.sync_port)
        if self.backend == "server":
            require(
                bool(self.servers) and all(":" in s for s in self.servers),
                "servers",
                "a non-empty list of host:port with rollout.backend=server",
                self.servers,
            )


@dataclasses.dataclass
class TaskConfig:
    """Which prompts to use."""

    name: str = knob(
        "arithmetic", help="registered task name, or a path to a jsonl/parquet/saved dataset"
    )
    split: str = knob("test", help="dataset split to read")
    num_prompts: int | None = knob(None, help="number of prompts to use; null = all")
    seed: int = knob(0, help="seed for picking prompts and for generated tasks")
    options: dict[str, Any] = knob({}, help="task-specific settings passed to the task builder")

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "a non-empty string", self.name)
        n = self.num_prompts
        require(n is None or n >= 1, "num_prompts", "null (all) or >= 1", n)


@dataclasses.dataclass
class RewardConfig:
    """One reward function and its weight in the total reward."""

    func: str = knob(help='"path/to/file.py:function" or "package.module:function"')
    weight: float = knob(1.0, help="multiplier of this reward in the weighted sum")

    def __post_init__(self) -> None:
        target, _, name = self.func.rpartition(":")
        form = '"file.py:function" or "module:function"'
        require(bool(target and name), "func", form, self.func)
        require(math.isfinite(self.weight), "weight", "finite", self.weight)


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warm-up, then a constant or decaying learning rate."""

    lr: float = knob(3e-5, help="peak learning rate")
    weight_decay: float = knob(0.0, help="AdamW weight decay")
    warmup_steps: int = knob(0, help="linear warm-up steps")
    schedule: LrSchedule = knob(
        "constant", help="after warm-up: keep lr, or decay it to 0 at the run's last step (`steps`)"
    )
    max_grad_norm: float = knob(1.0, help="gradient-norm clip; 0 = off")

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        require(self.max_grad_norm >= 0, "max_grad_norm", ">= 0", self.max_grad_norm)


@dataclasses.dataclass
class HeldOutConfig:
    """Held-out evaluation of a training run, before and after training (greedy, one completion
    per prompt). The prompts are the training task's `split` split, or those of `data`."""

    split: str = knob("test", help="held-out split of the task (or of a saved DatasetDict in data)")
    data: str | None = knob(
        None,
        help="held-out prompts from their own .jsonl / .json / .parquet file or save_to_disk "
        "folder (like TRL's eval_dataset); null = the training task's split",
    )
    num_prompts: int = knob(200, help="held-out prompts evaluated (fewer if the data has fewer)")
    max_new_tokens: int = knob(64, help="most tokens per evaluated completion")
    enabled: bool = knob(True, help="run the before/after evaluation")

    def __post_init__(self) -> None:
        require(self.num_prompts >= 1, "num_prompts", ">= 1", self.num_prompts)


@dataclasses.dataclass
class RunConfig:
    """What both training loops (recipes/pg.py, recipes/es.py) configure the same way: the model,
    data and rewards, how long to train, and where the outputs go."""

    model: ModelConfig = knob(ModelConfig(), help="the policy model")
    rollout: RolloutConfig = knob(RolloutConfig(), help="the rollout engine and its sampling")
    task: TaskConfig = knob(TaskConfig(split="train"), help="training prompts")
    rewards: list[RewardConfig] = knob([], help="reward functions; empty = the task's defaults")
    eval: HeldOutConfig = knob(HeldOutConfig(), help="held-out evaluation")
    steps: int = knob(30, help="training steps (one rollout batch each)")
    prompts_per_step: int = knob(8, help="training prompts per step, over all processes")
    max_prompt_tokens: int = knob(512, help="longest prompt accepted, in tokens")
    long_prompts: OnError = knob(
        "error", help="a prompt over max_prompt_tokens: stop with an error, or skip it (logged)"
    )
    bad_steps: OnError = knob(
        "error",
        help="a reward function failure (PG: or a NaN loss): stop with an error, or skip the step",
    )
    seed: int = knob(0, help="seed for data order, sampling and initialisation")
    output_dir: str = knob("runs/run", help="metrics, checkpoints, eval.json, plots")
    save_every: int = knob(0, help="checkpoint every k steps; 0 = only at the end")
    resume_from: str | None = knob(None, help='checkpoint folder, or "latest" in output_dir')
    overwrite_output_dir: bool = knob(
        False, help="a new run into an output_dir holding a run removes that run's outputs first"
    )
    log_with: list[str] = knob(["tensorboard"], help="accelerate trackers: tensorboard, wandb")
    max_minutes: float = knob(0.0, help="stop training after this wall time; 0 = no limit")
    max_run_minutes: float = knob(
        0.0,
        help="stop training early enough that the whole run, start-up and the final evaluation "
        "included, ends within this wall time; 0 = no limit",
    )

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", ">= 1", self.steps)
        require(self.prompts_per_step >= 1, "prompts_per_step", ">= 1", self.prompts_per_step)
        require(self.save_every >= 0, "save_every", ">= 0", self.save_every)
        require(self.max_minutes >= 0, "max_minutes", ">= 0", self.max_minutes)
        require(self.max_run_minutes >= 0, "max_run_minutes", ">= 0", self.max_run_minutes)
