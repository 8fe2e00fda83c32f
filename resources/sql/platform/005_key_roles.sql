-- Migration 005: a role per API key. reader: audit records (every key before this migration);
-- auditor: also the read log, inclusion and consistency proofs and checkpoints; admin: also
-- legal holds and keys.
ALTER TABLE audit_platform.api_keys
    ADD COLUMN IF NOT EXISTS role text NOT NULL DEFAULT 'reader'
    CHECK (role IN ('reader', 'auditor', 'admin'));
