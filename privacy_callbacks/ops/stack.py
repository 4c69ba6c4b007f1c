"""A local monitoring stack from installed binaries: Prometheus (with the privacy rules),
Alertmanager, Pushgateway and VictoriaMetrics, all on 127.0.0.1.

Prometheus scrapes the monitors and the Pushgateway, evaluates the rules, sends alerts to the
Alertmanager and copies every sample to VictoriaMetrics (long-term storage, which also accepts
InfluxDB line protocol).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .alertmanager import Receivers, alertmanager_config
from .rules import RuleOptions, prometheus_config, rule_file

logger = logging.getLogger(__name__)

__all__ = ["SERVICES", "MissingBinary", "Service", "Stack", "default_workdir", "find_binary",
           "free_port"]


class MissingBinary(RuntimeError):
    """A server binary is not installed; the message names the Debian package."""


@dataclass(frozen=True)
class Service:
    """A server of the stack.

    Attributes:
        name: Short name, also the log file's name.
        package: Debian package that installs it.
        binaries: Executable names, the Debian one first, then upstream's.
        ready_path: The server's own readiness endpoint: 200 once it serves.
        ready_body: Text its readiness answer contains, which tells it from another server.
        default_port: Its usual port (Debian's own service of the package uses it too).
    """

    name: str
    package: str
    binaries: tuple[str, ...]
    ready_path: str
    ready_body: str
    default_port: int


SERVICES: dict[str, Service] = {s.name: s for s in (
    Service("victoria-metrics", "victoria-metrics", ("victoria-metrics", "victoria-metrics-prod"),
            "/health", "OK", 8428),
    Service("pushgateway", "prometheus-pushgateway", ("prometheus-pushgateway", "pushgateway"),
            "/-/ready", "OK", 9091),
    Service("alertmanager", "prometheus-alertmanager", ("prometheus-alertmanager", "alertmanager"),
            "/-/ready", "OK", 9093),
    Service("prometheus", "prometheus", ("prometheus",), "/-/ready", "Prometheus", 9090),
)}  # in dependency order: started in this order, stopped in the reverse one


def find_binary(service: Service) -> str:
    """Path of ``service``'s executable; :class:`MissingBinary` names the package to install."""
    for binary in service.binaries:
        path = shutil.which(binary)
        if path:
            return path
    raise MissingBinary(f"`{service.binaries[0]}` not found: install the Debian package "
                        f"`{service.package}` (sudo apt-get install {service.package})")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alertmanager_argv(binary: str, workdir: Path, port: int, config: Path) -> list[str]:
    """Alertmanager on 127.0.0.1:``port``, alone (no cluster gossip port)."""
    return [binary, f"--config.file={config}", f"--storage.path={workdir / 'alertmanager'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]


def _argv(name: str, binary: str, workdir: Path, port: int) -> list[str]:
    if name == "victoria-metrics":
        return [binary, f"-httpListenAddr=127.0.0.1:{port}",
                f"-storageDataPath={workdir / 'victoria-metrics'}"]
    if name == "pushgateway":
        return [binary, f"--web.listen-address=127.0.0.1:{port}",
                f"--persistence.file={workdir / 'pushgateway.db'}"]
    if name == "alertmanager":
        return alertmanager_argv(binary, workdir, port, workdir / "alertmanager.yml")
    return [binary, f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"]


def _ready(url: str, body: str) -> bool:
    """Whether ``url`` answers 200 with ``body`` in its text: the server's own ready answer."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status == 200 and body in resp.read(4096).decode("utf-8", "replace")
    except (OSError, ValueError):  # refused, reset, HTTP error status, timeout
        return False


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


_ERROR_LINE = ("level=error", "level=fatal", "level=panic", "\tfatal\t", "\terror\t",
               "panic:", "error:", "Error:")


def error_lines(log: str, limit: int = 3) -> str:
    """The last error lines of a server's log, each whole (they carry the cause)."""
    lines = [line for line in log.splitlines() if any(m in line for m in _ERROR_LINE)]
    if not lines:
        lines = [line for line in log.splitlines() if line.strip()][-limit:]
    return "\n".join(lines[-limit:])


class Stack:
    """Prometheus, Alertmanager, Pushgateway and VictoriaMetrics on 127.0.0.1.

    Args:
        workdir: Folder for configs, data and logs (``<service>.log``).
        targets: ``host:port`` of the monitors' ``/metrics`` endpoints to scrape.
        ports: Port per service name (see :data:`SERVICES`); ``0`` picks a free one; a missing
            entry uses the service's usual port.
        receivers: Alert receivers; from the environment if ``None``.
        rule_options: Thresholds of the alert rules.
        interval: Prometheus scrape and rule evaluation interval.
        group_wait: Alertmanager's wait before the first notification of a group.
    """

    def __init__(self, workdir: str | Path, targets: list[str], *,
                 ports: dict[str, int] | None = None, receivers: Receivers | None = None,
                 rule_options: RuleOptions | None = None, interval: str = "15s",
                 group_wait: str = "30s") -> None:
        ports = dict(ports or {})
        unknown = set(ports) - set(SERVICES)
        if unknown:
            raise ValueError(f"Unknown services {sorted(unknown)}: use {sorted(SERVICES)}")
        for name, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(f"Unexpected port for {name}: {port!r}; use 0-65535 (0 = free)")
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.binaries: dict[str, str] = {}
        missing = []
        for name, service in SERVICES.items():
            try:
                self.binaries[name] = find_binary(service)
            except MissingBinary as exc:
                missing.append(str(exc))
        if missing:
            raise MissingBinary("; ".join(missing))
        self.ports = {name: ports.get(name, s.default_port) or free_port()
                      for name, s in SERVICES.items()}
        self.receivers = receivers
        self.rule_options = rule_options
        self.interval = interval
        self.group_wait = group_wait
        self.procs: dict[str, subprocess.Popen] = {}

    def url(self, name: str) -> str:
        """Base URL of service ``name``."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def write_configs(self) -> None:
        """Write the rule file, the Alertmanager config and the Prometheus config."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "privacy-rules.yml").write_text(rule_file(self.rule_options))
        am = self.workdir / "alertmanager.yml"
        am.write_text(alertmanager_config(self.receivers, group_wait=self.group_wait))
        am.chmod(0o600)  # receiver URLs and keys are secrets
        (self.workdir / "prometheus.yml").write_text(prometheus_config(
            self.targets, rule_files=("privacy-rules.yml",),
            alertmanager=f"127.0.0.1:{self.ports['alertmanager']}",
            pushgateway=f"127.0.0.1:{self.ports['pushgateway']}",
            remote_write=self.url("victoria-metrics") + "/api/v1/write",
            interval=self.interval))

    def start(self, timeout: float = 60.0) -> Stack:
        """Write the configs, start every server and wait until each answers ready."""
        taken = [f"{name} port {port}" for name, port in self.ports.items() if _port_taken(port)]
        if taken:
            raise RuntimeError(
                f"127.0.0.1: {', '.join(taken)} already in use (Debian's own prometheus* and "
                "victoria-metrics services use the default ports: `systemctl stop` them), or "
                "choose other ports, e.g. --prometheus-port 0 for any free one")
        self.write_configs()
        try:
            for name, service in SERVICES.items():
                with open(self.workdir / f"{name}.log", "ab") as log:
                    # Own session: a terminal's Ctrl-C reaches only us; we stop the servers in
                    # order (Prometheus first, so it does not alert on vanished targets).
                    self.procs[name] = subprocess.Popen(
                        _argv(name, self.binaries[name], self.workdir, self.ports[name]),
                        cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        start_new_session=True)
                self._wait_ready(name, service, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, name: str, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _ready(self.url(name) + service.ready_path, service.ready_body):
            code = self.procs[name].poll()
            if code is not None:
                raise RuntimeError(f"{name} exited with {code}; see {self.workdir / name}.log:\n"
                                   f"{error_lines(self.log_tail(name, 20_000))}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer on {self.url(name)} within "
                                   f"{timeout:.0f} s; see {self.workdir / name}.log")
            time.sleep(0.2)

    def log_tail(self, name: str, chars: int = 1000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def exited(self) -> dict[str, int]:
        """Servers that stopped by themselves, with their exit codes."""
        return {name: code for name, proc in self.procs.items()
                if (code := proc.poll()) is not None}

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the servers one by one, dependants first (Prometheus before the VictoriaMetrics
        it writes to): SIGTERM, then SIGKILL after ``timeout`` seconds each."""
        procs = list(reversed(self.procs.items()))
        self.procs = {}
        for name, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", name, timeout)
                proc.kill()
                proc.wait(5)

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}


def default_workdir() -> Path:
    """Where ``stack`` keeps its files unless told: a folder under the user's cache."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "privacy-callbacks" / "stack"
