"""Shared command-line plumbing of the ``sfd`` commands (``sfd_scale/apps``, one module per command):
``--config`` files (a path or a shipped config by name, ``config.find_config_file``) plus ``key=value`` overrides,
the ``--help`` epilog, and the one way every command reports a problem the user can fix.

``entry_point(main)`` wraps a command's ``main(argv)``: a ``UserError`` (``sfd_scale/errors.py``: config, data,
checkpoint and input-file problems) becomes one line on stderr, ``error: <message>``, and exit status 2
(``EXIT_USER_ERROR``); any other exception is a bug and keeps its traceback. ``--debug`` anywhere on the
command line (taken out before the tool parses it) or ``SFD_DEBUG=1`` re-raises the UserError with its
traceback. Under a multi-rank launch each rank writes at most that one line, ranks other than 0 prefixed with
their rank (a problem only one rank sees is still named); ``python -m sfd_scale.torchrun`` then turns the
workers' status 2 into its own.

Start-up order (issue #18): a command parses its arguments and loads and validates the run config first
(``parse_config``; ``sfd_scale.config`` and the settings classes it builds on import neither torch nor
megatron-core / DeepSpeed), and imports the heavy parts only after that, so a typo is reported in about a
second and ``--print-config`` (the resolved config as YAML, then exit 0) is as fast. ``--help`` lists the
config sections and the most used keys (``COMMON_KEYS``) with their defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from dataclasses import fields
from typing import Callable, Optional, Sequence

from .config import Config, load_config, to_yaml
from .errors import EXIT_USER_ERROR, UserError, one_line

DEBUG_FLAG, DEBUG_ENV = "--debug", "SFD_DEBUG"

# The keys people set most, listed (with their defaults) by every run-config tool's --help; each must exist in
# the schema (tests/test_cli.py checks it; config_epilog raises on a missing one).
COMMON_KEYS = (
    "model.name", "data.source", "data.path", "train.output_dir", "train.max_steps", "train.global_batch_size",
    "train.micro_batch_size", "train.precision", "train.device", "optim.lr", "parallel.engine",
    "parallel.tensor_parallel", "parallel.pipeline_parallel", "checkpoint.every", "checkpoint.init_from",
    "logging.wandb_mode", "sample.guidance", "sample.cfg_scale", "eval.fid_every",
)


def config_epilog() -> str:
    """The config part of ``--help``: the sections of ``Config`` and ``COMMON_KEYS`` with their defaults."""
    defaults = Config()
    sections = ", ".join(f.name for f in fields(Config))
    lines = [f"config sections: {sections}", "most used keys (default):"]
    for key in COMMON_KEYS:
        section, name = key.split(".")
        if not hasattr(getattr(defaults, section, None), name):
            raise KeyError(f"cli.COMMON_KEYS names {key!r}, which is not in the config schema")
        value = getattr(getattr(defaults, section), name)
        lines.append(f"  {key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}")
    lines.append("--print-config shows every key of the resolved config")
    return "\n".join(lines)


def help_epilog(run_config: bool = True) -> str:
    """The end of every command's ``--help``: the config keys (``run_config``) and the ``--debug`` switch."""
    debug = f"{DEBUG_FLAG} (or {DEBUG_ENV}=1): show the traceback of an error"
    return f"{config_epilog()}\n{debug}" if run_config else debug


def add_progress_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--progress`` / ``--no-progress``: whether to show ``what`` (a progress bar); unset (None), the bar shows
    only when stderr is a terminal (``logging.show_progress``)."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{what} (default: only when stderr is a terminal)")


def command_parser(prog: Optional[str], description: str, run_config: bool = False) -> argparse.ArgumentParser:
    """The argument parser of command ``prog`` (e.g. ``sfd sample``), its ``--help`` ending in ``help_epilog``
    (``run_config``: the command's ``key=value`` arguments are run config keys)."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=help_epilog(run_config),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def config_parser(description: str, run_config: bool = True, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """``--config`` files and ``key=value`` overrides. ``run_config``: the files are run configs (``Config``):
    ``--help`` lists its sections and ``COMMON_KEYS``, and ``--print-config`` is offered (``parse_config``)."""
    parser = command_parser(prog, description, run_config)
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (repeatable; later files override earlier ones): a path, or a shipped "
                             "config by name (experiments/sfd_xl; `sfd configs` lists them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 model.name=LightningDiT-B/1")
    if run_config:
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved config (files + overrides, validated) as YAML and exit")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """(argparse namespace, validated Config); a config problem raises ``ConfigError`` (a UserError). With
    ``--print-config`` the resolved config goes to stdout and the process exits 0 (``SystemExit``, like
    ``--help``) before the tool imports anything heavy."""
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="", flush=True)
        raise SystemExit(0)
    return args, cfg


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
