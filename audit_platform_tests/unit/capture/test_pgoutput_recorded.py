"""The pgoutput decoder on bytes PostgreSQL wrote (``data/pgoutput_session.json``, recorded by
``record_pgoutput.py`` from the session it lists): every column type the session writes comes
out as the type's own text, as the server printed it; the unchanged-TOAST marker, a rolled-back
transaction, a foreign and a non-transactional message, a table outside the publication and a
truncate are what PostgreSQL really sends. No server: the expectations come from the session's
SQL, not from the decoder."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from audit_platform.capture.pgoutput import ChangeBatch, Masker, PgOutputDecoder
from audit_platform_tests.helpers import policy_for
from audit_platform_tests.unit.capture.record_pgoutput import CONTEXT

SESSION = json.loads((Path(__file__).parent / "data" / "pgoutput_session.json").read_text())
MESSAGES = [bytes.fromhex(m) for m in SESSION["messages"]]
TYPES = {int(oid): name for oid, name in SESSION["types"].items()}
BIG = "".join(hashlib.md5(str(i).encode()).hexdigest() for i in range(1, 401))
ROW_1 = {
    "id": "1",
    "amount": "12345678901234567890.125",
    "ratio": "0.5",
    "active": "t",
    "note": 'quote \' and "double", line\nbreak, tab\t, unicode Zoë ✓',
    "doc": '{"a": null, "b": [1, 2]}',  # jsonb's own order and spacing
    "tags": "{1,NULL,3}",
    "at": "2026-12-01 10:00:00.123456+00",
    "day": "2026-12-01",
    "raw": "\\x00ff10",
    "ref": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "big": BIG,
}
ROW_2 = {column: None for column in ROW_1} | {"id": "2", "ratio": "NaN"}


def decoder() -> PgOutputDecoder:
    return PgOutputDecoder(
        policy_for("rec", public__kinds={}),
        Masker(b"key"),
        lambda oids: {oid: TYPES[oid] for oid in oids if oid in TYPES},
        lambda schema, table: SESSION["primary_keys"][f"{schema}.{table}"],
    )


def changes(batch: ChangeBatch) -> list[dict]:
    return [
        {
            "operation": batch.operation[i],
            "table": f"{batch.schema[i]}.{batch.table[i]}",
            "xid": batch.xid[i],
            "index": batch.change_index[i],
            "keys": json.loads(batch.key_columns[i]),
            "before": json.loads(batch.before[i]) if batch.before[i] else None,
            "after": json.loads(batch.after[i]) if batch.after[i] else None,
            "unchanged": batch.unchanged_toast[i],
        }
        for i in range(len(batch.lsn))
    ]


def contexts(batch: ChangeBatch) -> list[tuple]:
    return list(
        zip(
            batch.ctx_lsn,
            batch.ctx_xid,
            batch.ctx_seq,
            batch.ctx_kind,
            batch.ctx_context,
            strict=True,
        )
    )


def commits() -> list[tuple[int, int]]:
    """(commit LSN, end LSN) of each Commit message, read here from the protocol's layout."""
    return [struct.unpack_from("!QQ", m, 2) for m in MESSAGES if m[:1] == b"C"]


def tuple_kinds(message: bytes) -> list[list[str]]:
    """The kind byte of every column of each TupleData of an Update message."""
    found, pos = [], 5
    while pos < len(message):
        pos += 1  # O, K or N
        (count,) = struct.unpack_from("!h", message, pos)
        pos += 2
        kinds = []
        for _ in range(count):
            kinds.append(chr(message[pos]))
            pos += 1
            if kinds[-1] in "tb":
                (length,) = struct.unpack_from("!i", message, pos)
                pos += 4 + length
        found.append(kinds)
    return found


