"""Command line: ``python -m privacy_callbacks`` (also installed as ``privacy-callbacks``)."""

from __future__ import annotations

import argparse
import sys

from . import catalog


def _metrics(args: argparse.Namespace) -> int:
    print(catalog.markdown_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privacy-callbacks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    metrics = commands.add_parser("metrics", help="print the metrics table (markdown)")
    metrics.set_defaults(func=_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
