"""OpenTelemetry spans around handlers, so that one trace runs producer -> relay -> consumer.

The producer puts its W3C `traceparent` (and `tracestate`) into the event's headers
(`outbox.emit(..., headers => '{"traceparent": "00-..."}')`); the relay forwards the event's own
headers untouched; here each handler call runs inside a CONSUMER span whose parent is that
context, named and attributed after OpenTelemetry's messaging conventions. A record without a
valid traceparent gets a span of its own (a new trace), never an error.

Optional: with the `tracing` extra (opentelemetry-api) installed and a tracer provider configured
by the application (the SDK, an exporter) before the Runner starts, handlers are traced; without
either, handlers run exactly as before, at no cost per record. OTEL_SDK_DISABLED=true turns the SDK
off as usual.
"""

from __future__ import annotations

import functools

try:
    from opentelemetry import propagate, trace
except ImportError:  # the tracing extra is not installed
    trace = None

from inbox.message import Message

PROPAGATED = ("traceparent", "tracestate")


def enabled() -> bool:
    """True when spans would go somewhere: the API is installed and a real provider is set (the
    default ProxyTracerProvider only forwards to one set later, and makes no-op spans until then)."""
    return trace is not None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def carrier(message: Message) -> dict[str, str]:
    """The propagation headers of a record, as text (what a propagator reads)."""
    found = {}
    for name, value in message.headers:
        if name in PROPAGATED and value is not None:
            found[name] = value.decode("utf-8", errors="replace")
    return found


def instrument(handler):
    """`handler` itself when tracing is not enabled, else a handler that runs it inside a span."""
    if not enabled():
        return handler
    tracer = trace.get_tracer("inbox")

    @functools.wraps(handler)
    def traced(conn, message: Message):
        record = message.record
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": message.consumer,
            "messaging.message.id": str(message.event_id),
            "inbox.attempt": message.attempt,
        }
        with tracer.start_as_current_span(f"process {record.topic}", context=propagate.extract(carrier(message)),
                                          kind=trace.SpanKind.CONSUMER, attributes=attributes):
            return handler(conn, message)

    return traced
