"""Property tests of the pure router (relay/router.py): one decoded outbox row -> one Kafka record.

Rows are generated as pgoutput hands them to the router (text-format bytes per column, in the order
the Relation message announced, or the table order of backfill reads), over the input PostgreSQL
can produce and beyond: aggregate_type, event_type and aggregate_id as any text (non-ASCII, empty,
very long, characters illegal in topic names, names of reserved and '__' topics) or bytes that are
not UTF-8 (a SQL_ASCII database); payload as JSON, arbitrary bytes or NULL; headers as `{}`, a JSON
object of strings, or one with a reserved name, a non-string value, another JSON type, malformed
JSON or invalid UTF-8; columns in any order, with headers/created_at/txid or a routing column
absent; several rows per Router, so the topic cache is hit. Against a model built from the
generator's own labels, for a few templates the settings accept and the checkpoint topic reserved:

- routing returns a Record or raises RouteError, never another exception, and raises exactly when
  the model says, with the model's reason (schema, invalid_encoding, invalid_topic,
  reserved_topic, bad_headers);
- a record's topic is the template filled with the row's text, a legal Kafka topic name
  (envelope.is_topic_name), not reserved, not starting with '__';
- its key is aggregate_id and its value the payload (None for a tombstone), bytes unchanged;
- its headers are the seven envelope headers with the row's values (event_id, event_type,
  aggregate_type, aggregate_id, outbox_commit_lsn as PostgreSQL writes the commit LSN,
  outbox_xid, outbox_commit_ts in RFC 3339 UTC), then the event's own headers in their JSON order;
  exactly one event_id header, which event_id_of() parses back to the row's event id; every
  contract header exactly once; all names text, all values UTF-8; read_envelope() gives the row
  back, with the own headers separated.

JSON escapes of lone surrogates ("\\ud800") are left out: jsonb refuses them (in every database
encoding), so they cannot reach the router. Three bugs this file found are fixed and kept as tests below; each input made route() raise
something other than RouteError, so the relay stopped with exit 1 ("a bug in the relay") on the
same row after every restart instead of dead-lettering the event:
- a headers object nested deeper than Python's recursion limit, which jsonb accepts: RecursionError;
- the bytes of a UTF-8-encoded surrogate in a header value (a SQL_ASCII database stores them), which
  json.loads(bytes) let through: UnicodeEncodeError (in a header name: a record whose header name
  was not UTF-8);
- a template the settings validator accepted, "outbox.{aggregate_type:d}": ValueError (now refused
  at start).
"""

from __future__ import annotations

import json
import re
import string
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st

from outbox.core.envelope import CONTRACT_HEADERS, event_id_of, is_reserved, is_topic_name, read_envelope
from outbox.core.settings import Settings
from relay.pgoutput import UNCHANGED, Column, Relation
from relay.router import OUTBOX_COLUMNS, TABLE_LAYOUT, Layout, Record, RouteError, Router, Txn

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CHECKPOINTS = "outbox.relay.checkpoints"
RESERVED = frozenset({CHECKPOINTS})
TEMPLATES = ["outbox.event.{aggregate_type}", "{aggregate_type}", "_{aggregate_type}",
             "{aggregate_type}.{event_type}", "outbox.relay.{aggregate_type}", "events-{event_type}", "all-events"]
ROUTING = ("aggregate_type", "aggregate_id", "event_type", "payload")
OPTIONAL = ("headers", "created_at", "txid")

# ----- text as the row carries it: (bytes, the text or None when it is not UTF-8)


def labelled(raw: bytes) -> tuple[bytes, str | None]:
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw, None


topic_safe = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=30)
special = st.sampled_from(["order", "Order.v2", "checkpoints", CHECKPOINTS, "relay.checkpoints", "_consumer_offsets",
                           "__consumer_offsets", "_", ".", "..", "", " ", "a" * 236, "a" * 249, "a" * 250,
                           "Ordér", "订单", "a b", "a/b", "a\0b", "{aggregate_type}", "{0}", "%s", "\u212a"])
not_utf8 = st.tuples(st.binary(max_size=6), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\xf4\x90"]),
                     st.binary(max_size=6)).map(b"".join)
texts = st.one_of(topic_safe, special, st.text(max_size=30), st.integers(240, 400).map(lambda n: "é" * n))
row_text = st.one_of(texts.map(str.encode), texts.map(str.encode), not_utf8).map(labelled)
# Aggregate types that make each template name the checkpoint topic or a '__' topic.
RESERVED_BAIT = {"{aggregate_type}": [CHECKPOINTS, "__consumer_offsets", "__x"],
                 "_{aggregate_type}": ["_consumer_offsets", "_"], "{aggregate_type}.{event_type}": ["__x"],
                 "outbox.relay.{aggregate_type}": ["checkpoints"]}

