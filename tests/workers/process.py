"""Worker processes for the crash tests (tests.workers.inbox_worker, tests.workers.effect_worker) whose log is
collected and attached to any failure, so a worker that hung, crashed or misbehaved says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from tests.support.helpers import wait_for
from tests.support.paths import REPO

LOG_TAIL = 16000


class WorkerProcess:
    """`python -m <module> <args>` with stderr collected. As a context manager: any exception raised
    inside the block (a failed assert, a timeout) carries the worker's log as a note, and a worker
    still running at the end is killed (a leaked worker would keep consuming, with the same static
    group membership, into the next rounds and tests)."""

    def __init__(self, module: str, *args: str, env: dict[str, str] | None = None, name: str | None = None):
        self.name = name or module
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def log(self) -> str:
        if self.proc.poll() is not None:
            self._reader.join(5)
        return "".join(self.lines)[-LOG_TAIL:]

    def wait(self, timeout: float) -> int:
        """The exit code; a worker still running after `timeout` is killed and reported."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            self.kill()
            raise AssertionError(f"{self.name} (pid {self.proc.pid}) still running after {timeout:.0f} s; killed "
                                 f"it") from None

    def wait_for(self, predicate, timeout: float, what: str):
        """helpers.wait_for, failing at once if the worker exited meanwhile."""
        def check():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} while waiting for {what}")
            return predicate()

        return wait_for(check, timeout, what)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def dump_stacks(self) -> None:
        """Every thread's stack into the log (the workers register faulthandler on SIGUSR1): a hung
        worker's report then says where it hung."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.dump_stacks()
        self.kill()
        if exc is not None:
            exc.add_note(f"--- log of {self.name} (pid {self.proc.pid}, exit {self.proc.returncode}) ---\n"
                         f"{self.log() or '(empty)'}")
