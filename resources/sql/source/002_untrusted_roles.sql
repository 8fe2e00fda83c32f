-- audit-platform, source database schema, migration 002: roles on the source are not trusted
-- (docs/design.md, invariant 10).
--
-- 1. Late attribution nobody can forge.
-- Migration 001 let any role call audit.attach_context, and the function emitted a logical
-- message that any role could also emit itself with pg_logical_emit_message: either way, a role
-- with nothing but CONNECT could attribute another role's transaction to anyone. Now a late
-- context is a row of audit.attached_contexts, which only audit.attach_context can write (it runs
-- as its owner), and only members of the database's attributor role may call it. Capture reads the table's
-- inserts from the slot (setup adds it to every environment's publication) and rejects
-- attach messages, so emitting the old prefix attributes nothing (docs/design.md, invariant 10).
--
-- Give a service the right with: GRANT <SELECT audit.attributor_role()> TO <its role>; the role
-- is named after the database (audit_attributor_<database>), and `source setup` prints it.

CREATE TABLE IF NOT EXISTS audit.attached_contexts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target      xid8 NOT NULL,
    context     jsonb NOT NULL,
    attached_by name NOT NULL DEFAULT session_user,
    attached_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE audit.attached_contexts IS
    'audit-platform: contexts attached to committed transactions; written by audit.attach_context only';
REVOKE ALL ON audit.attached_contexts FROM PUBLIC;

-- The role that may attach: one per database (roles are shared by the whole server, and a
-- member of a shared one could attribute in every source database it can connect to).
CREATE OR REPLACE FUNCTION audit.attributor_role() RETURNS name
LANGUAGE sql STABLE AS $fn$
    SELECT ('audit_attributor_' || CASE WHEN length(current_database()) <= 46
                                        THEN current_database()
                                        ELSE left(current_database(), 37) || '_'
                                             || left(md5(current_database()), 8) END)::name;
$fn$;

-- Context for a transaction that has already committed (a late arrival that capture's quarantine
-- resolves). It is recorded when the calling transaction commits.
CREATE OR REPLACE FUNCTION audit.attach_context(target xid8, ctx jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $fn$
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
    -- Stored as validated: a null field means an absent one (validate_context's rule), so a
    -- context padded with nulls is not larger here than the size it was checked at.
    INSERT INTO audit.attached_contexts (target, context) VALUES (target, jsonb_strip_nulls(ctx));
END
$fn$;

REVOKE EXECUTE ON FUNCTION audit.attach_context(xid8, jsonb) FROM PUBLIC;
DO $do$
DECLARE
    attributor name := audit.attributor_role();
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = attributor) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', attributor);
    END IF;
    EXECUTE format('COMMENT ON ROLE %I IS %L', attributor,
                   'audit-platform: may attach a context to a committed transaction of database '
                   || current_database() || ' (audit.attach_context)');
    EXECUTE format('GRANT EXECUTE ON FUNCTION audit.attach_context(xid8, jsonb) TO %I', attributor);
END
$do$;

-- 2. Contexts without pg_logical_emit_message for everyone.
--
-- Any role may call pg_logical_emit_message by default, and one message of up to 1 GB costs the
-- capture process about three times its size in memory while the driver reads it. `source
-- setup` revokes it from PUBLIC where it can (as a superuser: it is a system function), so
-- set_context now runs as its owner to emit the context for whoever calls it. The transaction,
-- and so the rollback of the context with it, is still the caller's. Cost: about 2 us per call
-- more (SET search_path on a SECURITY DEFINER function), on a transaction that commits.
CREATE OR REPLACE FUNCTION audit.set_context(ctx jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- The check is an inlined expression, not a query: no cost beyond evaluating it.
    IF audit.context_is_valid(ctx) IS NOT TRUE THEN
        PERFORM audit.explain_invalid_context(ctx);
        -- Accepted only once its nulls are gone (a null field means an absent one): emit it
        -- so, or a context padded with nulls would be larger than the size it was checked at.
        ctx := jsonb_strip_nulls(ctx);
    END IF;
    PERFORM pg_logical_emit_message(true, 'audit_platform.context.v1', ctx::text);
END
$fn$;
