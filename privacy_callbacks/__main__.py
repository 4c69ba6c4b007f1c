"""Command line: ``python -m privacy_callbacks`` (also installed as ``privacy-callbacks``)."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from . import catalog
from .compliance import audit

if TYPE_CHECKING:
    from .ops import Receivers, RuleOptions


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


def _rule_options(args: argparse.Namespace) -> RuleOptions:
    from .ops import RuleOptions

    return RuleOptions(budget_low_ratio=args.budget_low_ratio,
                       attack_score_threshold=args.attack_score_threshold,
                       attack_risk_threshold=args.attack_risk_threshold,
                       overhead_ratio_threshold=args.overhead_ratio_threshold,
                       runbook_url=args.runbook_url)


def _receivers(args: argparse.Namespace) -> Receivers:
    from .ops import Receivers

    receivers = Receivers.from_file(args.receivers) if args.receivers else Receivers.from_env()
    if receivers.unset:
        print(f"receivers sending nowhere (set PRIVACY_ALERTS_* or --receivers): "
              f"{', '.join(receivers.unset)}", file=sys.stderr)
    return receivers


def _generate(args: argparse.Namespace) -> int:
    from .ops import alertmanager_config, dashboards, prometheus_config, rule_file, rule_tests

    try:
        options = _rule_options(args)
        files = {
            "privacy-rules.yml": rule_file(options),
            "privacy-rules.test.yml": rule_tests("privacy-rules.yml", options),
            "prometheus.yml": prometheus_config(
                args.target, rule_files=("privacy-rules.yml",), alertmanager=args.alertmanager,
                pushgateway=args.pushgateway, interval=args.interval),
            "alertmanager.yml": alertmanager_config(_receivers(args)),
        }
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for uid, dashboard in dashboards().items():
        files[f"dashboards/{uid}.json"] = json.dumps(dashboard, indent=2, ensure_ascii=False)
    out = Path(args.dir)
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("" if text.endswith("\n") else "\n"))
        if name == "alertmanager.yml":
            path.chmod(0o600)  # receiver URLs and keys are secrets
        print(path)
    return 0


def _stack(args: argparse.Namespace) -> int:
    from .ops.stack import MissingBinary, Stack, default_workdir, error_lines

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack = Stack(args.dir or default_workdir(), args.target, ports={
            "prometheus": args.prometheus_port, "alertmanager": args.alertmanager_port,
            "pushgateway": args.pushgateway_port, "victoria-metrics": args.victoria_metrics_port},
            receivers=_receivers(args), rule_options=_rule_options(args),
            interval=args.interval, group_wait=args.group_wait)
        stack.start()
    except (MissingBinary, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        for name, pid in stack.pids.items():
            print(f"{name:<17} {stack.url(name):<24} pid {pid}")
        print(f"files and logs in {stack.workdir}; Ctrl-C stops the stack", flush=True)
        while not stop.wait(0.5):
            exited = stack.exited()
            if exited:
                name, code = next(iter(exited.items()))
                print(f"error: {name} exited with {code}:\n"
                      f"{error_lines(stack.log_tail(name, 20_000))}", file=sys.stderr)
                return 1
        return 0
    finally:
        stack.stop()
        print("stack stopped", flush=True)


def _add_ops_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", metavar="HOST:PORT",
                        help="a monitor's /metrics endpoint to scrape (repeatable; "
                             "default 127.0.0.1:9108)")
    parser.add_argument("--interval", default="15s", help="scrape and rule evaluation interval")
    parser.add_argument("--receivers", metavar="FILE",
                        help="YAML mapping receiver -> webhook URL, slack:URL or pagerduty:KEY "
                             "(PRIVACY_ALERTS_* environment variables win)")
    parser.add_argument("--budget-low-ratio", type=float, default=0.8,
                        help="PrivacyBudgetLow fires at this fraction of the target")
    parser.add_argument("--attack-score-threshold", type=float, default=0.7,
                        help="PrivacyAttackDetected fires above this measured attack accuracy")
    parser.add_argument("--attack-risk-threshold", type=float, default=0.9,
                        help="MembershipRiskBoundHigh (a warning) fires above this proven "
                             "membership-inference bound")
    parser.add_argument("--overhead-ratio-threshold", type=float, default=3.0,
                        help="HighPrivacyOverhead fires above this DP/plain step time ratio")
    parser.add_argument("--runbook-url", help="base URL of your runbook (adds runbook_url)")


def _audit_verify(args: argparse.Namespace) -> int:
    try:
        result = audit.verify(args.file, key_env=args.key_env, require_hmac=args.require_hmac)
    except (OSError, ValueError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: {result}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privacy-callbacks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    metrics = commands.add_parser("metrics", help="print the metrics table (markdown)")
    metrics.add_argument("--readme", metavar="FILE",
                         help="rewrite the table between the metrics markers in FILE instead")
    metrics.set_defaults(func=_metrics)

    generate = commands.add_parser(
        "generate", help="write alert rules (+ promtool tests), Alertmanager and Prometheus "
                         "configs and Grafana dashboards into a folder")
    generate.add_argument("dir", help="output folder (created if missing)")
    _add_ops_arguments(generate)
    generate.add_argument("--alertmanager", default="127.0.0.1:9093", metavar="HOST:PORT",
                          help="Alertmanager Prometheus sends alerts to")
    generate.add_argument("--pushgateway", metavar="HOST:PORT",
                          help="also scrape this Pushgateway")
    generate.set_defaults(func=_generate)

    stack = commands.add_parser(
        "stack", help="run Prometheus (with the rules), Alertmanager, Pushgateway and "
                      "VictoriaMetrics on 127.0.0.1 until Ctrl-C")
    _add_ops_arguments(stack)
    stack.add_argument("--dir", help="folder for configs, data and logs "
                                     "(default ~/.cache/privacy-callbacks/stack)")
    for name, port in (("prometheus", 9090), ("alertmanager", 9093), ("pushgateway", 9091),
                       ("victoria-metrics", 8428)):
        stack.add_argument(f"--{name}-port", type=int, default=port,
                           help=f"port of {name} (0 = any free port)")
    stack.add_argument("--group-wait", default="30s",
                       help="Alertmanager's wait before the first notification of a group")
    stack.set_defaults(func=_stack)

    audit_cmd = commands.add_parser("audit", help="work with a privacy audit trail")
    audit_commands = audit_cmd.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the hash chain (and HMACs); name the first broken record")
    verify.add_argument("file", metavar="FILE", help="the JSON-lines audit trail")
    verify.add_argument("--key-env", default=audit.DEFAULT_KEY_ENV, metavar="VAR",
                        help="environment variable holding the HMAC key (default: %(default)s);"
                             " HMACs are checked when it is set")
    verify.add_argument("--require-hmac", action="store_true",
                        help="fail when the key variable is not set")
    verify.set_defaults(func=_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "target", False) is None:
        args.target = ["127.0.0.1:9108"]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
