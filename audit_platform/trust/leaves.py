"""What a leaf of the trail's Merkle log covers, and its canonical bytes.

Three kinds of leaf, each a fact captured from the source's WAL and never rewritten:

- ``change``: one change as its record holds it: identity (id, env, source, commit LSN, xid,
  change index, commit time), where (schema, table, object id, key and column types), what
  (operation, changed columns, the row before and after as the tracking policy recorded them),
  the policy version, and how many changes its transaction had (captured and ignored).
- ``context``: the context a transaction recorded for itself (several ``set_context`` calls
  merged), keyed by its commit LSN and xid. A record with ``attribution.status = attributed``
  carries exactly this context. Where its source declares the actor's fields personal
  (``context_personal``), the leaf holds their commitments and the declaration
  (``trust.commitments``), as ``attach`` leaves do.
- ``attach``: a context attached to an earlier transaction by a later one
  (``audit.attach_context``), with the time it committed. A record that becomes ``late`` carries
  the last such context, and its lag is that time minus its own commit time.

- ``rejected``: a message a transaction emitted under the platform's prefix that is not a valid
  context (``capture.messages``): where it was, its prefix, size and why it was refused. It
  covers no record; it makes the refusal itself a fact nobody can remove unseen.

So the later facts that change a record (a late context, ``unattributed`` becoming ``late``) are
leaves of their own, appended when they are captured; no leaf is ever rewritten. What a leaf does
not cover is derived from what it does (the record's ``user``, ``service``, ``trace``, ``client``,
``event``, ``values_text``, ``transaction.lsn``) and is checked by deriving it again; only
``ingested_at`` and ``source.database`` (settings of the deployment) and
``source.server_version`` (what the source's server reported; a leaf's keys never change, or the
leaves written before it would stop verifying) are outside the trail.

Canonical bytes: the leaf as a JSON object serialized per RFC 8785 (JCS). Every value in a leaf
is a string, null, an array or an object (numbers are written as strings), so JCS is Python's
``json.dumps(leaf, ensure_ascii=False, separators=(",", ":"), sort_keys=True)`` encoded as UTF-8;
keys sort by code point, which is JCS's UTF-16 order for every key without characters beyond
U+FFFF. The leaf hash is RFC 6962's: SHA-256 of ``0x00`` followed by those bytes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import orjson
import polars as pl

from audit_platform.lsn import lsn_text, parse_lsn
from audit_platform.staging.schemas import with_context_spec
from audit_platform.trust.commitments import (
    Commitments,
    attach_ref,
    context_ref,
    context_shape,
)
from audit_platform.trust.jcs import canonical
from audit_platform.trust.merkle import leaf_hash

VERSION = "1"
#: The order of a transaction's leaves; an ``erasure`` leaf follows the last leaf of the log
#: when it is appended (``erasure``).
KINDS = ("context", "attach", "rejected", "change", "erasure")

#: One row per leaf in the log's files.
LEAF_SCHEMA = pl.Schema(
    {
        "position": pl.Int64(),
        "kind": pl.String(),
        "lsn": pl.Int64(),  # commit LSN of the transaction the fact was captured in
        "seq": pl.Int32(),  # change index, or the context's sequence in its transaction
        "xid": pl.Int64(),  # the transaction; for ``attach``, the transaction it attaches to
        "time": pl.Datetime("us", "UTC"),  # that transaction's commit time
        "record_id": pl.String(),  # ``change`` only
        "hash": pl.Binary(),
    }
)


def moment(value: datetime) -> str:
    """A commit time as leaves write it: UTC, microseconds, ``Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def change_leaf(
    *,
    record_id: str,
    env: str,
    source: str,
    lsn: int,
    xid: int,
    change_index: int,
    time: datetime,
    schema: str,
    table: str,
    operation: str,
    key: list[str],
    types: dict[str, str],
    object_id: str | None,
    changed: list[str] | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    policy_version: str,
    txn_changes: int | None,
    txn_ignored: int | None,
    organization: str | None = None,
    personal: dict[str, Any] | None = None,
    commitments: Commitments | None = None,
) -> dict[str, Any]:
    """``personal`` (the record's ``row.personal``) puts commitments in place of its values,
    from ``commitments`` (docs/design.md, "Erasure")."""
    if personal is not None:
        before, after = (commitments or Commitments()).seal(record_id, personal, (before, after))
    leaf = {
        "v": VERSION,
        "kind": "change",
        "id": record_id,
        "env": env,
        "source": source,
        "commit_lsn": lsn_text(lsn),
        "xid": str(xid),
        "index": str(change_index),
        "time": moment(time),
        "schema": schema,
        "table": table,
        "op": operation,
        "key": key,
        "types": types,
        "object_id": object_id,
        "changed": changed,
        "before": before,
        "after": after,
        "policy": policy_version,
        "txn_changes": _text(txn_changes),
        "txn_ignored": _text(txn_ignored),
    }
    return _with_optional(leaf, organization, personal)


