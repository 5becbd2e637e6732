import dataclasses
import os
from typing import get_args, get_origin, get_type_hints

import pytest

from rlx.config import (
    ConfigError,
    GenerateConfig,
    RewardConfig,
    RolloutConfig,
    TaskConfig,
    config_key,
    describe,
    from_dict,
    knob,
    load_config,
    merge,
    parse_overrides,
    save_config,
)


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
        return str(path)

    return write


def all_fields(cls, prefix=""):
    """(dotted key, field) for every field, descending into nested and list-of configs."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{config_key(f.name)}"
        yield key, f
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from all_fields(tp, key + ".")
        elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            yield from all_fields(get_args(tp)[0], key + "[].")


def test_defaults_load():
    cfg = load_config(GenerateConfig)
    assert cfg == GenerateConfig()
    assert cfg.model.name == "smollm2" and cfg.model.dtype == "float32"
    assert cfg.rollout.stop == ["</answer>"] and cfg.rollout.top_k == -1
    assert cfg.task.num_prompts is None and cfg.rewards == []


def test_mutable_defaults_are_not_shared():
    a, b = GenerateConfig(), GenerateConfig()
    a.rollout.stop.append("\n")
    a.task.options["x"] = 1
    assert b.rollout.stop == ["</answer>"] and b.task.options == {}


def test_yaml_overrides_defaults_and_keeps_the_rest(write_yaml):
    path = write_yaml("rollout:\n  temperature: 0.5\n  backend: hf\ntask:\n  num_prompts: 10\n")
    cfg = load_config(GenerateConfig, path)
    assert cfg.rollout.temperature == 0.5 and cfg.rollout.backend == "hf"
    assert cfg.task.num_prompts == 10
    assert cfg.rollout.num_samples == 8 and cfg.task.name == "arithmetic"


def test_cli_overrides_beat_yaml(write_yaml):
    path = write_yaml("rollout:\n  temperature: 0.5\n  num_samples: 4\n")
    cfg = load_config(GenerateConfig, path, ["rollout.temperature=0.9", "task.options.digits=3"])
    assert cfg.rollout.temperature == 0.9
    assert cfg.rollout.num_samples == 4
    assert cfg.task.options == {"digits": 3}


def test_nested_and_list_of_configs_from_yaml(write_yaml):
    path = write_yaml(
        "model: {name: /tmp/m, dtype: bfloat16}\n"
        "rewards:\n"
        "  - func: rewards/math.py:correct\n"
        "    weight: 2\n"
        "  - func: rewards.format:tags\n"
    )
    cfg = load_config(GenerateConfig, path)
    assert cfg.model.name == "/tmp/m" and cfg.model.dtype == "bfloat16"
    assert cfg.rewards == [
        RewardConfig("rewards/math.py:correct", 2.0),
        RewardConfig("rewards.format:tags", 1.0),
    ]
    assert isinstance(cfg.rewards[0].weight, float)


def test_unknown_key_names_dotted_key_and_suggestion():
    with pytest.raises(ConfigError, match=r"'rollout\.temprature'.*'rollout\.temperature'"):
        load_config(GenerateConfig, overrides=["rollout.temprature=0.5"])
    with pytest.raises(ConfigError, match=r"'rewards\[0\]\.wieght'.*'rewards\[0\]\.weight'"):
        from_dict(GenerateConfig, {"rewards": [{"func": "a:b", "wieght": 1}]})
    with pytest.raises(ConfigError, match=r"'zzz'.*valid keys: model, rollout"):
        from_dict(GenerateConfig, {"zzz": 1})


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ('rollout.num_samples="8"', "rollout.num_samples", "expected int, got '8'"),
        ("rollout.num_samples=2.5", "rollout.num_samples", "expected int, got 2.5"),
        ("rollout.enable_lora=1", "rollout.enable_lora", "expected bool, got 1"),
        ("rollout.temperature=true", "rollout.temperature", "expected float, got True"),
        ("rollout.stop=[1]", r"rollout.stop\[0\]", "expected str, got 1"),
        ("rollout.stop=x", "rollout.stop", r"expected list\[str\]"),
        ("task.num_prompts=many", "task.num_prompts", "expected int, got 'many'"),
        ("task.options=3", "task.options", r"expected dict\[str, Any\]"),
        ("model=smollm2", "model", "expected ModelConfig"),
        ("rewards=[a:b]", r"rewards\[0\]", "expected RewardConfig"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, key, expected):
    with pytest.raises(ConfigError, match=rf"^{key}: {expected}"):
        load_config(GenerateConfig, overrides=[override])


def test_bad_literal_lists_choices():
    with pytest.raises(
        ConfigError, match=r"rollout\.backend: expected one of 'vllm', 'hf', 'server', got 'tgi'"
    ):
        load_config(GenerateConfig, overrides=["rollout.backend=tgi"])


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load_config(GenerateConfig, overrides=["rollout.temperature=0", "task.num_prompts=null"])
    assert cfg.rollout.temperature == 0.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.task.num_prompts is None


def test_parse_overrides_values():
    out = parse_overrides(
        ["a.b.c=3", "a.b.d=1e-5", "a.e=-3E8", "f=[x, 1.5e2]", "g=hi", "h=", "i=a=b", "f=[y]"]
    )
    assert out == {
        "a": {"b": {"c": 3, "d": 1e-5}, "e": -3e8},
        "f": ["y"],  # later override wins
        "g": "hi",
        "h": None,
        "i": "a=b",
    }
    assert isinstance(out["a"]["b"]["d"], float)


def test_scientific_notation_override_and_yaml_parse_as_float(write_yaml):
    cfg = load_config(GenerateConfig, write_yaml("rollout: {top_p: 5e-1}"))
    assert cfg.rollout.top_p == 0.5
    cfg = load_config(GenerateConfig, overrides=["rollout.temperature=1e-5"])
    assert cfg.rollout.temperature == 1e-5


@pytest.mark.parametrize("arg", ["rollout.temperature", "=3", "a..b=1"])
def test_override_without_key_value_form(arg):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides([arg])


def test_merge_is_deep_and_does_not_mutate():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    out = merge(base, {"a": {"c": [3]}, "e": {"f": 1}})
    assert out == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def test_missing_yaml_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"not found: {path}"):
        load_config(GenerateConfig, path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "3\n"])
def test_yaml_that_is_not_a_mapping(write_yaml, text):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(GenerateConfig, write_yaml(text))


def test_invalid_and_empty_yaml(write_yaml):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(GenerateConfig, write_yaml("rollout: [unclosed\n"))
    assert load_config(GenerateConfig, write_yaml("")) == GenerateConfig()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2048}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"kv_cache_gib": 0}, "kv_cache_gib"),
        ({"stop": [""]}, "stop"),
        ({"max_loras": 0}, "max_loras"),
        ({"max_lora_rank": 0}, "max_lora_rank"),
    ],
)
def test_rollout_validation(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        RolloutConfig(**kwargs)


def test_validation_errors_carry_the_dotted_path():
    with pytest.raises(ConfigError, match=r"^rollout\.top_p must be in \(0, 1\], got 2\.0"):
        load_config(GenerateConfig, overrides=["rollout.top_p=2"])
    with pytest.raises(ConfigError, match=r"^task\.num_prompts must be"):
        load_config(GenerateConfig, overrides=["task.num_prompts=0"])
    with pytest.raises(ConfigError, match=r"^rewards\[1\]\.func must be"):
        from_dict(GenerateConfig, {"rewards": [{"func": "a:b"}, {"func": "no_colon"}]})
    with pytest.raises(ConfigError, match=r"^rewards\[0\]\.func is required"):
        from_dict(GenerateConfig, {"rewards": [{"weight": 1.0}]})
    with pytest.raises(ConfigError, match=r"^show_examples must be >= 0"):
        load_config(GenerateConfig, overrides=["show_examples=-1"])
    with pytest.raises(ConfigError, match=r"^name must be"):
        TaskConfig(name="")


def test_save_config_round_trip(tmp_path):
    cfg = load_config(
        GenerateConfig,
        overrides=[
            "rollout.temperature=1e-5",
            r'rollout.stop=[</answer>, "\n\n"]',  # YAML escapes, as typed in a shell
            "task.options={digits: 3, ops: [+, '-']}",
            "rewards=[{func: rewards/math.py:correct, weight: 0.5}]",
            "task.num_prompts=7",
        ],
    )
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(GenerateConfig, str(path)) == cfg
    assert cfg.rollout.stop == ["</answer>", "\n\n"] and cfg.rollout.temperature == 1e-5
    assert os.listdir(path.parent) == ["config.yaml"]  # no temp file left behind
    save_config(GenerateConfig(), str(path))  # overwrite in place
    assert load_config(GenerateConfig, str(path)) == GenerateConfig()


def test_every_field_has_help_and_describe_mentions_it():
    text = describe(GenerateConfig)
    for key, f in all_fields(GenerateConfig):
        assert f.metadata.get("help"), f"{key} has no help text"
        assert key in text and f.metadata["help"] in text, key
    assert "rollout.backend: 'vllm' | 'hf' | 'server' = 'vllm'" in text
    assert "rewards[].func: str (required)" in text


def test_a_keyword_key_reads_writes_and_reads_back(tmp_path):
    cfg = from_dict(RolloutConfig, {"async": True, "max_staleness": 2})
    assert cfg.async_ and cfg.max_staleness == 2
    path = tmp_path / "saved.yaml"
    save_config(cfg, str(path))
    assert "async: true" in path.read_text()
    assert load_config(RolloutConfig, str(path)) == cfg
    with pytest.raises(ConfigError, match="unknown key 'async_'"):
        from_dict(RolloutConfig, {"async_": True})


def test_describe_shows_the_parents_default_for_a_nested_section():
    @dataclasses.dataclass
    class Inner:
        size: int = knob(1, help="a size")

    @dataclasses.dataclass
    class Outer:
        inner: Inner = knob(Inner(size=7), help="an inner section")

    text = describe(Outer)
    assert "inner.size: int = 7" in text and "= 1" not in text
