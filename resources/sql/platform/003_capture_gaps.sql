-- Migration 003: ranges of a source's WAL that capture could not read, as explicit facts.
-- A slot PostgreSQL invalidated (wal_status = lost) or one dropped outside audit-platform loses
-- the changes between its last confirmed position and the position where a new slot starts.
-- They are recorded here when the slot is replaced, never skipped silently; the API serves them.
CREATE TABLE IF NOT EXISTS audit_platform.capture_gaps (
    env              text        NOT NULL,
    source           text        NOT NULL,
    -- Everything committed at or before from_lsn was captured; everything after to_lsn will be.
    from_lsn         bigint      NOT NULL,
    to_lsn           bigint      NOT NULL CHECK (to_lsn >= from_lsn),
    -- Commit time of the last change captured before the gap, when staging still holds it.
    last_captured_at timestamptz,
    detected_at      timestamptz NOT NULL DEFAULT now(),
    reason           text        NOT NULL,
    PRIMARY KEY (env, source, from_lsn)
);
