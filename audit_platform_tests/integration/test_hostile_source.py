"""A role with nothing but CONNECT (and INSERT on one tracked table) attacks the audit from a
source database, through the real pipeline (PostgreSQL, capture, enrichment, the trail,
Elasticsearch): every kind of logical message, hostile values in every column type, forged late
contexts. Capture keeps going, nothing of anyone else's is lost or misattributed, every
refusal is recorded (docs/design.md, invariant 10). The trigger table is the ground truth."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.conninfo import make_conninfo

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.capture.messages import ATTACH_PREFIX, CONTEXT_PREFIX, MAX_MESSAGE_BYTES
from audit_platform.capture.slot import parked_name, parked_pid
from audit_platform.capture.snapshot import run_snapshot
from audit_platform.enrich.batch import enrich_pending, resolve_quarantine
from audit_platform.enrich.rejections import list_rejections
from audit_platform.index.batch import index_pending
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias, slot_name
from audit_platform.settings import ApiSettings, Settings
from audit_platform.signing import new_private_key, private_key
from audit_platform.sources.check import Level, check_source
from audit_platform.sources.setup import setup_source, teardown_source
from audit_platform.trust.log import TrustLog
from audit_platform.verify import Window, verify_source, waiting_changes
from audit_platform_tests.capture_support import make_source
from audit_platform_tests.helpers import (
    ZOO_DDL,
    ZOO_ROW,
    ground_truth,
    ground_truth_ddl,
    policy_for,
    record_tuple,
)

SQL = Settings().resources_dir / "sql"
SERVICE = {"actor": {"type": "service", "id": "billing"}, "request_id": "r-1"}
#: Text that tries to leave whatever it is rendered into: SQL comments and literals, psql
#: meta-commands, NDJSON lines, CSV formulas, HTML, templates.
HOSTILE = [
    "line\nbreak",
    "cr\r\nlf",
    "\\! echo PWNED",
    "*/ SELECT 1; /*",
    "$$; DROP TABLE zoo; $$",
    "'; DROP TABLE zoo; --",
    '=HYPERLINK("http://x","y")',
    "<script>alert(1)</script>",
    "{{7*7}} ${7*7}",
    "\u2028\u2029\ufeff\u200b",
    "🎉" * 1000,
]

VALID = json.dumps({"actor": {"type": "user", "id": "mallory"}})
#: (transactional, prefix, content, the rejection's reason, or None when it is not ours to
#: record: someone else's message, or a non-transactional one that attributes nothing)
MESSAGES: list[tuple[bool, str, bytes, str | None]] = [
    (True, "other.tool", b"\xff\xfe binary", None),
    (False, "other.tool", b"\xff", None),
    (True, "audit_platform.context.v2", b"\xff", None),
    (False, CONTEXT_PREFIX, VALID.encode(), None),
    (True, ATTACH_PREFIX, b"x", "attach messages are not accepted"),
    (True, CONTEXT_PREFIX, b"not json", "not JSON"),
    (True, CONTEXT_PREFIX, b"\xff\xfe", "not UTF-8"),
    (True, CONTEXT_PREFIX, b"[]", "must be a JSON object"),
    (True, CONTEXT_PREFIX, b'{"actor": {"type": "god", "id": "x"}}', "actor.type: enum"),
    (True, CONTEXT_PREFIX, b'{"actor": {"type": "user", "id": ""}}', "actor.id: string_too"),
    (True, CONTEXT_PREFIX, b'{"actor": {"type": "user", "id": "x"}, "x": 1}', "<unknown field>"),
    (True, CONTEXT_PREFIX, b'{"actor": {"type": "user", "id": "\\ud800"}}', "lone surrogate"),
    (True, CONTEXT_PREFIX, b'{"actor": {"type": "user", "id": "a\\u0000b"}}', "NUL"),
    (True, CONTEXT_PREFIX, b'{"actor": {"type": "user", "id": "x", "\\u0000": 1}}', "NUL"),
    (
        True,
        CONTEXT_PREFIX,
        b'{"actor": {"type": "user", "id": "x", "<img src=x>\\nINFO forged": 1}}',
        "actor.<unknown field>: extra_forbidden",
    ),
    (
        True,
        CONTEXT_PREFIX,
        b'{"actor": {"type": "user", "id": "x"}, "attributes": {"n": NaN}}',
        "not JSON",
    ),
    (
        True,
        CONTEXT_PREFIX,
        b'{"actor": {"type": "user", "id": "x"}, "attributes": {"n": 1e999}}',
        "beyond a double",
    ),
    (True, CONTEXT_PREFIX, b"{" * 100_000, "limit"),
    (True, CONTEXT_PREFIX, b" " * (64 * 1024 * 1024), "limit"),
]
#: Contexts audit.set_context accepts that a stricter reading would refuse: whoever fills such a
#: field (an end user's display name, a forwarded address) must not be able to make their own
#: writes unattributed.
ODD_BUT_VALID = [
    {"actor": {"type": "user", "id": "u", "name": "€" * 2000}},
    {"actor": {"type": "user", "id": "u"}, "client_addr": "01.02.03.04"},
    {"actor": {"type": "user", "id": "u"}, "client_addr": "10.1.2.3/24"},
    {"actor": {"type": "user", "id": "u"}, "attributes": {"n": 123456789012345678901234567890}},
    {"actor": {"type": "user", "id": "u"}, "attributes": {f"k{i}": None for i in range(2000)}},
]
#: How the record shows each of them where it differs: past 64 bits an integer's digits as a
#: string; fields set to null stripped, as set_context strips them when it had to explain.
EXPECTED_CONTEXT = {
    13: {"attributes": {"n": "123456789012345678901234567890"}},
    14: {"attributes": {}},
}
FLOOD = 300  # messages of ours in one transaction


def _as(url: str, role: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.hostname}:{parts.port}"))


@pytest.fixture
def attacked(pg_database, es, tmp_path):
    env = f"hostile_{uuid.uuid4().hex[:8]}"
    source = make_source(
        pg_database,
        tmp_path,
        ZOO_DDL + ground_truth_ddl("zoo"),
        policy_for("zoo", public__zoo={}),
        env,
    )
    database = urlsplit(pg_database).path.lstrip("/")
    intruder, attributor = f"intruder_{database}", f"attributor_{database}"
    with psycopg.connect(pg_database, autocommit=True) as admin:
        # The trigger writes the ground truth whoever writes the table.
        admin.execute("ALTER FUNCTION record_truth() SECURITY DEFINER")
        for role in (intruder, attributor):
            admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
        admin.execute(f"GRANT INSERT, UPDATE ON zoo TO {intruder}")
        # Setup revoked pg_logical_emit_message from PUBLIC (test below); where it cannot (not
        # a superuser), every role keeps it, which is the case these attacks are made in.
        admin.execute(
            f"GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text),"
            f" pg_logical_emit_message(boolean, text, bytea) TO {intruder}"
        )
        role = admin.execute("SELECT audit.attributor_role()").fetchone()[0]
        admin.execute(f'GRANT "{role}" TO {attributor}')
        platform_db.install(admin, Settings().resources_dir / "sql")
    install_template(es, Settings().resources_dir, env, replicas=0)
    yield source, _as(pg_database, intruder), _as(pg_database, attributor)
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.indices.delete_index_template(name=f"audit-{env}")
    with psycopg.connect(pg_database, autocommit=True) as admin:
        for role in (intruder, attributor):
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def _run(source, state, es, key) -> None:
    """One capture run as the deployment makes it, with no grace: orphans are released."""
    source.capture(batch_changes=7)
    now = datetime.now(UTC)
    enrich_pending(source.store, state, source.policy, now=now, grace=timedelta(0))
    resolve_quarantine(source.store, state, source.policy, now=now, grace=timedelta(0))
    hours = index_pending(es, source.store, database="zoo", now=now)
    assert not any(h.failed for h in hours), [h.metadata for h in hours]
    es.indices.refresh(index=read_alias(source.env))
    TrustLog(source.store).checkpoint(key, now)


def _records(es, env: str) -> dict[int, list[dict]]:
    hits = es.search(index=read_alias(env), size=1000, sort=["_doc"])["hits"]["hits"]
    by_id: dict[int, list[dict]] = {}
    for hit in hits:
        by_id.setdefault(int(hit["_source"]["object_id"]), []).append(hit["_source"])
    return by_id


def test_a_connect_only_role_cannot_stop_capture_misattribute_or_hide(attacked, es):
    source, intruder, attributor = attacked
    columns = [c for c in ZOO_ROW if c != "id"]
    with psycopg.connect(source.url) as service:  # attributed work before and after
        service.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(SERVICE),))
        service.execute("INSERT INTO zoo (id, txt) VALUES (1, 'before the attack')")
    for n, context in enumerate(ODD_BUT_VALID, start=10):
        with psycopg.connect(source.url) as service:
            service.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
            service.execute("INSERT INTO zoo (id) VALUES (%s)", (n,))
    with psycopg.connect(source.url) as victim:  # a transaction that recorded no context
        victim.execute("INSERT INTO zoo (id, txt) VALUES (2, 'victim')")
        victim_xid = victim.execute("SELECT pg_current_xact_id()::text").fetchone()[0]

    expected_reasons: list[str] = []
    with psycopg.connect(intruder, autocommit=True) as conn:
        for n, (transactional, prefix, content, reason) in enumerate(MESSAGES, start=100):
            with conn.transaction():
                conn.execute(
                    "INSERT INTO zoo (id, txt) VALUES (%s, %s)", (n, HOSTILE[n % len(HOSTILE)])
                )
                conn.execute(
                    "SELECT pg_logical_emit_message(%s, %s, %s::bytea)",
                    (transactional, prefix, content),
                )
            if reason:
                expected_reasons.append(reason)
        # A flood of messages in one transaction: a hundred are read, the rest counted once.
        with conn.transaction():
            conn.execute("INSERT INTO zoo (id) VALUES (201)")
            conn.execute(
                "SELECT count(pg_logical_emit_message(true, %s, 'x')) FROM generate_series(1, %s)",
                (CONTEXT_PREFIX, FLOOD),
            )
        expected_reasons += ["not JSON"] * 100 + [f"{FLOOD - 100} more messages"]
        # A whitespace-laden but valid context: accepted, and re-serialised on one line.
        with conn.transaction():
            conn.execute("INSERT INTO zoo (id, txt) VALUES (200, 'own context')")
            conn.execute(
                "SELECT pg_logical_emit_message(true, %s, %s)",
                (CONTEXT_PREFIX, '{\n"actor":\n{"type": "user", "id": "mallory"}}'),
            )
        # Hostile values in every column type, and in every hostile string.
        for n, text in enumerate(HOSTILE, start=300):
            row = {
                **ZOO_ROW,
                "txt": text,
                "vc": text[:20],
                "tarr": json.dumps([text, "b"]).replace("[", "{").replace("]", "}"),
                "jb": json.dumps({text: text}),
            }
            conn.execute(
                f"INSERT INTO zoo (id, {', '.join(columns)}) VALUES (%s, "
                f"{', '.join(['%s'] * len(columns))})",
                [n, *(row[c] for c in columns)],
            )
        # Forging a late context for the victim's transaction, both ways.
        forged = json.dumps({"xid": victim_xid, "context": json.loads(VALID)})
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (ATTACH_PREFIX, forged))
        expected_reasons.append("attach messages are not accepted")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT audit.attach_context(%s::xid8, %s::jsonb)", (victim_xid, VALID))

    key = private_key(new_private_key())
    with psycopg.connect(source.url, autocommit=True) as state:
        _run(source, state, es, key)
        records = _records(es, source.env)
        # Nothing lost, nothing twice, every value as the trigger saw it.
        assert sorted(record_tuple(r) for rs in records.values() for r in rs) == ground_truth(
            source.url
        )
        assert records[1][0]["context"] == SERVICE
        assert records[2][0]["attribution"]["status"] == "unattributed"  # the forgery failed
        assert records[200][0]["context"] == json.loads(VALID)
        assert records[201][0]["attribution"]["status"] == "unattributed"
        for n, context in enumerate(ODD_BUT_VALID, start=10):
            [record] = records[n]
            assert record["attribution"]["status"] == "attributed", (n, record)
            expected = {**context, **EXPECTED_CONTEXT.get(n, {})}
            assert record["context"] == expected, n
        for n in range(100, 100 + len(MESSAGES)):
            assert records[n][0]["attribution"]["status"] == "unattributed", n
        rejected = list_rejections(state, source.env, None, limit=1000)
        unmatched = [r.reason for r in rejected]
        for reason in sorted(expected_reasons, key=len, reverse=True):  # specific first
            found = next((text for text in unmatched if reason in text), None)
            assert found is not None, (reason, unmatched)
            unmatched.remove(found)
        assert unmatched == []
        assert all(r.source == "zoo" for r in rejected)
        assert any(r.bytes == 64 * 1024 * 1024 for r in rejected)  # sized, never read
        assert max(len(r.reason) for r in rejected) <= 600
        for text in ("mallory", "\\ud800", "<img", "forged", "\x00"):
            assert not any(text in r.reason for r in rejected), text
        leaves = TrustLog(source.store).leaves()
        assert leaves.filter(leaves["kind"] == "rejected").height == len(expected_reasons)

        # Capture goes on, and a role allowed to attribute still can.
        with psycopg.connect(attributor) as conn:
            conn.execute(
                "SELECT audit.attach_context(%s::xid8, %s::jsonb)",
                (victim_xid, json.dumps(SERVICE)),
            )
        with psycopg.connect(source.url) as service:
            service.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(SERVICE),))
            service.execute("UPDATE zoo SET txt = 'after the attack' WHERE id = 1")
        _run(source, state, es, key)
        records = _records(es, source.env)
        assert records[2][0]["attribution"]["status"] == "late"
        assert records[2][0]["context"] == SERVICE
        assert {r["operation"] for r in records[1]} == {"insert", "update"}

        settings = Settings(
            env=source.env,
            pg_url=source.url,
            api=ApiSettings(key_cache_seconds=0),
            staging_root=source.store.root,
        )
        auditor = create_key(state, source.env, "a", role="auditor").secret
        narrow = create_key(state, source.env, "n", role="auditor", tables=["public.zoo"]).secret
        with TestClient(create_app(settings)) as client:
            listed = client.get("/v1/rejections?limit=1000", headers={"X-API-Key": auditor})
            assert listed.status_code == 200, listed.text
            assert len(listed.json()["rejections"]) == len(expected_reasons)
            for path in ("/v1/rejections?source=%00", "/v1/reads?key_id=%00"):
                nul = client.get(path, headers={"X-API-Key": auditor})
                assert nul.status_code == 422 and "NUL" in nul.text, (path, nul.text)
            refused = client.get("/v1/rejections", headers={"X-API-Key": narrow})
            assert refused.status_code == 403 and "limited to some tables" in refused.text

        window = Window(datetime.now(UTC) + timedelta(hours=1), indexing_lag=timedelta(0))
        report = verify_source(
            source.store,
            es,
            source.policy,
            key.public_key(),
            since=None,
            until=None,
            window=window,
            waiting=waiting_changes(state, source.env, "zoo"),
        )
        assert report.ok, report.problems


def test_the_stream_keeps_only_a_bounded_prefix_of_an_oversized_message():
    from audit_platform.capture.stream import kept_message

    def message(prefix: bytes, content: bytes, flags: int = 1) -> bytes:
        return (
            b"M"
            + bytes([flags])
            + (0).to_bytes(8, "big")
            + prefix
            + b"\0"
            + len(content).to_bytes(4, "big")
            + content
        )

    huge = message(CONTEXT_PREFIX.encode(), b"x" * (10 * MAX_MESSAGE_BYTES))
    kept = kept_message(huge)
    assert kept is not None and len(kept) < 2 * MAX_MESSAGE_BYTES
    assert int.from_bytes(kept[11 + len(CONTEXT_PREFIX) : 15 + len(CONTEXT_PREFIX)], "big") == (
        10 * MAX_MESSAGE_BYTES
    )
    assert kept_message(message(b"other", b"\xff" * 100)) is None
    assert kept_message(message(CONTEXT_PREFIX.encode(), b"{}", flags=0)) is None
    small = message(CONTEXT_PREFIX.encode(), b"{}")
    assert kept_message(small) == small


def test_setup_takes_logical_messages_from_public_and_contexts_still_work(attacked):
    source, intruder, _ = attacked
    with psycopg.connect(source.url, autocommit=True) as admin:
        admin.execute("CREATE ROLE plain_connect LOGIN PASSWORD 'pw'")
        admin.execute("GRANT INSERT ON zoo TO plain_connect")
    try:
        plain = intruder.replace(urlsplit(intruder).username, "plain_connect")
        with (
            psycopg.connect(plain) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_logical_emit_message"),
        ):
            conn.execute("SELECT pg_logical_emit_message(true, 'other.tool', 'x')")
        with psycopg.connect(plain) as conn:  # set_context emits as its owner
            conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(SERVICE),))
            conn.execute("INSERT INTO zoo (id) VALUES (1)")
        source.capture()
        [context] = source.staged("contexts")["context"].to_list()
        assert json.loads(context) == SERVICE
        findings = check_source(source.url, source.env, source.policy, SQL)
        assert [f.level for f in findings if f.subject == "logical messages"] == [Level.ok]
        with psycopg.connect(source.url, autocommit=True) as admin:
            admin.execute(
                "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO PUBLIC"
            )
        findings = check_source(source.url, source.env, source.policy, SQL)
        [open_] = [f for f in findings if f.subject == "logical messages"]
        assert open_.level is Level.warning and "REVOKE EXECUTE" in open_.fix
    finally:
        with psycopg.connect(source.url, autocommit=True) as admin:
            admin.execute("DROP OWNED BY plain_connect")
            admin.execute("DROP ROLE plain_connect")


def test_a_session_named_as_a_parked_worker_passes_for_no_capture(attacked):
    """A parked live worker is seen by the name of its connection (``capture.slot``); a role
    that only connects can name a session so too, and must not pass for the capture: the
    standalone check would call a stopped capture live, teardown would refuse for nobody."""
    source, intruder, _ = attacked
    slot = slot_name(source.env, "zoo")
    with (
        psycopg.connect(make_conninfo(intruder, application_name=parked_name(slot))),
        psycopg.connect(source.url, autocommit=True) as conn,
    ):
        named = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (parked_name(slot),),
        ).fetchone()[0]
        assert named == 1  # the intruder's session is there, under that name
        assert parked_pid(conn, slot) is None
        removed = teardown_source(source.url, source.env, "zoo", SQL, everything=False)
    assert f"slot {slot}" in removed


#: Functions a role that may create in ``public`` (everyone before PostgreSQL 15) can put in
#: the way of polymorphic built-ins the platform's statements call: each matches its arguments
#: exactly, which beats ``pg_catalog``'s polymorphic one wherever ``public`` is searched, and
#: writes down whose session ran it.
HIJACKS = """
CREATE TABLE public.hijacked (who text, what text);
GRANT INSERT ON public.hijacked TO PUBLIC;
CREATE FUNCTION public.array_position(int2vector, smallint) RETURNS int LANGUAGE sql AS $$
    INSERT INTO public.hijacked VALUES (current_user, 'array_position');
    SELECT pg_catalog.array_position($1::smallint[], $2) $$;
