-- Removes what migration 001 and later installed. `audit-platform source teardown --all` runs it
-- only after every environment's slot and publication on this database are gone. The event
-- triggers first (setup creates them, see migration 003): they are the database's, not the
-- schema's, and would otherwise fire on the schema's own drop.
DROP EVENT TRIGGER IF EXISTS audit_schema_changes;
DROP EVENT TRIGGER IF EXISTS audit_table_drops;
DROP SCHEMA IF EXISTS audit CASCADE;
