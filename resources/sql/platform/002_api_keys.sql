-- Migration 002: API keys of the Audit API.
-- Only a SHA-256 digest of each key's secret is stored. The secrets are 256-bit random values, so
-- a fast digest is safe here (a slow password hash protects low-entropy secrets, which these are
-- not) and keeps verification cheap on every request. A key belongs to one environment and may be
-- narrowed to sources and tables ('schema.table'); NULL means "all of this environment".

CREATE TABLE IF NOT EXISTS audit_platform.api_keys (
    key_id        text        PRIMARY KEY,
    env           text        NOT NULL,
    name          text        NOT NULL,
    secret_sha256 bytea       NOT NULL,
    sources       text[],
    tables        text[],
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE INDEX IF NOT EXISTS api_keys_env ON audit_platform.api_keys (env) WHERE revoked_at IS NULL;
