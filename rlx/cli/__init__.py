"""The `rlx` command.

rlx env                          what rlx found on this machine (start every bug report with it)
rlx model fetch smollm2          download + convert + check the embedded default model
rlx generate [--config F] [key.sub=value ...]
                                 sample and score completions for a task (baseline reward)
rlx generate --show-config       every knob of `rlx generate`, with defaults and help
rlx quantize --base B --finetuned F --method quantlrm --bits 4 --out DIR
                                 int4 export for vLLM (rlx/cli/quantize.py)
rlx eval --model DIR [--model DIR2] --task arithmetic
                                 held-out reward table through vLLM (rlx/cli/eval.py)
rlx diagnose --base smollm2 --finetuned DIR [--top-k 16] [--out DIR]
                                 spectral diagnostics of the update (rlx/cli/diagnose.py)
rlx serve --config recipes/grpo.yaml [port=8000]
                                 a vLLM rollout server for rollout.backend=server (rlx/cli/serve.py)
"""

from __future__ import annotations

import argparse
import json
import sys

from rlx.config import ConfigError, GenerateConfig, describe, load_config
from rlx.errors import report_user_errors


def _model_fetch(args) -> int:
    from rlx.models import ALIASES
    from rlx.models.smollm2 import fetch_smollm2

    if args.name not in ALIASES:
        raise ConfigError(f"unknown model alias {args.name!r}: choose one of {sorted(ALIASES)}")
    path = fetch_smollm2(force=args.force, verify=not args.no_verify)
    print(path)
    return 0


def _env(args) -> int:
    from rlx.hardware import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _generate(args) -> int:
    if args.show_config:
        print(describe(GenerateConfig))
        return 0
    from rlx.cli.generate import run_generate

    run_generate(load_config(GenerateConfig, args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlx", description="RL and ES trainer for causal LMs")
    parser.add_argument("--debug", action="store_true", help="tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True)

    env = commands.add_parser(
        "env", help="CPU features, vLLM build, auto dtypes, int4 serving, GPU: for bug reports"
    )
    env.add_argument("--json", action="store_true", help="print as JSON")
    env.set_defaults(func=_env)

    model = commands.add_parser("model", help="manage models").add_subparsers(
        dest="action", required=True
    )
    fetch = model.add_parser("fetch", help="download and convert an embedded model")
    fetch.add_argument("name", nargs="?", default="smollm2", help="model alias (default smollm2)")
    fetch.add_argument("--force", action="store_true", help="convert again even if cached")
    fetch.add_argument("--no-verify", action="store_true", help="skip the HF-vs-vLLM greedy check")
    fetch.set_defaults(func=_model_fetch)

    gen = commands.add_parser(
        "generate",
        help="sample and score completions for a task",
        description="Overrides are key.sub=value, e.g. rollout.backend=hf task.num_prompts=16",
    )
    gen.add_argument("--config", help="YAML file with GenerateConfig keys")
    gen.add_argument("--show-config", action="store_true", help="list every knob and exit")
    gen.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    gen.set_defaults(func=_generate)

    from rlx.cli.diagnose import add_diagnose_parser
    from rlx.cli.eval import add_eval_parser
    from rlx.cli.quantize import add_quantize_parser
    from rlx.cli.serve import add_serve_parser

    add_quantize_parser(commands)  # rlx quantize: rlx/cli/quantize.py
    add_eval_parser(commands)  # rlx eval: rlx/cli/eval.py
    add_diagnose_parser(commands)  # rlx diagnose: rlx/cli/diagnose.py
    add_serve_parser(commands)  # rlx serve: rlx/cli/serve.py
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors("rlx", args.func, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
