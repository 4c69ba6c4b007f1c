"""Shared fixtures: no test may leave a thread, process or port behind."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("PYTHONHASHSEED", "0")


def _ours(thread: threading.Thread) -> bool:
    # Threads this project (or the servers it wraps) start; pool/daemon threads of torch and the
    # interpreter are not ours to police.
    name = thread.name
    return name.startswith(("privacy-", "Thread-")) or "serve_forever" in repr(
        getattr(thread, "_target", ""))


@pytest.fixture(autouse=True)
def no_zombie_threads():
    """Fail a test that leaves one of our threads running (exporters own threads)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        gc.collect()
        left = [t for t in threading.enumerate()
                if t not in before and t.is_alive() and _ours(t)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"zombie threads left behind: {[t.name for t in left]}"


@pytest.fixture(autouse=True)
def fresh_rdp_vectors():
    """Each test starts with no exact RDP vector computed, as a new process does.

    The cache is process-wide (a later fit reuses an earlier fit's vectors), so without this a
    test's exact-or-bound labels would depend on which tests ran before it.
    """
    from privacy_callbacks.accounting import rdp
    rdp.VECTORS.clear()
    yield
