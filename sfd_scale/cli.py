"""Shared command-line plumbing for the thin tools: ``--config`` files plus ``key=value`` overrides."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import ConfigError, load_config


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (repeatable; later files override earlier ones)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 model.name=LightningDiT-B/1")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """(argparse namespace, validated Config); a config problem exits with one clear line."""
    args = parser.parse_intermixed_args(argv)
    try:
        return args, load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
