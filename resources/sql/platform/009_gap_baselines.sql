-- Migration 009: the snapshot that re-established a source's state after a gap
-- (docs/design.md, "Snapshots"). A gap says which changes were never captured; a snapshot of
-- every tracked table begun after the gap's end records each row as it then was, so the
-- trail's view of the source is whole again from that snapshot on. The gap keeps its range
-- (what was lost stays lost) and names the snapshot that re-baselined it.
ALTER TABLE audit_platform.capture_gaps ADD COLUMN IF NOT EXISTS rebaselined_by text;
ALTER TABLE audit_platform.capture_gaps ADD COLUMN IF NOT EXISTS rebaselined_at timestamptz;
