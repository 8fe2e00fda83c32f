-- audit-platform, source database schema, migration 005: what a snapshot was limited to, and
-- where in the WAL it began (docs/design.md, "Snapshots").
--
-- condition: the snapshot's WHERE, as capture.row_filter checked and wrote it out; a resumed
-- snapshot reads with the condition it began with, never another.
-- started_lsn: the WAL position when the snapshot began a table. Every chunk commits after it,
-- so a gap that ends at or before it (a replaced slot's lost range) is re-baselined by the
-- snapshot once every tracked table is done.

ALTER TABLE audit.snapshot_progress ADD COLUMN IF NOT EXISTS condition text;
-- Null for a snapshot begun before this migration: where it began is not known, so it
-- re-baselines no gap (the column's default applies to snapshots begun from now on).
ALTER TABLE audit.snapshot_progress ADD COLUMN IF NOT EXISTS started_lsn pg_lsn;
ALTER TABLE audit.snapshot_progress ALTER COLUMN started_lsn SET DEFAULT pg_current_wal_lsn();
