-- Migration 008: logical messages with the platform's prefix that capture refused.
-- A role on a source database can emit any message (docs/design.md, invariant 10). One that is
-- not a valid context is never allowed to stop capture or to attribute anything; it becomes a
-- row here (and a leaf of the trail), so an investigator sees who tried what, and when, instead
-- of a silent skip. The message's content is never kept: only its size and why it was refused.
CREATE TABLE IF NOT EXISTS audit_platform.rejected_messages (
    env         text        NOT NULL,
    source      text        NOT NULL,
    lsn         bigint      NOT NULL,  -- commit LSN of the transaction that emitted it
    seq         integer     NOT NULL,  -- its place among that transaction's messages
    xid         bigint      NOT NULL,
    committed_at timestamptz NOT NULL,
    prefix      text        NOT NULL,
    bytes       bigint      NOT NULL,
    reason      text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (env, source, lsn, seq)
);

CREATE INDEX IF NOT EXISTS rejected_messages_recent
    ON audit_platform.rejected_messages (env, committed_at);
