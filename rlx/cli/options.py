"""The options every config-driven command shares: --config, --show-config, key.sub=value.

A command's config is its dataclass's defaults, then the YAML file of --config, then the command's
flags (each a shorthand for one key), then the `key.sub=value` overrides: the later wins. The
same order as the recipes (rlx/config/core.py's load_config does the reading and checking).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from rlx.config import describe, load_config


def add_config_arguments(parser, config_help: str) -> None:
    """--config FILE, --show-config and the positional overrides."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--show-config", action="store_true", help="list every knob and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def show_config(cls: type) -> int:
    """Print every knob of config class `cls` with its default and help; exit status 0."""
    print(describe(cls))
    return 0


def read_config(
    args,
    cls: type,
    flags: Mapping[str, str] | None = None,
    sections: Sequence[str] | None = None,
):
    """The config of `cls` from --config, the flags set (`flags`: argparse attribute -> config
    key) and the overrides. `sections`: read only these top-level keys of the file."""
    # JSON is YAML: a path stays a string even if it looks like a number or a date
    shorthands = [
        f"{key}={json.dumps(getattr(args, attr))}"
        for attr, key in (flags or {}).items()
        if getattr(args, attr) is not None
    ]
    return load_config(cls, args.config, [*shorthands, *args.overrides], sections=sections)
