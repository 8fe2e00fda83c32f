-- Migration 006: the read log. Every request that returns audit records, counts or exports
-- (API and Explorer) leaves a row: who (key id), what (route and filters), how much, when.
-- Rows are appended in id order to the environment's read trail (a Merkle log under the
-- staging root, signed like the sources' trails), so a removed or edited row is detected.
CREATE TABLE IF NOT EXISTS audit_platform.read_log (
    id        bigserial   PRIMARY KEY,
    env       text        NOT NULL,
    at        timestamptz NOT NULL,
    key_id    text        NOT NULL,
    method    text        NOT NULL,
    route     text        NOT NULL,
    params    jsonb       NOT NULL,
    status    int         NOT NULL,
    returned  int
);

CREATE INDEX IF NOT EXISTS read_log_env_at ON audit_platform.read_log (env, at);
