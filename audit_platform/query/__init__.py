"""Answering questions from the audit indices: filters and scope, reads, exports (no FastAPI)."""
