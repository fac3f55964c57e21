"""Dispatch by event type, with the payload validated into a typed model before the handler runs.

    handlers = Handlers(unknown="ignore")

    @handlers.on("OrderPlaced", OrderPlaced)          # OrderPlaced: a pydantic BaseModel
    def placed(conn, msg, order: OrderPlaced): ...

    Runner(..., handler=handlers)                     # a Handlers object is a handler(conn, msg)

- The event type is the relay's `event_type` header (outbox/core/envelope.py).
- A payload that does not validate is dead-lettered at once with the validation error: the same
  bytes will never validate on a retry (raised as PayloadInvalid, a NonRetryable).
- An event type nobody registered follows `unknown`:
    "dead-letter" (default)  dead-lettered at once (NonRetryable), so nothing is dropped silently:
                             deploy a handler for it, then replay the dead letters;
    "ignore"                 marked seen and counted as processed, nothing else happens. For
                             topics that carry event types this consumer does not care about.
  `ignore("TypeA", ...)` ignores only the named types, whatever `unknown` says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import psycopg
from pydantic import TypeAdapter, ValidationError

from inbox.errors import InboxError, NonRetryable
from inbox.message import Message
from outbox.core.envelope import EVENT_TYPE

UNKNOWN_RULES = ("dead-letter", "ignore")


class PayloadInvalid(NonRetryable):
    """The record's payload does not validate against the model registered for its event type."""

    def __init__(self, event_type: str, model: Any, error: ValidationError | str):
        name = getattr(model, "__name__", repr(model))
        super().__init__(f"payload of event type {event_type!r} does not validate as {name}: {error}")
        self.event_type = event_type
        self.model = model


class UnknownEventType(NonRetryable):
    """No handler is registered for the record's event type and the rule is to dead-letter it."""

    def __init__(self, event_type: str | None, known: list[str]):
        super().__init__(f"no handler for event type {event_type!r} (handled: {', '.join(known) or 'none'}); "
                         f"register one with @handlers.on({event_type!r}), or declare it with "
                         f"handlers.ignore({event_type!r}) or Handlers(unknown='ignore'), then replay")
        self.event_type = event_type


def _ignore(conn: psycopg.Connection, msg: Message) -> None:
    return None


class Handlers:
    """A handler(conn, msg) that dispatches on the event type. See the module docstring."""

    def __init__(self, *, unknown: Literal["dead-letter", "ignore"] = "dead-letter"):
        if unknown not in UNKNOWN_RULES:
            raise InboxError(f"unknown={unknown!r}: must be one of {', '.join(UNKNOWN_RULES)}")
        self.unknown = unknown
        self._routes: dict[str, Callable[[psycopg.Connection, Message], None]] = {}

    def on(self, event_type: str, model: Any = None) -> Callable:
        """Register fn(conn, msg, payload) for `event_type`, the payload validated as `model` (a
        pydantic BaseModel, or any type pydantic can validate: a dataclass, a TypedDict). Without a
        model, fn(conn, msg)."""
        if not event_type:
            raise InboxError("an event type must be a non-empty string")

        def register(fn: Callable) -> Callable:
            if event_type in self._routes:
                raise InboxError(f"event type {event_type!r} already has a handler")
            self._routes[event_type] = fn if model is None else _typed(event_type, model, fn)
            return fn

        return register

    def ignore(self, *event_types: str) -> "Handlers":
        """Mark these event types seen without doing anything (counted as processed)."""
        for event_type in event_types:
            if event_type in self._routes:
                raise InboxError(f"event type {event_type!r} already has a handler")
            self._routes[event_type] = _ignore
        return self

    @property
    def event_types(self) -> list[str]:
        return sorted(self._routes)

    def __call__(self, conn: psycopg.Connection, msg: Message) -> None:
        event_type = event_type_of(msg)
        route = self._routes.get(event_type) if event_type is not None else None
        if route is not None:
            return route(conn, msg)
        if self.unknown == "ignore":
            return None
        raise UnknownEventType(event_type, self.event_types)

    def __repr__(self) -> str:
        return f"Handlers({', '.join(self.event_types)}; unknown={self.unknown!r})"


def _typed(event_type: str, model: Any, fn: Callable) -> Callable[[psycopg.Connection, Message], None]:
    # Built once per registration: pydantic compiles the validator here, not per record.
    adapter = TypeAdapter(model)

    def handle(conn: psycopg.Connection, msg: Message) -> None:
        value = msg.value
        if value is None:
            raise PayloadInvalid(event_type, model, "the record is a tombstone (null value)")
        try:
            payload = adapter.validate_json(value)
        except ValidationError as exc:
            # Only our own validation is final; a ValidationError raised inside fn keeps the retry policy.
            raise PayloadInvalid(event_type, model, _one_line(exc)) from exc
        return fn(conn, msg, payload)

    handle.__name__ = getattr(fn, "__name__", "handle")
    return handle


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "(payload)"
        parts.append(f"{where}: {err.get('msg')}")
    return f"{exc.error_count()} error(s): " + "; ".join(parts)


def event_type_of(msg: Message) -> str | None:
    """The relay's event_type header, read directly: the full envelope is not needed to dispatch."""
    for name, value in msg.record.headers or ():
        if name == EVENT_TYPE and value is not None:
            return value.decode("utf-8", errors="replace")
    return None
