"""Every choice list is written once, in rlx/config/choices.py: the config fields are typed with
its Literals, and the registries of rlx/algos, rlx/es and rlx/adapters hold exactly its names."""

from __future__ import annotations

import dataclasses
from typing import get_args, get_origin, get_type_hints

import pytest

from rlx.config import (
    ConfigError,
    ESConfig,
    EvalCommandConfig,
    GenerateConfig,
    PGConfig,
    QuantizeConfig,
    ServeConfig,
    choices,
    load_config,
)

COMMAND_CONFIGS = [
    PGConfig,
    ESConfig,
    GenerateConfig,
    ServeConfig,
    QuantizeConfig,
    EvalCommandConfig,
]


def fields(cls, prefix=""):
    """(dotted key, type, help) of every field, nested sections included."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        yield key, tp, f.metadata.get("help")
        if dataclasses.is_dataclass(tp):
            yield from fields(tp, key + ".")
        elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            yield from fields(get_args(tp)[0], key + "[].")


def test_the_registries_hold_exactly_the_config_names():
    from rlx.adapters.methods import METHODS
    from rlx.algos import eggroll, pg

    assert set(pg.ADVANTAGES) == set(choices.ADVANTAGE_ESTIMATORS)
    assert set(choices.GROUP_ESTIMATORS) < set(choices.ADVANTAGE_ESTIMATORS)
    assert set(eggroll.SHAPERS) == set(choices.FITNESS_SHAPINGS)
    assert set(METHODS) == set(choices.ADAPTER_METHODS) - {"none"}


@pytest.mark.parametrize(
    "key, names",
    [
        ("algo.learner", choices.ADVANTAGE_ESTIMATORS),
        ("algo.loss_aggregation", choices.LOSS_AGGREGATIONS),
        ("algo.importance_level", choices.IMPORTANCE_LEVELS),
        ("algo.tis_mode", choices.TIS_MODES),
        ("algo.reward_normalization", choices.REWARD_NORMALIZATIONS),
        ("algo.scale_rewards", choices.REWARD_SCALES),
        ("weighting.method", choices.WEIGHTING_METHODS),
        ("adapter.method", choices.ADAPTER_METHODS),
        ("rollout.backend", choices.ROLLOUT_BACKENDS),
        ("rollout.sync_backend", choices.SYNC_BACKENDS),
    ],
)
def test_a_pg_choice_is_checked_against_its_one_list(key, names):
    types = {k: tp for k, tp, _ in fields(PGConfig)}
    assert get_args(types[key]) == names
    with pytest.raises(
        ConfigError, match=rf"^{key}: expected one of {', '.join(map(repr, names))}"
    ):
        load_config(PGConfig, None, [f"{key}=nope"])


@pytest.mark.parametrize(
    "key, names",
    [
        ("es.backend", choices.ES_BACKENDS),
        ("es.noise", choices.NOISE_KINDS),
        ("es.fitness_shaping", choices.FITNESS_SHAPINGS),
        ("es.prompt_assignment", choices.PROMPT_ASSIGNMENTS),
    ],
)
def test_an_es_choice_is_its_one_list(key, names):
    types = {k: tp for k, tp, _ in fields(ESConfig)}
    assert get_args(types[key]) == names


def test_the_es_and_algos_modules_use_the_config_lists():
    import rlx.es
    from rlx.algos import eggroll, pg
    from rlx.es import population

    assert rlx.es.BACKENDS is choices.ES_BACKENDS
    assert population.ASSIGNMENTS is choices.PROMPT_ASSIGNMENTS
    assert eggroll.NOISE_KINDS is choices.NOISE_KINDS
    assert pg.TIS_MODES is choices.TIS_MODES and pg.REWARD_SCALES is choices.REWARD_SCALES


@pytest.mark.parametrize("cls", COMMAND_CONFIGS, ids=lambda c: c.__name__)
def test_every_knob_of_every_command_has_a_one_line_help(cls):
    for key, _, help_ in fields(cls):
        assert help_ and "\n" not in help_, f"{cls.__name__}.{key}: no one-line help"


def test_the_config_layer_imports_nothing_above_it():
    """rlx/config imports only rlx.config, rlx.atomic and rlx.errors (no algos, no torch)."""
    import ast
    from pathlib import Path

    root = Path(choices.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlx"):
                allowed = ("rlx.config", "rlx.atomic", "rlx.errors")
                assert node.module.startswith(allowed), f"{path.name} imports {node.module}"
