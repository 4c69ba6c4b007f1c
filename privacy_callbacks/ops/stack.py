"""A local stack on 127.0.0.1: Prometheus (with the privacy rules) scrapes the monitors and a
Pushgateway, alerts an Alertmanager and copies every sample to VictoriaMetrics."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

from ..checks import number
from .alertmanager import Receivers, alertmanager_config
from .rules import RuleOptions, prometheus_config, rule_file

__all__ = ["SERVICES", "MissingBinary", "Stack", "argv", "default_workdir", "write_files"]


class MissingBinary(RuntimeError):
    """A server binary is not installed; the message names the Debian package."""


class Service(NamedTuple):
    package: str  # the Debian package that installs it
    binaries: tuple[str, ...]  # Debian's name first, then upstream's
    ready_path: str  # the server's own readiness answer: 200, holding ready_body
    ready_body: str
    default_port: int
    args: tuple[str, ...]  # {listen}: 127.0.0.1:port, {dir}: its folder, {config}: its file


# In dependency order: started in this order, stopped in the reverse one.
SERVICES: dict[str, Service] = {
    "victoria-metrics": Service(
        "victoria-metrics", ("victoria-metrics", "victoria-metrics-prod"), "/health", "OK", 8428,
        ("-httpListenAddr={listen}", "-storageDataPath={dir}/victoria-metrics")),
    "pushgateway": Service(
        "prometheus-pushgateway", ("prometheus-pushgateway", "pushgateway"), "/-/ready", "OK",
        9091, ("--web.listen-address={listen}", "--persistence.file={dir}/pushgateway.db")),
    "alertmanager": Service(  # alone: no cluster gossip port
        "prometheus-alertmanager", ("prometheus-alertmanager", "alertmanager"), "/-/ready", "OK",
        9093, ("--config.file={config}", "--storage.path={dir}/alertmanager",
               "--web.listen-address={listen}", "--cluster.listen-address=")),
    "prometheus": Service(
        "prometheus", ("prometheus",), "/-/ready", "Prometheus", 9090,
        ("--config.file={config}", "--storage.tsdb.path={dir}/prometheus",
         "--web.listen-address={listen}", "--web.enable-lifecycle")),
}


def argv(name: str, binary: str, workdir: Path, port: int, config: Path | None = None
         ) -> list[str]:
    """Service ``name`` on 127.0.0.1:``port``, its files in ``workdir`` (config
    ``<name>.yml`` there unless given)."""
    values = {"listen": f"127.0.0.1:{port}", "dir": workdir,
              "config": config or workdir / f"{name}.yml"}
    return [binary, *(a.format(**values) for a in SERVICES[name].args)]


def alertmanager_argv(binary: str, workdir: Path, port: int, config: Path) -> list[str]:
    return argv("alertmanager", binary, workdir, port, config)


def _ready(url: str, body: str) -> bool:
    """Whether ``url`` answers 200 with ``body`` in its text: the server's own ready answer."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status == 200 and body in resp.read(4096).decode("utf-8", "replace")
    except (OSError, ValueError):  # refused, reset, HTTP error status, timeout
        return False


def _bind(port: int) -> int | None:
    """``port`` (0: a free one) if it can be bound on 127.0.0.1 right now, else ``None``."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]


_ERROR = ("level=error", "level=fatal", "level=panic", "\tfatal\t", "\terror\t", "panic:",
          "error:", "Error:")


def error_lines(log: str, limit: int = 3) -> str:
    """The last error lines of a server's log, each whole (they carry the cause)."""
    errors = [line for line in log.splitlines() if any(m in line for m in _ERROR)]
    return "\n".join((errors or [line for line in log.splitlines() if line.strip()])[-limit:])


