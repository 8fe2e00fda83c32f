-- Migration 013: erasure (docs/design.md, "Erasure").
-- One key per person of an environment: the salts of their values' commitments derive from it.
-- Never copied to the staging root or Elasticsearch; an erasure deletes it.
-- Keyed by the name's hash: a person's id is the source's data, of any length a writer chose,
-- and a btree entry holds at most about 2.7 kB.
CREATE TABLE IF NOT EXISTS audit_platform.subject_keys (
    env          text        NOT NULL,
    subject      text        NOT NULL,  -- schema.table:id
    subject_hash bytea       NOT NULL,  -- SHA-256 of the name's UTF-8 (trust.commitments)
    key          bytea       NOT NULL CHECK (length(key) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (env, subject_hash)
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
    -- The person's key was deleted, and the plans below are final: later changes of the person
    -- get a new key and are not this erasure's.
    key_retired_at timestamptz,
    done_at      timestamptz,
    cancelled_at timestamptz,
    cancelled_by text,
    records      integer,
    CHECK (approved_by IS NULL OR approved_by <> requested_by)
);
CREATE INDEX IF NOT EXISTS erasure_requests_open ON audit_platform.erasure_requests (env)
    WHERE done_at IS NULL AND cancelled_at IS NULL;

-- The erasure leaf each source's plan became, by hash: the file kept beside the log is checked
-- against it before it is appended or acted on.
CREATE TABLE IF NOT EXISTS audit_platform.erasure_leaves (
    request bigint NOT NULL REFERENCES audit_platform.erasure_requests (id),
    source  text   NOT NULL,
    hash    bytea  NOT NULL,
    PRIMARY KEY (request, source)
);