CREATE FUNCTION public.unnest(smallint[]) RETURNS SETOF smallint LANGUAGE sql AS $$
    INSERT INTO public.hijacked VALUES (current_user, 'unnest');
    SELECT pg_catalog.unnest($1) $$;
"""


def test_functions_planted_in_public_never_run_in_the_platform_s_sessions(attacked, es):
    source, intruder, _ = attacked
    with psycopg.connect(source.url, autocommit=True) as admin:
        admin.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # as before PostgreSQL 15
    try:
        with psycopg.connect(intruder, autocommit=True) as conn:
            conn.execute(HIJACKS)
        setup_source(source.url, source.env, source.policy, Settings().resources_dir / "sql")
        check_source(source.url, source.env, source.policy, Settings().resources_dir / "sql")
        run_snapshot(source.url, source.policy, "hijack", env=source.env)
        with psycopg.connect(source.url, autocommit=True) as admin:
            admin.execute("INSERT INTO zoo (id) VALUES (991)")
        result = source.capture()  # the table's key is asked of the source at its first change
        assert result.changes > 0
        with psycopg.connect(source.url, autocommit=True) as admin:
            assert admin.execute("SELECT * FROM public.hijacked").fetchall() == []
            # The control: the same statement in a session that searches public runs the plant.
            admin.execute(
                "SELECT array_position(i.indkey, a.attnum) FROM pg_index i"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = 'zoo'::regclass AND i.indisprimary"
            )
            assert admin.execute("SELECT what FROM public.hijacked").fetchall() == [
                ("array_position",)
            ]
    finally:
        with psycopg.connect(source.url, autocommit=True) as admin:
            admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
