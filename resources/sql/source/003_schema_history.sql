-- audit-platform, source database schema, migration 003: schema changes are changes
-- (docs/design.md, "Schema history").
--
-- A column added, retyped, renamed or dropped, a table created, renamed or dropped, a primary key
-- or replica identity changed: an auditor asks about these as about any row change, and a rename
-- of a tracked table would otherwise make capture stop matching its policy without a word.
--
-- Two event triggers (created by `source setup`, which needs a superuser for them: on Amazon RDS
-- and Cloud SQL the provider's superuser role, rds_superuser or cloudsqlsuperuser) call the
-- functions below at the end of each DDL command. They compare each table the command touched
-- with the shape last seen (audit.table_shapes) and, where it differs, insert a row into
-- audit.schema_changes in the DDL's own transaction. Capture reads those inserts from the slot
-- (setup adds the table to every environment's publication), so a schema change arrives in commit
-- order, with the context its transaction recorded, and disappears with a rollback.
--
-- A row of audit.schema_changes is there only to carry the change through the WAL: the function
-- deletes it again in the same transaction (capture reads the insert and ignores the delete), so
-- the table stays empty however many tables a busy migration tool, or a role with CREATE on some
-- schema, creates and drops. audit.table_shapes holds a row per existing table.
--
-- Only the triggers' functions write the two tables (they run as their owner; nobody else is
-- granted anything on them), so a role with CONNECT cannot forge or hide a schema change, and a
-- function returning event_trigger cannot be called directly. The statement's text is not kept:
-- it may carry values (CREATE TABLE AS, defaults) and be of any size; the shape before and after
-- says what changed.

CREATE TABLE IF NOT EXISTS audit.table_shapes (
    relid oid PRIMARY KEY,
    shape jsonb NOT NULL
);
COMMENT ON TABLE audit.table_shapes IS
    'audit-platform: the last shape seen of each table, to tell what a DDL command changed';
REVOKE ALL ON audit.table_shapes FROM PUBLIC;

CREATE TABLE IF NOT EXISTS audit.schema_changes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid      oid NOT NULL,
    command    text NOT NULL,
    -- Whether an audit publication carries the table: only then can a rename out of a policy
    -- stop capture (a table of someone else's with a tracked name has nothing to lose).
    published  boolean NOT NULL DEFAULT false,
    before     jsonb,
    after      jsonb,
    changed_by name NOT NULL DEFAULT session_user,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE audit.schema_changes IS
    'audit-platform: schema changes of tables, written by the audit event triggers only';
REVOKE ALL ON audit.schema_changes FROM PUBLIC;

-- A table's shape: its name, columns (type, and "not null" where it is), primary key and replica
-- identity. NULL for anything that is not a user table: indexes, sequences, views, temporary
-- tables, the catalogs and the audit schema itself.
CREATE OR REPLACE FUNCTION audit.table_shape(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT jsonb_build_object(
        'schema', n.nspname,
        'table', c.relname,
        'columns', (
            SELECT coalesce(jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod)
                                            || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END),
                            '{}')
            FROM pg_attribute a
            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
        'primary_key', (
            SELECT coalesce(jsonb_agg(a.attname ORDER BY k.ord), '[]')
            FROM pg_constraint con
            CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
            WHERE con.conrelid = c.oid AND con.contype = 'p'),
        'replica_identity', CASE c.relreplident WHEN 'f' THEN 'full' WHEN 'd' THEN 'default'
                                                WHEN 'n' THEN 'nothing' ELSE 'index' END,
        'logged', c.relpersistence = 'p')
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
      AND n.nspname <> 'audit' AND n.nspname <> 'information_schema'
      AND n.nspname NOT LIKE 'pg\_%';
$fn$;

-- Every user table's shape as it is now: what the first change of each is compared with. Setup
-- runs it; tables already known keep the shape last recorded.
CREATE OR REPLACE FUNCTION audit.baseline_table_shapes() RETURNS integer
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
    WITH added AS (
        INSERT INTO audit.table_shapes (relid, shape)
        SELECT c.oid, audit.table_shape(c.oid) FROM pg_class c
        WHERE c.relkind IN ('r', 'p') AND audit.table_shape(c.oid) IS NOT NULL
        ON CONFLICT (relid) DO NOTHING
        RETURNING 1)
    SELECT count(*)::integer FROM added;
$fn$;

-- At the end of a DDL command: each table it touched whose shape changed gets a row. A failure
-- here must not fail the service's migration (an event trigger that raises blocks every DDL in
-- the database): it becomes a warning the migration tool shows, and `source check` then finds
-- the shapes out of date.
CREATE OR REPLACE FUNCTION audit.record_schema_change() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    rel oid;
    tag text;
    old jsonb;
    new jsonb;
    carried bigint;
BEGIN
    FOR rel, tag IN
        SELECT d.objid, min(d.command_tag) FROM pg_event_trigger_ddl_commands() d
        WHERE d.classid = 'pg_catalog.pg_class'::regclass AND NOT d.in_extension
        GROUP BY d.objid
        UNION  -- a schema renamed renames each of its tables
        SELECT c.oid, 'ALTER SCHEMA' FROM pg_event_trigger_ddl_commands() d
        JOIN pg_class c ON c.relnamespace = d.objid
        WHERE d.classid = 'pg_catalog.pg_namespace'::regclass AND c.relkind IN ('r', 'p')
        ORDER BY 1
    LOOP
        BEGIN
            new := audit.table_shape(rel);
            CONTINUE WHEN new IS NULL;
            SELECT s.shape INTO old FROM audit.table_shapes s WHERE s.relid = rel;
            CONTINUE WHEN old IS NOT DISTINCT FROM new;
            INSERT INTO audit.schema_changes (relid, command, published, before, after)
            VALUES (rel, tag,
                    EXISTS (SELECT FROM pg_publication_rel pr
                            JOIN pg_publication p ON p.oid = pr.prpubid
                            WHERE pr.prrelid = rel AND p.pubname LIKE 'audit\_%'),
                    old, new)
            RETURNING id INTO carried;
            DELETE FROM audit.schema_changes WHERE id = carried;
            INSERT INTO audit.table_shapes (relid, shape) VALUES (rel, new)
            ON CONFLICT (relid) DO UPDATE SET shape = excluded.shape;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'audit-platform could not record a schema change of table %: % (%)',
                rel, SQLERRM, SQLSTATE;
        END;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION audit.record_table_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    dropped record;
    old jsonb;
    carried bigint;
BEGIN
    FOR dropped IN
        SELECT o.objid, o.schema_name, o.object_name FROM pg_event_trigger_dropped_objects() o
        WHERE o.classid = 'pg_catalog.pg_class'::regclass AND o.objsubid = 0
          AND o.object_type = 'table' AND NOT o.is_temporary
          AND o.schema_name <> 'audit'
    LOOP
        BEGIN
            DELETE FROM audit.table_shapes s WHERE s.relid = dropped.objid RETURNING s.shape
            INTO old;
            INSERT INTO audit.schema_changes (relid, command, before, after)
            VALUES (dropped.objid, 'DROP TABLE',
                    coalesce(old, jsonb_build_object('schema', dropped.schema_name,
                                                     'table', dropped.object_name)),
                    NULL)
            RETURNING id INTO carried;
            DELETE FROM audit.schema_changes WHERE id = carried;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'audit-platform could not record the drop of table %.%: % (%)',
                dropped.schema_name, dropped.object_name, SQLERRM, SQLSTATE;
        END;
    END LOOP;
END
$fn$;
