"""The staged datasets' columns, declared once, with staging (capture writes them, enrichment
reads them; neither imports the other).

``commit_time_us`` is how capture decodes a commit time; staged files hold ``commit_time`` (UTC)
instead, plus ``env``, ``source`` and, for changes, ``policy_version``, ``server_version``
(the source's ``server_version_num``) and ``organization_column`` (the column the policy in force
at capture names as the row's organization) and ``personal_spec`` (its personal columns and
whose they are); contexts likewise ``personal_spec`` (the policy's ``context_personal``); files
staged before those were kept lack them. ``erased_changed`` is written by an erasure only
(docs/design.md, "Erasure").
"""

from __future__ import annotations

import polars as pl

DECODED_CHANGES = pl.Schema(
    {
        "lsn": pl.Int64(),
        "xid": pl.Int64(),
        "commit_time_us": pl.Int64(),
        "change_index": pl.Int32(),
        "operation": pl.String(),
        "schema": pl.String(),
        "table": pl.String(),
        "key_columns": pl.String(),  # JSON array of column names
        "before": pl.String(),
        "after": pl.String(),
        "unchanged_toast": pl.String(),  # JSON array, or null when every value was sent
        "column_types": pl.String(),
    }
)
DECODED_CONTEXTS = pl.Schema(
    {
        "lsn": pl.Int64(),
        "xid": pl.Int64(),
        "commit_time_us": pl.Int64(),
        "seq": pl.Int32(),
        "kind": pl.String(),
        "target_xid": pl.Int64(),
        "context": pl.String(),
    }
)
_STAGED_EXTRA = pl.Schema(
    {"commit_time": pl.Datetime("us", "UTC"), "env": pl.String(), "source": pl.String()}
)

#: Columns of ``changes`` that files staged by an earlier version lack (read as null); any other
#: column missing is an error.
STAGED_LATER = ("server_version", "organization_column", "personal_spec", "erased_changed")

STAGED_SCHEMAS: dict[str, pl.Schema] = {
    "changes": pl.Schema(
        {
            **{k: v for k, v in DECODED_CHANGES.items() if k != "commit_time_us"},
            **_STAGED_EXTRA,
            "policy_version": pl.String(),
            "server_version": pl.Int32(),
            "organization_column": pl.String(),
            "personal_spec": pl.String(),  # JSON: PersonalData.spec
            # JSON array: the columns the change changed, kept by an erasure that replaced its
            # values (which then no longer tell), null otherwise.
            "erased_changed": pl.String(),
        }
    ),
    "contexts": pl.Schema(
        {
            **{k: v for k, v in DECODED_CONTEXTS.items() if k != "commit_time_us"},
            **_STAGED_EXTRA,
            "personal_spec": pl.String(),  # JSON: ContextPersonalData.spec
        }
    ),
}


def with_context_spec(contexts: pl.DataFrame) -> pl.DataFrame:
    """Staged contexts with their ``personal_spec`` (null in files staged before it was)."""
    if "personal_spec" in contexts.columns:
        return contexts
    return contexts.with_columns(pl.lit(None, pl.String).alias("personal_spec"))
