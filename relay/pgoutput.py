"""Pure decoder for PostgreSQL's pgoutput logical replication messages (no I/O).

Covers the messages of non-streamed transactions in protocol versions 1-4: Begin, Commit, Origin,
Relation, Type, Insert, Update, Delete, Truncate and logical decoding Message. The relay never
enables `streaming` or `two_phase`, so the stream/prepare messages (and the xid field that
versions 2+ add only inside streamed transactions) cannot appear; meeting one is a DecodeError.

Reference: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
Column values are returned as the raw text-format bytes (None for SQL NULL, UNCHANGED for an
unchanged TOASTed value in an update); turning them into Python types is the router's job, so
this module stays a few attribute lookups per column.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_COLUMN_TAIL = struct.Struct(">BIi")  # flags precede the name; type oid and modifier follow it
_MESSAGE = struct.Struct(">BQ")


class DecodeError(ValueError):
    """The bytes are not a pgoutput message this decoder understands."""


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


class Begin(NamedTuple):
    final_lsn: int  # LSN of the commit record
    commit_ts: int  # µs since 2000-01-01 UTC
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int
    end_lsn: int  # the position to acknowledge: acking commit_lsn replays the transaction
    commit_ts: int


class Origin(NamedTuple):
    commit_lsn: int
    name: str


class Column(NamedTuple):
    flags: int  # 1 = part of the replica identity key
    name: str
    type_oid: int
    type_modifier: int


class Relation(NamedTuple):
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


class Type(NamedTuple):
    oid: int
    namespace: str
    name: str


class Insert(NamedTuple):
    relation_oid: int
    new: tuple


class Update(NamedTuple):
    relation_oid: int
    old: tuple | None  # replica identity FULL: the whole old row
    key: tuple | None  # the old key, when the key changed
    new: tuple


class Delete(NamedTuple):
    relation_oid: int
    old: tuple | None
    key: tuple | None


class Truncate(NamedTuple):
    options: int  # 1 = CASCADE, 2 = RESTART IDENTITY
    relation_oids: tuple[int, ...]


class Message(NamedTuple):
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode(), end + 1


def _tuple(buf: bytes, pos: int, _length=_I32.unpack_from) -> tuple[tuple, int]:
    # The relay's hottest function: one call per outbox row, hence the inlined loop.
    count = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    values = []
    append = values.append
    end = len(buf)
    for _ in range(count):
        kind = buf[pos]
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
            stop = pos + 5 + _length(buf, pos + 1)[0]
            if stop > end or stop < pos + 5:  # Int32 is signed: a negative length would read backwards
                raise DecodeError(f"column value of {stop - pos - 5} bytes does not fit the message")
            append(buf[pos + 5:stop])
            pos = stop
        elif kind == 0x6E:  # 'n'
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u'
            append(UNCHANGED)
            pos += 1
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r} at byte {pos}")
    return tuple(values), pos


def _begin(buf: bytes) -> Begin:
    return Begin(*_BEGIN.unpack_from(buf, 1))


def _commit(buf: bytes) -> Commit:
    return Commit(*_COMMIT.unpack_from(buf, 1))


def _origin(buf: bytes) -> Origin:
    (lsn,) = struct.unpack_from(">Q", buf, 1)
    return Origin(lsn, _cstring(buf, 9)[0])


def _relation(buf: bytes) -> Relation:
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    identity = chr(buf[pos])
    (count,) = _I16.unpack_from(buf, pos + 1)
    if count < 0:
        raise DecodeError(f"Relation with a negative column count ({count})")
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        col_name, pos = _cstring(buf, pos + 1)
        type_oid, modifier = struct.unpack_from(">Ii", buf, pos)
        pos += 8
        columns.append(Column(flags, col_name, type_oid, modifier))
    return Relation(oid, namespace, name, identity, tuple(columns))


def _type(buf: bytes) -> Type:
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _cstring(buf, 5)
    return Type(oid, namespace, _cstring(buf, pos)[0])


def _insert(buf: bytes) -> Insert:
    return Insert(*insert_at(buf, 0))


def insert_at(buf: bytes, start: int) -> tuple[int, tuple]:
    """(relation oid, new row) of the Insert message that begins at `start` in `buf`. The relay
    calls this on whole replication frames, skipping the message and frame objects per row."""
    try:
        (oid,) = _U32.unpack_from(buf, start + 1)
        if buf[start + 5] != 0x4E:  # 'N'
            raise DecodeError(f"Insert without a new tuple (marker {chr(buf[start + 5])!r})")
        return oid, _tuple(buf, start + 6)[0]
    except (struct.error, IndexError) as exc:
        raise DecodeError(f"truncated or malformed 'I' message ({len(buf) - start} bytes): {exc}") from None


def _update(buf: bytes) -> Update:
    (oid,) = _U32.unpack_from(buf, 1)
    pos, old, key = 5, None, None
    marker = buf[pos]
    if marker == 0x4F:  # 'O'
        old, pos = _tuple(buf, pos + 1)
    elif marker == 0x4B:  # 'K'
        key, pos = _tuple(buf, pos + 1)
    if buf[pos] != 0x4E:
        raise DecodeError(f"Update without a new tuple (marker {chr(buf[pos])!r})")
    return Update(oid, old, key, _tuple(buf, pos + 1)[0])


def _delete(buf: bytes) -> Delete:
    (oid,) = _U32.unpack_from(buf, 1)
    marker = buf[5]
    values, _ = _tuple(buf, 6)
    if marker == 0x4F:
        return Delete(oid, values, None)
    if marker == 0x4B:
        return Delete(oid, None, values)
    raise DecodeError(f"Delete with unknown tuple marker {chr(marker)!r}")


def _truncate(buf: bytes) -> Truncate:
    count, options = struct.unpack_from(">IB", buf, 1)
    return Truncate(options, struct.unpack_from(f">{count}I", buf, 6))


def _message(buf: bytes) -> Message:
    flags, lsn = _MESSAGE.unpack_from(buf, 1)
    prefix, pos = _cstring(buf, 10)
    (length,) = _I32.unpack_from(buf, pos)
    if not 0 <= length <= len(buf) - pos - 4:
        raise DecodeError(f"Message content of {length} bytes does not fit the message")
    return Message(bool(flags & 1), lsn, prefix, bytes(buf[pos + 4:pos + 4 + length]))


_DECODERS = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
}

_NOT_ENABLED = {
    ord("S"): "Stream Start", ord("E"): "Stream Stop", ord("c"): "Stream Commit", ord("A"): "Stream Abort",
    ord("b"): "Begin Prepare", ord("P"): "Prepare", ord("K"): "Commit Prepared",
    ord("r"): "Rollback Prepared", ord("p"): "Stream Prepare",
}


def decode(buf: bytes) -> Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message:
    """Decode one pgoutput message (the payload of an XLogData frame)."""
    if not buf:
        raise DecodeError("empty pgoutput message")
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        name = _NOT_ENABLED.get(buf[0])
        if name:
            raise DecodeError(f"{name} message received, but this relay never enables streaming or two-phase "
                              f"decoding; check the START_REPLICATION options")
        raise DecodeError(f"unknown pgoutput message type {chr(buf[0])!r}")
    try:
        return decoder(buf)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"truncated or malformed {chr(buf[0])!r} message ({len(buf)} bytes): {exc}") from None
