"""Replication protocol frames and timeline history files, parsed without a server."""

from __future__ import annotations

from relay.replication import Keepalive, XLogData, parse_frame, parse_timeline_history, status_update


def test_timeline_history_file_is_parsed():
    assert parse_timeline_history("1\t0/3000148\tno recovery target specified\n2\t1/A0\tx\n") == {
        1: 0x3000148, 2: (1 << 32) | 0xA0}


def test_replication_frames_parse():
    frame = b"w" + (5).to_bytes(8, "big") + (9).to_bytes(8, "big") + (7).to_bytes(8, "big") + b"B..."
    assert parse_frame(frame) == XLogData(5, 9, 7, b"B...")
    assert parse_frame(b"k" + (9).to_bytes(8, "big") + (7).to_bytes(8, "big") + b"\x01") == Keepalive(9, 7, True)
    status = status_update(10, 8, 8)
    assert status[:1] == b"r" and int.from_bytes(status[9:17], "big") == 8

