-- The transactional outbox: producers call outbox.emit() inside their own transaction; the relay
-- streams committed rows from a logical replication slot. Compatible with PostgreSQL 14-18.

-- Time-ordered ids (RFC 9562 version 7) keep the primary key index append-only and let
-- "oldest first" queries walk it. PostgreSQL 18 has a native uuidv7(); older versions get the
-- same layout built from gen_random_uuid() (core since 13).
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        EXECUTE $f$
            CREATE FUNCTION outbox.uuid_v7() RETURNS uuid
            LANGUAGE sql VOLATILE PARALLEL SAFE AS 'SELECT uuidv7()'
        $f$;
    ELSE
        EXECUTE $f$
            CREATE FUNCTION outbox.uuid_v7() RETURNS uuid
            LANGUAGE sql VOLATILE PARALLEL SAFE AS $body$
                SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
            $body$
        $f$;
    END IF;
END
$$;

CREATE TABLE outbox.events (
    event_id       uuid        NOT NULL DEFAULT outbox.uuid_v7(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb,
    headers        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- The producing transaction (64-bit, never wraps). The dashboard uses it with the relay's
    -- snapshot watermark to list exactly the events that are committed but not yet in Kafka.
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT events_pkey PRIMARY KEY (event_id),
    CONSTRAINT events_aggregate_type_not_empty CHECK (aggregate_type <> ''),
    CONSTRAINT events_aggregate_id_not_empty CHECK (aggregate_id <> ''),
    CONSTRAINT events_event_type_not_empty CHECK (event_type <> ''),
    CONSTRAINT events_headers_is_object CHECK (jsonb_typeof(headers) = 'object')
);

COMMENT ON TABLE outbox.events IS
    'Transactional outbox. Write with outbox.emit(); the relay publishes each committed row to Kafka once per delivery mode guarantees.';
COMMENT ON COLUMN outbox.events.payload IS
    'Kafka record value (JSON text). SQL NULL publishes a tombstone (null value) for compacted topics.';

-- Header names the relay sets itself; user headers may not shadow them (see relay/envelope.py).
CREATE FUNCTION outbox.reserved_header(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT name IN ('event_id', 'event_type', 'aggregate_type', 'aggregate_id') OR name LIKE 'outbox\_%'
$$;

CREATE FUNCTION outbox.emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    bad_key text;
    new_id  uuid;
BEGIN
    IF emit.aggregate_type IS NULL OR btrim(emit.aggregate_type) = '' THEN
        RAISE EXCEPTION 'outbox.emit: aggregate_type must be a non-empty string'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the kind of entity the event is about, e.g. ''order''; it selects the Kafka topic.';
    END IF;
    IF emit.aggregate_id IS NULL OR btrim(emit.aggregate_id) = '' THEN
        RAISE EXCEPTION 'outbox.emit: aggregate_id must be a non-empty string'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the id of the entity, e.g. the order number; it becomes the Kafka key and orders events per aggregate.';
    END IF;
    IF emit.event_type IS NULL OR btrim(emit.event_type) = '' THEN
        RAISE EXCEPTION 'outbox.emit: event_type must be a non-empty string'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass what happened, e.g. ''OrderPlaced''.';
    END IF;
    IF emit.headers IS NULL THEN
        emit.headers := '{}'::jsonb;
    ELSIF jsonb_typeof(emit.headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox.emit: headers must be a JSON object, got a JSON %', jsonb_typeof(emit.headers)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass e.g. ''{"traceparent": "00-..."}'' or omit the argument.';
    END IF;
    SELECT key INTO bad_key FROM jsonb_each(emit.headers) WHERE jsonb_typeof(value) <> 'string' LIMIT 1;
    IF bad_key IS NOT NULL THEN
        RAISE EXCEPTION 'outbox.emit: header "%" must have a string value', bad_key
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Kafka headers are bytes; pass strings, e.g. ''{"attempt": "2"}''.';
    END IF;
    SELECT key INTO bad_key FROM jsonb_object_keys(emit.headers) AS k(key) WHERE outbox.reserved_header(key) LIMIT 1;
    IF bad_key IS NOT NULL THEN
        RAISE EXCEPTION 'outbox.emit: header "%" is reserved for the relay', bad_key
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'event_id, event_type, aggregate_type, aggregate_id and outbox_* are set by the relay; rename the header.';
    END IF;

    INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, headers)
    VALUES (emit.aggregate_type, emit.aggregate_id, emit.event_type, emit.payload, emit.headers)
    RETURNING event_id INTO new_id;
    RETURN new_id;
END
$$;

COMMENT ON FUNCTION outbox.emit(text, text, text, jsonb, jsonb) IS
    'Insert one outbox event inside the caller''s transaction and return its event id (the Kafka event_id header, stable across redeliveries).';

-- Inserts only: UPDATE/DELETE of outbox rows (retention, cleanup) are never published and need
-- no replica identity.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_events') THEN
        CREATE PUBLICATION outbox_events FOR TABLE outbox.events WITH (publish = 'insert');
    END IF;
END
$$;
