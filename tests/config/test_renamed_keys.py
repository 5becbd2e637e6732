"""Keys that moved: an old config gets one line naming what to set instead, and the new keys
load. The `lora:` section went (adapter.method=lora)."""

from __future__ import annotations

import pytest

from rlx.config import ConfigError, PGConfig, load_config


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
