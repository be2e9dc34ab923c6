"""The `fusionsearch` command: one subcommand module each, registered here."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import FusionSearchError

# Subcommand name → module under fusionsearch.cli that defines `register(subparsers)`.
SUBCOMMANDS = ("translate", "bench", "predict", "search", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionsearch",
        description="Find, build and export the fastest fusion plan of a BERT-style encoder layer.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FusionSearchError as error:
        print(f"fusionsearch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; stay quiet like other command-line tools.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"fusionsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
