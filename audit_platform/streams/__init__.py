"""Streams: records delivered to a webhook or a bucket as they are indexed (docs/design.md,
"Streams")."""
