"""Transport: a logical replication stream over psycopg 3 (START_REPLICATION, CopyBoth, feedback).

psycopg has no replication API, but since 3.3 `execute()` accepts a COPY_BOTH result, after which
the stream is read and written through the libpq connection. Reads are non-blocking: the blocking
PQgetCopyData holds the GIL until data arrives and would freeze kafka-python's sender thread.
The frame parsing and building functions are pure and unit-tested.
"""

from __future__ import annotations

import select
import struct
from typing import NamedTuple

import psycopg
from psycopg import pq

from outbox.core.lsn import now_pg
from outbox.core.redact import Dsn, redact
from outbox.core.sqlident import quote_ident, quote_literal

_XLOGDATA = struct.Struct(">QQq")
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")


class ReplicationError(Exception):
    """The server ended or refused the stream; the message is the server's, redacted."""


class XLogData(NamedTuple):  # a NamedTuple: built once per event, and cheaper than a dataclass
    start_lsn: int
    wal_end: int
    send_time: int
    payload: bytes


class Keepalive(NamedTuple):
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_frame(frame: bytes | memoryview) -> XLogData | Keepalive:
    kind = frame[0]
    if kind == 0x77:  # 'w'
        start, end, ts = _XLOGDATA.unpack_from(frame, 1)
        return XLogData(start, end, ts, bytes(frame[25:]))
    if kind == 0x6B:  # 'k'
        end, ts, reply = _KEEPALIVE.unpack_from(frame, 1)
        return Keepalive(end, ts, bool(reply))
    raise ReplicationError(f"unexpected CopyData frame type {chr(kind)!r}")



def status_update(written: int, flushed: int, applied: int, reply: bool = False) -> bytes:
    """Standby status update ('r'). `flushed` is what moves the slot's confirmed_flush_lsn."""
    return _STATUS.pack(b"r", written, flushed, applied, now_pg(), 1 if reply else 0)




def start_command(slot: str, publication: str, proto_version: int, start_lsn: str = "0/0") -> str:
    options = {
        "proto_version": str(proto_version),
        "publication_names": quote_ident(publication),
        "messages": "true",
    }
    rendered = ", ".join(f"{k} {quote_literal(v)}" for k, v in options.items())
    return f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {start_lsn} ({rendered})"


def proto_version_for(server_version_num: int) -> int:
    # 2 (PG14), 3 (PG15: two-phase), 4 (PG16+: parallel streaming). Without streaming the
    # non-streamed message formats are identical; the highest is used for forward compatibility.
    if server_version_num >= 160000:
        return 4
    if server_version_num >= 150000:
        return 3
    return 2


class ReplicationStream:
    def __init__(self, dsn: Dsn, slot: str, publication: str, connect_timeout: int = 10):
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection | None = None
        self._pg: pq.abc.PGconn | None = None

    def open(self) -> None:
        conn = psycopg.connect(self.dsn.secret(), replication="database", autocommit=True,
                               connect_timeout=self.connect_timeout, application_name="outbox-relay")
        proto = proto_version_for(conn.info.server_version)
        try:
            conn.execute(start_command(self.slot, self.publication, proto))
        except psycopg.Error as exc:
            conn.close()
            raise ReplicationError(redact(str(exc)).strip()) from None
        self._conn, self._pg = conn, conn.pgconn

    @property
    def is_open(self) -> bool:
        return self._pg is not None

    @property
    def backend_pid(self) -> int | None:
        return self._pg.backend_pid if self._pg is not None else None

    def read_raw(self, timeout: float) -> memoryview | None:
        """The next CopyData message as received (see parse_frame), or None after `timeout` seconds."""
        pg = self._pg
        n, data = pg.get_copy_data(1)
        if n > 0:
            return data
        if n == 0:
            ready, _, _ = select.select([pg.socket], [], [], timeout)
            if not ready:
                return None
            pg.consume_input()
            n, data = pg.get_copy_data(1)
            if n > 0:
                return data
            if n == 0:
                return None
        # n == -1: the server ended the COPY; its final result carries the reason.
        result = pg.get_result()
        message = result.error_message.decode(errors="replace") if result is not None else ""
        raise ReplicationError(redact(message).strip() or "the server ended the replication stream")

    def send_status(self, written: int, flushed: int, reply: bool = False) -> None:
        pg = self._pg
        if pg.put_copy_data(status_update(written, flushed, flushed, reply)) != 1 or pg.flush() < 0:
            raise ReplicationError(f"could not send feedback: {pg.error_message.decode(errors='replace')}")

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = self._pg = None


class ServerPosition(NamedTuple):
    system_identifier: str
    timeline: int
    wal_lsn: int
    history: dict[int, int]  # {ancestor timeline: LSN where it ended}


def parse_timeline_history(content: str) -> dict[int, int]:
    """A timeline history file ("parentTLI<TAB>switchpoint<TAB>reason" per line) as {timeline: end LSN}."""
    ended = {}
    for line in content.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            high, _, low = parts[1].partition("/")
            ended[int(parts[0])] = int(high, 16) << 32 | int(low, 16)
    return ended


def identify_server(dsn: Dsn, connect_timeout: int = 10) -> ServerPosition:
    """IDENTIFY_SYSTEM (and TIMELINE_HISTORY after a promotion) on a replication connection: what
    a REPLICATION role may read without superuser rights, and the current timeline, not the one of
    the last checkpoint record."""
    with psycopg.connect(dsn.secret(), replication="database", autocommit=True, connect_timeout=connect_timeout,
                         client_encoding="utf8",
                         application_name="outbox-relay-identify") as conn:
        system_id, timeline, xlogpos, _ = conn.execute("IDENTIFY_SYSTEM").fetchone()
        history: dict[int, int] = {}
        if int(timeline) > 1:
            _, content = conn.execute(f"TIMELINE_HISTORY {int(timeline)}").fetchone()
            history = parse_timeline_history(bytes(content).decode() if not isinstance(content, str) else content)
    high, _, low = str(xlogpos).partition("/")
    return ServerPosition(str(system_id), int(timeline), int(high, 16) << 32 | int(low, 16), history)
