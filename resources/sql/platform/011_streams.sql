-- Migration 011: streams, which deliver records to a webhook or a bucket as they are indexed
-- (docs/design.md, "Streams").

-- What each indexing did, source by source and in the order it did it: one row per ledger
-- entry whose documents are in. Deliveries read it in that order. An entry is known by what it
-- indexes (a digest of its records files and ids), not by its name: a re-indexing after a crash
-- (documents in, entry not yet off the ledger), or a recovery that writes the same batch's
-- entry again under another name, adds nothing.
CREATE TABLE IF NOT EXISTS audit_platform.stream_feed (
    seq         bigserial   PRIMARY KEY,
    env         text        NOT NULL,
    source      text        NOT NULL,
    entry       text        NOT NULL,
    contents    bytea       NOT NULL,
    records     text[]      NOT NULL,
    ids         text[],
    indexed_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (env, source, contents)
);
CREATE INDEX IF NOT EXISTS stream_feed_next ON audit_platform.stream_feed (env, source, seq);

CREATE TABLE IF NOT EXISTS audit_platform.streams (
    id            bigserial   PRIMARY KEY,
    env           text        NOT NULL,
    name          text        NOT NULL CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    kind          text        NOT NULL CHECK (kind IN ('webhook', 'bucket')),
    target        text        NOT NULL,
    -- The webhook's Standard Webhooks secret (whsec_...): the platform signs with it, so it
    -- is kept, as the signing key is; never shown again after creation.
    secret        text,
    filter        text        NOT NULL DEFAULT '',
    organizations text[],
    -- Records of feed entries after this one: what was indexed once the stream existed.
    start_seq     bigint      NOT NULL,
    created_by    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz,
    deleted_by    text,
    CHECK (kind <> 'webhook' OR secret IS NOT NULL)
);
CREATE UNIQUE INDEX IF NOT EXISTS streams_live_name
    ON audit_platform.streams (env, name) WHERE deleted_at IS NULL;

-- Per stream and source: where the next message starts (a feed entry, and the position, commit
-- LSN and change index, of the last record of it passed; none: its first), and while that
-- message fails, its attempts and when the next one is due.
CREATE TABLE IF NOT EXISTS audit_platform.stream_cursors (
    stream          bigint      NOT NULL REFERENCES audit_platform.streams (id),
    source          text        NOT NULL,
    seq             bigint      NOT NULL,
    after_lsn       bigint,
    after_change    integer,
    attempts        integer     NOT NULL DEFAULT 0,
    failing_since   timestamptz,
    next_attempt_at timestamptz,
    last_error      text,
    delivered       bigint      NOT NULL DEFAULT 0,
    delivered_at    timestamptz,
    PRIMARY KEY (stream, source)
);

-- Messages a receiver refused as such (400, 413, 415, 422) after the bound of attempts: what
-- they held, and why.
CREATE TABLE IF NOT EXISTS audit_platform.stream_dead_letters (
    stream        bigint      NOT NULL REFERENCES audit_platform.streams (id),
    message_id    text        NOT NULL,
    source        text        NOT NULL,
    seq           bigint      NOT NULL,
    record_ids    text[]      NOT NULL,
    attempts      integer     NOT NULL,
    failing_since timestamptz NOT NULL,
    last_error    text        NOT NULL,
    dead_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, message_id)
);
