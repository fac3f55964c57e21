"""The pure pgoutput decoder, on bytes captured from PostgreSQL 18 (tests/unit/data/capture_pgoutput.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from outbox.core.lsn import lsn_to_str, pg_timestamp, str_to_lsn
from relay.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    DecodeError,
    Delete,
    Message,
    Origin,
    Truncate,
    Type,
    Update,
    decode,
)

DATA = Path(__file__).parent / "data"
OUTBOX_COLUMNS = ["event_id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers", "created_at",
                  "txid"]


def captured(proto: int) -> list:
    return [decode(bytes.fromhex(h)) for h in json.loads((DATA / f"pgoutput_v{proto}.json").read_text())]


@pytest.mark.parametrize("proto", [1, 2, 3, 4])
def test_captured_stream_decodes_to_the_expected_messages(proto):
    msgs = captured(proto)
    assert [type(m).__name__ for m in msgs] == [
        "Begin", "Relation", "Insert", "Commit",                      # emit with headers
        "Begin", "Insert", "Message", "Commit",                       # emit NULL payload + tx message
        "Message",                                                    # non-transactional message
        "Begin", "Type", "Relation", "Insert", "Commit",              # enum column -> Type first
        "Begin", "Update", "Commit",
        "Begin", "Delete", "Commit",
        "Begin", "Type", "Relation", "Truncate", "Commit",
        "Begin", "Origin", "Type", "Relation", "Insert", "Commit",    # replicated from an origin
    ]

    begin, rel, ins, commit = msgs[:4]
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_ts == commit.commit_ts
    assert pg_timestamp(begin.commit_ts).year >= 2026
    assert (rel.namespace, rel.name, rel.replica_identity) == ("outbox", "events", "d")
    assert [c.name for c in rel.columns] == OUTBOX_COLUMNS
    assert [c.flags for c in rel.columns] == [1, 0, 0, 0, 0, 0, 0, 0]  # event_id is the key
    assert ins.relation_oid == rel.oid
    row = dict(zip(OUTBOX_COLUMNS, ins.new))
    assert row["aggregate_type"] == b"order" and row["aggregate_id"] == b"42" and row["event_type"] == b"OrderPlaced"
    assert json.loads(row["payload"]) == {"total": 10, "text": "café"}
    assert json.loads(row["headers"]) == {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    assert len(row["event_id"]) == 36 and int(row["txid"]) == begin.xid

    tombstone, tx_message = msgs[5], msgs[6]
    assert dict(zip(OUTBOX_COLUMNS, tombstone.new))["payload"] is None
    assert tx_message == Message(True, tx_message.lsn, "test.prefix", b"in-tx")
    non_tx = msgs[8]
    assert non_tx.transactional is False and non_tx.content == b"non-tx"

    enum_type, misc = msgs[10], msgs[11]
    assert isinstance(enum_type, Type) and enum_type.name == "capture_mood"
    assert misc.replica_identity == "f" and misc.columns[1].type_oid == enum_type.oid
    assert msgs[12].new == (b"1", b"ok", None, b"x" * 5000)

    update = msgs[15]
    assert isinstance(update, Update) and update.key is None
    assert update.old == (b"1", b"ok", None, b"x" * 5000)
    assert update.new == (b"1", b"ok", b"n", b"x" * 5000)
    delete = msgs[18]
    assert isinstance(delete, Delete) and delete.old == (b"1", b"ok", b"n", b"x" * 5000) and delete.key is None
    truncate = msgs[23]
    assert isinstance(truncate, Truncate) and truncate.relation_oids == (misc.oid,) and truncate.options == 0
    origin = msgs[26]
    assert isinstance(origin, Origin) and origin.name == "capture_origin" and origin.commit_lsn == 0xAB
    assert msgs[29].new == (b"2", b"sad", b"from origin", None)


def test_unchanged_toast_and_key_tuples():
    # Update with a changed key ('K') and an unchanged TOASTed column ('u'), built by hand since
    # capturing one depends on the storage decisions of the server.
    key = b"K" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 1) + b"1"
    new = b"N" + struct.pack(">h", 2) + b"t" + struct.pack(">i", 1) + b"2" + b"u"
    msg = decode(b"U" + struct.pack(">I", 77) + key + new)
    assert msg == Update(77, None, (b"1",), (b"2", UNCHANGED))


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "empty pgoutput message"),
        (b"Z\x00", "unknown pgoutput message type 'Z'"),
        (b"S\x00\x00\x00\x01\x01", "Stream Start message received, but this relay never enables streaming"),
        (b"B\x00\x01", "truncated or malformed 'B' message"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 99) + b"ab",
         "column value of 99 bytes does not fit the message"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"q", "unknown tuple column kind 'q'"),
        (b"I" + struct.pack(">I", 1) + b"X", "Insert without a new tuple"),
    ],
)
def test_malformed_input_raises_decode_error(raw, error):
    with pytest.raises(DecodeError, match=error):
        decode(raw)


def test_lsn_text_round_trip():
    assert lsn_to_str(0x16_B374D848) == "16/B374D848"
    assert str_to_lsn("16/B374D848") == 0x16_B374D848
    assert str_to_lsn(lsn_to_str(0)) == 0
    with pytest.raises(ValueError, match="is not an LSN"):
        str_to_lsn("nope")


def test_insert_at_reads_an_insert_inside_a_whole_frame():
    """The relay's hot path decodes inserts in place in the replication frame."""
    from relay.pgoutput import insert_at

    payload = bytes.fromhex(json.loads((DATA / "pgoutput_v1.json").read_text())[2])
    frame = b"w" + bytes(24) + payload
    expected = decode(payload)
    assert insert_at(frame, 25) == (expected.relation_oid, expected.new)
    with pytest.raises(DecodeError, match="truncated or malformed 'I' message"):
        insert_at(frame[:30], 25)
