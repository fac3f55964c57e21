-- What the relay records about its own progress, for operators and the dashboard. Written off
-- the hot path: one row per batch (not per event), per-event delivery rows only when
-- OUTBOX_TRACK_DELIVERIES is on.

-- One row per replication slot, i.e. per logical relay (active and standbys share it).
CREATE TABLE outbox.relay_status (
    slot_name            text PRIMARY KEY,
    active_relay_id      text,
    delivery             text NOT NULL,
    confirmed_lsn        pg_lsn,
    -- Every outbox transaction with txid < watermark_txid is published or dead-lettered. With the
    -- xids of later acknowledged batches this gives the exact set of events still in flight.
    watermark_txid       xid8,
    -- Set when the relay creates its slot: the transactions visible in this snapshot committed
    -- before the slot's starting point and are never streamed; the relay publishes the ones not
    -- yet published from the table, then clears it. Survives a crash in the middle.
    backfill_snapshot    pg_snapshot,
    slot_creating        boolean NOT NULL DEFAULT false,  -- a crash between creating the slot and
                                                          -- saving its snapshot: re-create it
    events_published     bigint NOT NULL DEFAULT 0,
    events_dead_lettered bigint NOT NULL DEFAULT 0,
    batches_acked        bigint NOT NULL DEFAULT 0,
    last_event_id        uuid,
    last_published_at    timestamptz,
    last_error           text,
    last_error_at        timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Every relay process, active or standby, heartbeating.
CREATE TABLE outbox.relay_instances (
    relay_id     text PRIMARY KEY,
    slot_name    text NOT NULL,
    role         text NOT NULL CHECK (role IN ('active', 'standby', 'stopped')),
    delivery     text NOT NULL,
    host         text,
    pid          integer,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    last_error   text
);

-- A batch is recorded as in_flight before its first record is sent to Kafka, so a crash always
-- leaves evidence of what might or might not have reached Kafka. The next relay settles it:
-- at-least-once: unknown -> replayed from the slot (duplicates possible);
-- exactly-once: committed or aborted, decided by the checkpoint in Kafka.
CREATE TABLE outbox.relay_batches (
    batch_id      bigserial PRIMARY KEY,
    slot_name     text NOT NULL,
    relay_id      text NOT NULL,
    delivery      text NOT NULL,
    status        text NOT NULL CHECK (status IN ('in_flight', 'acked', 'committed', 'unknown', 'aborted')),
    first_lsn     pg_lsn,
    ack_lsn       pg_lsn,
    events        integer NOT NULL DEFAULT 0,
    dead_lettered integer NOT NULL DEFAULT 0,
    xids          xid8[],  -- producing transactions whose last event is in this batch
    max_xid       xid8,    -- greatest of xids: the in-flight view reads only batches at or above the watermark
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    resolution    text
);
CREATE INDEX relay_batches_open ON outbox.relay_batches (slot_name, status)
    WHERE status IN ('in_flight', 'unknown');
CREATE INDEX relay_batches_finished ON outbox.relay_batches (slot_name, finished_at);
CREATE INDEX relay_batches_max_xid ON outbox.relay_batches (max_xid) WHERE max_xid IS NOT NULL;

-- Where each event landed in Kafka (OUTBOX_TRACK_DELIVERIES). Append-only: an event delivered
-- twice (at-least-once after a crash) has two rows, which is exactly what the trace should show.
CREATE TABLE outbox.deliveries (
    event_id        uuid        NOT NULL,
    batch_id        bigint      NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    delivered_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_event_id ON outbox.deliveries (event_id);
CREATE INDEX deliveries_delivered_at ON outbox.deliveries (delivered_at);

-- Events the relay could not publish. A copy of the event is kept so that a replay works even
-- after retention pruned the outbox row.
CREATE TABLE outbox.relay_dead_letters (
    id               bigserial PRIMARY KEY,
    event_id         uuid        NOT NULL,
    slot_name        text        NOT NULL,
    batch_id         bigint,
    topic            text,
    reason           text        NOT NULL,
    error            text        NOT NULL,
    aggregate_type   text,
    aggregate_id     text,
    event_type       text,
    payload          text,
    headers          text,
    commit_lsn       pg_lsn,
    txid             xid8,
    created_at       timestamptz,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz,
    replay_note      text
);
CREATE INDEX relay_dead_letters_event_id ON outbox.relay_dead_letters (event_id);
CREATE INDEX relay_dead_letters_open ON outbox.relay_dead_letters (dead_lettered_at) WHERE replayed_at IS NULL;

-- The in-flight view scans events from the watermark on.
CREATE INDEX events_txid ON outbox.events (txid);
CREATE INDEX events_aggregate ON outbox.events (aggregate_type, aggregate_id);

-- Exactly the committed events not yet acknowledged by Kafka (and recorded), as of the query's
-- snapshot. Below the watermark everything is published; at and above it, an event is done when
-- its transaction is in an acknowledged batch or it was dead-lettered. Events of a transaction
-- split across batches count as in flight until the whole transaction is acknowledged.
CREATE VIEW outbox.in_flight AS
WITH mark AS (
    SELECT coalesce(min(watermark_txid), '0'::xid8) AS txid FROM outbox.relay_status
), acked AS (
    SELECT x.txid
      FROM mark, outbox.relay_batches b CROSS JOIN LATERAL unnest(b.xids) AS x(txid)
     WHERE b.max_xid >= mark.txid AND b.status IN ('acked', 'committed')
)
SELECT e.event_id, e.aggregate_type, e.aggregate_id, e.event_type, e.created_at, now() - e.created_at AS age, e.txid
  FROM mark, outbox.events e
 WHERE e.txid >= mark.txid
   AND NOT EXISTS (SELECT 1 FROM acked WHERE acked.txid = e.txid)
   AND NOT EXISTS (SELECT 1 FROM outbox.relay_dead_letters d WHERE d.event_id = e.event_id);

COMMENT ON VIEW outbox.in_flight IS
    'Committed outbox events the relay has not yet published (Kafka-acknowledged and recorded), exact as of the query snapshot.';

-- Retention: delete published events (with their delivery rows and finished batches) older than
-- `keep`, committing every batch_size rows so no transaction holds locks for long:
--     CALL outbox.prune('7 days');            -- must run outside an explicit transaction
-- Events the relay has not published yet (txid at or above the lowest watermark) are never removed.
CREATE PROCEDURE outbox.prune(keep interval, batch_size integer DEFAULT 10000,
                              INOUT events bigint DEFAULT 0, INOUT deliveries bigint DEFAULT 0,
                              INOUT batches bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    horizon xid8;
    n       bigint;
BEGIN
    SELECT min(watermark_txid) INTO horizon FROM outbox.relay_status;
    IF horizon IS NOT NULL THEN
        LOOP
            DELETE FROM outbox.events WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM outbox.events
                 WHERE created_at < now() - keep AND txid < horizon LIMIT batch_size));
            GET DIAGNOSTICS n = ROW_COUNT;
            events := events + n;
            COMMIT;
            EXIT WHEN n < batch_size;
        END LOOP;
    END IF;
    LOOP
        DELETE FROM outbox.deliveries WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM outbox.deliveries WHERE delivered_at < now() - keep LIMIT batch_size));
        GET DIAGNOSTICS n = ROW_COUNT;
        deliveries := deliveries + n;
        COMMIT;
        EXIT WHEN n < batch_size;
    END LOOP;
    DELETE FROM outbox.relay_batches
     WHERE finished_at < now() - keep AND status IN ('acked', 'committed', 'aborted', 'unknown');
    GET DIAGNOSTICS n = ROW_COUNT;
    batches := n;
END
$$;
