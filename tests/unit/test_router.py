"""The pure router: outbox row -> Kafka record, or a dead letter with the reason."""

from __future__ import annotations

import pytest

from relay.pgoutput import Column, Relation
from relay.router import Layout, RouteError, Router, SchemaError, Txn


def relation(*names: str) -> Relation:
    return Relation(1, "outbox", "events", "d", tuple(Column(0, n, 25, -1) for n in names))


ALL = ("event_id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers", "created_at", "txid")


def test_layout_without_a_routing_column_dead_letters_and_without_event_id_stops():
    layout = Layout.of(relation(*[c for c in ALL if c != "event_type"]))
    assert layout.missing == ("event_type",)
    with pytest.raises(RouteError) as err:
        Router("t.{aggregate_type}").route(layout, (b"id", b"order", b"1", b"{}", b"{}", b"now", b"5"), Txn.of(1, 0))
    assert err.value.reason == "schema" and "event_type" in str(err.value)
    with pytest.raises(SchemaError, match="no event_id column"):
        Layout.of(relation(*ALL[1:]))


@pytest.mark.parametrize("column", ["aggregate_type", "aggregate_id", "event_type", "payload"])
def test_text_that_is_not_utf8_is_refused_by_the_router_with_the_column(column):
    layout = Layout.of(relation(*ALL))
    row = dict(zip(ALL, (b"id", b"order", b"1", b"Placed", b'{"a": 1}', b"{}", b"now", b"5")))
    row[column] = b"\xff\xfe" + row[column]
    with pytest.raises(RouteError) as err:
        Router("t.{aggregate_type}").route(layout, tuple(row.values()), Txn.of(1, 0))
    assert err.value.reason == "invalid_encoding" and column in str(err.value)



@pytest.mark.parametrize("template, aggregate_type", [("t.{aggregate_type}", "checkpoints"),
                                                      ("_{aggregate_type}", "_consumer_offsets")])
def test_an_aggregate_type_that_names_a_reserved_topic_is_refused(template, aggregate_type):
    router = Router(template, reserved=frozenset({"t.checkpoints"}))
    with pytest.raises(RouteError) as err:
        router.topic(aggregate_type.encode(), b"Placed")
    assert err.value.reason == "reserved_topic" and "Fix:" in str(err.value)
    router = Router("t.{aggregate_type}", reserved=frozenset({"t.checkpoints"}))
    assert router.topic(b"order", b"Placed") == "t.order"
