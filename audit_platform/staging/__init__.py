"""Staging: the immutable Parquet files every later stage reads, and the ledger of batches
that later stages have not finished yet."""

from audit_platform.staging.schemas import DECODED_CHANGES, DECODED_CONTEXTS, STAGED_SCHEMAS
from audit_platform.staging.store import (
    PendingBatch,
    StagedFile,
    StagingStore,
    hour_from_path,
    lsn_range,
)

__all__ = [
    "DECODED_CHANGES",
    "DECODED_CONTEXTS",
    "STAGED_SCHEMAS",
    "PendingBatch",
    "StagedFile",
    "StagingStore",
    "hour_from_path",
    "lsn_range",
]
