"""Erasing a person's values from the trail, verifiably (docs/design.md, "Erasure")."""
