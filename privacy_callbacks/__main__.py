"""Command line: ``python -m privacy_callbacks`` (also installed as ``privacy-callbacks``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import catalog
from .ops.alertmanager import RECEIVERS, alertmanager_config
from .ops.dashboards import dashboards
from .ops.rules import RuleOptions, prometheus_config, rule_file
from .ops.stack import SERVICES, Stack, write_files


def metrics_markdown() -> str:
    """``docs/metrics.md``: every metric of the catalog, as a markdown table."""
    rows = ["# Metrics", "", "Generated from `privacy_callbacks.catalog` by `python -m "
            "privacy_callbacks metrics --write docs/metrics.md`: do not edit by hand. Every "
            f"metric carries the labels {', '.join(f'`{b}`' for b in catalog.BASE_LABELS)} and "
            "the ones below. InfluxDB gets one point per step: measurement "
            f"`{catalog.INFLUX_MEASUREMENT}`, tags {', '.join(catalog.INFLUX_TAGS)}, the fields "
            f"below and `{catalog.INFLUX_STEP_FIELD}`.", "",
            "| metric | type | unit | labels | InfluxDB field | meaning |", "|" + "---|" * 6]
    rows += [f"| `{m.name}` | {m.kind} | {m.unit or '-'} | {', '.join(m.labels) or '-'} | "
             f"{f'`{m.field}`' if m.field else '-'} | {m.help} |" for m in catalog.METRICS]
    return "\n".join(rows) + "\n"


def _metrics(args: argparse.Namespace) -> None:
    if args.write:
        Path(args.write).write_text(metrics_markdown())
    else:
        print(metrics_markdown(), end="")


def _rule_options(args: argparse.Namespace) -> RuleOptions:  # and names unset receivers
    if unset := [name for name, var in RECEIVERS.items() if not os.environ.get(var)]:
        print(f"receivers sending nowhere (set PRIVACY_ALERTS_*): {', '.join(unset)}",
              file=sys.stderr)
    args.target = getattr(args, "target", None) or ["127.0.0.1:9108"]
    return RuleOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RuleOptions)})


def _generate(args: argparse.Namespace) -> None:
    files = {"privacy-rules.yml": rule_file(_rule_options(args)), "prometheus.yml":
             prometheus_config(args.target, rule_files=("privacy-rules.yml",),
                               alertmanager=args.alertmanager, pushgateway=args.pushgateway,
                               interval=args.interval), "alertmanager.yml": alertmanager_config(),
             **{f"dashboards/{uid}.json": json.dumps(board, indent=2, ensure_ascii=False)
                for uid, board in dashboards().items()}}
    print("\n".join(map(str, write_files(Path(args.dir), files))))


def _stack(args: argparse.Namespace) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job ignores it
        signal.signal(sig, signal.default_int_handler)
    options = _rule_options(args)  # sets args.target
    stack = Stack(getattr(args, "dir", None), args.target, rule_options=options, ports={
        n: getattr(args, n.replace("-", "_") + "_port") for n in SERVICES}, interval=args.interval)
    try:
        for name, proc in stack.start().procs.items():
            print(f"{name:<17} {stack.url(name):<24} pid {proc.pid}")
        print(f"files and logs in {stack.workdir}; Ctrl-C stops the stack", flush=True)
        while not (dead := [n for n, p in stack.procs.items() if p.poll() is not None]):
            time.sleep(0.5)
        raise RuntimeError(f"{dead[0]} exited with {stack.procs[dead[0]].returncode}; "
                           + stack.errors(dead[0]))
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        print("stack stopped", flush=True)


def _audit(args: argparse.Namespace) -> int:
    from .compliance.audit import verify
    result = verify(args.trail, require_hmac=args.require_hmac)
    print(f"{args.trail}: {result}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _report(args: argparse.Namespace) -> int:
    try:
        from .report import render_trail
        html, ok = render_trail(args.trail)
    except ImportError as exc:
        raise RuntimeError(f"the report needs {exc.name}: pip install "
                           "'privacy_callbacks[report]'") from None
    except ValueError as exc:  # not an audit trail with a fit in it
        raise ValueError(f"{args.trail}: {exc}") from None
    Path(args.output).write_text(html)
    print(f"{args.output}: audit trail {'verified' if ok else 'verification FAILED'}",
          file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ops, trail = argparse.ArgumentParser(add_help=False), argparse.ArgumentParser(add_help=False)
    ops.add_argument("--target", action="append", metavar="HOST:PORT", default=argparse.SUPPRESS,
                     help="a monitor to scrape, repeatable (default: 127.0.0.1:9108)")
    ops.add_argument("--interval", default="15s", help="scrape and rule evaluation interval")
    for f in dataclasses.fields(RuleOptions):
        ops.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                         type=type(f.default or ""), help="alert rule setting")
    trail.add_argument("trail", metavar="TRAIL", help="the JSON-lines audit trail")
    parser = argparse.ArgumentParser(prog="privacy-callbacks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="audit trail tools").add_subparsers(required=True)
    made = {name: where.add_parser(name, parents=parents, help=text, formatter_class=(
        argparse.ArgumentDefaultsHelpFormatter)) for name, where, parents, text in (
        ("metrics", sub, [], "print docs/metrics.md"),
        ("generate", sub, [ops], "write rules, configs, dashboards to DIR"),
        ("stack", sub, [ops], "run the monitoring stack on 127.0.0.1"),
        ("verify", audit, [trail], "check the hash chain (and HMACs)"),
        ("report", sub, [trail], "render a trail's privacy report"))}
    made["metrics"].add_argument("--write", metavar="PATH", help="write it to PATH instead")
    made["generate"].add_argument("dir", metavar="DIR", help="output folder")
    made["generate"].add_argument("--alertmanager", default="127.0.0.1:9093", metavar="HOST:PORT")
    made["generate"].add_argument("--pushgateway", metavar="HOST:PORT", help="also scrape it")
    made["stack"].add_argument("--dir", default=argparse.SUPPRESS,
                               help="files and logs (default: ~/.cache/privacy-callbacks/stack)")
    for name, service in SERVICES.items():
        made["stack"].add_argument(f"--{name}-port", type=int, default=service.default_port,
                                   help="0: any free port")
    made["verify"].add_argument("--require-hmac", action="store_true",
                                help="fail unless PRIVACY_AUDIT_HMAC_KEY is set")
    made["report"].add_argument("-o", "--output", required=True, metavar="OUT", help="HTML file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return globals()["_" + args.command](args) or 0  # each command's function: _<command>
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
