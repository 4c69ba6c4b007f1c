"""Command line: ``python -m privacy_callbacks`` (also installed as ``privacy-callbacks``)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import catalog


_MARKERS = re.compile(r"(<!-- metrics:start -->\n).*?(\n<!-- metrics:end -->)", re.S)


def _metrics(args: argparse.Namespace) -> int:
    table = catalog.markdown_table()
    if args.readme is None:
        print(table)
        return 0
    path = Path(args.readme)
    text = path.read_text()
    if not _MARKERS.search(text):
        print(f"{path}: no <!-- metrics:start --> / <!-- metrics:end --> markers", file=sys.stderr)
        return 2
    path.write_text(_MARKERS.sub(lambda m: m.group(1) + table + m.group(2), text))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privacy-callbacks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    metrics = commands.add_parser("metrics", help="print the metrics table (markdown)")
    metrics.add_argument("--readme", metavar="FILE",
                         help="rewrite the table between the metrics markers in FILE instead")
    metrics.set_defaults(func=_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
