"""Property tests of the pgoutput decoder (relay/pgoutput.py) and XLogData framing (relay/replication.py).

The messages are built by a small encoder written here from PostgreSQL's documented format
(protocol-logicalrep-message-formats.html), not from the decoder: Begin, Commit, Origin, Relation,
Type, Insert, Update, Delete, Truncate and Message, with tuple data of 'n' (NULL), 'u' (unchanged
TOAST), 't' (text) and 'b' (binary) columns. Over random messages (0-40 columns, NULLs, unchanged
TOAST, empty values, arbitrary bytes in text columns including non-UTF-8, values over 64 KiB, LSNs
up to 2^64-1, negative timestamps, any xid and oid):

- decode(encode(msg)) reproduces every field;
- a message wrapped in an XLogData frame ('w', start LSN, WAL end, send time, payload) comes back
  from parse_frame (bytes or memoryview) with the payload and LSNs unchanged, and Keepalive frames
  round-trip too;
- the relay's hot path (relay/pipeline.py: `raw[0] == 0x77 and raw[25] == 0x49` then
  `insert_at(bytes(raw), 25)`) is taken exactly for Inserts and returns what decode() of the
  payload returns (relation oid and new tuple);
- every proper prefix of a message, and of an Insert frame read by insert_at, raises DecodeError;
- arbitrary and mutated bytes either decode to a message or raise DecodeError, never another
  exception (IndexError, struct.error, UnicodeDecodeError, ...);
- bytes after a complete message do not change what it decodes to. The decoder does not detect
  them (nor, as far as I know, does PostgreSQL's own apply worker): this pins the lenient behaviour.

Two bugs this file found are fixed and kept as tests below: a Message whose declared content length
runs past the end, and a negative length or count (which PostgreSQL never sends), decoded silently
to wrong values instead of raising DecodeError.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    DecodeError,
    Delete,
    Insert,
    Message,
    Origin,
    Relation,
    Truncate,
    Type,
    Update,
    decode,
    insert_at,
)
from relay.replication import Keepalive, XLogData, parse_frame

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MESSAGE_TYPES = (Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, Message)

# ----- an independent encoder (PostgreSQL's documented layout, network byte order)


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def i16(n: int) -> bytes:
    return n.to_bytes(2, "big", signed=True)


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def i32(n: int) -> bytes:
    return n.to_bytes(4, "big", signed=True)


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def i64(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def column_data(col) -> bytes:
    """TupleData column: ('n',) NULL, ('u',) unchanged TOAST, ('t', bytes) text, ('b', bytes) binary."""
    if col[0] in ("n", "u"):
        return col[0].encode()
    return col[0].encode() + i32(len(col[1])) + col[1]


def tuple_data(cols) -> bytes:
    return i16(len(cols)) + b"".join(column_data(c) for c in cols)


def decoded(cols) -> tuple:
    return tuple(None if c[0] == "n" else UNCHANGED if c[0] == "u" else c[1] for c in cols)


# ----- random messages, each as (what decode must return, its bytes)

LSN_MAX = 2**64 - 1
lsns = st.one_of(st.integers(0, 2**32), st.integers(0, LSN_MAX))
timestamps = st.integers(-(2**63), 2**63 - 1)  # µs since 2000-01-01, signed
xids = st.integers(0, 2**32 - 1)
oids = st.integers(0, 2**32 - 1)
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
values = st.one_of(
    st.binary(max_size=40),  # arbitrary bytes, non-UTF-8 and empty included
    st.text(max_size=10).map(str.encode),
    st.integers(65_536, 66_000).map(lambda n: b"x" * n),  # length past 16 bits
)
columns = st.one_of(st.just(("n",)), st.just(("u",)), st.tuples(st.sampled_from("tb"), values))
tuples = st.lists(columns, max_size=40)


@st.composite
def begins(draw):
    lsn, ts, xid = draw(lsns), draw(timestamps), draw(xids)
    return Begin(lsn, ts, xid), b"B" + u64(lsn) + i64(ts) + u32(xid)


@st.composite
def commits(draw):
    flags, lsn, end, ts = draw(st.integers(0, 255)), draw(lsns), draw(lsns), draw(timestamps)
    return Commit(flags, lsn, end, ts), b"C" + u8(flags) + u64(lsn) + u64(end) + i64(ts)


@st.composite
def origins(draw):
    lsn, name = draw(lsns), draw(names)
    return Origin(lsn, name), b"O" + u64(lsn) + cstring(name)


@st.composite
def relations(draw):
    oid, namespace, name = draw(oids), draw(names), draw(names)
    identity = draw(st.sampled_from("dnfi"))
    cols = draw(st.lists(st.tuples(st.integers(0, 255), names, oids, st.integers(-(2**31), 2**31 - 1)),
                         max_size=40))
    raw = b"R" + u32(oid) + cstring(namespace) + cstring(name) + identity.encode() + i16(len(cols))
    raw += b"".join(u8(f) + cstring(n) + u32(t) + i32(m) for f, n, t, m in cols)
    return Relation(oid, namespace, name, identity, tuple(Column(*c) for c in cols)), raw


@st.composite
def types(draw):
    oid, namespace, name = draw(oids), draw(names), draw(names)
    return Type(oid, namespace, name), b"Y" + u32(oid) + cstring(namespace) + cstring(name)


@st.composite
def inserts(draw):
    oid, new = draw(oids), draw(tuples)
    return Insert(oid, decoded(new)), b"I" + u32(oid) + b"N" + tuple_data(new)


@st.composite
def updates(draw):
    oid, old_kind, old, new = draw(oids), draw(st.sampled_from(["", "K", "O"])), draw(tuples), draw(tuples)
    raw = b"U" + u32(oid) + (old_kind.encode() + tuple_data(old) if old_kind else b"") + b"N" + tuple_data(new)
    return Update(oid, decoded(old) if old_kind == "O" else None, decoded(old) if old_kind == "K" else None,
                  decoded(new)), raw


@st.composite
def deletes(draw):
    oid, kind, old = draw(oids), draw(st.sampled_from("KO")), draw(tuples)
    raw = b"D" + u32(oid) + kind.encode() + tuple_data(old)
    return Delete(oid, decoded(old) if kind == "O" else None, decoded(old) if kind == "K" else None), raw


@st.composite
def truncates(draw):
    options, rels = draw(st.integers(0, 255)), draw(st.lists(oids, max_size=20))
    return Truncate(options, tuple(rels)), b"T" + u32(len(rels)) + u8(options) + b"".join(map(u32, rels))


@st.composite
def logical_messages(draw, contents=values):
    flags, lsn, prefix, content = draw(st.integers(0, 1)), draw(lsns), draw(names), draw(contents)
    raw = b"M" + u8(flags) + u64(lsn) + cstring(prefix) + i32(len(content)) + content
    return Message(bool(flags), lsn, prefix, content), raw


ALL_BUT_MESSAGE = [begins(), commits(), origins(), relations(), types(), inserts(), updates(), deletes(),
                   truncates()]
messages = st.one_of(*ALL_BUT_MESSAGE, logical_messages())


def xlogdata(start: int, wal_end: int, send_time: int, payload: bytes) -> bytes:
    return b"w" + u64(start) + u64(wal_end) + i64(send_time) + payload


def decodes_or_refuses(raw: bytes) -> None:
    try:
        msg = decode(raw)
    except DecodeError:
        return
    assert type(msg) in MESSAGE_TYPES


# ----- round trips


@SETTINGS
@given(messages)
def test_decode_reproduces_every_field(case):
    expected, raw = case
    msg = decode(raw)
    assert type(msg) is type(expected)
    assert msg == expected
    for got, want in zip(msg, expected):  # NamedTuple equality alone would accept 1 == True
        assert type(got) is type(want)
    for row in (getattr(msg, f, None) for f in ("new", "old", "key")):
        assert row is None or all(v is None or v is UNCHANGED or type(v) is bytes for v in row)


@SETTINGS
@given(st.one_of(inserts(), messages), lsns, lsns, timestamps)  # inserts weighted: the hot path
def test_frames_carry_the_payload_and_the_hot_path_reads_inserts_as_decode_does(case, start, wal_end, send_time):
    expected, payload = case
    frame = xlogdata(start, wal_end, send_time, payload)
    for raw in (frame, memoryview(frame)):  # read_raw hands the pipeline a memoryview
        assert parse_frame(raw) == XLogData(start, wal_end, send_time, payload)
        assert type(parse_frame(raw).payload) is bytes
        hot = raw[0] == 0x77 and raw[25] == 0x49  # relay/pipeline.py's test, verbatim
        assert hot == (type(expected) is Insert)
        if hot:
            msg = decode(parse_frame(raw).payload)
            assert insert_at(bytes(raw), 25) == (msg.relation_oid, msg.new) == tuple(expected)


@SETTINGS
@given(lsns, timestamps, st.booleans())
def test_keepalive_frames_round_trip(wal_end, send_time, reply):
    assert parse_frame(b"k" + u64(wal_end) + i64(send_time) + u8(reply)) == Keepalive(wal_end, send_time, reply)


# ----- truncated, corrupted and trailing bytes


def content_start(expected: Message, raw: bytes) -> int:
    return len(raw) - len(expected.content)


@SETTINGS
@given(messages, st.data())
def test_every_proper_prefix_raises_decode_error(case, data):
    expected, raw = case
    # A Message cut inside its content has its own test below.
    end = content_start(expected, raw) if type(expected) is Message else len(raw)
    cut = data.draw(st.integers(0, end - 1), label="cut")
    with pytest.raises(DecodeError):
        decode(raw[:cut])


@SETTINGS
@given(inserts(), lsns, st.data())
def test_insert_at_on_a_cut_frame_raises_decode_error(case, start, data):
    _, payload = case
    frame = xlogdata(start, start, 0, payload)
    cut = data.draw(st.integers(25, len(frame) - 1), label="cut")
    with pytest.raises(DecodeError):
        insert_at(frame[:cut], 25)


@SETTINGS
@example(b"R" + bytes(3))
@example(b"T" + u32(2**32 - 1) + b"\0")
@example(b"M\x01" + bytes(8) + b"p")
@given(st.one_of(st.binary(max_size=60),
                 st.tuples(st.sampled_from(b"BCORYIUDTMSZ"), st.binary(max_size=60)).map(lambda t: bytes([t[0]]) + t[1])))
def test_arbitrary_bytes_decode_or_raise_decode_error(raw):
    decodes_or_refuses(raw)
    if raw[:1] == b"I":
        try:
            insert_at(b"w" + bytes(24) + raw, 25)
        except DecodeError:
            pass


@SETTINGS
@given(messages, st.data())
def test_mutated_messages_decode_or_raise_decode_error(case, data):
    _, raw = case
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        at = data.draw(st.integers(0, len(buf)), label="at")
        how = data.draw(st.sampled_from(["set", "insert", "delete"]), label="how")
        byte = data.draw(st.sampled_from([0x00, 0xFF, 0x80, 0x7F, 0x4E, 0x74, 0x75, 0x6E, 0x62])
                         | st.integers(0, 255), label="byte")
        if how == "insert":
            buf.insert(at, byte)
        elif at < len(buf):
            if how == "set":
                buf[at] = byte
            else:
                del buf[at]
    decodes_or_refuses(bytes(buf))
    if buf[:1] == b"I":
        try:
            insert_at(b"w" + bytes(24) + bytes(buf), 25)
        except DecodeError:
            pass


@SETTINGS
@given(messages, st.binary(min_size=1, max_size=20))
def test_trailing_bytes_do_not_change_the_decoded_message(case, garbage):
    expected, raw = case
    assert decode(raw + garbage) == expected
    if type(expected) is Insert:
        assert insert_at(xlogdata(1, 2, 3, raw + garbage), 25) == tuple(expected)


# ----- bugs this file found, fixed (see the module docstring)


@SETTINGS
@example(case=(Message(True, 0, "p", b"ab"), b"M\x01" + bytes(8) + b"p\0" + i32(2) + b"ab"),
         data=None).via("the reproducer of the fixed bug")
@given(logical_messages(st.binary(min_size=1, max_size=20)), st.data())
def test_a_message_cut_inside_its_content_raises_decode_error(case, data):
    """Found by this file, fixed: `_message` slices `buf[pos + 4:pos + 4 + length]` without checking that
    `length` bytes are there, so a Message cut inside its content decodes to a shorter content.
    Reproducer: decode(b"M\\x01" + bytes(8) + b"p\\0" + (2).to_bytes(4, "big") + b"a")
    -> Message(True, 0, 'p', b'a') instead of DecodeError."""
    expected, raw = case
    start = content_start(expected, raw)
    cut = start + 1 if data is None else data.draw(st.integers(start, len(raw) - 1), label="cut")
    with pytest.raises(DecodeError):
        decode(raw[:cut])


@SETTINGS
@example(case=(Insert(1, (b"",)), b"I" + u32(1) + b"N" + i16(1) + b"t" + i32(-1)), pick=0,
         length=-1).via("the reproducer of the fixed bug")
@given(st.one_of(inserts(), updates(), deletes(), logical_messages(), relations()), st.integers(0, 10**6),
       st.integers(-(2**31), -1))
def test_a_negative_length_or_count_raises_decode_error_not_a_backwards_read(case, pick, length):
    """Found by this file, fixed: lengths and counts are read signed and never checked. PostgreSQL never
    sends a negative one, so it can only mean corruption, which the format makes detectable, but:
    - a 't'/'b' column of length -1 is decoded as b"" and the read position moves backwards:
      decode(b"I" + (1).to_bytes(4, "big") + b"N\\x00\\x01t\\xff\\xff\\xff\\xff") -> Insert(1, (b'',));
    - a Message with a negative content length decodes to content b'', or, when the length is
      below minus the content's offset, to part of what follows (a negative slice end):
      decode(b"M\x01" + bytes(8) + b"p\0" + (-18).to_bytes(4, "big", signed=True) + b"abcdef")
      -> Message(True, 0, 'p', b'abcd');
    - a Relation with column count -1 decodes as a relation without columns, ignoring the rest.
    Expected: DecodeError in each case."""
    expected, raw = case
    buf = bytearray(raw)
    # Where the encoder wrote lengths/counts: re-encode with one of them made negative.
    if type(expected) is Relation:
        at = len(raw) - sum(1 + len(c.name.encode()) + 1 + 8 for c in expected.columns) - 2
        buf[at:at + 2] = i16(max(length, -(2**15)))
    elif type(expected) is Message:
        at = len(raw) - len(expected.content) - 4
        buf[at:at + 4] = i32(length)
    else:
        offsets = length_offsets(raw)
        if not offsets:
            return  # no 't'/'b' column to corrupt
        at = offsets[pick % len(offsets)]
        buf[at:at + 4] = i32(length)
    with pytest.raises(DecodeError):
        decode(bytes(buf))


def length_offsets(raw: bytes) -> list[int]:
    """Offsets of the Int32 lengths of the 't'/'b' columns of an Insert, Update or Delete built above."""
    offsets, pos = [], 5
    while pos < len(raw) and raw[pos] in b"NKO":
        (count,) = struct.unpack_from(">h", raw, pos + 1)
        pos += 3
        for _ in range(count):
            if raw[pos] in b"tb":
                offsets.append(pos + 1)
                pos += 5 + int.from_bytes(raw[pos + 1:pos + 5], "big")
            else:
                pos += 1
    return offsets
