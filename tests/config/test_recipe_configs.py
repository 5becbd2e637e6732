"""Every shipped YAML recipe is checked against what it configures: it loads into its config class,
every key it sets reaches the loaded config unchanged, its task (with its options) builds, its
reward functions import, and its model names are known aliases (or local paths). A typo in a
recipe fails here, not in a 10-minute run. New recipes under recipes/ are covered automatically."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlx.config import (
    ConfigError,
    ESConfig,
    GenerateConfig,
    PGConfig,
    QuantizeConfig,
    load_config,
    to_dict,
)
from rlx.config.core import _load_yaml
from rlx.models import ALIASES
from rlx.rewards import load_reward
from rlx.tasks import TASKS, load_task_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
CONFIG_OF = {
    "grpo": PGConfig,
    "rloo": PGConfig,
    "reinforce": PGConfig,
    "multi": PGConfig,
    "es": ESConfig,
    "quantize": QuantizeConfig,
    "generate": GenerateConfig,
}


def _config_class(path: Path) -> type:
    prefix = path.stem.split("_")[0]
    assert prefix in CONFIG_OF, (
        f"{path.name}: no config class known for recipe prefix {prefix!r}; add it to CONFIG_OF"
    )
    return CONFIG_OF[prefix]


def _read_yaml(path: Path) -> dict:
    """The recipe as written, parsed the way load_config parses it (1e-5 is a float)."""
    data = _load_yaml(path.read_text())
    assert isinstance(data, dict) and data, f"{path.name}: empty or not a mapping"
    return data


def _mismatches(written, loaded, key: str = "") -> list[str]:
    """Every place where a value the YAML sets differs from the loaded config's value."""
    if isinstance(written, dict):
        if not isinstance(loaded, dict):
            return [f"{key}: YAML sets a mapping, config has {loaded!r}"]
        out = []
        for name, value in written.items():
            sub = f"{key}.{name}" if key else str(name)
            if name not in loaded:
                out.append(f"{sub}: set in the YAML, absent from the config")
            else:
                out += _mismatches(value, loaded[name], sub)
        return out
    if isinstance(written, list):
        if not isinstance(loaded, list) or len(loaded) != len(written):
            return [f"{key}: YAML sets {written!r}, config has {loaded!r}"]
        out = []
        for i, (w, c) in enumerate(zip(written, loaded, strict=True)):
            out += _mismatches(w, c, f"{key}[{i}]")
        return out
    # Scalars: same value, and a bool stays a bool (True == 1 must not pass); an int written for a
    # float knob (max_minutes: 8) may load as 8.0.
    same_kind = isinstance(written, bool) == isinstance(loaded, bool) and (
        type(written) is type(loaded)
        or (isinstance(written, int | float) and isinstance(loaded, int | float))
    )
    if written is None:
        same_kind = loaded is None
    if not same_kind or written != loaded:
        return [f"{key}: YAML sets {written!r}, config has {loaded!r}"]
    return []


def _task_source(cfg) -> tuple[str, str, int, dict]:
    """(name or path, split, seed, options) of the prompts the recipe reads."""
    if isinstance(cfg, QuantizeConfig):
        return cfg.calib.source, cfg.calib.split, cfg.calib.seed, cfg.calib.options
    return cfg.task.name, cfg.task.split, cfg.task.seed, cfg.task.options


def _model_names(cfg) -> list[str]:
    if isinstance(cfg, QuantizeConfig):
        return [name for name in (cfg.finetuned, cfg.base) if name is not None]
    return [cfg.model.name]


