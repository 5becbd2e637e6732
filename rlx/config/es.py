"""Config of the evolution-strategies loop (recipes/es.py): EGGROLL's knobs and the run around them."""

from __future__ import annotations

import dataclasses

from rlx.config.choices import (
    AutoDtype,
    ESBackend,
    ESOptimizer,
    FitnessShaping,
    NoiseKind,
    PromptAssignment,
)
from rlx.config.common import ModelConfig, RolloutConfig, RunConfig
from rlx.config.core import AUTO_DTYPE, ConfigError, knob, require

LINEAR_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class EggrollConfig:
    """The ES learner: population, noise, fitness shaping, optimizer, population backend."""

    population_size: int = knob(32, help="members N per step; even (antithetic pairs)")
    rank: int = knob(1, help="rank r of each member's perturbation A B^T")
    sigma: float = knob(1e-3, help="noise scale: E = A B^T has entries of std sigma")
    noise: NoiseKind = knob(
        "low_rank", help="EGGROLL low-rank noise, or full-rank Gaussian (the plain ES baseline)"
    )
    noise_reuse: int = knob(1, help="steps sharing one noise draw; 0 = one draw for the whole run")
    fitness_shaping: FitnessShaping = knob(
        "group_zscore", help="fitness -> update weights (rlx/algos/eggroll.py SHAPERS)"
    )
    prompt_assignment: PromptAssignment = knob(
        "all",
        help="all: every member answers every step prompt; grouped: N/P members per prompt",
    )
    backend: ESBackend = knob(
        "hf_batched",
        help="population evaluation: batched HF forward, vLLM multi-LoRA (the fastest on CPU, "
        "recipes/es.yaml), or in-place perturbation",
    )
    population_dtype: AutoDtype = knob(
        "auto",
        help=f"dtype of the hf_batched backend's model copy; {AUTO_DTYPE}",
    )
    members_per_batch: int = knob(
        0, help="members per generate call; 0 = all of a process's members (vllm_lora: up to 64)"
    )
    target_modules: list[str] = knob(
        LINEAR_PROJECTIONS,
        help='evolved nn.Linear module names; "all-linear" = every nn.Linear but a tied lm_head',
    )
    optimizer: ESOptimizer = knob("sgd", help="torch optimizer fed -step_direction")
    lr: float = knob(5e-4, help="learning rate: SGD moves W by lr * (1/N) sum f~_i E_i / sigma")
    momentum: float = knob(0.0, help="SGD momentum")
    weight_decay: float = knob(0.0, help="optimizer weight decay")
    warmup_steps: int = knob(0, help="linear learning-rate warm-up steps")

    def __post_init__(self) -> None:
        n = self.population_size
        require(n >= 2 and n % 2 == 0, "population_size", "even and >= 2", n)
        require(self.rank >= 1, "rank", ">= 1", self.rank)
        require(self.sigma > 0, "sigma", "> 0", self.sigma)
        require(self.noise_reuse >= 0, "noise_reuse", ">= 0", self.noise_reuse)
        require(self.members_per_batch >= 0, "members_per_batch", ">= 0", self.members_per_batch)
        require(
            bool(self.target_modules), "target_modules", "a non-empty list", self.target_modules
        )
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        if self.noise == "full_rank" and self.backend != "inplace":
            raise ConfigError(
                f"backend {self.backend!r} evaluates low-rank noise only: "
                "use es.backend=inplace for es.noise=full_rank"
            )


@dataclasses.dataclass
class ESConfig(RunConfig):
    """recipes/es.py: EGGROLL evolution strategies on the rlx tasks and rewards."""

    model: ModelConfig = knob(ModelConfig(), help="the policy model (float32 master weights)")
    rollout: RolloutConfig = knob(
        RolloutConfig(num_samples=1, temperature=0.0),
        help="decoding of population members (greedy by default) and the engine for evaluation",
    )
    es: EggrollConfig = knob(EggrollConfig(), help="the ES learner")
    steps: int = knob(20, help="ES updates (one population evaluation each)")
    output_dir: str = knob("runs/es", help="metrics, checkpoints, eval.json, plots")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.dtype != "float32":
            # the update is cast to the master's dtype: es.yaml's step (RMS 1.25e-3 on weights of
            # std 0.2) loses 27% of its entries in bf16, a 26% relative error
            raise ConfigError(
                f"model.dtype={self.model.dtype}: ES steps round away in a bf16 master; set "
                "model.dtype=float32 (the population still runs in es.population_dtype or "
                "rollout.dtype)"
            )
        r = self.rollout
        if r.temperature == 0 and r.num_samples > 1:
            rule = "1 with greedy decoding (temperature 0)"
            require(False, "rollout.num_samples", rule, r.num_samples)
        if self.es.backend == "vllm_lora" and r.backend not in ("vllm", "server"):
            raise ConfigError("es.backend=vllm_lora needs rollout.backend=vllm or server")
        if self.es.prompt_assignment == "grouped":
            group, rest = divmod(self.es.population_size, self.prompts_per_step)
            if rest or group % 2:
                raise ConfigError(
                    f"es.prompt_assignment=grouped needs es.population_size "
                    f"({self.es.population_size}) = prompts_per_step ({self.prompts_per_step}) "
                    "x an even group size (antithetic pairs share a prompt)"
                )
