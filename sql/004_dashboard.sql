-- The operator dashboard: an audit trail of operator decisions, the one function allowed to make
-- them, a read-only role for the dashboard, and the indexes its pages need. PostgreSQL 14-18.
--
-- The dashboard reads everything and writes nothing, except through outbox.resolve_effect():
-- a SECURITY DEFINER function that settles an effect whose outcome is unknown and records who
-- decided, when and why. Keeping the write path in one audited function means a compromised or
-- buggy dashboard cannot touch the ledger, the inbox or the outbox in any other way.

-- Every operator decision, append-only. `operator` is the human who confirmed it in the dashboard
-- (typed in: a shared dashboard login does not identify a person), `db_user` the database login
-- that ran it; both are kept because either alone can be wrong.
CREATE TABLE outbox.operator_audit (
    id                 bigint      GENERATED ALWAYS AS IDENTITY,
    at                 timestamptz NOT NULL DEFAULT clock_timestamp(),
    operator           text        NOT NULL,
    db_user            text        NOT NULL DEFAULT session_user,
    action             text        NOT NULL,
    effect_key         text        NOT NULL,
    event_id           uuid,
    consumer           text,
    reason             text        NOT NULL,
    provider_reference text,
    response           jsonb,
    previous_status    text        NOT NULL,
    previous_attempts  integer     NOT NULL,
    CONSTRAINT operator_audit_pkey PRIMARY KEY (id),
    CONSTRAINT operator_audit_action CHECK (action IN ('mark_succeeded', 'mark_failed', 'approve_reattempt'))
);
CREATE INDEX operator_audit_effect ON outbox.operator_audit (effect_key);
CREATE INDEX operator_audit_event ON outbox.operator_audit (event_id) WHERE event_id IS NOT NULL;

COMMENT ON TABLE outbox.operator_audit IS
    'Operator decisions on effects with an unknown outcome (outbox.resolve_effect): who, when, why, and what the effect looked like before.';

