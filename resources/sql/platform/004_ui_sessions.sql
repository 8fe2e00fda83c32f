-- Migration 004: sessions of the Audit Explorer (the web UI under /ui).
-- A session is opened by signing in with an API key and reads with that key's scope. The browser
-- holds a random 256-bit token; only its SHA-256 digest is stored, so a copy of this table opens
-- no session. Each lookup joins the key, so revoking a key ends its sessions at once, and
-- deleting a key deletes them.

CREATE TABLE IF NOT EXISTS audit_platform.ui_sessions (
    token_sha256 bytea       PRIMARY KEY,
    key_id       text        NOT NULL REFERENCES audit_platform.api_keys (key_id) ON DELETE CASCADE,
    env          text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

CREATE INDEX IF NOT EXISTS ui_sessions_expiry ON audit_platform.ui_sessions (expires_at);