def _with_optional(
    leaf: dict[str, Any], organization: str | None, personal: dict[str, Any] | None
) -> dict[str, Any]:
    """The row's organization (its policy's column) and its personal declaration are committed
    where there are some, and only there, so every leaf written before either existed keeps
    its bytes."""
    if organization is not None:
        leaf["org"] = organization
    if personal is not None:
        leaf["personal"] = personal
    return leaf


def context_leaf(
    *,
    env: str,
    source: str,
    lsn: int,
    xid: int,
    time: datetime,
    context: dict[str, Any] | None,
    personal: dict[str, Any] | None = None,
    commitments: Commitments | None = None,
) -> dict[str, Any]:
    """``personal`` (the record's ``context_personal``) puts commitments in place of the
    actor's personal fields, from ``commitments``, and is committed itself."""
    leaf = {
        "v": VERSION,
        "kind": "context",
        "env": env,
        "source": source,
        "commit_lsn": lsn_text(lsn),
        "xid": str(xid),
        "time": moment(time),
        "context": context,
    }
    return _sealed_context(leaf, personal, commitments)


def attach_leaf(
    *,
    env: str,
    source: str,
    target_xid: int,
    time: datetime,
    context: dict[str, Any] | None,
    personal: dict[str, Any] | None = None,
    commitments: Commitments | None = None,
) -> dict[str, Any]:
    leaf = {
        "v": VERSION,
        "kind": "attach",
        "env": env,
        "source": source,
        "xid": str(target_xid),
        "time": moment(time),
        "context": context,
    }
    return _sealed_context(leaf, personal, commitments)


def context_name(leaf: dict[str, Any]) -> str:
    """A context or attach leaf's name among commitments (``context_ref``, ``attach_ref``)."""
    if leaf["kind"] == "context":
        return context_ref(leaf["source"], leaf["commit_lsn"])
    return attach_ref(leaf["source"], leaf["xid"], leaf["time"])


def _sealed_context(
    leaf: dict[str, Any], personal: dict[str, Any] | None, commitments: Commitments | None
) -> dict[str, Any]:
    """A context leaf with the actor's personal fields committed, and the declaration, where
    there is one (only there: leaves written before it keep their bytes)."""
    if personal is not None:
        leaf["context"] = (commitments or Commitments()).seal_context(
            context_name(leaf), personal, leaf["context"]
        )
        leaf["personal"] = personal
    return leaf


def rejected_leaf(
    *, env: str, source: str, lsn: int, xid: int, seq: int, time: datetime, detail: dict[str, Any]
) -> dict[str, Any]:
    return {
        "v": VERSION,
        "kind": "rejected",
        "env": env,
        "source": source,
        "commit_lsn": lsn_text(lsn),
        "xid": str(xid),
        "seq": str(seq),
        "time": moment(time),
        "prefix": detail["prefix"],
        "bytes": str(detail["bytes"]),
        "reason": detail["reason"],
    }


