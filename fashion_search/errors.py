"""Errors the user can fix: a command's (UserError, reported in one line by ``cli``) and a query's (QueryError and
its kinds, each carrying the HTTP status of the JSON routes)."""
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


class QueryError(ValueError):
    """Bad or refused input: its message is shown on the page and raised to API clients as gr.Error."""
    status = 400


class Busy(QueryError):
    """Too many requests are waiting: refused at once rather than queued without limit."""
    status = 503


class ModelFailure(QueryError):
    """The model failed on the batch this request was in (the other batches are unaffected)."""
    status = 500