-- Settle an effect whose outcome is unknown (status unknown, or in progress with an expired
-- lease), the way the effects ledger (inbox/effects.py) honours it on the next attempt:
--   decision 'succeeded': status succeeded, response = `response` (a JSON object, default {}) plus
--                         {"provider_reference": ...}; the handler gets it back, via = 'operator'.
--   decision 'failed':    status failed, response = `response` or {"error": ..., "reason": ...}.
--   decision 'reattempt': stays unknown with reattempt_approved = true: the next attempt calls
--                         the provider again WITH THE SAME KEY (never a new one).
-- Refuses anything that is not actually unknown, so a decision can never overwrite a result the
-- provider gave, nor race a worker that still holds a live lease. Returns the audit row's id.
CREATE FUNCTION outbox.resolve_effect(
    key                text,
    decision           text,
    reason             text,
    operator           text,
    provider_reference text  DEFAULT NULL,
    response           jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
-- A SECURITY DEFINER function must not resolve names through a search_path its caller controls.
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e          outbox.effects%ROWTYPE;
    expired    boolean;
    new_status text;
    stored     jsonb;
    action     text;
    audit_id   bigint;
    why        text := btrim(coalesce(resolve_effect.reason, ''));
    who        text := btrim(coalesce(resolve_effect.operator, ''));
    ref        text := nullif(btrim(coalesce(resolve_effect.provider_reference, '')), '');
BEGIN
    IF resolve_effect.key IS NULL OR resolve_effect.key = '' THEN
        RAISE EXCEPTION 'resolve_effect: key is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF resolve_effect.decision IS NULL OR resolve_effect.decision NOT IN ('succeeded', 'failed', 'reattempt') THEN
        RAISE EXCEPTION 'resolve_effect: decision must be succeeded, failed or reattempt, not %',
            coalesce(quote_literal(resolve_effect.decision), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF who = '' OR length(who) > 200 THEN
        RAISE EXCEPTION 'resolve_effect: operator must name who decides (1-200 characters)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF why = '' OR length(why) > 2000 THEN
        RAISE EXCEPTION 'resolve_effect: reason must say why (1-2000 characters)'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'e.g. "provider dashboard shows charge ch_123 captured at 03:12"';
    END IF;
    IF length(ref) > 500 THEN
        RAISE EXCEPTION 'resolve_effect: provider_reference is longer than 500 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF resolve_effect.decision = 'succeeded' AND ref IS NULL THEN
        RAISE EXCEPTION 'resolve_effect: marking succeeded needs the provider''s reference for the effect'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Look the key up in the provider''s dashboard or API and pass its id (e.g. the charge id).';
    END IF;
    IF resolve_effect.decision = 'reattempt' AND (ref IS NOT NULL OR resolve_effect.response IS NOT NULL) THEN
        RAISE EXCEPTION 'resolve_effect: a re-attempt takes no provider reference or response (%)',
            'the provider will answer'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF resolve_effect.response IS NOT NULL AND jsonb_typeof(resolve_effect.response) <> 'object' THEN
        RAISE EXCEPTION 'resolve_effect: response must be a JSON object, got a JSON %',
            jsonb_typeof(resolve_effect.response)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Row lock: a worker recording a result, or a second operator, waits for this decision and
    -- then finds the key settled (the ledger's "first definite result wins").
    SELECT * INTO e FROM outbox.effects f WHERE f.key = resolve_effect.key FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'resolve_effect: no effect with key %', quote_literal(resolve_effect.key)
            USING ERRCODE = 'no_data_found';
    END IF;
    expired := e.status = 'in_progress' AND e.lease_expires_at <= now();
    IF e.status = 'in_progress' AND NOT expired THEN
        RAISE EXCEPTION 'resolve_effect: effect % is not unknown: in progress, % holds its lease until %',
            quote_literal(e.key), e.lease_owner, e.lease_expires_at
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Wait for the attempt to finish or its lease to expire.';
    ELSIF e.status IN ('succeeded', 'failed') THEN
        RAISE EXCEPTION 'resolve_effect: effect % is not unknown: % (via %), nothing to decide',
            quote_literal(e.key), e.status, e.resolved_via
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF resolve_effect.decision = 'reattempt' AND e.reattempt_approved THEN
        RAISE EXCEPTION 'resolve_effect: a re-attempt of % is already approved; %', quote_literal(e.key),
            'the next attempt will call with the same key' USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    IF resolve_effect.decision = 'succeeded' THEN
        action := 'mark_succeeded';
        new_status := 'succeeded';
        stored := coalesce(resolve_effect.response, '{}'::jsonb) || jsonb_build_object('provider_reference', ref);
    ELSIF resolve_effect.decision = 'failed' THEN
        action := 'mark_failed';
        new_status := 'failed';
        stored := coalesce(resolve_effect.response,
                           jsonb_build_object('error', 'marked failed by an operator', 'reason', why));
        IF ref IS NOT NULL THEN
            stored := stored || jsonb_build_object('provider_reference', ref);
        END IF;
    ELSE
        action := 'approve_reattempt';
        new_status := 'unknown';
    END IF;

    UPDATE outbox.effects f SET
        status             = new_status,
        response           = CASE WHEN new_status = 'unknown' THEN f.response ELSE stored END,
        resolved_via       = CASE WHEN new_status = 'unknown' THEN f.resolved_via ELSE 'operator' END,
        completed_at       = CASE WHEN new_status = 'unknown' THEN NULL ELSE now() END,
        reattempt_approved = new_status = 'unknown',
        -- An expired lease is over either way; clearing it is what the ledger itself would do.
        lease_owner        = NULL,
        lease_token        = NULL,
        lease_expires_at   = NULL,
        updated_at         = now(),
        evidence           = f.evidence || jsonb_build_array(jsonb_build_object(
                                 'at', clock_timestamp(), 'owner', 'operator ' || who, 'what', action,
                                 'detail', concat_ws(' | ', 'provider reference ' || ref, why)))
     WHERE f.key = e.key;

    INSERT INTO outbox.operator_audit (operator, action, effect_key, event_id, consumer, reason,
                                       provider_reference, response, previous_status, previous_attempts)
    VALUES (who, action, e.key, e.event_id, e.consumer, why, ref, stored,
            CASE WHEN expired THEN 'in_progress (lease expired)' ELSE e.status END, e.attempts)
    RETURNING id INTO audit_id;
    RETURN audit_id;
END
$$;

COMMENT ON FUNCTION outbox.resolve_effect(text, text, text, text, text, jsonb) IS
    'Operator decision on an effect whose outcome is unknown: succeeded (with the provider reference), failed, or reattempt (same key). Audited in outbox.operator_audit.';

-- Only the dashboard role (below) may call it; functions are executable by PUBLIC by default.
REVOKE ALL ON FUNCTION outbox.resolve_effect(text, text, text, text, text, jsonb) FROM PUBLIC;

-- Give a role what the dashboard needs: read the outbox schema and the replication slots, and
-- execute resolve_effect. Run by the schema's owner (the user that ran `outbox migrate`), for
-- the default role or one of your own: SELECT outbox.grant_dashboard('my_role');
CREATE FUNCTION outbox.grant_dashboard(role_name name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %I', role_name);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA outbox TO %I', role_name);
    -- Tables that later migrations add are readable without another grant.
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA outbox GRANT SELECT ON TABLES TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.resolve_effect(text, text, text, text, text, jsonb) TO %I',
                   role_name);
END
$$;
REVOKE ALL ON FUNCTION outbox.grant_dashboard(name) FROM PUBLIC;

-- The role the dashboard switches to (SET ROLE) after connecting. Roles belong to the whole
-- cluster, and creating one needs CREATEROLE: an application owner without it can still migrate,
-- and is told what an administrator has to run.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_dashboard') THEN
        BEGIN
            CREATE ROLE outbox_dashboard NOLOGIN;
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role outbox_dashboard was not created: % may not create roles', current_user
                    USING HINT = 'As a role with CREATEROLE run: CREATE ROLE outbox_dashboard NOLOGIN; '
                                 'then as ' || current_user || ': SELECT outbox.grant_dashboard(''outbox_dashboard'');';
            WHEN duplicate_object THEN
                NULL;  -- a concurrent migration of another database in this cluster created it
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_dashboard') THEN
        PERFORM outbox.grant_dashboard('outbox_dashboard');
    END IF;
END
$$;

-- Indexes for the dashboard's pages at millions of rows (bench/dashboard_bench.py). The existing
-- indexes of 001-003 serve every other page. Throughput chart: batches finished in the last hour,
-- across slots; a quiet relay writes one batch per event, and with a million of them this is
-- 18 ms instead of 126 ms.
CREATE INDEX relay_batches_finished_at ON outbox.relay_batches (finished_at) WHERE status IN ('acked', 'committed');
