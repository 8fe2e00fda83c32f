-- Migration 014: the contexts' personal declaration (docs/design.md, "Erasure"), kept with each
-- late context as capture staged it, so the record it attributes commits the actor's personal
-- fields as the policy in force at capture said. Null: no declaration (or stored before this).
ALTER TABLE audit_platform.late_contexts ADD COLUMN IF NOT EXISTS personal_spec text;
