"""Decoder for PostgreSQL's built-in ``pgoutput`` logical decoding protocol (version 1).

Values arrive in PostgreSQL's text output format, which is what we keep: it is the one form that
is exact for every type (numeric precision, ``infinity`` timestamps, NaN, ranges, arrays, enums,
domains). The decoder appends straight into a columnar :class:`ChangeBatch`, applying the column
policy on the way, because a per-change object graph would cost more than the decoding itself.

Message layouts: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from audit_platform.capture.messages import (
    ATTACHMENTS_TABLE,
    CONTEXT_PREFIX,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES_PER_TRANSACTION,
    OWN_PREFIXES,
    Rejection,
    parse_context,
    rejection_json,
)
from audit_platform.capture.schema_changes import SCHEMA_CHANGES_TABLE, schema_change
from audit_platform.capture.snapshot import SNAPSHOT_CHUNKS_TABLE
from audit_platform.policy import SourcePolicy, TablePolicy

_ATTACH_REFUSED = (
    "attach messages are not accepted: a late context comes only from audit.attach_context "
    "(source migration 002), which only the database's attributor role may call"
)
#: Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_US = 946_684_800_000_000

_BEGIN = struct.Struct("!qqI")
_COMMIT = struct.Struct("!bqqq")
_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")


class DecodeError(ValueError):
    """The stream is not what pgoutput version 1 sends (or a relation was never described)."""


@dataclass
class Relation:
    """A table as the stream last described it, with the policy's plan for its columns."""

    relid: int
    schema: str
    name: str
    columns: list[str]
    type_oids: list[int]
    key_flags: list[bool]
    #: Per column: None to drop it, False to keep it as is, True to mask it.
    plan: list[bool | None] = field(default_factory=list)
    key_columns: list[str] = field(default_factory=list)
    key_json: str = "[]"
    tracked: bool = True
    #: ``audit.attached_contexts``: its inserts are late contexts, not row changes.
    attachments: bool = False
    #: ``audit.schema_changes``: its inserts are tracked tables' schema changes.
    schema_changes: bool = False
    #: ``audit.snapshot_chunks``: its inserts are chunks of a snapshot's rows.
    snapshot_chunks: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class ChangeBatch:
    """Row changes and transaction contexts of complete transactions, column by column."""

    # changes
    lsn: list[int] = field(default_factory=list)
    xid: list[int] = field(default_factory=list)
    commit_time_us: list[int] = field(default_factory=list)
    change_index: list[int] = field(default_factory=list)
    operation: list[str] = field(default_factory=list)
    schema: list[str] = field(default_factory=list)
    table: list[str] = field(default_factory=list)
    key_columns: list[str] = field(default_factory=list)
    before: list[str | None] = field(default_factory=list)
    after: list[str | None] = field(default_factory=list)
    unchanged_toast: list[str | None] = field(default_factory=list)
    column_types: list[str] = field(default_factory=list)
    # contexts
    ctx_lsn: list[int] = field(default_factory=list)
    ctx_xid: list[int] = field(default_factory=list)
    ctx_commit_time_us: list[int] = field(default_factory=list)
    ctx_seq: list[int] = field(default_factory=list)
    ctx_kind: list[str] = field(default_factory=list)
    ctx_target_xid: list[int] = field(default_factory=list)
    ctx_context: list[str] = field(default_factory=list)
    # progress
    first_lsn: int | None = None
    last_lsn: int | None = None
    #: End LSN of the last complete transaction: the slot may be advanced to it once staged.
    end_lsn: int | None = None
    transactions: int = 0
    #: Set when the batch ends inside a transaction: its commit LSN and which part this is.
    open_txn_lsn: int | None = None
    open_txn_part: int = 0
    #: Tracked tables whose schema changed in this batch: what the change broke and how to fix
    #: it, or None where it broke nothing (``capture.schema_changes``), the latest per table.
    schema_problems: dict[str, str | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lsn)

    def truncate(self, changes: int, contexts: int) -> None:
        for name in (
            "lsn",
            "xid",
            "commit_time_us",
            "change_index",
            "operation",
            "schema",
            "table",
            "key_columns",
            "before",
            "after",
            "unchanged_toast",
            "column_types",
        ):
            del getattr(self, name)[changes:]
        for name in (
            "ctx_lsn",
            "ctx_xid",
            "ctx_commit_time_us",
            "ctx_seq",
            "ctx_kind",
            "ctx_target_xid",
            "ctx_context",
        ):
            del getattr(self, name)[contexts:]


