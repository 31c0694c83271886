"""The project's user-facing error type and the one-line reporting every entry point uses.

Entry points (the `trl-rejection` CLI, the recipes) wrap their work in `user_errors()`: a `UserError` (bad input, bad
configuration, an unsafe output folder) prints one line, `error: <what, where, fix>`, and exits with status 2. Set
`TRL_REJECTION_DEBUG=1` (or pass `--debug` to the CLI) to see the traceback instead.

Example:
    >>> str(UserError("max_length is -1. Fix: give a positive number of tokens."))
    'max_length is -1. Fix: give a positive number of tokens.'
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

DEBUG_ENV = "TRL_REJECTION_DEBUG"


class UserError(ValueError):
    """An error the user can fix: the message names the file / record / field or option, and the fix."""




class MixDataError(UserError):
    """A bad input record or argument: names the file, the record id and the field, and says how to fix it.

    Example:
        >>> str(MixDataError("a.json", "7", "conversations", "is missing", "add a conversations list"))
        "a.json: record '7', field 'conversations': is missing. Fix: add a conversations list."
    """

    def __init__(self, file: str, record_id: str | None, field: str | None, problem: str, fix: str):
        self.file, self.record_id, self.field = str(file), record_id, field
        where = [f"record {record_id!r}"] * (record_id is not None) + [f"field {field!r}"] * (field is not None)
        fix += "" if fix.endswith(".") else "."  # a fix may end in "..." or "e.g."
        super().__init__(f"{file}{': ' + ', '.join(where) if where else ''}: {problem}. Fix: {fix}")


def debug_enabled() -> bool:
    """True when `TRL_REJECTION_DEBUG` is set to a true value: errors then show their traceback."""
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` (and `FileExistsError`) raised inside into `error: ...` on stderr and exit status 2."""
    try:
        yield
    except (UserError, FileExistsError) as e:
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
