"""`jamba`: the command line. Each command is a module of this room:

    jamba generate|score|classify|eval|make-demo-model|warmup    run.py
    jamba serve                                                  serve.py
    jamba batch                                                  batch.py
    jamba plan                                                   plan.py
    jamba client ...                                             client/cli.py (the gRPC client)

Argument parsing stays light: torch and Ray load when a command runs, not when it parses.
Problems with the setup (a missing file, a bad value) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from client.cli import add_client_parser
from stages.openmp import use_openmp_env

from . import run
from .batch import add_batch_parser
from .plan import add_plan_parser
from .serve import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    use_openmp_env()  # before torch or numba load OpenMP (stages/openmp.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # setup problems: one line, no traceback
        print(f"jamba: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jamba", description="Serve and run AI21 Jamba models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parsers(sub)
    add_batch_parser(sub)
    add_plan_parser(sub)
    add_serve_parser(sub)
    add_client_parser(sub)
    return p
