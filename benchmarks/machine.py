"""What machine a benchmark ran on, for its report."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name and core count."""
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
    except OSError:
        names = []
    name = names[0] if names else (platform.processor() or platform.machine())
    return f"{name} ({os.cpu_count()} cores)"
