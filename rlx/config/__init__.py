"""Typed configs: dataclasses are the single source of defaults for every command.

Precedence, lowest to highest: the dataclass defaults, a YAML file (`--config`), then
`key.sub=value` arguments. `load_config` type-checks every value against its field's annotation,
then each dataclass's `__post_init__` checks ranges and combinations with `require` / ConfigError
(one line naming the knob). Modules:

    core.py      knob, require, ConfigError, load_config, save_config, describe (the machinery)
    choices.py   every named choice (advantage estimators, backends, ...) as a Literal type and,
                 where rlx/algos, rlx/rollout or rlx/es need the names, a tuple of them
    adapter.py   the `adapter:` section (method, knobs, principal guard, diagnostics)
    common.py    sections shared by the commands: model, rollout, task, rewards, optimizer, the
                 held-out evaluation of training runs, and RunConfig (fields of both loops)
    generate.py  `rlx generate`, `rlx serve`       pg.py  recipes/pg.py       es.py  recipes/es.py
    quant.py     `rlx quantize`, `rlx eval`

Everything public is importable from `rlx.config`.
"""

from rlx.config.adapter import AdaLoraConfig, AdapterConfig
from rlx.config.choices import ADAPTER_METHODS
from rlx.config.common import (
    HeldOutConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    TaskConfig,
)
from rlx.config.core import (
    AUTO_DTYPE,
    ConfigError,
    config_key,
    describe,
    from_dict,
    knob,
    load_config,
    merge,
    parse_overrides,
    require,
    save_config,
    to_dict,
)
from rlx.config.es import LINEAR_PROJECTIONS, EggrollConfig, ESConfig
from rlx.config.generate import GenerateConfig, ServeConfig
from rlx.config.pg import AlgoConfig, PGConfig, WeightingConfig
from rlx.config.quant import (
    CalibrationConfig,
    EvalCommandConfig,
    PseudoFinetuneConfig,
    QuantizeConfig,
    TuneConfig,
)

__all__ = [
    "ADAPTER_METHODS",
    "AdaLoraConfig",
    "AdapterConfig",
    "AUTO_DTYPE",
    "LINEAR_PROJECTIONS",
    "AlgoConfig",
    "CalibrationConfig",
    "ConfigError",
    "config_key",
    "ESConfig",
    "EggrollConfig",
    "EvalCommandConfig",
    "GenerateConfig",
    "ServeConfig",
    "HeldOutConfig",
    "ModelConfig",
    "OptimConfig",
    "PGConfig",
    "PseudoFinetuneConfig",
    "QuantizeConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "TaskConfig",
    "TuneConfig",
    "WeightingConfig",
    "describe",
    "from_dict",
    "knob",
    "load_config",
    "merge",
    "parse_overrides",
    "require",
    "save_config",
    "to_dict",
]
