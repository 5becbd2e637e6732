"""Keys that moved: an old config gets one line naming what to set instead, and the new keys
load. The `lora:` section went (adapter.method=lora); the dynamic-weighting knobs moved from
`algo:` to their own `weighting:` section."""

from __future__ import annotations

import pytest

from rlx.config import ConfigError, PGConfig, WeightingConfig, load_config, save_config

OLD_WEIGHTING_KEYS = {
    "algo.reward_weighting=gradient": "weighting.method",
    "algo.hv_every=2": "weighting.hv_every",
    "algo.hv_prompts=4": "weighting.hv_prompts",
    "algo.hv_minimise=[x]": "weighting.hv_minimise",
    "algo.hv_validation={a: b.py:c}": "weighting.hv_validation",
    "algo.hv_adapt_weights=true": "weighting.hv_adapt_weights",
    "algo.hv_adapt_lr=0.5": "weighting.hv_adapt_lr",
    "algo.grad_lambda=1e-3": "weighting.grad_lambda",
    "algo.grad_layers=[1]": "weighting.grad_layers",
}


def one_line_error(overrides=(), yaml_path=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(PGConfig, yaml_path, list(overrides))
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("override", ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"])
def test_an_old_lora_override_is_one_line_naming_adapter_method_lora(override):
    message = one_line_error([override])
    assert message.startswith("config key 'lora' was renamed: use adapter.method=lora"), message
    assert "adapter.rank, adapter.alpha, adapter.target_modules" in message


def test_an_old_lora_section_in_a_yaml_file_is_the_same_error(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("lora:\n  enabled: true\n  rank: 8\nsteps: 2\n")
    assert "use adapter.method=lora" in one_line_error(yaml_path=str(path))
    path.write_text("lora: {enabled: false}\n")  # a config saved before: nothing to train
    assert "adapter.method=none" in one_line_error(yaml_path=str(path))


def test_what_lora_enabled_trained_is_adapter_method_lora():
    cfg = load_config(PGConfig, None, ["adapter.method=lora", "adapter.rank=4"])
    assert (cfg.adapter.method, cfg.adapter.rank, cfg.adapter.alpha) == ("lora", 4, 32.0)
    assert not hasattr(cfg, "lora")


@pytest.mark.parametrize("override, new", OLD_WEIGHTING_KEYS.items())
def test_an_old_weighting_key_is_one_line_naming_the_new_key(override, new):
    old = override.partition("=")[0]
    assert one_line_error([override]) == f"config key {old!r} was renamed: use {new}"


def test_the_weighting_section_loads_checks_and_round_trips(tmp_path):
    overrides = [
        f"{new}={override.partition('=')[2]}" for override, new in OLD_WEIGHTING_KEYS.items()
    ]
    cfg = load_config(PGConfig, None, overrides)
    assert cfg.weighting == WeightingConfig(
        method="gradient",
        hv_every=2,
        hv_prompts=4,
        hv_minimise=["x"],
        hv_validation={"a": "b.py:c"},
        hv_adapt_weights=True,
        hv_adapt_lr=0.5,
        grad_lambda=1e-3,
        grad_layers=[1],
    )
    save_config(cfg, str(tmp_path / "config.yaml"))  # what a resumed run reads back
    assert load_config(PGConfig, str(tmp_path / "config.yaml")) == cfg
    assert PGConfig().weighting.method == "static"
    with pytest.raises(ConfigError, match=r"^weighting\.grad_lambda must be a finite number > 0"):
        load_config(PGConfig, None, ["weighting.grad_lambda=0"])
    with pytest.raises(ConfigError, match=r"^weighting\.method: expected one of 'static', "):
        load_config(PGConfig, None, ["weighting.method=pareto"])
