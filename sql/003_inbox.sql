-- The consumer side (package `inbox`): what each consumer has seen, where it is in each Kafka
-- partition, what it could not process, and the idempotency ledger for effects outside
-- PostgreSQL. Compatible with PostgreSQL 14-18. See docs/inbox.md for the guarantees.

-- One row per (event, consumer) that the consumer took responsibility for: processed by its
-- handler, or dead-lettered. Written in the same transaction as the handler's own writes and the
-- consumer's offset, which is what makes the handler's effect in this database exactly once.
CREATE TABLE outbox.inbox_messages (
    -- event_id first: the trace view looks rows up by event id alone, and time-ordered (v7) ids
    -- keep inserts at the right edge of the index.
    event_id        uuid        NOT NULL,
    consumer        text        NOT NULL,
    status          text        NOT NULL DEFAULT 'processed',
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    last_seen       timestamptz NOT NULL DEFAULT now(),
    duplicates      integer     NOT NULL DEFAULT 0,
    processed_at    timestamptz DEFAULT now(),
    CONSTRAINT inbox_messages_pkey PRIMARY KEY (event_id, consumer),
    CONSTRAINT inbox_messages_status CHECK (status IN ('processed', 'dead_lettered')),
    CONSTRAINT inbox_messages_processed_at CHECK ((status = 'processed') = (processed_at IS NOT NULL)),
    CONSTRAINT inbox_messages_duplicates CHECK (duplicates >= 0)
);

COMMENT ON TABLE outbox.inbox_messages IS
    'Dedupe memory of the inbox: a delivery of (event_id, consumer) that finds a row here is suppressed and counted. Rows older than the retention window are purged, after which an old duplicate is accepted again.';
COMMENT ON COLUMN outbox.inbox_messages.status IS
    'processed: the handler''s transaction committed. dead_lettered: see outbox.inbox_dead_letters; redeliveries are suppressed until the dead letter is replayed.';
COMMENT ON COLUMN outbox.inbox_messages.duplicates IS
    'Deliveries suppressed after the first (redeliveries, producer retries, replays of the topic).';
COMMENT ON COLUMN outbox.inbox_messages.last_seen IS
    'Last delivery of this event to this consumer; retention counts the window from here.';

-- Retention walks this (bounded DELETE batches, oldest first). Dead-lettered rows are kept until
-- their dead letter is resolved, so they are left out.
CREATE INDEX inbox_messages_retention ON outbox.inbox_messages (last_seen) WHERE status = 'processed';
-- Dashboard: most-duplicated events and when each was last seen, per consumer. Duplicates are
-- rare, so this partial index stays small even with millions of inbox rows.
CREATE INDEX inbox_messages_duplicated ON outbox.inbox_messages (consumer, last_seen DESC) WHERE duplicates > 0;

-- The consumer's position: the offset of the next record to process, per partition. The runner
-- seeks here on partition assignment; Kafka's committed group offset is only a copy for lag tools.
CREATE TABLE outbox.inbox_offsets (
    consumer        text        NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    next_offset     bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_offsets_pkey PRIMARY KEY (consumer, topic, kafka_partition),
    CONSTRAINT inbox_offsets_next_offset CHECK (next_offset >= 0)
);

COMMENT ON TABLE outbox.inbox_offsets IS
    'Next Kafka offset to process per consumer and partition, committed with the inbox rows and the handler''s writes.';

-- Counters per minute and partition, upserted once per batch. Keyed by partition so that two
-- instances of one consumer (which own disjoint partitions) never wait on each other's row.
CREATE TABLE outbox.inbox_stats (
    minute          timestamptz NOT NULL,
    consumer        text        NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    processed       bigint      NOT NULL DEFAULT 0,
    duplicates      bigint      NOT NULL DEFAULT 0,
    dead_lettered   bigint      NOT NULL DEFAULT 0,
    CONSTRAINT inbox_stats_pkey PRIMARY KEY (minute, consumer, topic, kafka_partition)
);

