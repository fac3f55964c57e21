"""What the inbox stores of a record: headers, payload JSON, errors (pure)."""

from __future__ import annotations

import uuid

import pytest

from inbox import codec

A, B, C = (uuid.UUID(int=i) for i in (1, 2, 3))


def test_headers_round_trip_exactly_and_stay_readable():
    headers = [("event_id", str(A).encode()), ("bin", b"\xff\x00\x01"), ("empty", b""), ("event_id", b"x")]
    doc = codec.headers_to_json(headers)
    assert doc[0] == {"name": "event_id", "value": str(A)}
    assert doc[1] == {"name": "bin", "base64": "/wAB"}
    assert codec.headers_from_json(doc) == headers
    with pytest.raises(ValueError, match="not valid"):
        codec.headers_from_json([{"name": "x", "base64": "%%%"}])


def test_payload_json_and_errors_are_safe_to_store():
    assert codec.payload_json(b'{"a": 1}') == {"a": 1}
    assert codec.payload_json(b"\xff not json") is None
    assert codec.payload_json(None) is None
    exc = RuntimeError("connect to postgresql://app:hunter2@db/app failed\nsecond line")
    assert codec.describe_error(exc) == "RuntimeError: connect to postgresql://app:***@db/app failed second line"
    try:
        raise exc
    except RuntimeError as caught:
        detail = codec.error_detail(caught)
    assert "hunter2" not in detail and "Traceback" in detail

