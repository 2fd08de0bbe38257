"""`eplb` command line: one sub-command per module, imported only when used.

Each command module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `eplb rebalance`
# does not pay for the server's imports and a broken optional part stays contained.
COMMANDS: dict[str, tuple[str, str]] = {
    "rebalance": ("eplb.balancer.rebalance_cli", "compute a placement for a load matrix"),
    "simulate": ("eplb.sim.simulate_cli", "replay a load trace through EPLB policies"),
    "generate": ("eplb.engine.generate_cli", "generate text offline with the engine"),
    "serve": ("eplb.server.serve_cli", "start the OpenAI-compatible server"),
    "eval": ("eplb.evals.eval_cli", "evaluate a server (gsm8k)"),
    "bench": ("eplb.benchmarks.cli", "benchmarks: `eplb bench serve` load-tests a server"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eplb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command if command else "__none__")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