json_numbers = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
json_scalars = json_numbers | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=8)
not_strings = st.one_of(json_numbers, st.lists(json_values, max_size=3),
                        st.dictionaries(st.text(max_size=5), json_values, max_size=3))


@st.composite
def dumps(draw, value) -> bytes:
    ascii_only = draw(st.booleans())
    separators = draw(st.sampled_from([(", ", ": "), (",", ":")]))
    return json.dumps(value, ensure_ascii=ascii_only, separators=separators).encode()


payloads = st.one_of(st.none(), json_values.flatmap(dumps), st.binary(max_size=30), not_utf8).map(
    lambda raw: (raw, True if raw is None else labelled(raw)[1] is not None))

# ----- headers: (raw bytes, expected own headers or None when the router must refuse them)

header_names = st.one_of(st.sampled_from(["traceparent", "tracestate", "attempt", "x-request-id", "outbox", "Event_ID",
                                          "eventid", "", "é"]), st.text(max_size=12)).filter(lambda n: not is_reserved(n))
reserved_names = st.one_of(st.sampled_from(CONTRACT_HEADERS), st.text(max_size=8).map(lambda s: "outbox_" + s))
own_headers = st.dictionaries(header_names, st.text(max_size=20), max_size=5)


@st.composite
def headers(draw):
    kind = draw(st.sampled_from(["empty", "valid", "valid", "reserved", "non_string", "not_object", "malformed",
                                 "not_utf8"]))
    own = draw(own_headers)
    if kind == "empty":
        return b"{}", []
    if kind == "valid":
        return draw(dumps(own)), [(n, v.encode()) for n, v in own.items()]
    items = list(own.items())
    at = draw(st.integers(0, len(items)))
    if kind == "reserved":
        items.insert(at, (draw(reserved_names), draw(st.text(max_size=8))))
    elif kind == "non_string":
        items.insert(at, (draw(header_names.filter(lambda n: n not in own)), draw(not_strings)))
    elif kind == "not_object":
        return draw(st.one_of(json_scalars, st.lists(json_values, max_size=3)).flatmap(dumps)), None
    elif kind == "malformed":  # every proper prefix of an object's JSON text is malformed
        raw = draw(dumps(dict(items)))
        return raw[:draw(st.integers(0, len(raw) - 1))], None
    else:  # a value holding bytes that are not UTF-8
        items.insert(at, ("x-bin", "\0BAD\0"))
        # Not b"\xed\xa0\x80" (an encoded surrogate): json.loads(bytes) accepts it, see the fixed bug below.
        bad = draw(st.sampled_from([b"\xff", b"\x80", b"\xc3(", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        return draw(dumps(dict(items))).replace(b"\\u0000BAD\\u0000", bad), None
    return draw(dumps(dict(items))), None


# ----- rows and layouts


@st.composite
def layouts(draw):
    """(layout, column names in row order); None names an extra column the router must ignore."""
    if draw(st.integers(0, 4)) == 0:
        return TABLE_LAYOUT, list(OUTBOX_COLUMNS)
    names = [c for c in OUTBOX_COLUMNS if c not in draw(st.sets(st.sampled_from(OPTIONAL)))]
    if draw(st.integers(0, 9)) == 0:
        names.remove(draw(st.sampled_from(ROUTING)))
    names += [None] * draw(st.integers(0, 2))
    names = draw(st.permutations(names))
    relation = Relation(16400, "outbox", "events", "d",
                        tuple(Column(0, n or f"extra{i}", 25, -1) for i, n in enumerate(names)))
    return Layout.of(relation), names


@st.composite
def rows(draw, names, template):
    """(the row tuple, the generator's view of it as a dict)."""
    bait = RESERVED_BAIT.get(template)
    aggregate_types = st.sampled_from(bait).map(str.encode).map(labelled) if bait else row_text
    event = {
        "event_id": str(draw(st.uuids())).encode(),  # the uuid column's text form
        "aggregate_type": draw(st.one_of(row_text, aggregate_types)),
        "aggregate_id": draw(row_text),
        "event_type": draw(row_text),
        "payload": draw(payloads),
        "headers": draw(headers()),
        "created_at": b"2026-01-02 03:04:05.678901+00",
        "txid": str(draw(st.integers(0, 2**64 - 1))).encode(),
    }
    cells = {"aggregate_type": event["aggregate_type"][0], "aggregate_id": event["aggregate_id"][0],
             "event_type": event["event_type"][0], "payload": event["payload"][0], "headers": event["headers"][0]}
    row = tuple(cells.get(n, event.get(n)) if n else draw(st.sampled_from([None, UNCHANGED, b"x"])) for n in names)
    return row, event


PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
commit_timestamps = st.integers(-(62 * 10**15), 250 * 10**15)  # µs since 2000: years 0036-9922
lsns = st.one_of(st.integers(0, 2**32), st.integers(0, 2**64 - 1))


def rfc3339(us: int) -> bytes:
    d = PG_EPOCH + timedelta(microseconds=us)
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}."
            f"{d.microsecond:06d}Z").encode()


def model(template: str, names: list, event: dict) -> tuple[str | None, str | None]:
    """(expected reason or None, expected topic)."""
    if any(c not in names for c in ROUTING):
        return "schema", None
    at, et = event["aggregate_type"][1], event["event_type"][1]
    if at is None or et is None:
        return "invalid_encoding", None
    topic = template.format(aggregate_type=at, event_type=et)
    if not re.fullmatch(r"[a-zA-Z0-9._-]{1,249}", topic) or topic in (".", ".."):
        return "invalid_topic", topic
    if topic in RESERVED or topic.startswith("__"):
        return "reserved_topic", topic
    if event["aggregate_id"][1] is None or not event["payload"][1]:
        return "invalid_encoding", topic
    if "headers" in names and event["headers"][1] is None:
        return "bad_headers", topic
    return None, topic


@SETTINGS
@given(st.sampled_from(TEMPLATES), layouts(), st.data(), lsns, commit_timestamps)
def test_a_row_becomes_a_valid_record_or_a_route_error_with_the_models_reason(template, layout_names, data,
                                                                              final_lsn, commit_ts):
    layout, names = layout_names
    router = Router(template, reserved=RESERVED)
    txn = Txn.of(final_lsn, commit_ts)
    for row, event in data.draw(st.lists(rows(names, template), min_size=1, max_size=4), label="rows"):
        reason, topic = model(template, names, event)
        tally(reason or "record")
        try:
            record = router.route(layout, row, txn)
        except RouteError as exc:  # anything else fails the test
            assert exc.reason == reason, (exc.reason, str(exc), event)
            assert str(exc)
            continue
        assert reason is None, (reason, record)
        assert type(record) is Record

        assert record.topic == topic
        assert is_topic_name(record.topic) and record.topic not in RESERVED and not record.topic.startswith("__")
        assert record.key == event["aggregate_id"][0]
        assert record.value == event["payload"][0]
        assert (record.value is None) == (event["payload"][0] is None)
        txid = event["txid"] if "txid" in names else b""
        assert record.event_id == event["event_id"] and record.txid == txid
        assert isinstance(record.size, int) and record.size > 0

        own = event["headers"][1] if "headers" in names else []
        lsn_text = record.headers[4][1].decode()
        assert re.fullmatch(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}", lsn_text)
        high, low = lsn_text.split("/")
        assert int(high, 16) << 32 | int(low, 16) == final_lsn
        assert record.headers == [
            ("event_id", event["event_id"]), ("event_type", event["event_type"][0]),
            ("aggregate_type", event["aggregate_type"][0]), ("aggregate_id", event["aggregate_id"][0]),
            ("outbox_commit_lsn", lsn_text.encode()), ("outbox_xid", txid), ("outbox_commit_ts", rfc3339(commit_ts)),
        ] + own
        header_names = [n for n, _ in record.headers]
        assert header_names.count("event_id") == 1
        assert event_id_of(record.headers) == uuid.UUID(event["event_id"].decode())
        assert all(header_names.count(n) == 1 for n in CONTRACT_HEADERS)
        assert not any(is_reserved(n) for n, _ in record.headers[7:])
        for name, value in record.headers:
            assert type(name) is str and type(value) is bytes
            name.encode("utf-8")
            value.decode("utf-8")

        envelope = read_envelope(record.headers)
        assert envelope.event_id == uuid.UUID(event["event_id"].decode())
        assert (envelope.event_type, envelope.aggregate_type, envelope.aggregate_id) == (
            event["event_type"][1], event["aggregate_type"][1], event["aggregate_id"][1])
        assert envelope.commit_lsn == lsn_text and envelope.commit_ts == rfc3339(commit_ts).decode()
        assert envelope.xid == (int(txid) if txid else None)
        assert envelope.headers == {n: v.decode() for n, v in own}


@SETTINGS
@given(st.sampled_from(TEMPLATES), st.lists(st.tuples(row_text, row_text), min_size=1, max_size=6))
def test_topic_is_the_same_with_and_without_the_cache(template, pairs):
    """Router.topic() caches per (aggregate_type, event_type if the template uses it): a warm
    router answers like a fresh one, for topics it refuses too. One difference is by design: when
    the template does not use event_type, a warm router does not decode it again (route() checks
    its encoding itself, which the test above covers)."""
    warm = Router(template, reserved=RESERVED)

    def outcome(router, at, et):
        try:
            return router.topic(at, et)
        except RouteError as exc:
            return exc.reason

    for (at, _), (et, et_text) in pairs + pairs:
        fresh = outcome(Router(template, reserved=RESERVED), at, et)
        if et_text is None and "{event_type}" not in template and fresh == "invalid_encoding":
            fresh = outcome(Router(template, reserved=RESERVED), at, b"x")  # what the cache may hold
            assert outcome(warm, at, et) in (fresh, "invalid_encoding")
        else:
            assert outcome(warm, at, et) == fresh


# ----- bugs this file found, fixed (see the module docstring)

ALL_COLUMNS = Layout.of(Relation(1, "outbox", "events", "d", tuple(Column(0, n, 25, -1) for n in OUTBOX_COLUMNS)))


def row_with_headers(raw_headers: bytes) -> tuple:
    return (str(uuid.UUID(int=1)).encode(), b"order", b"42", b"OrderPlaced", b"{}", raw_headers, b"now", b"7")


@settings(max_examples=20, deadline=None)
@example(depth=5000, brackets="[]").via("the reproducer of the fixed bug")
@given(st.integers(1, 5000), st.sampled_from(["[]", '{"a":}']))
def test_deeply_nested_headers_are_dead_lettered_not_a_crash_loop(depth, brackets):
    """Found by this file, fixed: own_headers() catches ValueError around json.loads, but a nested value
    deeper than the recursion limit raises RecursionError. jsonb accepts such an object (the
    CHECK only asks for jsonb_typeof = 'object'; outbox.emit() would refuse the non-string value,
    a direct INSERT does not), and the relay then stops with exit 1 on every restart, since the
    slot streams the same row again: a poison pill instead of a dead letter.
    Reproducer: Router("t.{aggregate_type}").route(layout, row with headers
    b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", Txn.of(1, 0)) -> RecursionError;
    expected RouteError("bad_headers") (header 'a' has a non-string value)."""
    opening, closing = brackets[:-1], brackets[-1]
    raw = ('{"a": ' + opening * depth + ("1" if opening.endswith(":") else "") + closing * depth + "}").encode()
    with pytest.raises(RouteError) as err:
        Router("t.{aggregate_type}").route(ALL_COLUMNS, row_with_headers(raw), Txn.of(1, 0))
    assert err.value.reason == "bad_headers"


@pytest.mark.parametrize("template", ["outbox.{aggregate_type:d}", "outbox.{aggregate_type:.20}",
                                      "outbox.{aggregate_type:x}", "outbox.{event_type:_<10}",
                                      "outbox.{aggregate_type!r}", "outbox.{aggregate_type:,}"])
def test_a_template_with_a_format_spec_is_refused_at_start_not_on_every_event(template):
    """Found by this file: the settings accepted "outbox.{aggregate_type:d}", and then every route()
    raised ValueError("Unknown format code 'd'"), stopping the relay on the first event."""
    with pytest.raises(ValueError, match="uses a format spec or conversion"):
        Settings._template(template)


@settings(max_examples=20, deadline=None)
@example(code_point=0xD800, where="value").via("the reproducer of the fixed bug")
@example(code_point=0xDFFF, where="name").via("the reproducer of the fixed bug")
@given(st.integers(0xD800, 0xDFFF), st.sampled_from(["value", "name"]))
def test_encoded_surrogates_in_headers_are_dead_lettered_not_a_crash(code_point, where):
    """Found by this file, fixed: json.loads(bytes) decodes with errors="surrogatepass", so the bytes of a
    UTF-8-encoded surrogate (b"\\xed\\xa0\\x80" for U+D800), which are not UTF-8, pass own_headers()'s
    JSON check. In a header value, `value.encode()` then raises UnicodeEncodeError out of route();
    in a header name the record is returned with a name that is not UTF-8 (the producer refuses it
    later, if at all). A SQL_ASCII database, which the router expects ("bytes from a SQL_ASCII
    database may be anything"), stores such a headers column. The relay stops with exit 1 on every
    restart (value case). Reproducer: route() of a row whose headers are b'{"k": "\\xed\\xa0\\x80"}'
    -> UnicodeEncodeError; expected RouteError (invalid_encoding or bad_headers), as for b"\\xff"."""
    surrogate = b"\xed" + bytes([0x80 | (code_point >> 6) & 0x3F, 0x80 | code_point & 0x3F])
    assert surrogate == chr(code_point).encode("utf-8", "surrogatepass")
    raw = b'{"k": "' + surrogate + b'"}' if where == "value" else b'{"' + surrogate + b'": "v"}'
    with pytest.raises(RouteError) as err:
        Router("t.{aggregate_type}").route(ALL_COLUMNS, row_with_headers(raw), Txn.of(1, 0))
    assert err.value.reason in ("invalid_encoding", "bad_headers")
