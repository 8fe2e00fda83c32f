"""Enrichment: changes joined with their transaction's context into audit records (``join``),
per staged batch or hour (``batch``), with orphans waiting in the ``quarantine``."""
