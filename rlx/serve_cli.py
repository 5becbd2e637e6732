"""`rlx serve`: start one rollout server for trainers that run with rollout.backend=server.

    rlx serve --config recipes/grpo.yaml --port 8000          # model + rollout settings of a recipe
    rlx serve model.name=smollm2 rollout.dtype=float32 host=0.0.0.0 port=8001
    rlx serve --show-config

Only the file's `model` and `rollout` sections are read, so a trainer and its servers share one
config file and cannot disagree on dtype, context length or LoRA limits. The process becomes
vLLM's own server (rlx/rollout/server.py says which endpoints and why it binds 127.0.0.1 by
default); stop it with Ctrl-C or SIGTERM.
"""

from __future__ import annotations


def _serve(args) -> int:
    from rlx.config import ServeConfig, describe, load_config

    if args.show_config:
        print(describe(ServeConfig))
        return 0
    cfg = load_config(ServeConfig, args.config, args.overrides, sections=("model", "rollout"))
    from rlx.rollout.server import serve

    serve(cfg.model.name, cfg.rollout, cfg.host, cfg.port)  # does not return
    return 0


def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="start a vLLM rollout server for rollout.backend=server",
        description="Overrides are key.sub=value, e.g. port=8001 rollout.dtype=float32",
    )
    serve.add_argument("--config", help="a recipe's YAML file (its model and rollout sections)")
    serve.add_argument("--show-config", action="store_true", help="list every knob and exit")
    serve.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    serve.set_defaults(func=_serve)
