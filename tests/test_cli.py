"""The command line needs neither torch nor Lightning: it must not import them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "lightning", "opacus")
ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a fresh interpreter, then reports which heavy packages it imported.
PROBE = f"""
import runpy, sys
sys.argv = ["privacy-callbacks", *sys.argv[1:]]
try:
    runpy.run_module("privacy_callbacks", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("IMPORTED=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
print("CODE=%s" % code)
"""


def run_cli(*args: str, cwd: Path) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines()
                 if line.startswith(("IMPORTED=", "CODE=")))
    assert "CODE" in lines, result.stdout + result.stderr
    return lines["IMPORTED"], lines["CODE"]


@pytest.mark.parametrize("args,code", [
    (("--help",), "0"),
    (("metrics",), "0"),
    (("generate", "{tmp}/ops"), "0"),
    (("audit", "verify", "{tmp}/missing.jsonl"), "2"),  # a missing file is a usage error
    (("report", "{tmp}/missing.jsonl", "-o", "{tmp}/r.html"), "2"),
])
def test_cli_commands_import_no_torch(tmp_path: Path, args: tuple[str, ...], code: str):
    imported, exit_code = run_cli(*(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    assert imported == "", f"`privacy-callbacks {' '.join(args)}` imported {imported}"
    assert exit_code == code


@pytest.mark.parametrize("content,says", [
    (None, "No such file"),
    ('{"seq": 1}\n', "no fit_start record"),
])
def test_report_errors_are_one_clear_line(tmp_path: Path, content: str | None, says: str):
    trail = tmp_path / "trail.jsonl"
    if content is not None:
        trail.write_text(content)
    result = subprocess.run([sys.executable, "-m", "privacy_callbacks", "report", str(trail),
                             "-o", str(tmp_path / "r.html")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(trail) in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_without_its_extra_names_the_extra(tmp_path: Path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "jinja2.py").write_text("raise ImportError('blocked', name='jinja2')\n")
    (tmp_path / "trail.jsonl").write_text('{"seq": 1}\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "privacy_callbacks", "report",
                             str(tmp_path / "trail.jsonl"), "-o", str(tmp_path / "r.html")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "privacy_callbacks[report]" in result.stderr and "jinja2" in result.stderr


def test_public_names_still_import_from_the_package_root():
    import privacy_callbacks

    for name in privacy_callbacks.__all__:
        assert getattr(privacy_callbacks, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        privacy_callbacks.Nope  # noqa: B018
