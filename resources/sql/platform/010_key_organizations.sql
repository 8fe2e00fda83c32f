-- Migration 010: an API key (and so the Explorer sessions signed in with it) can be limited to
-- organizations, the tenants records name as organization.id (docs/design.md, "Organizations").
-- NULL: every organization, and records that name none; every key before this migration.
ALTER TABLE audit_platform.api_keys ADD COLUMN IF NOT EXISTS organizations text[];
