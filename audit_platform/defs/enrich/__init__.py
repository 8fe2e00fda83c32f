"""Enrichment wiring: the enriched hourly asset, its orphan-rate check, the quarantine."""
