"""`rlx model fetch`: download, convert and check a model rlx ships (rlx/models).

    rlx model fetch smollm2 [--force] [--no-verify]

The embedded default, SmolLM2-135M-Instruct, is converted from its GGUF to a float32 HF folder on
first use anyway; fetching it ahead (on a machine with network access) makes that use instant.
"""

from __future__ import annotations

from rlx.config import ConfigError
from rlx.models import ALIASES


def add_parser(commands) -> None:
    actions = commands.add_parser("model", help="manage models").add_subparsers(
        dest="action", required=True
    )
    fetch = actions.add_parser("fetch", help="download and convert an embedded model")
    fetch.add_argument("name", nargs="?", default="smollm2", help="model alias (default smollm2)")
    fetch.add_argument("--force", action="store_true", help="convert again even if cached")
    fetch.add_argument("--no-verify", action="store_true", help="skip the HF-vs-vLLM greedy check")
    fetch.set_defaults(func=run)


def run(args) -> int:
    """`rlx model fetch`: print the model's local folder."""
    if args.name not in ALIASES:
        raise ConfigError(f"unknown model alias {args.name!r}: choose one of {sorted(ALIASES)}")
    print(ALIASES[args.name](force=args.force, verify=not args.no_verify))
    return 0
