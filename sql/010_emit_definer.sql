-- Least privilege for producers: outbox.emit() runs with its owner's rights (SECURITY DEFINER), so a
-- producer needs EXECUTE on it and nothing on outbox.events; it can neither read other services'
-- events nor insert rows that skip emit()'s checks. Signature and behaviour are 001's.

CREATE OR REPLACE FUNCTION outbox.emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
-- Resolved through a search_path the caller controls, a definer function would run the caller's
-- objects with the owner's rights; every name below is schema-qualified or in pg_catalog.
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad_key text;
    new_id  uuid;
BEGIN
    IF emit.aggregate_type IS NULL OR pg_catalog.btrim(emit.aggregate_type) = '' THEN
        RAISE EXCEPTION 'outbox.emit: aggregate_type must be a non-empty string'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the kind of entity the event is about, e.g. ''order''; it selects the Kafka topic.';
    END IF;
    IF emit.aggregate_id IS NULL OR pg_catalog.btrim(emit.aggregate_id) = '' THEN
        RAISE EXCEPTION 'outbox.emit: aggregate_id must be a non-empty string'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the id of the entity, e.g. the order number; it becomes the Kafka key and orders events per aggregate.';
    END IF;
    IF emit.event_type IS NULL OR pg_catalog.btrim(emit.event_type) = '' THEN
        RAISE EXCEPTION 'outbox.emit: event_type must be a non-empty string'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass what happened, e.g. ''OrderPlaced''.';
    END IF;
    IF emit.headers IS NULL THEN
        emit.headers := '{}'::pg_catalog.jsonb;
    ELSIF pg_catalog.jsonb_typeof(emit.headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox.emit: headers must be a JSON object, got a JSON %', pg_catalog.jsonb_typeof(emit.headers)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass e.g. ''{"traceparent": "00-..."}'' or omit the argument.';
    END IF;
    SELECT key INTO bad_key FROM pg_catalog.jsonb_each(emit.headers) WHERE pg_catalog.jsonb_typeof(value) <> 'string' LIMIT 1;
    IF bad_key IS NOT NULL THEN
        RAISE EXCEPTION 'outbox.emit: header "%" must have a string value', bad_key
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Kafka headers are bytes; pass strings, e.g. ''{"attempt": "2"}''.';
    END IF;
    SELECT key INTO bad_key FROM pg_catalog.jsonb_object_keys(emit.headers) AS k(key) WHERE outbox.reserved_header(key) LIMIT 1;
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

-- Functions are executable by PUBLIC by default; a definer function must not be. Roles that could
-- insert into outbox.events before this migration (the way producers were set up until now) keep
-- being able to emit, so upgrading breaks no producer; new ones get `outbox grants --role producer`.
REVOKE ALL ON FUNCTION outbox.emit(text, text, text, jsonb, jsonb) FROM PUBLIC;
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END
          FROM pg_catalog.pg_class c
         CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
          LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
         WHERE c.oid = 'outbox.events'::pg_catalog.regclass AND a.privilege_type = 'INSERT'
           AND a.grantee <> c.relowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION outbox.emit(text, text, text, jsonb, jsonb) TO %s',
                                  grantee);
    END LOOP;
END
$$;
