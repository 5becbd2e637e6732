"""`rlx env`: what rlx found on this machine, the first thing a bug report shows.

CPU name and flags, the vLLM kernel build loaded, whether vLLM serves int4 here, the dtype each
`auto` knob resolves to, the GPU; rlx/hardware.py finds them.
"""

from __future__ import annotations

import json


def add_parser(commands) -> None:
    p = commands.add_parser(
        "env", help="CPU features, vLLM build, auto dtypes, int4 serving, GPU: for bug reports"
    )
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from rlx.hardware import format_report, report  # deferred: torch and vLLM, when it runs

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
