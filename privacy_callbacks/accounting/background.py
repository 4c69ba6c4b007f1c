"""Off the training thread: one worker thread per accounting, driving one child process.

Jobs run one at a time, most urgent first; a newer job of the same key replaces one not started.
Opacus' computations run in :mod:`.child`, a plain ``python`` process fed through a pipe -- not
``ProcessPoolExecutor``: its spawn/forkserver children import the parent's ``__main__``, which
re-runs a training script without an ``if __name__ == "__main__"`` guard (a test runs one), and
``fork`` is unsafe with torch's threads.
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any, Callable

from opacus.accountants.analysis import rdp as _analysis

from . import child

logger = logging.getLogger(__name__)

__all__ = ["Child", "ChildUnavailable", "Worker"]


class ChildUnavailable(Exception):
    """The child cannot take this request: compute it in this process."""


class Child:
    """The child process of :mod:`.child`, started on the first request."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self.failed = False
        self._lock = threading.Lock()  # one request at a time

    def call(self, *request: Any) -> Any:
        """The child's answer (its error as ``RuntimeError``); waits in a pipe read, GIL free."""
        try:
            data = pickle.dumps(request)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ChildUnavailable from exc
        with self._lock:
            if self.failed:
                raise ChildUnavailable
            try:
                if self._proc is None:
                    self._proc = subprocess.Popen(
                        [sys.executable, child.__file__, _analysis.__file__],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL)
                assert self._proc.stdin is not None and self._proc.stdout is not None
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
                ok, value = pickle.load(self._proc.stdout)
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
                self.close()
                raise ChildUnavailable from exc
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        """Stop the child now; a request in flight fails (its caller computes in-thread)."""
        self.failed = True
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()  # type: ignore[union-attr]
                except OSError:
                    pass


class Worker:
    """One thread running an accounting's jobs, the lowest priority number first."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.child = Child()
        self._jobs: dict[Any, tuple[int, Callable[[], Any], Future[Any]]] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, key: Any, priority: int, job: Callable[[], Any]) -> Future[Any]:
        """Run ``job``, replacing a job of ``key`` not started yet (its future gets this result)."""
        with self._cv:
            pending = self._jobs.get(key)
            future: Future[Any] = Future() if pending is None else pending[2]
            if self._closed:
                future.cancel()
                return future
            self._jobs[key] = (priority, job, future)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return future

    def pending(self, key: Any) -> bool:
        return key in self._jobs

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                key = min(self._jobs, key=lambda k: self._jobs[k][0])
                _, job, future = self._jobs.pop(key)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # the waiter decides what a failure means
                future.set_exception(exc)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; a computation in flight is dropped (closing waits for none)."""
        with self._cv:
            self._closed = True
            for _, _, future in self._jobs.values():
                future.cancel()
            self._jobs.clear()
            self._cv.notify_all()
        self.child.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("%s did not stop within %.1f s", self.name, timeout)
