-- Migration 012: Explorer sessions opened by single sign-on (docs/design.md, "Single sign-on").
-- Such a session stands for no API key: it holds the person (sso: and the identity provider's
-- subject) and the scope their groups gave at sign-in. A key's session still joins its key, so
-- revoking the key ends it; a person's sessions end at sign-out, expiry, or
-- `audit-platform ui revoke`.
ALTER TABLE audit_platform.ui_sessions ALTER COLUMN key_id DROP NOT NULL;
ALTER TABLE audit_platform.ui_sessions
    ADD COLUMN principal     text,
    ADD COLUMN display_name  text,
    ADD COLUMN role          text,
    ADD COLUMN sources       text[],
    ADD COLUMN tables        text[],
    ADD COLUMN organizations text[],
    ADD CONSTRAINT ui_sessions_key_or_person
        CHECK ((key_id IS NULL) = (principal IS NOT NULL) AND (principal IS NULL OR role IS NOT NULL));
CREATE INDEX IF NOT EXISTS ui_sessions_principal ON audit_platform.ui_sessions (env, principal)
    WHERE principal IS NOT NULL;
