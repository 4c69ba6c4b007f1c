"""The command line needs neither torch nor Lightning: it must not import them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "lightning", "opacus")

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


@pytest.mark.parametrize("args", [
    ("--help",),
    ("metrics",),
    ("generate", "{tmp}/ops"),
    ("audit", "verify", "{tmp}/missing.jsonl"),
])
def test_cli_commands_import_no_torch(tmp_path: Path, args: tuple[str, ...]):
    imported, code = run_cli(*(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    assert imported == "", f"`privacy-callbacks {' '.join(args)}` imported {imported}"
    expected = "2" if args[0] == "audit" else "0"  # a missing audit file is a usage error
    assert code == expected


def test_public_names_still_import_from_the_package_root():
    import privacy_callbacks

    for name in privacy_callbacks.__all__:
        assert getattr(privacy_callbacks, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        privacy_callbacks.Nope  # noqa: B018
