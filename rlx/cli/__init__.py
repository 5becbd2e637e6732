"""The `rlx` command: one parser, one module per subcommand.

rlx env                          what rlx found on this machine (start every bug report with it)
rlx model fetch smollm2          download + convert + check the embedded default model
rlx generate [--config F] [key.sub=value ...]
                                 sample and score completions for a task (baseline reward)
rlx quantize --base B --finetuned F --method quantlrm --bits 4 --out DIR
                                 int4 export for vLLM
rlx eval --model DIR [--model DIR2] --task arithmetic
                                 held-out reward table through vLLM
rlx diagnose --base smollm2 --finetuned DIR [--top-k 16] [--out DIR]
                                 spectral diagnostics of the update
rlx serve --config recipes/grpo.yaml [port=8000]
                                 a vLLM rollout server for rollout.backend=server
rlx <command> --show-config      every knob of a config-driven command, with defaults and help

Each command lives in rlx/cli/<command>.py with `add_parser` (its flags) and `run` (what it does).
A command module imports only light modules at its top (argparse, rlx.config, rich) and the work
(torch, datasets, transformers, vLLM) when it runs, so `rlx --help` and `--show-config` answer at
once. Every command runs through rlx.errors.report_user_errors: a user's mistake is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse

from rlx.cli import diagnose, env, generate, model, quantize, serve
from rlx.cli import eval as eval_command  # `eval` alone would hide the builtin here
from rlx.errors import report_user_errors

COMMANDS = (env, model, generate, quantize, eval_command, diagnose, serve)  # in `rlx --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlx", description="RL and ES trainer for causal LMs")
    parser.add_argument("--debug", action="store_true", help="tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors("rlx", args.func, args, debug=args.debug)
