"""Every shipped YAML recipe loads into its config class (a typo in a recipe fails here, not in a
10-minute run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlx.config import GenerateConfig, load_config
from rlx.train_config import PGConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CONFIG_OF = {"grpo": PGConfig, "rloo": PGConfig, "reinforce": PGConfig, "generate": GenerateConfig}


def _config_class(path: Path):
    prefix = path.stem.split("_")[0]
    if prefix == "es":
        from rlx.es_config import ESConfig

        return ESConfig
    if prefix == "quantize":
        from rlx.quant.config import QuantizeConfig

        return QuantizeConfig
    return CONFIG_OF[prefix]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(_config_class(path), str(path))
    assert cfg is not None


def test_pg_recipes_pick_their_learner():
    advantage = {
        name: load_config(PGConfig, str(RECIPES / f"{name}.yaml")).algo.advantage
        for name in ("grpo", "rloo", "reinforce")
    }
    assert advantage == {"grpo": "grpo", "rloo": "rloo", "reinforce": "reinforce_baseline"}
