"""Errors the user can fix, and the command-line wrapper that reports them in one line."""
from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """A problem the user can fix (missing file, offline, bad input): reported in one line, exit code 2."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def cli(main_fn):
    """Run ``main_fn`` as a command: UserError becomes one 'error:' line and exit code 2, no traceback."""
    try:
        main_fn()
    except UserError as exc:
        fail(str(exc))
