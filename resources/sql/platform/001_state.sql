-- audit-platform's own state, in the platform's PostgreSQL database (AUDIT_PG_URL), migration 001.
-- Why here and not in staged files: the quarantine is updated entry by entry (attempts, next
-- retry, release) and queried by due time from a sensor, which is what a database is for;
-- staged files stay immutable. Rows name changes by (env, source, commit LSN, change index):
-- the change itself stays in staging, already filtered and masked by the policy.

CREATE SCHEMA IF NOT EXISTS audit_platform;

CREATE TABLE IF NOT EXISTS audit_platform.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS audit_platform.quarantine (
    env            text        NOT NULL,
    source         text        NOT NULL,
    commit_lsn     bigint      NOT NULL,
    change_index   integer     NOT NULL,
    xid            bigint      NOT NULL,
    commit_time    timestamptz NOT NULL,
    first_seen     timestamptz NOT NULL,
    attempts       integer     NOT NULL DEFAULT 1,
    next_retry_at  timestamptz NOT NULL,
    -- waiting: no context yet, within the grace window; released: indexed as unattributed;
    -- resolved: a context arrived and the record carries it.
    status         text        NOT NULL DEFAULT 'waiting'
                   CHECK (status IN ('waiting', 'released', 'resolved')),
    settled_at     timestamptz,
    PRIMARY KEY (env, source, commit_lsn, change_index)
);
CREATE INDEX IF NOT EXISTS quarantine_due
    ON audit_platform.quarantine (env, source, next_retry_at) WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS quarantine_xid
    ON audit_platform.quarantine (env, source, xid) WHERE status <> 'resolved';

-- Contexts attached to already committed transactions (audit.attach_context), as capture saw
-- them, so that the changes they name can be re-joined whichever hour they are in.
CREATE TABLE IF NOT EXISTS audit_platform.late_contexts (
    env          text        NOT NULL,
    source       text        NOT NULL,
    target_xid   bigint      NOT NULL,
    lsn          bigint      NOT NULL,
    context      text        NOT NULL,
    attached_at  timestamptz NOT NULL,
    PRIMARY KEY (env, source, target_xid, lsn)
);
