-- audit-platform, source database schema, migration 004: snapshots of existing rows
-- (docs/design.md, "Snapshots").
--
-- A snapshot records every existing row of a tracked table once, as a record of its own
-- (operation "snapshot"), so an object's history and its state at a time cover rows that were
-- never changed since the source joined. It reads the table in chunks by primary key, each chunk
-- in one short transaction that
--   1. locks the chunk's rows FOR SHARE (a writer of one of them waits for the chunk's commit,
--      milliseconds, so no change of a row can commit between the chunk's read and its commit:
--      the chunk's records sit at its commit position, after every earlier change of its rows
--      and before every later one; a new row the chunk missed has its own insert record),
--   2. writes the rows, as PostgreSQL's text output of each value (what pgoutput sends), into
--      one row of audit.snapshot_chunks, which capture reads from the slot like any insert and
--      applies the policy to; the row is deleted again in the same transaction,
--   3. moves the snapshot's progress (audit.snapshot_progress) past the chunk.
-- Progress commits with the chunk, so a snapshot stopped at any point resumes from its last
-- committed chunk and records every row exactly once. No transaction stays open longer than a
-- chunk (a long one would hold back vacuum on the source).
--
-- Only the role that owns the audit schema (the one `source setup` runs as) writes these tables:
-- a role with CONNECT cannot forge a snapshot record or move a snapshot's progress.

CREATE TABLE IF NOT EXISTS audit.snapshot_chunks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot_id text NOT NULL,
    table_name  text NOT NULL,           -- schema.table, as the policy names it
    columns     jsonb NOT NULL,          -- the table's columns, in order
    types       jsonb NOT NULL,          -- format_type of each column
    key         jsonb NOT NULL,          -- the primary key's columns
    rows        jsonb NOT NULL           -- an array of arrays of text (or null), as columns
);
COMMENT ON TABLE audit.snapshot_chunks IS
    'audit-platform: snapshot chunks in transit to capture (each row is deleted as it is written)';
REVOKE ALL ON audit.snapshot_chunks FROM PUBLIC;

CREATE TABLE IF NOT EXISTS audit.snapshot_progress (
    snapshot_id text NOT NULL,
    table_name  text NOT NULL,
    last_key    text[],                  -- the last chunk's last key, as text; null: not begun
    rows        bigint NOT NULL DEFAULT 0,
    chunks      integer NOT NULL DEFAULT 0,
    done        boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (snapshot_id, table_name)
);
COMMENT ON TABLE audit.snapshot_progress IS
    'audit-platform: how far each snapshot has read each table (committed with its chunks)';
REVOKE ALL ON audit.snapshot_progress FROM PUBLIC;
