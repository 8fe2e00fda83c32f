-- audit-platform, source database schema, migration 001.
-- Installed by `audit-platform source setup`; shared by every environment that captures from
-- this database (their slots and publications are separate, see audit_platform/naming.py).
--
-- A transaction's context travels as a transactional logical decoding message: it is written to
-- WAL inside the transaction, decoded in the same slot stream as the transaction's row changes,
-- and disappears with a rollback. No table row is written, so the source pays no heap, index or
-- vacuum cost for it. benchmarks/context_write_cost.py measured this against a context row and a
-- trigger-based audit table; benchmarks/results/context_write_cost.md has the numbers and the
-- decision.

CREATE SCHEMA IF NOT EXISTS audit;
COMMENT ON SCHEMA audit IS 'audit-platform: transaction context for change data capture';

CREATE TABLE IF NOT EXISTS audit.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Context contract (docs/context.schema.json is the same contract as JSON Schema):
--   actor        required object: type (user|service|job|system), id (non-empty string),
--                name (optional display name)
--   service, request_id, reason: optional strings
--   job          optional object: name, run_id (strings)
--   trace_id     optional W3C trace-id: 32 lowercase hex digits, not all zero
--   client_addr  optional IP address
--   attributes   optional object, free-form
-- The serialized context may be at most 8192 bytes. Anything else is refused with an error that
-- names the field (SQLSTATE 22023), which fails the caller's transaction: a write that cannot be
-- attributed is a bug in the caller, and it is cheaper to find it at once than in an audit.
--
-- Validation runs in every audited transaction, so the usual case is one expression
-- (audit.context_is_valid, an SQL function PostgreSQL inlines): the structure is checked with
-- jsonb operators (no loops, no queries, no exception block). Only a context that fails it goes
-- through audit.explain_invalid_context, which finds the field to name in the error (or accepts
-- it, e.g. for an IPv6 client address or explicit nulls).
CREATE OR REPLACE FUNCTION audit.context_is_valid(ctx jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT jsonb_typeof(ctx) = 'object'
        AND (ctx - ARRAY['actor', 'service', 'request_id', 'job', 'trace_id', 'reason',
                         'client_addr', 'attributes']) = '{}'::jsonb
        AND jsonb_typeof(ctx -> 'actor') = 'object'
        AND ((ctx -> 'actor') - ARRAY['type', 'id', 'name']) = '{}'::jsonb
        AND jsonb_typeof(ctx -> 'actor' -> 'type') = 'string'
        AND ctx -> 'actor' ->> 'type' IN ('user', 'service', 'job', 'system')
        AND jsonb_typeof(ctx -> 'actor' -> 'id') = 'string' AND ctx -> 'actor' ->> 'id' <> ''
        AND coalesce(jsonb_typeof(ctx -> 'actor' -> 'name'), 'string') = 'string'
        AND coalesce(jsonb_typeof(ctx -> 'service'), 'string') = 'string'
        AND coalesce(jsonb_typeof(ctx -> 'request_id'), 'string') = 'string'
        AND coalesce(jsonb_typeof(ctx -> 'reason'), 'string') = 'string'
        AND coalesce(jsonb_typeof(ctx -> 'attributes'), 'object') = 'object'
        AND (ctx -> 'job' IS NULL
             OR (jsonb_typeof(ctx -> 'job') = 'object'
                 AND ((ctx -> 'job') - ARRAY['name', 'run_id']) = '{}'::jsonb
                 AND coalesce(jsonb_typeof(ctx -> 'job' -> 'name'), 'string') = 'string'
                 AND coalesce(jsonb_typeof(ctx -> 'job' -> 'run_id'), 'string') = 'string'))
        AND (ctx -> 'trace_id' IS NULL
             OR (jsonb_typeof(ctx -> 'trace_id') = 'string'
                 AND ctx ->> 'trace_id' ~ '^[0-9a-f]{32}$'
                 AND ctx ->> 'trace_id' <> '00000000000000000000000000000000'))
        AND (ctx -> 'client_addr' IS NULL
             OR (jsonb_typeof(ctx -> 'client_addr') = 'string'
                 AND ctx ->> 'client_addr' ~ '^((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$'))
        AND octet_length(ctx::text) <= 8192;
$fn$;

CREATE OR REPLACE FUNCTION audit.validate_context(ctx jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
BEGIN
    IF audit.context_is_valid(ctx) IS NOT TRUE THEN
        PERFORM audit.explain_invalid_context(ctx);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION audit.explain_invalid_context(ctx jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
    field text;
    actor jsonb;
    job jsonb;
    size integer;
BEGIN
    IF ctx IS NULL OR jsonb_typeof(ctx) <> 'object' THEN
        RAISE EXCEPTION 'audit context must be a JSON object, got %', coalesce(jsonb_typeof(ctx), 'NULL')
            USING ERRCODE = '22023', HINT = 'Pass e.g. {"actor": {"type": "user", "id": "42"}}';
    END IF;
    -- A field set to null means the same as an absent field (as it does in the Python SDK).
    ctx := jsonb_strip_nulls(ctx);
    size := octet_length(ctx::text);
    IF size > 8192 THEN
        RAISE EXCEPTION 'audit context is % bytes; the limit is 8192', size
            USING ERRCODE = '22023', HINT = 'Keep ids and reasons in the context, not payloads.';
    END IF;
    FOR field IN SELECT jsonb_object_keys(ctx) LOOP
        IF field NOT IN ('actor', 'service', 'request_id', 'job', 'trace_id', 'reason',
                         'client_addr', 'attributes') THEN
            RAISE EXCEPTION 'audit context has unknown field "%"', field
                USING ERRCODE = '22023',
                      HINT = 'Known fields: actor, service, request_id, job, trace_id, reason, '
                             'client_addr, attributes. Put anything else under attributes.';
        END IF;
    END LOOP;

    actor := ctx -> 'actor';
    IF actor IS NULL OR jsonb_typeof(actor) <> 'object' THEN
        RAISE EXCEPTION 'audit context field "actor" must be an object with type and id'
            USING ERRCODE = '22023', HINT = 'e.g. "actor": {"type": "user", "id": "42"}';
    END IF;
    IF jsonb_typeof(actor -> 'type') IS DISTINCT FROM 'string'
       OR actor ->> 'type' NOT IN ('user', 'service', 'job', 'system') THEN
        RAISE EXCEPTION 'audit context field "actor.type" must be one of user, service, job, system; got %',
            coalesce((actor -> 'type')::text, 'nothing')
            USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(actor -> 'id') IS DISTINCT FROM 'string' OR actor ->> 'id' = '' THEN
        RAISE EXCEPTION 'audit context field "actor.id" must be a non-empty string; got %',
            coalesce((actor -> 'id')::text, 'nothing')
            USING ERRCODE = '22023';
    END IF;
    FOR field IN SELECT jsonb_object_keys(actor) LOOP
        IF field NOT IN ('type', 'id', 'name') THEN
            RAISE EXCEPTION 'audit context has unknown field "actor.%"', field
                USING ERRCODE = '22023', HINT = 'actor has type, id and name only.';
        END IF;
        IF jsonb_typeof(actor -> field) <> 'string' THEN
            RAISE EXCEPTION 'audit context field "actor.%" must be a string', field
                USING ERRCODE = '22023';
        END IF;
    END LOOP;

    FOREACH field IN ARRAY ARRAY['service', 'request_id', 'reason', 'trace_id', 'client_addr'] LOOP
        IF ctx ? field AND jsonb_typeof(ctx -> field) <> 'string' THEN
            RAISE EXCEPTION 'audit context field "%" must be a string; got %', field,
                jsonb_typeof(ctx -> field)
                USING ERRCODE = '22023';
        END IF;
    END LOOP;
    IF ctx ? 'trace_id' AND (ctx ->> 'trace_id' !~ '^[0-9a-f]{32}$'
                             OR ctx ->> 'trace_id' = repeat('0', 32)) THEN
        RAISE EXCEPTION 'audit context field "trace_id" must be a W3C trace-id (32 lowercase hex digits, not all zero); got %',
            ctx ->> 'trace_id'
            USING ERRCODE = '22023';
    END IF;
    IF ctx ? 'client_addr' THEN
        BEGIN
            PERFORM (ctx ->> 'client_addr')::inet;
        EXCEPTION WHEN invalid_text_representation THEN
            RAISE EXCEPTION 'audit context field "client_addr" must be an IP address; got %',
                ctx ->> 'client_addr'
                USING ERRCODE = '22023';
        END;
    END IF;

    job := ctx -> 'job';
    IF job IS NOT NULL THEN
        IF jsonb_typeof(job) <> 'object' THEN
            RAISE EXCEPTION 'audit context field "job" must be an object with name and run_id'
                USING ERRCODE = '22023';
        END IF;
        FOR field IN SELECT jsonb_object_keys(job) LOOP
            IF field NOT IN ('name', 'run_id') OR jsonb_typeof(job -> field) <> 'string' THEN
                RAISE EXCEPTION 'audit context field "job.%" is not allowed: job has string fields name and run_id', field
                    USING ERRCODE = '22023';
            END IF;
        END LOOP;
    END IF;
    IF ctx ? 'attributes' AND jsonb_typeof(ctx -> 'attributes') <> 'object' THEN
        RAISE EXCEPTION 'audit context field "attributes" must be an object; got %',
            jsonb_typeof(ctx -> 'attributes')
            USING ERRCODE = '22023';
    END IF;
END
$fn$;

-- Record the context of the current transaction. Call it once per transaction, before or after
-- the writes. A second call in the same transaction is recorded too, and capture merges them in
-- order: later top-level fields replace earlier ones, and attributes are merged key by key.
CREATE OR REPLACE FUNCTION audit.set_context(ctx jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    -- The check is an inlined expression, not a query: no cost beyond evaluating it.
    IF audit.context_is_valid(ctx) IS NOT TRUE THEN
        PERFORM audit.explain_invalid_context(ctx);
    END IF;
    PERFORM pg_logical_emit_message(true, 'audit_platform.context.v1', ctx::text);
END
$fn$;

-- The same, but only when the transaction has written something (has a transaction id): what
-- the SDK's hooks send together with COMMIT, so read-only transactions cost nothing.
CREATE OR REPLACE FUNCTION audit.set_context_if_writing(ctx jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        PERFORM audit.set_context(ctx);
    END IF;
END
$fn$;

-- Context for a transaction that has already committed (a late arrival that capture's quarantine
-- resolves). It is recorded when the calling transaction commits.
CREATE OR REPLACE FUNCTION audit.attach_context(target xid8, ctx jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    status text;
BEGIN
    PERFORM audit.validate_context(ctx);
    IF target IS NULL THEN
        RAISE EXCEPTION 'attach_context needs a transaction id; got NULL' USING ERRCODE = '22023';
    END IF;
    IF target = pg_current_xact_id_if_assigned() THEN
        RAISE EXCEPTION 'transaction % is the current one: use audit.set_context instead', target
            USING ERRCODE = '22023';
    END IF;
    status := pg_xact_status(target);
    IF status IS DISTINCT FROM 'committed' THEN
        RAISE EXCEPTION 'transaction % is %; context can be attached only to a committed transaction',
            target, coalesce(status, 'too old to look up (its commit status was truncated)')
            USING ERRCODE = '22023';
    END IF;
    PERFORM pg_logical_emit_message(true, 'audit_platform.attach.v1',
        jsonb_build_object('xid', target::text, 'context', ctx)::text);
END
$fn$;

GRANT USAGE ON SCHEMA audit TO PUBLIC;
-- Which migrations are installed is no secret, and `source check` may run as a capture-only role.
GRANT SELECT ON audit.schema_migrations TO PUBLIC;
GRANT EXECUTE ON FUNCTION audit.context_is_valid(jsonb), audit.validate_context(jsonb),
    audit.explain_invalid_context(jsonb),
    audit.set_context(jsonb),
    audit.set_context_if_writing(jsonb), audit.attach_context(xid8, jsonb) TO PUBLIC;
