"""Command line: ``python -m privacy_callbacks`` (also installed as ``privacy-callbacks``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from . import catalog


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


def _metrics(args: argparse.Namespace) -> int:
    if args.write:
        Path(args.write).write_text(metrics_markdown())
    else:
        print(metrics_markdown(), end="")
    return 0


def _ops(args: argparse.Namespace) -> tuple[Any, Any]:
    """The rule options and receivers the ``generate`` and ``stack`` arguments ask for."""
    from .ops.alertmanager import Receivers
    from .ops.rules import RuleOptions
    options = RuleOptions(**{k: getattr(args, k) for k in (
        "budget_low_ratio", "attack_score_threshold", "attack_risk_threshold",
        "overhead_ratio_threshold", "runbook_url")})
    receivers = Receivers.from_file(args.receivers) if args.receivers else Receivers.from_env()
    if receivers.unset:
        print(f"receivers sending nowhere (set PRIVACY_ALERTS_* or --receivers): "
              f"{', '.join(receivers.unset)}", file=sys.stderr)
    return options, receivers


def _generate(args: argparse.Namespace) -> int:
    from .ops.alertmanager import alertmanager_config
    from .ops.dashboards import dashboards
    from .ops.rules import prometheus_config, rule_file
    from .ops.stack import write_files
    options, receivers = _ops(args)
    files = {"privacy-rules.yml": rule_file(options), "prometheus.yml": prometheus_config(
        args.target, rule_files=("privacy-rules.yml",), alertmanager=args.alertmanager,
        pushgateway=args.pushgateway, interval=args.interval),
        "alertmanager.yml": alertmanager_config(receivers)}
    files.update({f"dashboards/{uid}.json": json.dumps(board, indent=2, ensure_ascii=False)
                  for uid, board in dashboards().items()})
    print("\n".join(map(str, write_files(Path(args.dir), files))))
    return 0


def _stack(args: argparse.Namespace) -> int:
    from .ops.stack import Stack, default_workdir, error_lines
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    options, receivers = _ops(args)
    stack = Stack(args.dir or default_workdir(), args.target, ports={
        name: getattr(args, name.replace("-", "_") + "_port") for name in (
            "prometheus", "alertmanager", "pushgateway", "victoria-metrics")},
        receivers=receivers, rule_options=options, interval=args.interval,
        group_wait=args.group_wait).start()
    try:
        for name, proc in stack.procs.items():
            print(f"{name:<17} {stack.url(name):<24} pid {proc.pid}")
        print(f"files and logs in {stack.workdir}; Ctrl-C stops the stack", flush=True)
        while not stop.wait(0.5):
            for name, code in stack.exited().items():
                print(f"error: {name} exited with {code}:\n"
                      f"{error_lines(stack.log_tail(name))}", file=sys.stderr)
                return 1
        return 0
    finally:
        stack.stop()
        print("stack stopped", flush=True)


def _audit_verify(args: argparse.Namespace) -> int:
    from .compliance import audit
    result = audit.verify(args.trail, key_env=args.key_env or audit.DEFAULT_KEY_ENV,
                          require_hmac=args.require_hmac)
    print(f"{args.trail}: {result}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _report(args: argparse.Namespace) -> int:
    from .report import render_trail
    try:
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
    parser = argparse.ArgumentParser(prog="privacy-callbacks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    metrics = sub.add_parser("metrics", help="print docs/metrics.md (markdown) from the catalog")
    metrics.add_argument("--write", metavar="PATH", help="write it to PATH instead")
    generate = sub.add_parser("generate", help="write alert rules, Alertmanager and Prometheus "
                                               "configs and Grafana dashboards into DIR")
    generate.add_argument("dir", metavar="DIR", help="output folder (created if missing)")
    generate.add_argument("--alertmanager", default="127.0.0.1:9093", metavar="HOST:PORT")
    generate.add_argument("--pushgateway", metavar="HOST:PORT", help="also scrape it")
    stack = sub.add_parser("stack", help="run Prometheus (with the rules), Alertmanager, "
                                         "Pushgateway and VictoriaMetrics on 127.0.0.1")
    stack.add_argument("--dir", help="configs, data and logs (default "
                                     "~/.cache/privacy-callbacks/stack)")
    for name, port in (("prometheus", 9090), ("alertmanager", 9093), ("pushgateway", 9091),
                       ("victoria-metrics", 8428)):
        stack.add_argument(f"--{name}-port", type=int, default=port, help="0: any free port")
    stack.add_argument("--group-wait", default="30s", help="Alertmanager's wait before the "
                                                           "first notification of a group")
    for ops in (generate, stack):
        ops.add_argument("--target", action="append", metavar="HOST:PORT", help="a monitor's "
                         "/metrics to scrape (repeatable; default 127.0.0.1:9108)")
        ops.add_argument("--interval", default="15s", help="scrape and rule evaluation interval")
        ops.add_argument("--receivers", metavar="FILE", help="YAML: receiver -> webhook URL, "
                         "slack:URL or pagerduty:KEY (PRIVACY_ALERTS_* variables win)")
        for flag, default, what in (
                ("budget-low-ratio", 0.8, "PrivacyBudgetLow at this fraction of the target"),
                ("attack-score-threshold", 0.7, "PrivacyAttackDetected above this accuracy"),
                ("attack-risk-threshold", 0.9, "MembershipRiskBoundHigh above this bound"),
                ("overhead-ratio-threshold", 3.0, "HighPrivacyOverhead above this ratio")):
            ops.add_argument(f"--{flag}", type=float, default=default, help=what)
        ops.add_argument("--runbook-url", help="base URL of your runbook (adds runbook_url)")
    verify = sub.add_parser("audit", help="audit trail tools").add_subparsers(
        dest="audit_command", required=True).add_parser(
        "verify", help="check the hash chain (and HMACs); name the first broken record")
    verify.add_argument("--key-env", metavar="VAR", help="variable holding the HMAC key, checked "
                        "when set (default PRIVACY_AUDIT_HMAC_KEY)")
    verify.add_argument("--require-hmac", action="store_true", help="fail when it is not set")
    report = sub.add_parser("report", help="render the privacy report of an audit trail")
    report.add_argument("-o", "--output", required=True, metavar="OUT", help="the HTML file")
    for command, func in ((metrics, _metrics), (generate, _generate), (stack, _stack),
                          (verify, _audit_verify), (report, _report)):
        command.set_defaults(func=func)
    for command in (verify, report):
        command.add_argument("trail", metavar="TRAIL", help="the JSON-lines audit trail")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "target", False) is None:
        args.target = ["127.0.0.1:9108"]
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as exc:  # MissingBinary is a RuntimeError
        print(f"error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
