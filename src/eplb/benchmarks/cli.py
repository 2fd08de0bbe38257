"""`eplb bench SUB`: one sub-command per benchmark module, imported only when used.

Each module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "serve": ("eplb.benchmarks.serve", "load-test an OpenAI-compatible server (like `vllm bench serve`)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    wanted = next((a for a in sys.argv[1:] if a in BENCHMARKS), None)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted is None or wanted == name:
            importlib.import_module(module).add_arguments(p)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "bench", None) is None:
        print(f"eplb bench: error: name a benchmark: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[args.bench][0]).main(args) or 0)
