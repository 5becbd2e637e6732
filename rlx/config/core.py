"""The config machinery: `knob` fields, `require` checks, loading from dicts, YAML and overrides.

Precedence, lowest to highest: dataclass defaults, then a YAML file, then `key.sub=value` arguments:

    cfg = load_config(GenerateConfig, "recipes/generate_demo.yaml", ["rollout.temperature=0.7"])

`from_dict` type-checks every value against its field's annotation before the dataclass's own
`__post_init__` checks the ranges. To add a config, write a dataclass whose fields are declared with
`knob(default, help=...)`; nested dataclasses and `list[SomeConfig]` need nothing else. A choice
is a Literal type from choices.py. A key that moved or went is named in the class's `RENAMED`
(old field name -> what to set instead): an old config then gets one line saying what to set.
"""

import copy
import dataclasses
import difflib
import keyword
import os
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from rlx.atomic import atomic_write_text
from rlx.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad config value. Messages raised in `__post_init__` start with the field name, so that
    `from_dict` can prefix the dotted path of the enclosing config (`rollout.` + `top_p must ...`)."""


def knob(default: Any = dataclasses.MISSING, *, help: str) -> Any:
    """A dataclass field with its help text; mutable defaults (lists, dicts, configs) are copied
    for each instance. Leave `default` out for a required field."""
    if default is not dataclasses.MISSING and type(default).__hash__ is None:
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(default), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help})


AUTO_DTYPE = (
    "auto = bfloat16 where the hardware computes it (GPU, AVX-512 bf16 or AMX CPU), else float32"
)
"""What `auto` means for every dtype knob (rlx.hardware.auto_dtype)."""


def require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


# ----------------------------------------------------------------------------- dict -> dataclass


def config_key(field_name: str) -> str:
    """The config key of a field: a Python keyword is declared with a trailing underscore
    (`async_`) and written without it (`rollout.async`)."""
    bare = field_name[:-1] if field_name.endswith("_") else field_name
    return bare if keyword.iskeyword(bare) else field_name


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp` (int -> float, dict -> dataclass) or raise ConfigError."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: keep X's precise error
            return _check(value, arms[0], key)
        for arm in arms:
            try:
                return _check(value, arm, key)
            except ConfigError:
                pass
    elif origin is Literal:
        # type() as well as ==, so that True does not pass for 1 nor 1 for 1.0
        if any(type(value) is type(c) and value == c for c in args):
            return value
        choices = ", ".join(repr(c) for c in args)
        raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
    elif origin is list or tp is list:
        if isinstance(value, list):
            item = args[0] if args else Any
            return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            k_tp, v_tp = args or (Any, Any)
            return {_check(k, k_tp, key): _check(v, v_tp, _join(key, k)) for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, key)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is bool:  # no 0/1 or "true": a typo should not silently flip a switch
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    got = f"{value!r} ({type(value).__name__})"
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {got}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; `prefix` is its dotted path."""
    if not isinstance(data, Mapping):
        got = f"{data!r} ({type(data).__name__})"
        raise ConfigError(f"{prefix or cls.__name__}: expected {cls.__name__} mapping, got {got}")
    hints = get_type_hints(cls)
    fields = {config_key(f.name): f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    renamed = getattr(cls, "RENAMED", {})
    for name, value in data.items():
        if name in renamed:
            raise ConfigError(
                f"config key {_join(prefix, name)!r} was renamed: use {renamed[name]}"
            )
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"did you mean {_join(prefix, close[0])!r}?" if close else ""
            hint = hint or f"valid keys: {', '.join(_join(prefix, f) for f in fields)}"
            raise ConfigError(f"unknown key {_join(prefix, name)!r}; {hint}")
        kwargs[fields[name].name] = _check(value, hints[fields[name].name], _join(prefix, name))
    for name, f in fields.items():
        if f.name not in kwargs and f.default is f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(prefix, name)} is required: {f.metadata.get('help', '')}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix:
            raise ConfigError(f"{prefix}.{e}") from None
        raise


# ----------------------------------------------------------------------------- YAML and overrides


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` and `3E8` as floats (YAML 1.1 wants `1.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


def parse_overrides(args: list[str]) -> dict:
    """Turn `["a.b=1", "c=[x,y]"]` into `{"a": {"b": 1}, "c": ["x", "y"]}`; values are YAML."""
    out: dict = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"bad override {arg!r}: expected key.sub=value (rollout.top_p=0.9)")
        try:
            value = _load_yaml(text)
        except yaml.YAMLError:
            value = text  # not YAML (e.g. "a: b: c"): keep the raw string
        for part in reversed(parts):
            value = {part: value}
        out = merge(out, value)
    return out


def merge(base: dict, override: dict) -> dict:
    """Deep merge into a new dict: nested dicts merge, every other value replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(
    cls: type,
    yaml_path: str | None = None,
    overrides: Sequence[str] = (),
    sections: Sequence[str] | None = None,
) -> Any:
    """Defaults of `cls`, then the YAML file, then `key.sub=value` overrides, all checked.
    `sections`: read only these top-level keys of the file (a recipe's file for another command)."""
    data = to_dict(cls())
    if yaml_path is not None:
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"config file not found: {yaml_path}")
        with open(yaml_path) as f:
            try:
                loaded = _load_yaml(f.read())
            except yaml.YAMLError as e:
                raise ConfigError(f"{yaml_path}: invalid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            got = type(loaded).__name__
            raise ConfigError(f"{yaml_path}: top level must be a mapping of config keys, got {got}")
        loaded = loaded or {}
        if sections is not None:
            loaded = {k: v for k, v in loaded.items() if k in sections}
        data = merge(data, loaded)
    return from_dict(cls, merge(data, parse_overrides(list(overrides))))


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts and lists under its config keys (what `save_config` writes)."""
    if dataclasses.is_dataclass(cfg):
        return {config_key(f.name): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return copy.deepcopy(cfg)


def save_config(cfg: Any, path: str) -> None:
    """Write `cfg` as YAML atomically (see rlx.atomic)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


_REQUIRED = object()


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


def describe(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """Every field of `cls` (nested ones as dotted keys) with type, default and help, for --help.

    `defaults` is the instance whose values are shown (a nested section's defaults are those of
    its parent's default instance, which may differ from the nested class's own defaults)."""
    lines = [f"{cls.__name__}: {(cls.__doc__ or '').strip()}", ""] if not prefix else []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp, help_ = (
            _join(prefix, config_key(f.name)),
            hints[f.name],
            f.metadata.get("help", ""),
        )
        value = _field_default(f) if defaults is None else getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            lines += [f"{key}: {help_}", describe(tp, key, None if value is _REQUIRED else value)]
            continue
        default = " (required)" if value is _REQUIRED else f" = {value!r}"
        lines += [f"  {key}: {_type_name(tp)}{default}", f"      {help_}"]
        item = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if dataclasses.is_dataclass(item):
            lines.append(describe(item, f"{key}[]"))
    return "\n".join(lines)
