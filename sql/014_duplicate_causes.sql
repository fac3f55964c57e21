-- Duplicates by cause, where the Kafka coordinates tell it: a delivery of the Kafka record the
-- inbox row already names (same topic, partition and offset) is a redelivery of that record by
-- Kafka to the consumer (a rebalance, a zombie instance, a replayed offset); any other delivery
-- of a known event id is another Kafka record carrying it (the relay republished it after a crash
-- in at-least-once mode, a dead-letter replay, `--reset-checkpoint`, or a producer emitting the
-- same event id twice). Both are suppressed alike; the split says where to look.
ALTER TABLE outbox.inbox_messages ADD COLUMN redeliveries integer NOT NULL DEFAULT 0;
-- NOT VALID: every existing row has 0, so nothing needs scanning under the table lock.
ALTER TABLE outbox.inbox_messages ADD CONSTRAINT inbox_messages_redeliveries
    CHECK (redeliveries >= 0 AND redeliveries <= duplicates) NOT VALID;
COMMENT ON COLUMN outbox.inbox_messages.redeliveries IS
    'Of the duplicates, deliveries of the very Kafka record (topic, partition, offset) this row names: Kafka redelivered it. The rest came in other Kafka records with the same event id (republished).';

ALTER TABLE outbox.inbox_stats ADD COLUMN redelivered bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN outbox.inbox_stats.redelivered IS
    'Of the duplicates, those that were the same Kafka record delivered again (see inbox_messages.redeliveries).';
