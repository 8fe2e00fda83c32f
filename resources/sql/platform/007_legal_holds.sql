-- Migration 007: legal holds. While a hold is active, retention deletes nothing it covers:
-- records (their indices), staged hours, or the trail (never pruned anyway).
CREATE TABLE IF NOT EXISTS audit_platform.legal_holds (
    id          bigserial   PRIMARY KEY,
    env         text        NOT NULL,
    source      text        NOT NULL,
    schema_name text,
    table_name  text,
    object_id   text,
    reason      text        NOT NULL CHECK (reason <> ''),
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    released_at timestamptz,
    released_by text,
    CHECK (object_id IS NULL OR table_name IS NOT NULL)
);

CREATE INDEX IF NOT EXISTS legal_holds_active ON audit_platform.legal_holds (env, source)
    WHERE released_at IS NULL;
