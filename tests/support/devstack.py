"""Driving `outbox dev` as a user does: the real CLI in a subprocess, its export lines, its processes."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil


def outbox(dev_dir, *args, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({"OUTBOX_DEV_DIR": str(dev_dir), **(env_extra or {})})
    result = subprocess.run([sys.executable, "-m", "outbox.cli", *args], cwd=dev_dir.parent, env=env,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"outbox {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def parse_exports(stdout: str) -> dict[str, str]:
    env = {}
    for line in stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    return env


def our_processes(dev_dir) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(dev_dir) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found