class Masker:
    """Keyed hash for masked columns: equal values stay equal, the value itself is gone.

    BLAKE2b in keyed mode is a MAC in one C call, several times cheaper per value than HMAC.
    """

    def __init__(self, key: bytes) -> None:
        self._key = hashlib.blake2b(key, digest_size=32).digest()  # any length in, 32 bytes out

    def __call__(self, value: str) -> str:
        digest = hashlib.blake2b(value.encode(), key=self._key, digest_size=16).hexdigest()
        return f"masked:{digest}"


class PgOutputDecoder:
    """Stateful across batches (relations are described once per session of the stream)."""

    def __init__(
        self,
        policy: SourcePolicy,
        masker: Callable[[str], str],
        type_names: Callable[[list[int]], dict[int, str]],
        primary_key: Callable[[str, str], list[str]],
        env: str | None = None,
    ) -> None:
        self.policy = policy
        #: The environment whose capture this is: a snapshot taken for another is not its to
        #: record (None: a decoder of no environment's, which records every snapshot).
        self.env = env
        self.masker = masker
        self.type_names = type_names
        #: pgoutput flags the replica identity's columns, which under REPLICA IDENTITY FULL is
        #: every column; the object is identified by the primary key, asked of the source.
        self.primary_key = primary_key
        self.relations: dict[int, Relation] = {}
        self._types: dict[int, str] = {}
        self._relation_types: dict[int, str] = {}
        self._in_txn = False
        self._xid = 0
        self._final_lsn = 0
        self._commit_us = 0
        self._change_index = 0
        self._ctx_seq = 0
        self._unread = 0  # our messages past MAX_MESSAGES_PER_TRANSACTION, counted at commit
        self._txn_start = (0, 0)
        self._part = 0

    # -- public ------------------------------------------------------------------------------

    def decode(
        self, messages: Iterable[bytes], batch: ChangeBatch, *, complete: bool = True
    ) -> ChangeBatch:
        """Decode ``messages`` into ``batch``.

        With ``complete``, a trailing unfinished transaction is left out (it is read again next
        time). Without, the batch is one part of a transaction too large for one batch: its rows
        are kept, and decoding continues with the rest of that transaction on the next call.
        """
        if self._in_txn:
            self._txn_start = (0, 0)  # continuing a transaction cut at the previous batch
        dispatch = {
            66: self._begin,  # B
            67: self._commit,  # C
            82: self._relation,  # R
            73: self._insert,  # I
            85: self._update,  # U
            68: self._delete,  # D
            84: self._truncate,  # T
            77: self._message,  # M
            89: _ignore,  # Y: type names are looked up with format_type, one naming for all
            79: _ignore,  # O (origin)
        }
        for data in messages:
            handler = dispatch.get(data[0])
            if handler is None:
                raise DecodeError(f"unknown pgoutput message type {chr(data[0])!r}")
            handler(memoryview(data), batch)
        if self._in_txn and complete:
            batch.truncate(*self._txn_start)
            self._in_txn = False
        elif self._in_txn:
            batch.open_txn_lsn = self._final_lsn
            batch.open_txn_part = self._part
            self._part += 1
        return batch

    # -- transaction framing ------------------------------------------------------------------

    def _begin(self, data: memoryview, batch: ChangeBatch) -> None:
        self._final_lsn, commit_ts, self._xid = _BEGIN.unpack_from(data, 1)
        self._commit_us = commit_ts + PG_EPOCH_US
        self._in_txn = True
        self._part = 0
        self._change_index = 0
        self._ctx_seq = 0
        self._unread = 0
        self._txn_start = (len(batch.lsn), len(batch.ctx_lsn))

    def _commit(self, data: memoryview, batch: ChangeBatch) -> None:
        _, commit_lsn, end_lsn, _ = _COMMIT.unpack_from(data, 1)
        if self._unread:
            self._reject(
                batch,
                CONTEXT_PREFIX,
                0,
                f"{self._unread} more messages with the "
                f"platform's prefix in this transaction were not read (at most "
                f"{MAX_MESSAGES_PER_TRANSACTION} are)",
            )
            self._unread = 0
        self._in_txn = False
        batch.transactions += 1
        batch.end_lsn = end_lsn
        if batch.first_lsn is None:
            batch.first_lsn = commit_lsn
        batch.last_lsn = commit_lsn

    # -- schema -------------------------------------------------------------------------------

    def _relation(self, data: memoryview, _batch: ChangeBatch) -> None:
        (relid,) = _I32.unpack_from(data, 1)
        relid &= 0xFFFFFFFF
        pos = 5
        namespace, pos = _cstring(data, pos)
        name, pos = _cstring(data, pos)
        pos += 1  # replica identity setting
        (ncols,) = _I16.unpack_from(data, pos)
        pos += 2
        columns, oids, keys = [], [], []
        for _ in range(ncols):
            flags = data[pos]
            column, pos = _cstring(data, pos + 1)
            (oid,) = _I32.unpack_from(data, pos)
            pos += 8  # type oid, typmod
            columns.append(column)
            oids.append(oid & 0xFFFFFFFF)
            keys.append(bool(flags & 1))
        relation = Relation(relid, namespace or "pg_catalog", name, columns, oids, keys)
        self._plan(relation)
        self.relations[relid] = relation
        self._relation_types.pop(relid, None)

    def _plan(self, relation: Relation) -> None:
        if (relation.schema, relation.name) == ATTACHMENTS_TABLE:
            relation.tracked, relation.attachments = False, True
            relation.plan = [False] * len(relation.columns)
            return
        if (relation.schema, relation.name) == SCHEMA_CHANGES_TABLE:
            relation.tracked, relation.schema_changes = False, True
            relation.plan = [False] * len(relation.columns)
            return
        if (relation.schema, relation.name) == SNAPSHOT_CHUNKS_TABLE:
            relation.tracked, relation.snapshot_chunks = False, True
            relation.plan = [False] * len(relation.columns)
            return
        table_policy = self.policy.tables.get(relation.qualified)
        if table_policy is None:
            relation.tracked = False
            return
        relation.plan = [_column_plan(table_policy, c) for c in relation.columns]
        if table_policy.key:
            relation.key_columns = list(table_policy.key)
        else:
            relation.key_columns = self.primary_key(relation.schema, relation.name)
        relation.key_json = _json(relation.key_columns)

    def _column_types(self, relation: Relation) -> str:
        cached = self._relation_types.get(relation.relid)
        if cached is None:
            unknown = [oid for oid in relation.type_oids if oid not in self._types]
            if unknown:
                self._types.update(self.type_names(unknown))
            cached = json.dumps(
                {
                    column: self._types.get(oid, str(oid))
                    for column, oid, keep in zip(
                        relation.columns, relation.type_oids, relation.plan, strict=True
                    )
                    if keep is not None
                },
                separators=(",", ":"),
            )
            self._relation_types[relation.relid] = cached
        return cached

    # -- row changes --------------------------------------------------------------------------

    def _tuple(self, data: memoryview, pos: int, relation: Relation) -> tuple[dict, list, int]:
        """Read TupleData; returns (values by column, unchanged-toast columns, next position)."""
        (ncols,) = _I16.unpack_from(data, pos)
        pos += 2
        values: dict[str, str | None] = {}
        unchanged: list[str] = []
        plan, columns, masker = relation.plan, relation.columns, self.masker
        if ncols != len(columns):
            raise DecodeError(
                f"{relation.qualified}: tuple has {ncols} columns, relation has {len(columns)}"
            )
        for i in range(ncols):
            kind = data[pos]
            pos += 1
            if kind == 116:  # t: text
                (length,) = _I32.unpack_from(data, pos)
                pos += 4
                action = plan[i]
                if action is not None:
                    # A UTF8 database only sends valid UTF-8; one in SQL_ASCII may hold any
                    # bytes, which become U+FFFD rather than stop capture.
                    value = str(data[pos : pos + length], "utf-8", "replace")
                    values[columns[i]] = masker(value) if action else value
                pos += length
            elif kind == 110:  # n: null
                if plan[i] is not None:
                    values[columns[i]] = None
            elif kind == 117:  # u: unchanged TOASTed value, not sent
                if plan[i] is not None:
                    unchanged.append(columns[i])
            else:
                raise DecodeError(f"{relation.qualified}: unsupported tuple kind {chr(kind)!r}")
        return values, unchanged, pos

    def _tracked(self, data: memoryview) -> Relation | None:
        """The change's relation, or None (still counting the change) when it is not tracked."""
        (relid,) = _I32.unpack_from(data, 1)
        relation = self.relations.get(relid & 0xFFFFFFFF)
        if relation is None:
            raise DecodeError(f"change for relation {relid} before its Relation message")
        if relation.tracked:
            return relation
        if relation.attachments or relation.schema_changes or relation.snapshot_chunks:
            return relation if data[0] == 73 else None  # only inserts: they are append-only
        self._change_index += 1
        return None

    def _append(
        self,
        batch: ChangeBatch,
        relation: Relation,
        operation: str,
        before: dict | None,
        after: dict | None,
        unchanged: list[str],
    ) -> None:
        self._append_row(
            batch,
            relation.schema,
            relation.name,
            relation.key_json,
            self._column_types(relation),
            operation,
            before,
            after,
            unchanged,
        )

    def _append_row(
        self,
        batch: ChangeBatch,
        schema: str,
        table: str,
        key_json: str,
        types: str,
        operation: str,
        before: dict | None,
        after: dict | None,
        unchanged: list[str],
    ) -> None:
        batch.lsn.append(self._final_lsn)
        batch.xid.append(self._xid)
        batch.commit_time_us.append(self._commit_us)
        batch.change_index.append(self._change_index)
        self._change_index += 1
        batch.operation.append(operation)
        batch.schema.append(schema)
        batch.table.append(table)
        batch.key_columns.append(key_json)
        batch.before.append(None if before is None else _json(before))
        batch.after.append(None if after is None else _json(after))
        batch.unchanged_toast.append(_json(unchanged) if unchanged else None)
        batch.column_types.append(types)

    def _insert(self, data: memoryview, batch: ChangeBatch) -> None:
        relation = self._tracked(data)
        if relation is None:
            return
        if relation.attachments:
            self._attachment(data, relation, batch)
            return
        if relation.schema_changes:
            self._schema_change(data, relation, batch)
            return
        if relation.snapshot_chunks:
            self._snapshot_chunk(data, relation, batch)
            return
        after, unchanged, _ = self._tuple(data, 6, relation)
        self._append(batch, relation, "insert", None, after, unchanged)

    def _update(self, data: memoryview, batch: ChangeBatch) -> None:
        relation = self._tracked(data)
        if relation is None:
            return
        pos, before = 5, None
        if data[pos] in (75, 79):  # K (key only) or O (old tuple)
            before, _, pos = self._tuple(data, pos + 1, relation)
        after, unchanged, _ = self._tuple(data, pos + 1, relation)
        still_unchanged = []
        for column in unchanged:
            # An unchanged TOASTed value is not sent; the before-image (REPLICA IDENTITY FULL)
            # has it, so the after-image is complete and the column is not reported as changed.
            if before is not None and column in before:
                after[column] = before[column]
            else:
                still_unchanged.append(column)
        self._append(batch, relation, "update", before, after, still_unchanged)

    def _delete(self, data: memoryview, batch: ChangeBatch) -> None:
        relation = self._tracked(data)
        if relation is None:
            return
        before, unchanged, _ = self._tuple(data, 6, relation)
        self._append(batch, relation, "delete", before, None, unchanged)

    def _truncate(self, data: memoryview, batch: ChangeBatch) -> None:
        (count,) = _I32.unpack_from(data, 1)
        pos = 6
        for _ in range(count):
            (relid,) = _I32.unpack_from(data, pos)
            pos += 4
            relation = self.relations.get(relid & 0xFFFFFFFF)
            if relation is None:
                raise DecodeError(f"truncate of relation {relid} before its Relation message")
            if relation.tracked:
                self._append(batch, relation, "truncate", None, None, [])
            elif not relation.attachments:
                self._change_index += 1

    def _schema_change(self, data: memoryview, relation: Relation, batch: ChangeBatch) -> None:
        """A row the event triggers wrote: a table's shape before and after a DDL command."""
        row, _, _ = self._tuple(data, 6, relation)
        change = schema_change(row, self.policy, self.policy.source)
        if change is None:
            self._change_index += 1  # an untracked table's: counted like its row changes
            return
        self._append_row(
            batch, change.schema, change.table, "[]", "{}", "ddl", change.before, change.after, []
        )
        batch.schema_problems[change.qualified] = change.problem

    def _snapshot_chunk(self, data: memoryview, relation: Relation, batch: ChangeBatch) -> None:
        """A chunk of a snapshot's rows (``capture.snapshot``): each row a record of its own,
        the policy applied as to any row image. A snapshot taken for another environment is
        that environment's alone (every environment's publication on the database carries the
        chunks): skipped, like a table the policy no longer tracks."""
        row, _, _ = self._tuple(data, 6, relation)
        name = row.get("table_name") or ""
        table_policy = self.policy.tables.get(name)
        theirs = row.get("env") not in (None, self.env) and self.env is not None
        if table_policy is None or theirs:
            self._change_index += 1
            return
        columns = json.loads(row["columns"] or "[]")
        types = json.loads(row["types"] or "[]")
        plan = [_column_plan(table_policy, c) for c in columns]
        key = list(table_policy.key) if table_policy.key else json.loads(row["key"] or "[]")
        key_json = _json(key)
        types_json = json.dumps(
            {c: t for c, t, p in zip(columns, types, plan, strict=True) if p is not None},
            separators=(",", ":"),
        )
        schema, table = name.split(".", 1)
        masker = self.masker
        for values in json.loads(row["rows"] or "[]"):
            after = {
                c: (masker(v) if action and v is not None else v)
                for c, v, action in zip(columns, values, plan, strict=True)
                if action is not None
            }
            self._append_row(
                batch, schema, table, key_json, types_json, "snapshot", None, after, []
            )

    # -- contexts ---------------------------------------------------------------------------

    def _message(self, data: memoryview, batch: ChangeBatch) -> None:
        """A logical message: ours becomes a context or a recorded rejection; others are
        skipped before their content is looked at (docs/design.md, invariant 10)."""
        flags, raw = data[1], data.obj
        # The prefix is compared as bytes: someone else's need not even be UTF-8.
        end = raw.find(0, 10) if isinstance(raw, bytes | bytearray) else bytes(data).find(0, 10)
        prefix = bytes(data[10:end])
        if prefix not in OWN_PREFIXES or not flags & 1:
            # Someone else's message, or a non-transactional one, which belongs to no
            # transaction and so can attribute nothing.
            return
        if self._ctx_seq >= MAX_MESSAGES_PER_TRANSACTION:
            self._unread += 1
            return
        (length,) = _I32.unpack_from(data, end + 1)
        name = prefix.decode()
        try:
            if name != CONTEXT_PREFIX:
                raise Rejection(_ATTACH_REFUSED)
            if length > MAX_MESSAGE_BYTES:
                raise Rejection(f"message is {length} bytes; the limit is {MAX_MESSAGE_BYTES}")
            context = parse_context(data[end + 5 : end + 5 + length])
        except Rejection as exc:
            self._reject(batch, name, length, str(exc))
            return
        self._context(batch, "context", self._xid, context)

    def _attachment(self, data: memoryview, relation: Relation, batch: ChangeBatch) -> None:
        """A row ``audit.attach_context`` wrote: a context for an earlier transaction."""
        row, _, _ = self._tuple(data, 6, relation)
        try:
            target = int(row.get("target") or "")
            context = parse_context((row.get("context") or "").encode())
        except (ValueError, Rejection) as exc:
            self._reject(batch, "audit.attached_contexts", 0, f"unreadable attachment: {exc}")
            return
        self._context(batch, "attach", target & 0xFFFFFFFF, context)

    def _reject(self, batch: ChangeBatch, prefix: str, size: int, reason: str) -> None:
        self._context(batch, "rejected", self._xid, rejection_json(prefix, size, reason))

    def _context(self, batch: ChangeBatch, kind: str, target: int, text: str) -> None:
        batch.ctx_lsn.append(self._final_lsn)
        batch.ctx_xid.append(self._xid)
        batch.ctx_commit_time_us.append(self._commit_us)
        batch.ctx_seq.append(self._ctx_seq)
        self._ctx_seq += 1
        batch.ctx_kind.append(kind)
        batch.ctx_target_xid.append(target)
        batch.ctx_context.append(text)


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _cstring(data: memoryview, pos: int) -> tuple[str, int]:
    end = pos
    while data[end]:
        end += 1
    return str(data[pos:end], "utf-8", "replace"), end + 1


def _column_plan(policy: TablePolicy, column: str) -> bool | None:
    if not policy.keeps(column):
        return None
    return column in policy.mask


def _ignore(_data: memoryview, _batch: ChangeBatch) -> None:
    return None