def test_each_type_comes_out_as_postgresql_printed_it():
    batch = decoder().decode(MESSAGES, ChangeBatch())
    found = changes(batch)
    assert [c["operation"] for c in found] == ["insert", "update", "insert", "delete", "truncate"]
    assert {c["table"] for c in found} == {"public.kinds"}  # `other` is not published
    insert = found[0]
    assert insert["after"] == ROW_1 and insert["before"] is None
    assert insert["keys"] == ["id"]
    assert json.loads(batch.column_types[0]) == {
        "id": "bigint",
        "amount": "numeric",
        "ratio": "double precision",
        "active": "boolean",
        "note": "text",
        "doc": "jsonb",
        "tags": "integer[]",
        "at": "timestamp with time zone",
        "day": "date",
        "raw": "bytea",
        "ref": "uuid",
        "big": "text",
    }


def test_the_rolled_back_transaction_and_foreign_messages_leave_nothing():
    batch = decoder().decode(MESSAGES, ChangeBatch())
    assert batch.transactions == 4  # the rolled-back one never reached the slot
    assert "99" not in {c["after"]["id"] for c in changes(batch) if c["after"]}
    # One context: the transactional one with our prefix. The foreign prefix and the
    # non-transactional message with ours are skipped unread, not rejected.
    assert batch.ctx_kind == ["context"]
    assert json.loads(batch.ctx_context[0]) == CONTEXT
    assert batch.ctx_xid == [batch.xid[0]] and batch.ctx_seq == [0]
    assert sum(1 for m in MESSAGES if m[:1] == b"M") == 3


def test_an_unchanged_toasted_value_is_taken_from_the_before_image():
    update_message = next(m for m in MESSAGES if m[:1] == b"U")
    old, new = tuple_kinds(update_message)
    assert "u" not in old and new[-1] == "u"  # PostgreSQL did not send `big` again
    update = changes(decoder().decode(MESSAGES, ChangeBatch()))[1]
    assert update["before"] == ROW_1
    assert update["after"] == ROW_1 | {"amount": "12345678901234567891.125", "note": None}
    assert update["unchanged"] is None  # complete after-image: nothing left unknown


def test_a_delete_carries_the_row_and_a_truncate_names_the_table():
    found = changes(decoder().decode(MESSAGES, ChangeBatch()))
    insert, delete, truncate = found[2], found[3], found[4]
    assert insert["after"] == ROW_2
    assert delete["before"] == ROW_2 and delete["after"] is None
    assert (insert["xid"], insert["index"]) == (delete["xid"], 0) and delete["index"] == 1
    assert truncate["before"] is None and truncate["after"] is None


def test_positions_are_the_commits_postgresql_wrote():
    batch = decoder().decode(MESSAGES, ChangeBatch())
    (first, _), *_, (last, end) = commits()
    assert (batch.first_lsn, batch.last_lsn, batch.end_lsn) == (first, last, end)
    by_xid = dict(zip(batch.xid, batch.lsn, strict=True))
    assert sorted(set(by_xid.values())) == [lsn for lsn, _ in commits()]


@pytest.mark.parametrize("cut", range(1, len(MESSAGES)))
def test_a_batch_cut_anywhere_loses_and_repeats_nothing(cut):
    """The stream is read in batches: an unfinished transaction at a batch's end is left out,
    and the next batch starts again at its Begin (the slot was confirmed to the last commit)."""
    once = decoder().decode(MESSAGES, ChangeBatch())
    whole = changes(once)
    reader = decoder()
    first = reader.decode(MESSAGES[:cut], ChangeBatch())
    last_commit = max((i for i in range(cut) if MESSAGES[i][:1] == b"C"), default=-1)
    begins = (i for i in range(last_commit + 1, len(MESSAGES)) if MESSAGES[i][:1] == b"B")
    restart = next(begins, len(MESSAGES))
    rest = reader.decode(MESSAGES[restart:], ChangeBatch())
    assert changes(first) + changes(rest) == whole
    assert contexts(first) + contexts(rest) == contexts(once)
    assert first.transactions + rest.transactions == once.transactions
