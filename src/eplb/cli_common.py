"""Helpers shared by the ``eplb`` commands (``serve``, ``rebalance``, ``simulate``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class UsageError(ValueError):
    """A bad argument: the command prints one line and exits with code 2 (``fail``)."""


def one_line_errors(parser: argparse.ArgumentParser, prog: str) -> None:
    """Make argparse report bad arguments as one line (no usage dump), exit code 2."""

    def error(message: str) -> NoReturn:
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-ranks", type=int, required=True, help="EP ranks (G)")
    parser.add_argument("--num-redundant", type=int, default=0, help="redundant slots per layer (R)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (N), for hierarchical deepseek")
    parser.add_argument("--num-groups", type=int, default=1, help="expert groups (K)")
    parser.add_argument("--max-moves", type=int, default=None,
                        help="cap on expert copies moved per layer and rebalance (refined only)")