def test_the_glob_finds_the_shipped_recipes():
    assert len(RECIPE_FILES) >= 8, [p.name for p in RECIPE_FILES]
    # Every recipe is mapped to a config class (a new prefix must be added above).
    for path in RECIPE_FILES:
        _config_class(path)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_keys_reach_the_config(path):
    cfg = load_config(_config_class(path), str(path))
    assert isinstance(cfg, _config_class(path))
    problems = _mismatches(_read_yaml(path), to_dict(cfg))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_task_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config(_config_class(path), str(path))
    name, split, seed, options = _task_source(cfg)
    assert name in TASKS or Path(name).exists(), f"{path.name}: unknown task or missing path {name}"
    # The task builds with the recipe's options (an unknown or bad option fails here).
    rows = load_task_dataset(name, split, 2, seed, **options)
    assert len(rows) == 2 and "prompt" in rows.column_names
    held_out = getattr(cfg, "eval", None)
    if held_out is not None and held_out.enabled:
        if held_out.data is not None:
            assert Path(held_out.data).exists(), f"{path.name}: eval.data {held_out.data} missing"
        else:
            rows = load_task_dataset(name, held_out.split, 2, seed, **options)
            assert len(rows) == 2


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_rewards_resolve(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config(_config_class(path), str(path))
    specs = [reward.func for reward in getattr(cfg, "rewards", [])]
    written = [r["func"] for r in _read_yaml(path).get("rewards", [])]
    assert specs == written
    if not specs:  # the task's default rewards are used: those must load too
        name = _task_source(cfg)[0]
        if name in TASKS:
            specs = [spec for spec, _ in TASKS[name].default_rewards]
    for spec in specs:
        assert callable(load_reward(spec)), spec


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_models_are_known(path):
    cfg = load_config(_config_class(path), str(path))
    names = _model_names(cfg)
    assert names, f"{path.name}: names no model"
    for name in names:
        # An alias rlx ships, or a local folder written by another job (quantize's `finetuned`);
        # never a bare word that would be sent to the hub as a typo'd id.
        assert name in ALIASES or name.startswith(("~", "/", ".", "runs/")), (
            f"{path.name}: model {name!r} is neither an alias {sorted(ALIASES)} nor a local path"
        )
    # PG, ES and generate recipes run the shipped model; quantize's base model is the alias too.
    assert any(name in ALIASES for name in names), f"{path.name}: no model alias in {names}"


def test_pg_recipes_pick_their_learner():
    advantage = {
        name: load_config(PGConfig, str(RECIPES / f"{name}.yaml")).algo.learner
        for name in ("grpo", "rloo", "reinforce")
    }
    assert advantage == {"grpo": "grpo", "rloo": "rloo", "reinforce": "reinforce_baseline"}


# --- the checks above can fail -------------------------------------------------------------------


def test_mismatch_walk_reports_changed_values():
    written = {"a": {"b": 1, "c": [1, {"d": "x"}]}, "e": True, "f": None, "g": 8}

    def loaded(**changes):
        base = {"a": {"b": 1, "c": [1, {"d": "x", "z": 0}]}, "e": True, "f": None, "g": 8.0}
        return {**base, **changes}

    assert _mismatches(written, loaded()) == []  # extra config keys and 8 -> 8.0 are fine
    assert _mismatches(written, loaded(a={"b": 2, "c": [1, {"d": "x"}]})) == [
        "a.b: YAML sets 1, config has 2"
    ]
    assert _mismatches(written, loaded(a={"b": 1, "c": [1]}))
    assert _mismatches(written, loaded(a={"b": 1, "c": [1, {"d": "y"}]}))
    assert _mismatches(written, loaded(e=1))
    assert _mismatches(written, loaded(f=0))
    assert _mismatches(written, loaded(g="8"))
    assert _mismatches(written, {k: v for k, v in loaded().items() if k != "e"})


def test_mismatch_walk_on_a_real_recipe():
    path = RECIPES / "grpo.yaml"
    data = to_dict(load_config(PGConfig, str(path)))
    data["rollout"]["temperature"] = 1.0  # what a config that ignored the YAML would hold
    assert _mismatches(_read_yaml(path), data) == [
        "rollout.temperature: YAML sets 0.7, config has 1.0"
    ]


def test_a_broken_recipe_fails_the_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    grpo = yaml.safe_load((RECIPES / "grpo.yaml").read_text())
    typo = {**grpo, "optim": {**grpo["optim"], "lrr": 1e-5}}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(PGConfig, str(tmp_path / "typo.yaml"))
    with pytest.raises(Exception, match="nope"):
        load_reward("rewards/arithmetic.py:nope")
    with pytest.raises(Exception, match="max_operand"):
        load_task_dataset("arithmetic", "train", 2, 0, max_operand=0)
    assert "smollm3" not in ALIASES
