"""User errors: one line on stderr and exit status 2, whatever the command.

A mistake in what the user gave (a config value, a dataset, a reward file, a model folder, a
checkpoint to resume from) raises a UserError subclass whose message says what is wrong and what to
do. Every command (`recipes/pg.py`, `recipes/es.py`, `rlx ...`) runs through `report_user_errors`,
which prints `<command>: error: <message>` and returns 2. Any other exception is a bug: it keeps its
traceback and exit status 1. `RLX_DEBUG=1` (or `--debug`) shows the traceback of user errors too,
for bug reports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm


class UserError(Exception):
    """A mistake in the user's input; the message names it and what to do."""


def debug_requested() -> bool:
    return os.environ.get("RLX_DEBUG", "") not in ("", "0")


def report_user_errors(prog: str, fn: Callable[..., Any], *args: Any, debug: bool = False) -> int:
    """fn(*args) -> its exit status (None = 0); a UserError -> one line on stderr, status 2."""
    try:
        return fn(*args) or 0
    except UserError as err:
        if debug or debug_requested():
            raise
        message = " ".join(str(err).split("\n"))  # one line, whatever the message
        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left mid-line
            bar.close()
        print(f"\r{prog}: error: {message}", file=sys.stderr)
        return 2
