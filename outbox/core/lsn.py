"""WAL positions and PostgreSQL's clock, as every component reads them.

An LSN is a 64-bit WAL position, shown by PostgreSQL as two hex halves (16/B374D848). The
replication protocol and pgoutput count time in microseconds since 2000-01-01 UTC.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
PG_EPOCH_UNIX_US = 946_684_800_000_000  # 2000-01-01 in µs since the Unix epoch


def lsn_to_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    try:
        return int(high, 16) << 32 | int(low, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not an LSN like 16/B374D848") from None


def pg_timestamp(us_since_2000: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us_since_2000)


def now_pg() -> int:
    """Microseconds since 2000-01-01, the clock of the replication protocol."""
    return int(time.time() * 1_000_000) - PG_EPOCH_UNIX_US


def unix_to_pg(unix_s: float) -> float:
    """Seconds since the Unix epoch as µs since 2000-01-01 (to compare with commit timestamps)."""
    return unix_s * 1_000_000 - PG_EPOCH_UNIX_US


def iso_to_pg(timestamp: str | None) -> int:
    """µs since 2000-01-01 of a timestamptz rendered as text; 0 when there is none."""
    if not timestamp:
        return 0
    return int(datetime.fromisoformat(timestamp).timestamp() * 1_000_000) - PG_EPOCH_UNIX_US
