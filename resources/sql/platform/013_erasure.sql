-- Migration 013: erasure (docs/design.md, "Erasure").
-- One key per person of an environment: the salts of their values' commitments derive from it.
-- Never copied to the staging root or Elasticsearch; an erasure deletes it.
CREATE TABLE IF NOT EXISTS audit_platform.subject_keys (
    env        text        NOT NULL,
    subject    text        NOT NULL,  -- schema.table:id
    key        bytea       NOT NULL CHECK (length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (env, subject)
);

-- Requests to erase a person, kept whatever became of them: who asked, why, who approved,
-- when it ran.
CREATE TABLE IF NOT EXISTS audit_platform.erasure_requests (
    id           bigserial   PRIMARY KEY,
    env          text        NOT NULL,
    subject      text        NOT NULL,
    reason       text        NOT NULL CHECK (reason <> ''),
    requested_by text        NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    not_before   timestamptz NOT NULL,  -- the waiting period's end
    approved_by  text,
    approved_at  timestamptz,
    started_at   timestamptz,  -- the erasure's own time, written once (its leaf's "time")
    done_at      timestamptz,
    cancelled_at timestamptz,
    cancelled_by text,
    records      integer,
    CHECK (approved_by IS NULL OR approved_by <> requested_by)
);
CREATE INDEX IF NOT EXISTS erasure_requests_open ON audit_platform.erasure_requests (env)
    WHERE done_at IS NULL AND cancelled_at IS NULL;
