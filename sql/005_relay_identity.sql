-- What the relay's recorded positions belong to, a backfill that does not depend on transaction
-- ids of this server, and an in-flight view and retention that stay exact with several slots and
-- with old transactions holding the watermark back.

-- The server and WAL history that relay_status (and the Kafka checkpoint) describe. A copy of the
-- database on another server (restored from a dump, a clone) has another system identifier: its
-- LSNs, xids and watermark mean nothing there, and the relay stops instead of trusting them.
ALTER TABLE outbox.relay_status
    ADD COLUMN system_identifier text,
    ADD COLUMN database_oid      oid,
    ADD COLUMN timeline          integer,
    -- Where and when the relay created its slot: the slot's identity, carried by each checkpoint.
    ADD COLUMN slot_created_lsn  pg_lsn,
    ADD COLUMN slot_created_at   timestamptz;

-- The events a new slot will never stream, listed when the slot is created (inside the slot's own
-- snapshot) and published from the table before streaming starts. A list, not a snapshot
-- visibility test: transaction ids copied from another server would fool the test.
CREATE TABLE outbox.relay_backfill (
    slot_name  text        NOT NULL,
    created_at timestamptz NOT NULL,
    event_id   uuid        NOT NULL,
    CONSTRAINT relay_backfill_pkey PRIMARY KEY (slot_name, created_at, event_id)
);

CREATE INDEX relay_dead_letters_batch ON outbox.relay_dead_letters (batch_id);

-- A dead letter counts once the batch that wrote it is acknowledged (exactly-once writes them
-- before the Kafka commit; an aborted batch's are withdrawn), or when it belongs to no batch.
CREATE FUNCTION outbox.dead_lettered(event uuid, slot text) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT EXISTS (SELECT 1 FROM outbox.relay_dead_letters d
                     LEFT JOIN outbox.relay_batches b ON b.batch_id = d.batch_id
                    WHERE d.event_id = event AND (slot IS NULL OR d.slot_name = slot)
                      AND (b.batch_id IS NULL OR b.status IN ('acked', 'committed')))
$$;

-- In flight = not yet published by every slot (each slot is a relay publishing the whole outbox).
-- Before any relay ran, every event is in flight.
CREATE OR REPLACE VIEW outbox.in_flight AS
WITH slots AS (
    SELECT slot_name, watermark_txid FROM outbox.relay_status
    UNION ALL
    SELECT NULL, NULL WHERE NOT EXISTS (SELECT 1 FROM outbox.relay_status)
), acked AS (
    SELECT b.slot_name, x.txid
      FROM slots s JOIN outbox.relay_batches b ON b.slot_name = s.slot_name
           CROSS JOIN LATERAL unnest(b.xids) AS x(txid)
     WHERE b.status IN ('acked', 'committed') AND (s.watermark_txid IS NULL OR b.max_xid >= s.watermark_txid)
)
SELECT e.event_id, e.aggregate_type, e.aggregate_id, e.event_type, e.created_at, now() - e.created_at AS age, e.txid
  FROM outbox.events e
 WHERE EXISTS (SELECT 1 FROM slots s
                WHERE (s.watermark_txid IS NULL OR e.txid >= s.watermark_txid)
                  AND NOT EXISTS (SELECT 1 FROM acked a WHERE a.slot_name = s.slot_name AND a.txid = e.txid)
                  AND NOT outbox.dead_lettered(e.event_id, s.slot_name));

-- Retention. The horizon is the lowest watermark of all slots, and none at all while a slot has
-- no watermark yet (it may not have published anything below another slot's). Batches the
-- in-flight view still reads (max_xid at or above the horizon) are kept, and so is each slot's
-- newest batch: the exactly-once checkpoint names it.
CREATE OR REPLACE PROCEDURE outbox.prune(keep interval, batch_size integer DEFAULT 10000,
                                         INOUT events bigint DEFAULT 0, INOUT deliveries bigint DEFAULT 0,
                                         INOUT batches bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    horizon xid8;
    n       bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox.relay_status WHERE watermark_txid IS NULL) THEN
        SELECT min(watermark_txid) INTO horizon FROM outbox.relay_status;
    END IF;
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
    DELETE FROM outbox.relay_batches b
     WHERE b.finished_at < now() - keep AND b.status IN ('acked', 'committed', 'aborted', 'unknown')
       AND (b.max_xid IS NULL OR b.max_xid < horizon)
       AND b.batch_id < (SELECT max(n.batch_id) FROM outbox.relay_batches n WHERE n.slot_name = b.slot_name);
    GET DIAGNOSTICS n = ROW_COUNT;
    batches := n;
END
$$;