COMMENT ON TABLE outbox.inbox_stats IS
    'Per-minute counts of records processed, suppressed as duplicates and dead-lettered, by consumer and partition (for charts over time).';

CREATE TABLE outbox.inbox_dead_letters (
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    consumer            text        NOT NULL,
    status              text        NOT NULL DEFAULT 'dead',
    reason              text        NOT NULL,
    error               text        NOT NULL,
    error_detail        text,
    attempts            integer     NOT NULL,
    event_id            uuid,
    event_type          text,
    aggregate_type      text,
    aggregate_id        text,
    topic               text        NOT NULL,
    kafka_partition     integer     NOT NULL,
    kafka_offset        bigint      NOT NULL,
    kafka_timestamp     timestamptz,
    key                 bytea,
    value               bytea,
    payload             jsonb,
    headers             jsonb       NOT NULL,
    first_failed_at     timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    replay_requested_at timestamptz,
    replayed_at         timestamptz,
    replay_attempts     integer     NOT NULL DEFAULT 0,
    CONSTRAINT inbox_dead_letters_pkey PRIMARY KEY (id),
    CONSTRAINT inbox_dead_letters_status CHECK (status IN ('dead', 'replay_requested', 'replayed', 'discarded')),
    CONSTRAINT inbox_dead_letters_reason CHECK (reason IN ('invalid_envelope', 'handler_failed')),
    -- Only records with an event id can go back through the handler (dedupe needs the id).
    CONSTRAINT inbox_dead_letters_replayable CHECK (reason = 'handler_failed' OR status IN ('dead', 'discarded')),
    CONSTRAINT inbox_dead_letters_event CHECK ((reason = 'handler_failed') = (event_id IS NOT NULL)),
    CONSTRAINT inbox_dead_letters_headers CHECK (jsonb_typeof(headers) = 'array')
);

COMMENT ON TABLE outbox.inbox_dead_letters IS
    'Records a consumer could not process: no valid event_id (invalid_envelope) or the handler kept failing (handler_failed). Replay with `outbox inbox replay --consumer C --id N`; the running consumer re-runs its handler on the stored record.';
COMMENT ON COLUMN outbox.inbox_dead_letters.value IS 'The record value exactly as consumed (what a replay hands to the handler).';
COMMENT ON COLUMN outbox.inbox_dead_letters.payload IS 'The value parsed as JSON when it is JSON, for reading; NULL otherwise.';
COMMENT ON COLUMN outbox.inbox_dead_letters.headers IS
    'Record headers in order: [{"name": n, "value": utf-8 text} or {"name": n, "base64": bytes}].';
COMMENT ON COLUMN outbox.inbox_dead_letters.status IS
    'dead: waiting for an operator. replay_requested: the consumer re-runs it on its next loop. replayed: the handler succeeded on replay. discarded: an operator gave up on it.';

