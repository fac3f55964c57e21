"""`outbox status --json` is strict JSON: no NaN/Infinity (null instead), times in RFC 3339."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import psycopg

from dashboard.cli import _as_json, strict_json
from dashboard.health import Snapshot

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_replaces_what_json_cannot_hold():
    ts = pd.Timestamp("2026-12-02 05:52:01.5", tz="UTC")
    frame = pd.DataFrame({"lag_bytes": [1.0, np.nan], "at": [ts, pd.NaT], "n": np.array([1, 2], dtype="int64"),
                          "flag": [True, False], "inf": [math.inf, -math.inf]})
    out = strict_json({"rows": frame, "naive": dt.datetime(2026, 1, 2, 3, 4, 5), "na": pd.NA, "age": pd.Timedelta(
        seconds=90), "nan": float("nan"), "np": np.float64("nan")})
    text = json.dumps(out, allow_nan=False)
    doc = strict_loads(text)
    assert doc["rows"] == [{"lag_bytes": 1.0, "at": "2026-12-02T05:52:01.500000+00:00", "n": 1, "flag": True,
                            "inf": None},
                           {"lag_bytes": None, "at": None, "n": 2, "flag": False, "inf": None}]
    assert RFC3339.match(doc["naive"]) and doc["na"] is None and doc["age"] == 90.0
    assert doc["nan"] is None and doc["np"] is None


def test_as_json_of_a_snapshot_with_missing_values_is_strict():
    empty = pd.DataFrame({"effective_status": pd.Series([], dtype=object)})
    snap = Snapshot(
        relays=pd.DataFrame({"relay_id": ["a"], "heartbeat_at": [pd.NaT], "heartbeat_age_s": [np.nan]}),
        slots=pd.DataFrame({"slot_name": ["s"], "lag_bytes": [np.nan], "last_published_at": [pd.NaT]}),
        in_flight={"count": 0, "oldest_age_s": float("nan")}, effects=empty, batches=pd.DataFrame(),
        dead_letters=pd.DataFrame({"source": ["relay"], "open": np.array([3])}),
        consumers=pd.DataFrame({"consumer": ["c"], "lag": [pd.NA]}), duplicates_last_hour=pd.DataFrame())
    doc = strict_loads(json.dumps(strict_json(_as_json(snap, [], False)), allow_nan=False))
    assert doc["slots"][0]["lag_bytes"] is None and doc["in_flight"]["oldest_age_s"] is None
    assert doc["consumers"][0]["lag"] is None and doc["open_dead_letters"][0]["open"] == 3


def test_status_json_with_a_missing_slot_is_strict(db, kafka, tmp_path):
    """A relay_status row whose slot does not exist (dropped, or never created): lag and WAL sizes
    are NULL in SQL and NaN in pandas, the last publication NaT."""
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute("INSERT INTO outbox.relay_status (slot_name, delivery) VALUES ('gone_slot', 'at-least-once')")
        conn.execute("INSERT INTO outbox.relay_instances (relay_id, slot_name, role, delivery, host, pid) "
                     "VALUES ('r1', 'gone_slot', 'standby', 'at-least-once', 'h', 1)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(OUTBOX_DATABASE_URL=db.secret(), OUTBOX_KAFKA_BOOTSTRAP=kafka)
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "status", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "NaN" not in result.stdout and "NaT" not in result.stdout
    doc = strict_loads(result.stdout)
    slot = doc["slots"][0]
    assert slot["slot_missing"] is True and slot["lag_bytes"] is None and slot["last_published_at"] is None
    assert RFC3339.match(slot["updated_at"]), slot["updated_at"]
    assert RFC3339.match(doc["relays"][0]["heartbeat_at"])
