"""`outbox dashboard` and `outbox status`.

`outbox status` exit codes: 0 all clear, 3 something needs attention (the findings say what),
1 the check itself failed (database unreachable, role missing), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from dashboard import MAX_IN_FLIGHT_AGE_S, STALLED_AFTER_S
from outbox.core.commands import DASHBOARD_MODULES, missing_extra
from outbox.core.exits import EXIT_ATTENTION, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from outbox.core.settings import Settings

APP = Path(__file__).resolve().parent / "app.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    dash = subparsers.add_parser(
        "dashboard", help="run the Streamlit operator dashboard",
        description="Serve the operator dashboard on http://OUTBOX_DASHBOARD_HOST:OUTBOX_DASHBOARD_PORT "
                    "(127.0.0.1:8501): health, "
                    "in-flight events, suppressed duplicates, unknown outcomes (with the audited operator "
                    "decision), dead letters with their replay commands, and an event trace. It connects with "
                    "OUTBOX_DASHBOARD_DATABASE_URL (default OUTBOX_DATABASE_URL) and switches to the read-only "
                    "role OUTBOX_DASHBOARD_ROLE (outbox_dashboard).")
    dash.add_argument("--port", type=int, help="listen on this port instead of OUTBOX_DASHBOARD_PORT")
    dash.set_defaults(func=_dashboard)

    status = subparsers.add_parser(
        "status", help="terminal summary: slot lag, in flight, duplicates, unknown outcomes, dead letters",
        description="Print the pipeline's health. Exit code 0: all clear; 3: something needs attention (each "
                    "finding is printed); 1: the check failed (database unreachable, dashboard role missing). "
                    "Suitable for cron or a monitoring probe.")
    status.add_argument("--json", action="store_true", help="one JSON document instead of text")
    status.add_argument("--max-in-flight-age", type=float, default=MAX_IN_FLIGHT_AGE_S, metavar="SECONDS",
                        help="attention when an event waits longer than this for Kafka (default %(default)g)")
    status.add_argument("--stalled-after", type=float, default=STALLED_AFTER_S, metavar="SECONDS",
                        help="attention when a consumer with lag has not moved for this long (default %(default)g)")
    status.set_defaults(func=_status)


def _needs_extra(command: str) -> int | None:
    if (problem := missing_extra(DASHBOARD_MODULES, "dashboard", command)) is not None:
        print(problem, file=sys.stderr)
        return EXIT_USAGE
    return None


def _dashboard(args: argparse.Namespace, settings: Settings) -> int:
    if (code := _needs_extra("dashboard")) is not None:
        return code
    from dashboard.db import DashboardError, connect, dashboard_dsn

    port = args.port or settings.dashboard_port
    host = settings.dashboard_host
    try:
        connect(dashboard_dsn(settings), settings.dashboard_role).close()
    except DashboardError as exc:
        print(f"outbox dashboard: {exc}", file=sys.stderr)
        return EXIT_FAILED
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            print(f"outbox dashboard: port {port} on {host} is not available ({exc.strerror}). Fix: stop what "
                  f"uses it or pick another port with --port or OUTBOX_DASHBOARD_PORT.", file=sys.stderr)
            return EXIT_FAILED
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # a wildcard is not an address to browse to
    print(f"outbox dashboard: http://{shown}:{port}" + (f" (listening on {host})" if shown != host else ""),
          file=sys.stderr)
    sys.stderr.flush()
    # exec: Ctrl-C and SIGTERM reach Streamlit directly, and no idle parent is left behind.
    os.execv(sys.executable, [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--server.fileWatcherType", "none", "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer",
    ])
    return EXIT_FAILED  # unreachable: execv does not return


def _status(args: argparse.Namespace, settings: Settings) -> int:
    if (code := _needs_extra("status")) is not None:
        return code
    from dashboard import health
    from dashboard.db import DashboardError, connect, dashboard_dsn
    from dashboard.kafka_lag import EndOffsets
    from dashboard.queries.overview import health_snapshot, with_kafka_lag

    ends = EndOffsets(settings.kafka_bootstrap, settings.kafka_security())
    try:
        conn = connect(dashboard_dsn(settings), settings.dashboard_role)
    except DashboardError as exc:
        print(f"outbox status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        with conn.transaction():
            snap = health_snapshot(conn)
    finally:
        conn.close()
    try:
        with_kafka_lag(snap, ends)
    finally:
        ends.close()
    findings = health.assess(snap, max_in_flight_age_s=args.max_in_flight_age, stalled_after_s=args.stalled_after)
    attention = health.needs_attention(findings)
    if args.json:
        # allow_nan=False: a NaN that slipped past strict_json() fails here, not in the reader's parser.
        print(json.dumps(strict_json(_as_json(snap, findings, attention)), indent=2, allow_nan=False))
    else:
        print(_as_text(snap, findings, attention))
    return EXIT_ATTENTION if attention else EXIT_OK


def _as_text(s, findings, attention: bool) -> str:
    from dashboard.units import duration, size

    lines = []
    for slot in s.slots.itertuples():
        relays = s.relays[s.relays["slot_name"] == slot.slot_name]
        who = ", ".join(f"{r.state} {r.relay_id}" for r in relays.itertuples() if r.state != "stopped") or "none"
        wal = "missing" if slot.slot_missing else slot.wal_status
        lines.append(f"slot        {slot.slot_name} ({slot.delivery}): lag {size(slot.lag_bytes)} / "
                     f"{duration(s.in_flight['oldest_age_s'])}, wal_status {wal}, retained WAL "
                     f"{size(slot.retained_wal_bytes)}; relays: {who}")
        if isinstance(slot.failover_detail, str):
            ready = {"True": "ready", "False": "NOT READY"}.get(str(slot.failover_ready), "n/a")
            lines.append(f"failover    {ready}: {slot.failover_detail}")
    if s.slots.empty:
        lines.append("slot        none (no relay has run against this database)")
    lines.append(f"in flight   {s.in_flight['count']:,} events"
                 + (f", oldest {duration(s.in_flight['oldest_age_s'])}" if s.in_flight["count"] else ""))
    if s.consumers.empty:
        lines.append("consumers   none")
    for name, parts in s.consumers.groupby("consumer", sort=True):
        lag = "unknown (Kafka not reachable)" if parts["lag"].isna().any() else f"{int(parts['lag'].sum()):,}"
        lines.append(f"consumer    {name}: lag {lag} over {len(parts)} partitions")
    dups = ", ".join(f"{r.consumer} {r.suppressed:,} ({r.redelivered:,} redelivered, {r.republished:,} republished)"
                     for r in s.duplicates_last_hour.itertuples() if r.suppressed) or "none"
    lines.append(f"duplicates  suppressed in the last hour: {dups}")
    unknown = int((s.effects["effective_status"] == "unknown").sum())
    in_progress = int((s.effects["effective_status"] == "in_progress").sum())
    lines.append(f"unknown     {unknown} effects (+{in_progress} in progress), {len(s.batches)} relay batches")
    open_dl = s.dead_letters.groupby(s.dead_letters["source"].str.startswith("relay"))["open"].sum()
    lines.append(f"dead        relay {int(open_dl.get(True, 0))}, inbox {int(open_dl.get(False, 0))} open")
    if attention:
        lines.append("NEEDS ATTENTION:")
    else:
        lines.append("all clear")
    for f in sorted(findings, key=lambda f: f.level != "attention"):
        lines.append(f"  {'!' if f.level == 'attention' else '-'} {f.text} (dashboard: {f.view})")
    return "\n".join(lines)


def strict_json(value):
    """What json.dumps can write as strict JSON (RFC 8259) for any reader: pandas' missing values
    (NaN, NaT, NA) and infinities become null, times RFC 3339 strings, numpy scalars plain numbers.
    A slot that does not exist has NaN lag bytes, a relay that never published NaT; Python's json
    module would print those as NaN and "NaT", which jq, JavaScript and Go reject or misread."""
    import datetime as dt
    import decimal
    import math
    import uuid

    import pandas as pd

    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [strict_json(r) for r in value.to_dict(orient="records")]
    if value is None or isinstance(value, (bool, str)):
        return value
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)  # PostgreSQL's timestamptz arrive as UTC
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (pd.Timedelta, dt.timedelta)):
        return value.total_seconds()
    if hasattr(value, "item") and not isinstance(value, (int, float)):  # numpy scalars
        return strict_json(value.item())
    if isinstance(value, decimal.Decimal):
        value = float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    if isinstance(value, (uuid.UUID, bytes)):
        return value.hex() if isinstance(value, bytes) else str(value)
    return str(value)


def _as_json(s, findings, attention: bool) -> dict:
    return {
        "attention": attention,
        "findings": [{"level": f.level, "text": f.text, "view": f.view} for f in findings],
        "slots": s.slots,
        "relays": s.relays,
        "in_flight": s.in_flight,
        "consumers": s.consumers,
        "unknown_effects": int((s.effects["effective_status"] == "unknown").sum()),
        "relay_batches_unknown": len(s.batches),
        "open_dead_letters": s.dead_letters,
    }
