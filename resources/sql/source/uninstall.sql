-- Removes what migration 001 and later installed. `audit-platform source teardown --all` runs it
-- only after every environment's slot and publication on this database are gone.
DROP SCHEMA IF EXISTS audit CASCADE;