-- The inbox row blocks redelivery of a dead-lettered event, so there is at most one per event.
-- Also serves the trace view (event id -> dead letters).
CREATE UNIQUE INDEX inbox_dead_letters_event ON outbox.inbox_dead_letters (event_id, consumer) WHERE event_id IS NOT NULL;
-- Open dead letters per consumer (dashboard list, the runner's replay pick-up).
CREATE INDEX inbox_dead_letters_open ON outbox.inbox_dead_letters (consumer, created_at)
    WHERE status IN ('dead', 'replay_requested');
-- Retention of resolved dead letters.
CREATE INDEX inbox_dead_letters_resolved ON outbox.inbox_dead_letters (updated_at)
    WHERE status IN ('replayed', 'discarded');

-- Idempotency ledger for calls to systems outside PostgreSQL (a payment provider, an email API),
-- after Stripe's idempotent requests and the IETF Idempotency-Key draft. Written on its own
-- connection, never in the handler's transaction: the lease must be durable before the call.
CREATE TABLE outbox.effects (
    key                text        NOT NULL,
    fingerprint        text        NOT NULL,
    request            jsonb       NOT NULL,
    status             text        NOT NULL,
    response           jsonb,
    resolved_via       text,
    attempts           integer     NOT NULL DEFAULT 0,
    replays            integer     NOT NULL DEFAULT 0,
    lease_owner        text,
    lease_token        uuid,
    lease_expires_at   timestamptz,
    reattempt_approved boolean     NOT NULL DEFAULT false,
    last_error         text,
    evidence           jsonb       NOT NULL DEFAULT '[]'::jsonb,
    consumer           text,
    event_id           uuid,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    last_replayed_at   timestamptz,
    CONSTRAINT effects_pkey PRIMARY KEY (key),
    CONSTRAINT effects_key CHECK (key <> '' AND length(key) <= 255),
    CONSTRAINT effects_status CHECK (status IN ('in_progress', 'succeeded', 'failed', 'unknown')),
    CONSTRAINT effects_resolved_via CHECK (resolved_via IN ('call', 'reconcile', 'operator')),
    CONSTRAINT effects_lease CHECK ((status = 'in_progress') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT effects_completed CHECK ((status IN ('succeeded', 'failed')) = (completed_at IS NOT NULL)),
    CONSTRAINT effects_evidence CHECK (jsonb_typeof(evidence) = 'array')
);

COMMENT ON TABLE outbox.effects IS
    'One row per idempotency key of an external side effect. in_progress: a worker holds a lease and may be calling right now. succeeded/failed: the stored result, returned to every retry without calling again. unknown: the call may or may not have happened (lease expired or indeterminate error); resolved by reconciliation with the provider, a re-call with the same key, or an operator - never by a new key.';
COMMENT ON COLUMN outbox.effects.fingerprint IS 'sha256 of the canonical JSON request; the same key with another request is refused (422-like).';
COMMENT ON COLUMN outbox.effects.attempts IS 'Calls made to the external system under this key (an in-flight call included).';
COMMENT ON COLUMN outbox.effects.replays IS 'Times the stored result was returned instead of calling.';
COMMENT ON COLUMN outbox.effects.reattempt_approved IS
    'Set by an operator on an unknown outcome: the next attempt may call again with the same key.';
COMMENT ON COLUMN outbox.effects.evidence IS
    'What is known about each attempt, in order: [{"at", "owner", "what", "detail"}]. The operator''s basis for deciding an unknown outcome.';
COMMENT ON COLUMN outbox.effects.event_id IS 'The inbox event whose handler ran the effect, when it ran inside one (trace).';

-- Dashboard "unknown outcome" view and at-risk leases; unresolved rows are few.
CREATE INDEX effects_open ON outbox.effects (created_at) WHERE status IN ('in_progress', 'unknown');
CREATE INDEX effects_event ON outbox.effects (event_id) WHERE event_id IS NOT NULL;
-- Retention of settled keys.
CREATE INDEX effects_completed ON outbox.effects (completed_at) WHERE status IN ('succeeded', 'failed');

-- Effects that need attention: outcome unknown, or a lease that expired without a result (the
-- worker died during or after the call; the ledger turns it into `unknown` on the next attempt).
CREATE VIEW outbox.effects_unresolved AS
SELECT key,
       CASE WHEN status = 'in_progress' AND lease_expires_at <= now() THEN 'unknown' ELSE status END AS effective_status,
       status,
       status = 'in_progress' AND lease_expires_at <= now() AS lease_expired,
       lease_owner,
       lease_expires_at,
       request,
       attempts,
       now() - created_at AS age,
       last_error,
       evidence,
       reattempt_approved,
       consumer,
       event_id,
       created_at,
       updated_at
  FROM outbox.effects
 WHERE status IN ('in_progress', 'unknown');

COMMENT ON VIEW outbox.effects_unresolved IS
    'Effects in progress or with an unknown outcome; effective_status says unknown as soon as a lease has expired.';