def write_files(folder: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` (relative name -> text) under ``folder``, ``alertmanager.yml`` for its
    owner only (receiver URLs and keys are secrets)."""
    paths = [folder / name for name in files]
    for path, text in zip(paths, files.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n")
        if path.name == "alertmanager.yml":
            path.chmod(0o600)
    return paths


class Stack:
    """The four servers scraping ``targets`` (``host:port``), with configs, data and logs
    (``<service>.log``) in ``workdir``; ``ports`` maps a service to its port (0: any free one;
    missing: its usual one); ``receivers`` come from the environment if ``None``."""

    def __init__(self, workdir: str | Path, targets: list[str], *,
                 ports: dict[str, int] | None = None, receivers: Receivers | None = None,
                 rule_options: RuleOptions | None = None, interval: str = "15s",
                 group_wait: str = "30s") -> None:
        for name, port in (ports or {}).items():
            if name not in SERVICES:
                raise ValueError(f"Unknown service {name!r}: use one of {sorted(SERVICES)}")
            number(f"port of {name}", port, "0-65535 (0 = any free port)", low_ok=True,
                   high=65535, high_ok=True, integer=True)
        found = {n: next(filter(None, map(shutil.which, s.binaries)), None)
                 for n, s in SERVICES.items()}
        missing = [f"`{s.binaries[0]}` not found: install the Debian package `{s.package}` "
                   f"(sudo apt-get install {s.package})" for n, s in SERVICES.items()
                   if not found[n]]
        if missing:
            raise MissingBinary("; ".join(missing))
        self.binaries = {n: b for n, b in found.items() if b}
        self.ports = {n: (ports or {}).get(n, s.default_port) or _bind(0) or 0
                      for n, s in SERVICES.items()}
        self.workdir = Path(workdir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.files = {"privacy-rules.yml": rule_file(rule_options),
                      "alertmanager.yml": alertmanager_config(receivers, group_wait=group_wait),
                      "prometheus.yml": prometheus_config(
                          targets, rule_files=("privacy-rules.yml",),
                          alertmanager=f"127.0.0.1:{self.ports['alertmanager']}",
                          pushgateway=f"127.0.0.1:{self.ports['pushgateway']}",
                          remote_write=self.url("victoria-metrics") + "/api/v1/write",
                          interval=interval)}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, timeout: float = 60.0) -> Stack:
        """Write the configs, start every server and wait until each answers ready."""
        taken = [f"{n} port {p}" for n, p in self.ports.items() if _bind(p) is None]
        if taken:
            raise RuntimeError(
                f"127.0.0.1: {', '.join(taken)} already in use (Debian's own prometheus* and "
                "victoria-metrics services use the default ports: `systemctl stop` them), or "
                "choose other ports, e.g. --prometheus-port 0 for any free one")
        write_files(self.workdir, self.files)
        try:
            for name, service in SERVICES.items():
                with open(self.workdir / f"{name}.log", "ab") as log:
                    # Own session: a terminal's Ctrl-C reaches only us, and we stop the servers
                    # in order (Prometheus first, so it does not alert on vanished targets).
                    self.procs[name] = proc = subprocess.Popen(
                        argv(name, self.binaries[name], self.workdir, self.ports[name]),
                        cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        start_new_session=True)
                deadline = time.monotonic() + timeout
                while not _ready(self.url(name) + service.ready_path, service.ready_body):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                           f"{self.workdir / name}.log:\n"
                                           f"{error_lines(self.log_tail(name))}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not answer on {self.url(name)} within "
                                           f"{timeout:.0f} s; see {self.workdir / name}.log")
                    time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, name: str, chars: int = 20_000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def exited(self) -> dict[str, int]:
        """Servers that stopped by themselves, with their exit codes."""
        return {n: code for n, p in self.procs.items() if (code := p.poll()) is not None}

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the servers, dependants first: SIGTERM, then SIGKILL after ``timeout`` s each."""
        procs, self.procs = list(self.procs.values())[::-1], {}
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def default_workdir() -> Path:
    """Where ``stack`` keeps its files unless told: a folder under the user's cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "privacy-callbacks" / "stack"
