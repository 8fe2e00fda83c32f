-- audit-platform, source database schema, migration 006: a snapshot belongs to the environment
-- it was taken for (docs/design.md, "Snapshots").
--
-- Environments are isolated (docs/design.md, invariant 6), yet every environment's publication
-- on a database carries audit.snapshot_chunks: a snapshot one environment took was recorded by
-- every environment capturing the database, unasked, and unpaced by their pipelines. A chunk
-- now names its snapshot's environment, and other environments' captures skip it.
--
-- Null: a snapshot begun before this migration, or by a tool that names no environment; its
-- chunks are recorded by every environment, as before, and it resumes that way.

ALTER TABLE audit.snapshot_progress ADD COLUMN IF NOT EXISTS env text;
ALTER TABLE audit.snapshot_chunks ADD COLUMN IF NOT EXISTS env text;
