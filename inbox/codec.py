"""Pure conversions between Kafka records / exceptions and what the dead-letter table stores."""

from __future__ import annotations

import base64
import binascii
import json
import traceback
from datetime import datetime, timezone
from typing import Any

from outbox.core.envelope import AGGREGATE_ID, AGGREGATE_TYPE, EVENT_TYPE
from outbox.core.redact import redact

ERROR_MAX = 2_000
DETAIL_MAX = 20_000


def headers_to_json(headers: list[tuple[str, bytes]] | None) -> list[dict[str, str]]:
    """Readable where possible (UTF-8 text), exact always (base64 otherwise), order kept."""
    out = []
    for name, value in headers or ():
        if value is None:
            out.append({"name": name, "base64": ""})
            continue
        try:
            out.append({"name": name, "value": value.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"name": name, "base64": base64.b64encode(value).decode("ascii")})
    return out


def headers_from_json(doc: list[dict[str, str]]) -> list[tuple[str, bytes]]:
    """Inverse of headers_to_json: the exact header bytes the record had."""
    out = []
    for h in doc:
        if "value" in h:
            out.append((h["name"], h["value"].encode("utf-8")))
        else:
            try:
                out.append((h["name"], base64.b64decode(h["base64"], validate=True)))
            except (binascii.Error, KeyError) as exc:
                raise ValueError(f"stored header {h.get('name')!r} is not valid: {exc}") from None
    return out


def payload_json(value: bytes | None) -> Any:
    """The value as JSON for reading in the table, or None when it is not JSON."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None


def header_text(headers: list[tuple[str, bytes]] | None, name: str) -> str | None:
    """First header `name` as text, tolerating a broken envelope (for display only)."""
    for n, v in headers or ():
        if n == name and v is not None:
            return v.decode("utf-8", errors="replace")
    return None


def envelope_columns(headers: list[tuple[str, bytes]] | None) -> tuple[str | None, str | None, str | None]:
    return header_text(headers, EVENT_TYPE), header_text(headers, AGGREGATE_TYPE), header_text(headers, AGGREGATE_ID)


def kafka_time(timestamp_ms: int | None) -> datetime | None:
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc)


def describe_error(exc: BaseException) -> str:
    """One line for the table and the logs: type and message, with DSN passwords masked."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return redact(text)[:ERROR_MAX]


def error_detail(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return redact(text)[-DETAIL_MAX:]  # the end of a traceback is the part that says what failed
