"""The errors a user can fix: bad configuration, damaged or missing input files, a run directory that cannot
continue. Every command (``sfd ...``: ``sfd_scale/apps``, through ``cli.entry_point``) reports one of these as
one line on stderr, ``error: <message>``, and exits with ``EXIT_USER_ERROR``; anything else is a bug and keeps
its traceback.

A message names the key, file or value at fault and says what to do. The family lives on the ground floor so
that any layer can raise it; the specific kinds live where they are found and keep the built-in base their
callers catch (``config.ConfigError`` and ``checkpoint_store.CheckpointError`` are also ``ValueError``s).
"""
from __future__ import annotations

EXIT_USER_ERROR = 2  # as argparse's usage errors: the command line or its inputs must change


class UserError(Exception):
    """A problem with what the user gave (config, files, run directory); the message says what to do."""


class DataError(UserError, ValueError):
    """The training or evaluation data is missing, incomplete or damaged; the message names the file."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user named is not there."""


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (a KeyError's message without the quotes ``str`` adds)."""
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(err).__name__
