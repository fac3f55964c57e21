"""Handler tracing without a configured tracer provider costs nothing, and only the propagation
headers are read (pure; the spans themselves: tests/inbox/test_tracing.py)."""

from __future__ import annotations

import uuid

from inbox import tracing
from inbox.message import Message
from tests.support.inbox import Rec, headers_for


def test_without_a_tracer_provider_the_handler_is_returned_unwrapped():
    def handler(conn, msg):
        pass

    assert not tracing.enabled()
    assert tracing.instrument(handler) is handler


def test_the_carrier_holds_only_the_propagation_headers_as_text():
    own = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("tracestate", b"a=1"),
           ("tenant", b"t-1"), ("tracestate-bad", "é".encode())]
    record = Rec("t", 0, 5, b"{}", headers_for(uuid.uuid4(), own=own))
    assert tracing.carrier(Message(record, uuid.uuid4(), "c")) == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "a=1"}
