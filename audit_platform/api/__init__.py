"""The Audit API: FastAPI wiring of :mod:`audit_platform.query` (``audit-platform api serve``)."""
