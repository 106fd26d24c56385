"""Shared command-line plumbing for the thin tools: ``--config`` files plus ``key=value`` overrides, and the
one way every tool reports a problem the user can fix.

``entry_point(main)`` wraps a tool's ``main(argv)``: a ``UserError`` (``sfd_scale/errors.py``: config, data,
checkpoint and input-file problems) becomes one line on stderr, ``error: <message>``, and exit status 2
(``EXIT_USER_ERROR``); any other exception is a bug and keeps its traceback. ``--debug`` anywhere on the
command line (taken out before the tool parses it) or ``SFD_DEBUG=1`` re-raises the UserError with its
traceback. Under a multi-rank launch each rank writes at most that one line, ranks other than 0 prefixed with
their rank (a problem only one rank sees is still named); ``python -m sfd_scale.torchrun`` then turns the
workers' status 2 into its own.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from typing import Callable, Optional, Sequence

from .errors import EXIT_USER_ERROR, UserError, one_line

DEBUG_FLAG, DEBUG_ENV = "--debug", "SFD_DEBUG"


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     epilog=f"{DEBUG_FLAG} (or {DEBUG_ENV}=1): show the traceback of an error")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (repeatable; later files override earlier ones)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 model.name=LightningDiT-B/1")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """(argparse namespace, validated Config); a config problem raises ``ConfigError`` (a UserError)."""
    from .config import load_config  # here: a tool's --help and its error path stay light (no torch import)

    args = parser.parse_intermixed_args(argv)
    return args, load_config(args.config, args.overrides)


def report_user_error(err: BaseException) -> None:
    """The one stderr line of a user error (rank > 0 of a multi-rank launch says which rank it is)."""
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1" else f"rank {rank}: "
    print(f"error: {where}{one_line(err)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def as_user_errors(*kinds: type):
    """Inside, an exception of ``kinds`` is about the inputs the command named (a tool's loading step: a
    checkpoint, a config, an image batch) and is raised again as a ``UserError`` with the same message."""
    try:
        yield
    except UserError:
        raise
    except kinds as err:
        raise UserError(one_line(err)) from err


def entry_point(main: Callable) -> Callable:
    """``main(argv)`` -> a tool entry point: its status, or ``EXIT_USER_ERROR`` after one stderr line for a
    ``UserError`` (re-raised with ``--debug`` / ``SFD_DEBUG=1``). ``argv`` None: ``sys.argv[1:]``."""
    @functools.wraps(main)
    def run(argv: Optional[Sequence[str]] = None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return main([a for a in argv if a != DEBUG_FLAG])
        except UserError as err:
            if debug:
                raise
            report_user_error(err)
            return EXIT_USER_ERROR
    return run
