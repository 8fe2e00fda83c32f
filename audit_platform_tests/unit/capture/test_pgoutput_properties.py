"""The pgoutput decoder over generated streams (Hypothesis): PostgreSQL frames the messages, but
everything inside them (values, message prefixes and contents) is written by roles on the
source, so no content may make the decoder raise, drop a change, or let a foreign or malformed
message through as a context (docs/design.md, invariant 10). No server: pure bytes."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit_platform.capture.messages import ATTACH_PREFIX, CONTEXT_PREFIX
from audit_platform.capture.pgoutput import ChangeBatch, Masker, PgOutputDecoder
from audit_platform_tests.helpers import policy_for

COLUMNS = ["id", "note", "secret"]
OURS = (CONTEXT_PREFIX.encode(), ATTACH_PREFIX.encode())
HEADS = {"insert": b"I", "update": b"U", "delete": b"D"}
POLICY = policy_for("p", public__t={"mask": ["secret"]})


def _cstring(text: bytes) -> bytes:
    return text + b"\0"


def relation(relid: int, name: bytes) -> bytes:
    body = struct.pack("!i", relid) + _cstring(b"public") + _cstring(name) + b"f"
    body += struct.pack("!h", len(COLUMNS))
    for column in COLUMNS:
        body += b"\x01" + _cstring(column.encode()) + struct.pack("!ii", 25, -1)
    return b"R" + body


def tuple_data(values: list[bytes | None]) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += b"n" if value is None else b"t" + struct.pack("!i", len(value)) + value
    return body


def message(transactional: bool, prefix: bytes, content: bytes) -> bytes:
    return (
        b"M"
        + bytes([transactional])
        + struct.pack("!q", 0)
        + _cstring(prefix)
        + struct.pack("!i", len(content))
        + content
    )


values = st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=40).map(str.encode))
rows = st.lists(values, min_size=len(COLUMNS), max_size=len(COLUMNS))
valid_context = st.fixed_dictionaries(
    {
        "actor": st.fixed_dictionaries(
            {"type": st.sampled_from(["user", "job"]), "id": st.text(min_size=1, max_size=20)}
        )
    },
    optional={
        "reason": st.text(max_size=30),
        "attributes": st.dictionaries(
            st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.none())
        ),
    },
).map(lambda c: json.dumps(c, indent=1).encode())
messages = st.tuples(
    st.booleans(),
    st.one_of(
        st.sampled_from([CONTEXT_PREFIX.encode(), ATTACH_PREFIX.encode()]),
        st.binary(max_size=30).filter(lambda b: 0 not in b),
    ),
    st.one_of(valid_context, st.binary(max_size=200), st.text(max_size=50).map(str.encode)),
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from([1, 2]), rows),
        st.tuples(st.just("update"), st.sampled_from([1, 2]), st.tuples(rows, rows)),
        st.tuples(st.just("delete"), st.sampled_from([1, 2]), rows),
        st.tuples(st.just("message"), st.just(0), messages),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions=st.lists(events, min_size=1, max_size=4))
def test_any_content_decodes_without_error_and_only_valid_contexts_pass(transactions):
    decoder = PgOutputDecoder(POLICY, Masker(b"k"), lambda oids: {25: "text"}, lambda s, t: ["id"])
    stream = [relation(1, b"t"), relation(2, b"untracked")]
    tracked = ours = 0
    lsn = 1000
    for xid, transaction in enumerate(transactions, start=1):
        lsn += 100
        stream.append(b"B" + struct.pack("!qqi", lsn, 0, xid))
        for kind, relid, payload in transaction:
            head = HEADS.get(kind, b"")
            if kind == "insert":
                stream.append(head + struct.pack("!i", relid) + b"N" + tuple_data(payload))
            elif kind == "update":
                before, after = payload
                stream.append(
                    head
                    + struct.pack("!i", relid)
                    + b"O"
                    + tuple_data(before)
                    + b"N"
                    + tuple_data(after)
                )
            elif kind == "delete":
                stream.append(head + struct.pack("!i", relid) + b"O" + tuple_data(payload))
            else:
                transactional, prefix, content = payload
                stream.append(message(transactional, prefix, content))
                ours += transactional and prefix in OURS
            tracked += kind != "message" and relid == 1
        stream.append(b"C" + struct.pack("!bqqq", 0, lsn, lsn + 10, 0))

    batch = decoder.decode(stream, ChangeBatch())

    assert len(batch) == tracked
    assert len(batch.ctx_kind) == ours  # one context or one rejection per message of ours
    for kind, text in zip(batch.ctx_kind, batch.ctx_context, strict=True):
        assert kind in ("context", "rejected")
        assert "\n" not in text and "\r" not in text
        parsed = json.loads(text)
        if kind == "rejected":
            assert parsed["prefix"] in (CONTEXT_PREFIX, ATTACH_PREFIX)
        else:
            assert parsed["actor"]["id"]
    for image in (*batch.before, *batch.after):
        assert image is None or isinstance(json.loads(image), dict)
    for after in batch.after:
        if after is not None and json.loads(after)["secret"] is not None:
            assert json.loads(after)["secret"].startswith("masked:")
