"""Process and port helpers for the dev stack: we only ever touch processes we started."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil


class StackError(RuntimeError):
    """A dev-stack server failed; the message says what broke and where its log is."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: a port whose old connections linger in TIME_WAIT after a crash is free
        # for a new listener, and keeping the port keeps the URLs in dev.env valid.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ours(pid: int | None, marker: Path | str) -> psutil.Process | None:
    """The process `pid` if it is alive and its command line mentions `marker` (our data dir).

    The marker check is what makes a stale pid file safe: after a reboot or a crash the pid may
    belong to an unrelated process, which we must neither reuse nor kill.
    """
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if str(marker) in " ".join(proc.cmdline()):
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


def find_ours(marker: Path | str) -> psutil.Process | None:
    """A live process whose command line mentions `marker`, even if its pid was never recorded
    (e.g. the CLI was killed between starting a server and writing state.json)."""
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(marker) in " ".join(proc.info["cmdline"] or []):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def terminate(proc: psutil.Process, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL the process (and nothing else)."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool], log: Path) -> float:
    """Poll `check` until true; fail fast with the log's tail if the server died meanwhile."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if not alive():
            raise StackError(f"{what} exited during start-up. Log: {log}\n{tail(log)}")
        if time.monotonic() - start > timeout:
            raise StackError(f"{what} did not become ready within {timeout:.0f} s. Log: {log}\n{tail(log)}")
        time.sleep(0.1)


def tail(path: Path, lines: int = 15) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log written)"
    return "\n".join("    " + line for line in content[-lines:])


def progress(message: str) -> None:
    """Progress for humans on stderr, so stdout stays clean for `eval "$(outbox dev up)"`."""
    print(message, file=sys.stderr, flush=True)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
