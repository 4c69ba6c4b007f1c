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
from .ops import (RECEIVERS, RuleOptions, Stack, alertmanager_config, dashboards,
                  prometheus_config, rule_file)
from .ops.stack import SERVICES, write_files


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


def _rule_options(args: argparse.Namespace) -> RuleOptions:
    """The options ``generate`` and ``stack`` ask for; names the receivers left unset."""
    if unset := [name for name, var in RECEIVERS.items() if not os.environ.get(var)]:
        print(f"receivers sending nowhere (set PRIVACY_ALERTS_*): {', '.join(unset)}",
              file=sys.stderr)
    args.target = getattr(args, "target", None) or ["127.0.0.1:9108"]
    return RuleOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RuleOptions)})


def _generate(args: argparse.Namespace) -> None:
    options = _rule_options(args)
    files = {"privacy-rules.yml": rule_file(options), "prometheus.yml": prometheus_config(
        args.target, rule_files=("privacy-rules.yml",), alertmanager=args.alertmanager,
        pushgateway=args.pushgateway, interval=args.interval),
        "alertmanager.yml": alertmanager_config()}
    files.update({f"dashboards/{uid}.json": json.dumps(board, indent=2, ensure_ascii=False)
                  for uid, board in dashboards().items()})
    print("\n".join(map(str, write_files(Path(args.dir), files))))


def _stack(args: argparse.Namespace) -> int | None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the servers stop on either
    options = _rule_options(args)  # sets args.target
    stack = Stack(getattr(args, "dir", None), args.target, rule_options=options, ports={
        n: getattr(args, n.replace("-", "_") + "_port") for n in SERVICES}, interval=args.interval)
    try:
        for name, proc in stack.start().procs.items():
            print(f"{name:<17} {stack.url(name):<24} pid {proc.pid}")
        print(f"files and logs in {stack.workdir}; Ctrl-C stops the stack", flush=True)
        while not (dead := [n for n, p in stack.procs.items() if p.poll() is not None]):
            time.sleep(0.5)
        print(f"error: {dead[0]} exited with {stack.procs[dead[0]].returncode}; "
              f"{stack.errors(dead[0])}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return None
    finally:
        stack.stop()
        print("stack stopped", flush=True)


def _audit_verify(args: argparse.Namespace) -> int:
    from .compliance import audit
    result = audit.verify(args.trail, key_env=args.key_env, require_hmac=args.require_hmac)
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

    def command(name, func, text, *parents, where=sub) -> argparse.ArgumentParser:
        return where.add_parser(name, parents=parents, help=text, formatter_class=(
            argparse.ArgumentDefaultsHelpFormatter)).set_defaults(func=func) or where.choices[name]

    command("metrics", _metrics, "print docs/metrics.md").add_argument(
        "--write", metavar="PATH", help="write it to PATH instead")
    generate = command("generate", _generate, "write rules, configs, dashboards to DIR", ops)
    generate.add_argument("dir", metavar="DIR", help="output folder")
    generate.add_argument("--alertmanager", default="127.0.0.1:9093", metavar="HOST:PORT")
    generate.add_argument("--pushgateway", metavar="HOST:PORT", help="also scrape it")
    stack = command("stack", _stack, "run the monitoring stack on 127.0.0.1", ops)
    stack.add_argument("--dir", default=argparse.SUPPRESS,
                       help="configs, data, logs (default: ~/.cache/privacy-callbacks/stack)")
    for name, service in SERVICES.items():
        stack.add_argument(f"--{name}-port", type=int, default=service.default_port,
                           help="0: any free port")
    audit = sub.add_parser("audit", help="audit trail tools").add_subparsers(required=True)
    verify = command("verify", _audit_verify, "check the hash chain (and HMACs)", trail,
                     where=audit)
    verify.add_argument("--key-env", metavar="VAR", default="PRIVACY_AUDIT_HMAC_KEY",
                        help="variable holding the HMAC key, checked when set")
    verify.add_argument("--require-hmac", action="store_true", help="fail when it is not set")
    command("report", _report, "render a trail's privacy report", trail).add_argument(
        "-o", "--output", required=True, metavar="OUT", help="the HTML file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
