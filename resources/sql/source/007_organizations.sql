-- audit-platform, source database schema, migration 007: a transaction's organization
-- (docs/design.md, "Organizations").
--
-- A multi-tenant service names the tenant a transaction acts for, as "organization":
-- {"id": ..., "name": ...}; records carry it as ECS organization.id and organization.name, and
-- API keys and Explorer sessions can be limited to organizations. The contract's two functions
-- are redefined with the new field and nothing else changed; the SDK's model
-- (audit_platform_context.model.Organization) holds the same rules.

CREATE OR REPLACE FUNCTION audit.context_is_valid(ctx jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT jsonb_typeof(ctx) = 'object'
        AND (ctx - ARRAY['actor', 'organization', 'service', 'request_id', 'job', 'trace_id',
                         'reason', 'client_addr', 'attributes']) = '{}'::jsonb
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
        AND (ctx -> 'organization' IS NULL
             OR (jsonb_typeof(ctx -> 'organization') = 'object'
                 AND ((ctx -> 'organization') - ARRAY['id', 'name']) = '{}'::jsonb
                 AND jsonb_typeof(ctx -> 'organization' -> 'id') = 'string'
                 AND length(ctx -> 'organization' ->> 'id') BETWEEN 1 AND 256
                 AND coalesce(jsonb_typeof(ctx -> 'organization' -> 'name'), 'string') = 'string'))
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
    org jsonb;
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
        IF field NOT IN ('actor', 'organization', 'service', 'request_id', 'job', 'trace_id',
                         'reason', 'client_addr', 'attributes') THEN
            RAISE EXCEPTION 'audit context has unknown field "%"', field
                USING ERRCODE = '22023',
                      HINT = 'Known fields: actor, organization, service, request_id, job, '
                             'trace_id, reason, client_addr, attributes. Put anything else '
                             'under attributes.';
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

    org := ctx -> 'organization';
    IF org IS NOT NULL THEN
        IF jsonb_typeof(org) <> 'object' THEN
            RAISE EXCEPTION 'audit context field "organization" must be an object with id and name'
                USING ERRCODE = '22023', HINT = 'e.g. "organization": {"id": "acme"}';
        END IF;
        FOR field IN SELECT jsonb_object_keys(org) LOOP
            IF field NOT IN ('id', 'name') OR jsonb_typeof(org -> field) <> 'string' THEN
                RAISE EXCEPTION 'audit context field "organization.%" is not allowed: organization has string fields id and name', field
                    USING ERRCODE = '22023';
            END IF;
        END LOOP;
        IF length(org ->> 'id') IS NULL OR length(org ->> 'id') NOT BETWEEN 1 AND 256 THEN
            RAISE EXCEPTION 'audit context field "organization.id" must be a string of 1 to 256 characters'
                USING ERRCODE = '22023';
        END IF;
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
