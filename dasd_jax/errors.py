"""Errors caused by the user's input, and how command-line entry points report them."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input: the message names the input that was wrong and what to do instead.

    Command-line entry points print the message alone (no traceback) and exit with
    `exit_status` (2).
    """

    exit_status = 2


class CheckpointError(UserError, ValueError):
    """A checkpoint directory, its config or its tensors cannot be used."""


class TrainingDiverged(UserError):
    """A training step had a non-finite loss or gradient; the message says what to change."""


def exit_on_user_error(main: Callable[..., object]) -> Callable[..., object]:
    """Wraps a CLI `main` so a `UserError` prints `error: <message>` and exits with its
    exit_status (2)."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_status)

    wrapped.__name__ = getattr(main, "__name__", "main")
    wrapped.__doc__ = main.__doc__
    return wrapped