def erasure_leaf(
    *,
    env: str,
    source: str,
    request: int,
    subject: str,
    reason: str,
    requested_by: str,
    approved_by: str | None,
    time: datetime,
    text: str,
    records: dict[str, dict[str, dict[str, str]]],
    contexts: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """An erasure of one person's values in one source: who asked, who approved (null: the
    waiting period passed), why, when, the text the values now read, and per record the
    commitment of each value replaced (``trust.commitments``), by side and column; and, where
    the person acted, per context leaf (``context_ref``, ``attach_ref``) by field."""
    leaf: dict[str, Any] = {
        "v": VERSION,
        "kind": "erasure",
        "env": env,
        "source": source,
        "request": str(request),
        "subject": subject,
        "reason": reason,
        "requested_by": requested_by,
        "approved_by": approved_by,
        "time": moment(time),
        "text": text,
        "records": records,
    }
    if contexts:  # only where there are some: the leaves of erasures before keep their bytes
        leaf["contexts"] = contexts
    return leaf


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def record_leaves(records: pl.DataFrame, commitments: Commitments | None = None) -> pl.DataFrame:
    """A ``change`` leaf for each record of a records frame (``RECORD_SCHEMA``): the leaf
    :func:`change_leaf` gives, with the scalar fields rendered by polars for the whole frame
    and the repeated JSON texts (keys, types, changed columns) parsed once each. Records with
    personal values need their subjects' keys in ``commitments``."""
    commitments = commitments or Commitments()
    text = pl.col("lsn")
    rendered = records.select(
        "id",
        "env",
        "source",
        pl.format(
            "{}/{}",
            (text // 2**32).map_elements(_hex, return_dtype=pl.String),
            (text % 2**32).map_elements(_hex, return_dtype=pl.String),
        ),
        pl.col("xid").cast(pl.String),
        pl.col("change_index").cast(pl.String),
        pl.col("commit_time").dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%dT%H:%M:%S.%6fZ"),
        "schema",
        "table",
        "operation",
        "key_columns",
        "column_types",
        "object_id",
        "changed_columns",
        "before",
        "after",
        "policy_version",
        pl.col("txn_changes").cast(pl.String),
        pl.col("txn_ignored").cast(pl.String),
        pl.col("row_organization")
        if "row_organization" in records.columns
        else pl.lit(None, pl.String).alias("row_organization"),
        pl.col("personal")
        if "personal" in records.columns
        else pl.lit(None, pl.String).alias("personal"),
    )
    hashes = []
    for (
        rid,
        env,
        source,
        lsn,
        xid,
        index,
        time,
        schema,
        table,
        op,
        key,
        types,
        oid,
        changed,
        before,
        after,
        policy,
        txn_changes,
        txn_ignored,
        organization,
        personal_text,
    ) in rendered.iter_rows():
        before_image, after_image = _loads(before), _loads(after)
        personal = None
        if personal_text is not None:
            personal = orjson.loads(personal_text)
            before_image, after_image = commitments.seal(rid, personal, (before_image, after_image))
        leaf = {
            "v": VERSION,
            "kind": "change",
            "id": rid,
            "env": env,
            "source": source,
            "commit_lsn": lsn,
            "xid": xid,
            "index": index,
            "time": time,
            "schema": schema,
            "table": table,
            "op": op,
            "key": _parsed(key) or [],
            "types": _parsed(types) or {},
            "object_id": oid,
            "changed": _parsed(changed),
            "before": before_image,
            "after": after_image,
            "policy": policy,
            "txn_changes": txn_changes,
            "txn_ignored": txn_ignored,
        }
        hashes.append(leaf_hash(canonical(_with_optional(leaf, organization, personal))))
    return _frame(
        records.select(
            pl.lit("change").alias("kind"),
            pl.col("lsn"),
            pl.col("change_index").alias("seq"),
            pl.col("xid"),
            pl.col("commit_time").alias("time"),
            pl.col("id").alias("record_id"),
        ),
        hashes,
    )


def _hex(value: int) -> str:
    return f"{value:X}"


@lru_cache(maxsize=4096)
def _parsed(text: str | None) -> Any:
    """A JSON text that repeats across records (a table's key and types, changed columns),
    parsed once. Callers must not change what it returns."""
    return None if text is None else orjson.loads(text)


def context_leaves(
    own: pl.DataFrame, env: str, commitments: Commitments | None = None
) -> pl.DataFrame:
    """A ``context`` leaf per transaction of ``own`` (source, lsn, xid, commit_time, merged
    context, and ``context_spec`` where staged), in its order. Contexts whose actor a
    declaration names need the actor's key in ``commitments``."""
    specs = own["context_spec"].to_list() if "context_spec" in own.columns else [None] * own.height
    rows = own.select("source", "lsn", "xid", "commit_time", "context").iter_rows()
    hashes = [
        leaf_hash(
            canonical(
                context_leaf(
                    env=env,
                    source=source,
                    lsn=lsn,
                    xid=xid,
                    time=time,
                    context=json.loads(text),
                    personal=None if spec is None else _loads(context_shape(spec, text)),
                    commitments=commitments,
                )
            )
        )
        for (source, lsn, xid, time, text), spec in zip(rows, specs, strict=True)
    ]
    return _frame(
        own.select(
            pl.lit("context").alias("kind"),
            "lsn",
            pl.lit(-1, pl.Int32).alias("seq"),
            "xid",
            pl.col("commit_time").alias("time"),
            pl.lit(None, pl.String).alias("record_id"),
        ),
        hashes,
    )


def attach_leaves(
    contexts: pl.DataFrame, env: str, source: str, commitments: Commitments | None = None
) -> pl.DataFrame:
    """An ``attach`` leaf per context attached to an earlier transaction."""
    attached = with_context_spec(contexts).filter(pl.col("kind") == "attach")
    if attached.is_empty():  # the usual batch: no frames to build (a live run's fixed cost)
        return pl.DataFrame(schema=LEAF_SCHEMA)
    hashes = [
        leaf_hash(
            canonical(
                attach_leaf(
                    env=env,
                    source=source,
                    target_xid=target,
                    time=time,
                    context=json.loads(text),
                    personal=None if spec is None else _loads(context_shape(spec, text)),
                    commitments=commitments,
                )
            )
        )
        for target, time, text, spec in attached.select(
            "target_xid", "commit_time", "context", "personal_spec"
        ).iter_rows()
    ]
    return _frame(
        attached.select(
            pl.lit("attach").alias("kind"),
            "lsn",
            "seq",
            pl.col("target_xid").alias("xid"),
            pl.col("commit_time").alias("time"),
            pl.lit(None, pl.String).alias("record_id"),
        ),
        hashes,
    )


def rejected_leaves(contexts: pl.DataFrame, env: str, source: str) -> pl.DataFrame:
    """A ``rejected`` leaf per refused message (``enrich.rejections``)."""
    rejected = contexts.filter(pl.col("kind") == "rejected")
    if rejected.is_empty():
        return pl.DataFrame(schema=LEAF_SCHEMA)
    rows = rejected.select("lsn", "xid", "seq", "commit_time", "context").iter_rows()
    hashes = [
        leaf_hash(
            canonical(
                rejected_leaf(
                    env=env,
                    source=source,
                    lsn=lsn,
                    xid=xid,
                    seq=seq,
                    time=time,
                    detail=orjson.loads(text),
                )
            )
        )
        for lsn, xid, seq, time, text in rows
    ]
    return _frame(
        rejected.select(
            pl.lit("rejected").alias("kind"),
            "lsn",
            "seq",
            "xid",
            pl.col("commit_time").alias("time"),
            pl.lit(None, pl.String).alias("record_id"),
        ),
        hashes,
    )


def _frame(meta: pl.DataFrame, hashes: list[bytes]) -> pl.DataFrame:
    return (
        meta.with_columns(
            pl.lit(None, pl.Int64).alias("position"), pl.Series("hash", hashes, dtype=pl.Binary)
        )
        .select(list(LEAF_SCHEMA))
        .cast(LEAF_SCHEMA)
    )


def kind_rank() -> pl.Expr:
    """A leaf's place within its transaction: its context, attachments, then changes."""
    return pl.col("kind").replace_strict(
        {k: i for i, k in enumerate(KINDS)}, default=len(KINDS), return_dtype=pl.Int8
    )


def in_log_order(leaves: pl.DataFrame) -> pl.DataFrame:
    """Commit order: by commit LSN, then within a transaction by :func:`kind_rank` and seq."""
    return leaves.sort(pl.col("lsn"), kind_rank(), pl.col("seq"))


# --- the same leaves, from an Elasticsearch document ------------------------------------


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def document_leaves(
    doc_id: str,
    doc: dict[str, Any],
    commitments: Commitments | None = None,
    *,
    context: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """(kind, leaf) of what a stored document claims: its change, and the context it carries
    (none when it says ``unattributed``, or without ``context``); personal values committed
    with ``commitments``."""
    txn, table = doc["transaction"], doc["table"]
    env, source = doc["env"], doc["source"]["service"]
    time = _time(doc["@timestamp"])
    row = doc.get("row") or {}
    # Each field as the document holds it, a missing one as null (its changed columns, its
    # context): a document that lost one gives a leaf the log does not hold, which verification
    # reports, rather than an error here.
    leaves = [
        (
            "change",
            change_leaf(
                record_id=doc_id,
                env=env,
                source=source,
                lsn=parse_lsn(txn["commit_lsn"]),
                xid=txn["xid"],
                change_index=txn["change_index"],
                time=time,
                schema=table["schema"],
                table=table["name"],
                operation=doc["operation"],
                key=row.get("key") or [],
                types=row.get("types") or {},
                object_id=doc.get("object_id"),
                changed=doc.get("changed_columns"),
                before=doc.get("before"),
                after=doc.get("after"),
                policy_version=doc["policy_version"],
                txn_changes=txn.get("changes"),
                txn_ignored=txn.get("ignored"),
                organization=row.get("organization"),
                personal=row.get("personal"),
                commitments=commitments,
            ),
        )
    ]
    if not context:
        return leaves
    attribution = doc.get("attribution") or {}
    status, carried = attribution.get("status"), doc.get("context")
    if status == "attributed":
        leaves.append(
            (
                "context",
                context_leaf(
                    env=env,
                    source=source,
                    lsn=parse_lsn(txn["commit_lsn"]),
                    xid=txn["xid"],
                    time=time,
                    context=carried,
                    personal=doc.get("context_personal"),
                    commitments=commitments,
                ),
            )
        )
    elif status == "late":
        lag = timedelta(seconds=attribution.get("lag_seconds") or 0)
        leaves.append(
            (
                "attach",
                attach_leaf(
                    env=env,
                    source=source,
                    target_xid=txn["xid"],
                    time=time + lag,
                    context=carried,
                    personal=doc.get("context_personal"),
                    commitments=commitments,
                ),
            )
        )
    return leaves
