"""A local stack on 127.0.0.1: Prometheus (with the privacy rules) scrapes the monitors and a
Pushgateway, alerts an Alertmanager and copies every sample to VictoriaMetrics."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from ..checks import number
from .alertmanager import alertmanager_config
from .rules import RuleOptions, prometheus_config, rule_file

class Service(NamedTuple):
    binaries: tuple[str, ...]  # Debian's name (also its package's) first, then upstream's
    ready_path: str
    ready_body: str
    default_port: int
    args: tuple[str, ...]  # {listen}: 127.0.0.1:port, {dir}: its folder, {config}: its file


# In dependency order: started in this order, stopped in the reverse one.
SERVICES: dict[str, Service] = {
    "victoria-metrics": Service(
        ("victoria-metrics", "victoria-metrics-prod"), "/health", "OK", 8428,
        ("-httpListenAddr={listen}", "-storageDataPath={dir}/victoria-metrics")),
    "pushgateway": Service(
        ("prometheus-pushgateway", "pushgateway"), "/-/ready", "OK", 9091,
        ("--web.listen-address={listen}", "--persistence.file={dir}/pushgateway.db")),
    "alertmanager": Service(  # alone: no cluster gossip port
        ("prometheus-alertmanager", "alertmanager"), "/-/ready", "OK", 9093,
        ("--config.file={config}", "--storage.path={dir}/alertmanager",
         "--web.listen-address={listen}", "--cluster.listen-address=")),
    "prometheus": Service(
        ("prometheus",), "/-/ready", "Prometheus", 9090,
        ("--config.file={config}", "--storage.tsdb.path={dir}/prometheus",
         "--web.listen-address={listen}", "--web.enable-lifecycle")),
}


def argv(name: str, binary: str, workdir: Path, port: int) -> list[str]:
    """Service ``name`` on 127.0.0.1:``port``, its files (config ``<name>.yml``) in ``workdir``."""
    values = {"listen": f"127.0.0.1:{port}", "dir": workdir, "config": workdir / f"{name}.yml"}
    return [binary, *(a.format(**values) for a in SERVICES[name].args)]


def _ready(url: str, body: str) -> bool:  # 200, with the server's own ready text
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


def error_lines(log: str) -> str:
    """The last 3 error lines of a server's log, each whole (they carry the cause)."""
    lines = [line for line in log.splitlines() if line.strip()]
    return "\n".join(([n for n in lines if re.search("(?i)error|fatal|panic", n)] or lines)[-3:])


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
    """The four servers scraping ``targets``, files and logs in ``workdir`` (default: the user's
    cache); ``ports``: service -> port (0: any free one; missing: its usual one)."""

    def __init__(self, workdir: str | Path | None, targets: list[str], *,
                 ports: dict[str, int] | None = None, receivers: Mapping[str, str] | None = None,
                 rule_options: RuleOptions | None = None, interval: str = "15s") -> None:
        for name, port in (ports := ports or {}).items():
            if name not in SERVICES:
                raise ValueError(f"Unknown service {name!r}: use one of {sorted(SERVICES)}")
            number(f"port of {name}", port, "0-65535 (0 = any free port)", low_ok=True,
                   high=65535, high_ok=True, integer=True)
        self.binaries = {n: next(filter(None, map(shutil.which, s.binaries)), "")
                         for n, s in SERVICES.items()}
        if missing := [s.binaries[0] for n, s in SERVICES.items() if not self.binaries[n]]:
            raise RuntimeError("; ".join(f"`{b}` not found: install the Debian package `{b}` "
                                         f"(sudo apt-get install {b})" for b in missing))
        self.ports = {n: ports.get(n, s.default_port) or _bind(0) or 0
                      for n, s in SERVICES.items()}
        self.workdir = Path(workdir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home()
                                            / ".cache") / "privacy-callbacks" / "stack")
        self.procs: dict[str, subprocess.Popen] = {}
        self.files = {"privacy-rules.yml": rule_file(rule_options),
                      "alertmanager.yml": alertmanager_config(receivers),
                      "prometheus.yml": prometheus_config(
                          targets, rule_files=("privacy-rules.yml",),
                          alertmanager=f"127.0.0.1:{self.ports['alertmanager']}",
                          pushgateway=f"127.0.0.1:{self.ports['pushgateway']}",
                          remote_write=self.url("victoria-metrics") + "/api/v1/write",
                          interval=interval)}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def errors(self, name: str) -> str:
        log = self.workdir / f"{name}.log"
        return f"see {log}:\n{error_lines(log.read_text(errors='replace')[-20_000:])}"

    def start(self, timeout: float = 60.0) -> Stack:
        """Write the configs, start every server and wait until each answers ready."""
        if taken := [f"{n} port {p}" for n, p in self.ports.items() if _bind(p) is None]:
            raise RuntimeError(f"127.0.0.1: {', '.join(taken)} already in use (Debian's own "
                               "services use the defaults: `systemctl stop` them), or choose "
                               "other ports, e.g. --prometheus-port 0 for any free one")
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
                        raise RuntimeError(f"{name} exited with {proc.returncode}; "
                                           + self.errors(name))
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not answer on {self.url(name)} within "
                                           f"{timeout:.0f} s; " + self.errors(name))
                    time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the servers, dependants first: SIGTERM, then SIGKILL after ``timeout`` s each."""
        procs, self.procs = list(self.procs.values())[::-1], {}
        for proc in procs:
            proc.terminate()  # nothing if it exited
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
