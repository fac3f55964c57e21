-- `outbox prune --dry-run`: what outbox.prune(keep) would delete now, without deleting it.
-- The predicates are outbox.prune's (005_relay_identity.sql), clause for clause;
-- tests/relay/test_operations.py compares this preview with a real prune of the same rows.
CREATE OR REPLACE FUNCTION outbox.prune_preview(keep interval, OUT events bigint, OUT deliveries bigint,
                                                OUT batches bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    horizon xid8;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox.relay_status WHERE watermark_txid IS NULL) THEN
        SELECT min(watermark_txid) INTO horizon FROM outbox.relay_status;
    END IF;
    events := 0;
    IF horizon IS NOT NULL THEN
        SELECT count(*) INTO events FROM outbox.events WHERE created_at < now() - keep AND txid < horizon;
    END IF;
    SELECT count(*) INTO deliveries FROM outbox.deliveries WHERE delivered_at < now() - keep;
    SELECT count(*) INTO batches FROM outbox.relay_batches b
     WHERE b.finished_at < now() - keep AND b.status IN ('acked', 'committed', 'aborted', 'unknown')
       AND (b.max_xid IS NULL OR b.max_xid < horizon)
       AND b.batch_id < (SELECT max(n.batch_id) FROM outbox.relay_batches n WHERE n.slot_name = b.slot_name);
END
$$;
