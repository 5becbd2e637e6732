"""Configs of `rlx generate` (rlx/cli/generate.py) and `rlx serve` (rlx/cli/serve.py)."""

from __future__ import annotations

import dataclasses

from rlx.config.common import ModelConfig, RewardConfig, RolloutConfig, TaskConfig
from rlx.config.core import knob, require


@dataclasses.dataclass
class GenerateConfig:
    """`rlx generate`: sample completions for a task's prompts and score them."""

    model: ModelConfig = knob(ModelConfig(), help="the policy model")
    rollout: RolloutConfig = knob(RolloutConfig(), help="sampling settings")
    task: TaskConfig = knob(TaskConfig(), help="prompt source")
    rewards: list[RewardConfig] = knob([], help="reward functions; empty = the task's defaults")
    output_dir: str = knob("runs/generate", help="folder for completions, scores and config")
    show_examples: int = knob(3, help="completions printed in the summary")

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "a non-empty path", self.output_dir)
        require(self.show_examples >= 0, "show_examples", ">= 0", self.show_examples)


@dataclasses.dataclass
class ServeConfig:
    """`rlx serve`: one rollout server (vLLM) for trainers with rollout.backend=server."""

    model: ModelConfig = knob(ModelConfig(), help="the policy model the trainers start from")
    rollout: RolloutConfig = knob(
        RolloutConfig(), help="engine settings (dtype, context, KV cache, block size, seed, LoRA)"
    )
    host: str = knob(
        "127.0.0.1",
        help="address to bind; anything but loopback needs rollout.token (or RLX_SERVE_TOKEN)",
    )
    port: int = knob(8000, help="HTTP port")
    tensor_parallel_size: int = knob(
        1, help="GPUs one model replica is split over (vLLM --tensor-parallel-size)"
    )
    data_parallel_size: int = knob(
        1, help="model replicas this server runs, one per GPU group (vLLM --data-parallel-size)"
    )

    def __post_init__(self) -> None:
        require(bool(self.host), "host", "a non-empty address", self.host)
        require(0 < self.port < 65536, "port", "in 1..65535", self.port)
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        require(tp >= 1, "tensor_parallel_size", ">= 1", tp)
        require(dp >= 1, "data_parallel_size", ">= 1", dp)
