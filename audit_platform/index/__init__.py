"""Indexing: the template, records as documents, bulk writes, per-batch indexing,
reconciliation with staging, and retention."""
