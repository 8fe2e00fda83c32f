"""audit.set_context and audit.attach_context in a real source database."""

from __future__ import annotations

import json

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from audit_platform.capture.messages import parse_context
from audit_platform.settings import Settings
from audit_platform_tests.helpers import (
    ATTACH_PREFIX,
    changes,
    context_source,
    messages,
    raw_messages,
    read_test_decoding,
)

USER = {"actor": {"type": "user", "id": "u-17", "name": "Ada"}, "reason": "refund"}


@pytest.fixture
def source_db(pg_database):
    return context_source(
        pg_database, "CREATE TABLE orders (id int PRIMARY KEY, status text)", "t_ctx"
    )


def test_context_and_writes_share_the_transaction_id_in_the_slot(source_db):
    with psycopg.connect(source_db) as conn:
        conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(USER),))
        conn.execute("INSERT INTO orders VALUES (1, 'paid')")
        conn.execute("UPDATE orders SET status = 'refunded' WHERE id = 1")
    rows = read_test_decoding(source_db, "t_ctx")
    [(ctx_xid, ctx)] = messages(rows)
    order_changes = changes(rows, "public.orders")
    assert ctx == USER
    assert len(order_changes) == 2
    assert {xid for xid, _ in order_changes} == {ctx_xid}


def test_rolled_back_context_leaves_nothing(source_db):
    with psycopg.connect(source_db) as conn:
        conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(USER),))
        conn.execute("INSERT INTO orders VALUES (2, 'paid')")
        conn.rollback()
    assert messages(read_test_decoding(source_db, "t_ctx")) == []


def test_set_context_if_writing_costs_nothing_in_a_read_only_transaction(source_db):
    with psycopg.connect(source_db) as conn:
        conn.execute("SELECT count(*) FROM orders")
        conn.execute("SELECT audit.set_context_if_writing(%s::jsonb)", (json.dumps(USER),))
        assigned = conn.execute("SELECT pg_current_xact_id_if_assigned()").fetchone()[0]
    assert assigned is None
    assert messages(read_test_decoding(source_db, "t_ctx")) == []


def test_a_role_without_privileges_can_set_context(source_db):
    with psycopg.connect(source_db, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS t_app_role")
        admin.execute("CREATE ROLE t_app_role LOGIN PASSWORD 'app-pw'")
        admin.execute("GRANT INSERT ON orders TO t_app_role")
    app_url = psycopg.conninfo.make_conninfo(source_db, user="t_app_role", password="app-pw")
    try:
        with psycopg.connect(app_url) as conn:
            conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(USER),))
            conn.execute("INSERT INTO orders VALUES (3, 'new')")
        [(_, ctx)] = messages(read_test_decoding(source_db, "t_ctx"))
        assert ctx["actor"]["id"] == "u-17"
    finally:
        with psycopg.connect(source_db, autocommit=True) as admin:
            admin.execute("DROP OWNED BY t_app_role")
            admin.execute("DROP ROLE t_app_role")


def test_attach_context_to_a_committed_transaction_is_captured(source_db):
    with psycopg.connect(source_db) as conn:
        conn.execute("INSERT INTO orders VALUES (4, 'paid')")
        xid = conn.execute("SELECT pg_current_xact_id()").fetchone()[0]
    with psycopg.connect(source_db) as conn:
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(xid), json.dumps(USER))
        )
    rows = read_test_decoding(source_db, "t_ctx")
    [(insert_xid, _)] = changes(rows, "public.orders")
    # A row of audit.attached_contexts, which only the function can write, not a message
    # that any role could emit itself.
    [(_, attached)] = changes(rows, "audit.attached_contexts")
    assert f"target[xid8]:'{xid}'" in attached
    assert int(str(xid)) % 2**32 == insert_xid
    assert "attached_by[name]:'postgres'" in attached
    assert messages(rows, ATTACH_PREFIX) == [] and messages(rows) == []


@pytest.fixture
def roles(source_db):
    """A role with nothing but CONNECT, and a service role granted late attribution."""
    suffix = source_db.rsplit("/", 1)[1]
    intruder, service = f"intruder_{suffix}", f"service_{suffix}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        for role in (intruder, service):
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
            conn.execute(f"GRANT CONNECT ON DATABASE {suffix} TO {role}")
        attributor = conn.execute("SELECT audit.attributor_role()").fetchone()[0]
        conn.execute(f'GRANT "{attributor}" TO {service}')
        conn.execute(f"GRANT INSERT ON orders TO {intruder}")
    yield {"intruder": _as(source_db, intruder), "service": _as(source_db, service)}
    with psycopg.connect(source_db, autocommit=True) as conn:
        for role in (intruder, service):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def _as(url: str, role: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.hostname}:{parts.port}"))


def test_only_the_databases_attributor_role_may_attach_context(source_db, roles):
    with psycopg.connect(roles["intruder"]) as conn:
        conn.execute("INSERT INTO orders VALUES (6, 'paid')")
        xid = conn.execute("SELECT pg_current_xact_id()").fetchone()[0]
    with (
        psycopg.connect(roles["intruder"]) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(xid), json.dumps(USER))
        )
    with (
        psycopg.connect(roles["intruder"]) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(
            "INSERT INTO audit.attached_contexts (target, context) VALUES (%s, '{}')", (str(xid),)
        )
    with psycopg.connect(roles["service"]) as conn:
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(xid), json.dumps(USER))
        )
    rows = read_test_decoding(source_db, "t_ctx")
    [(_, attached)] = changes(rows, "audit.attached_contexts")
    service = roles["service"].split("://")[1].split(":")[0]
    assert f"attached_by[name]:'{service}'" in attached


def test_attach_context_refuses_a_transaction_that_did_not_commit(source_db):
    with psycopg.connect(source_db) as conn:
        conn.execute("INSERT INTO orders VALUES (5, 'paid')")
        aborted = conn.execute("SELECT pg_current_xact_id()").fetchone()[0]
        conn.rollback()
    with (
        psycopg.connect(source_db) as conn,
        pytest.raises(
            psycopg.errors.InvalidParameterValue, match=rf"transaction {aborted} is aborted"
        ),
    ):
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(aborted), json.dumps(USER))
        )


def test_attach_context_refuses_the_current_transaction(source_db):
    with (
        psycopg.connect(source_db) as conn,
        pytest.raises(
            psycopg.errors.InvalidParameterValue, match=r"use audit\.set_context instead"
        ),
    ):
        conn.execute("INSERT INTO orders VALUES (6, 'paid')")
        conn.execute(
            "SELECT audit.attach_context(pg_current_xact_id(), %s::jsonb)", (json.dumps(USER),)
        )


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ("[1, 2]", "audit context must be a JSON object, got array"),
        ('"text"', "audit context must be a JSON object, got string"),
        ("{}", 'field "actor" must be an object'),
        (
            '{"actor": {"type": "robot", "id": "1"}}',
            '"actor.type" must be one of user, service, job, system; got "robot"',
        ),
        ('{"actor": {"type": "user"}}', '"actor.id" must be a non-empty string; got nothing'),
        ('{"actor": {"type": "user", "id": 42}}', '"actor.id" must be a non-empty string; got 42'),
        ('{"actor": {"type": "user", "id": "1", "email": "x"}}', 'unknown field "actor.email"'),
        ('{"actor": {"type": "user", "id": "1"}, "who": "me"}', 'unknown field "who"'),
        (
            '{"actor": {"type": "user", "id": "1"}, "reason": 5}',
            'field "reason" must be a string; got number',
        ),
        (
            '{"actor": {"type": "user", "id": "1"}, "trace_id": "abc"}',
            '"trace_id" must be a W3C trace-id',
        ),
        (
            '{"actor": {"type": "user", "id": "1"}, "client_addr": "here"}',
            '"client_addr" must be an IP address; got here',
        ),
        (
            '{"actor": {"type": "user", "id": "1"}, "job": {"name": "x", "pid": "1"}}',
            '"job.pid" is not allowed',
        ),
        (
            '{"actor": {"type": "user", "id": "1"}, "attributes": [1]}',
            '"attributes" must be an object; got array',
        ),
        (
            '{"actor": {"type": "user", "id": "1"}, "organization": "acme"}',
            'field "organization" must be an object with id and name',
        ),
        (
            '{"actor": {"type": "user", "id": "1"}, "organization": {"id": "acme", "plan": "x"}}',
            '"organization.plan" is not allowed',
        ),
        (
            '{"actor": {"type": "user", "id": "1"}, "organization": {"name": "Acme"}}',
            '"organization.id" must be a string of 1 to 256 characters',
        ),
    ],
)
def test_invalid_context_fails_the_transaction_naming_the_field(source_db, context, message):
    with psycopg.connect(source_db) as conn:
        conn.execute("INSERT INTO orders VALUES (7, 'paid')")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
            conn.execute("SELECT audit.set_context(%s::jsonb)", (context,))
        assert message in str(refused.value)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    with psycopg.connect(source_db) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 0


def test_oversized_context_is_refused_with_the_limit(source_db):
    big = json.dumps({"actor": {"type": "user", "id": "1"}, "attributes": {"blob": "x" * 9000}})
    with (
        psycopg.connect(source_db) as conn,
        pytest.raises(psycopg.errors.InvalidParameterValue, match=r"bytes; the limit is 8192"),
    ):
        conn.execute("SELECT audit.set_context(%s::jsonb)", (big,))


def test_published_json_schema_is_the_python_model():
    from audit_platform_context.model import TransactionContext

    published = json.loads((Settings().resources_dir / "context.schema.json").read_text())
    for key in ("$schema", "$id"):
        published.pop(key)
    assert published == TransactionContext.model_json_schema(), (
        "resources/context.schema.json is stale; regenerate it from TransactionContext"
    )


@pytest.mark.parametrize(
    "context",
    [
        {"actor": {"type": "user", "id": "1"}},
        {
            "actor": {"type": "job", "id": "n", "name": "Nightly"},
            "job": {"name": "n", "run_id": "r"},
        },
        {
            "actor": {"type": "system", "id": "x"},
            "client_addr": "2001:db8::1",
            "trace_id": "a" * 32,
        },
        {"actor": {"type": "service", "id": "x"}, "attributes": {"k": [1, {"n": None}]}},
        {"actor": {"type": "robot", "id": "1"}},
        {"actor": {"type": "user", "id": ""}},
        {"actor": {"type": "user", "id": "1"}, "extra": 1},
        {"actor": {"type": "user", "id": "1"}, "trace_id": "0" * 32},
        {"actor": {"type": "user", "id": "1"}, "client_addr": "256.1.1.1"},
        {"actor": {"type": "user", "id": "1"}, "job": {"name": 1}},
        {"actor": {"type": "user", "id": "1"}, "reason": None, "job": None, "attributes": None},
        {"actor": None},
        {"actor": {"type": "user", "id": "1"}, "organization": {"id": "acme", "name": "Acme"}},
        {"actor": {"type": "user", "id": "1"}, "organization": {"id": "acme", "name": None}},
        {"actor": {"type": "user", "id": "1"}, "organization": {"id": ""}},
        {"actor": {"type": "user", "id": "1"}, "organization": {"id": "x" * 256}},
        {"actor": {"type": "user", "id": "1"}, "organization": {"id": "x" * 257}},
        {"actor": {"type": "user", "id": "1"}, "organization": {"id": 7}},
        {"actor": {"type": "user", "id": "1"}, "organization": {"id": "a", "tier": "gold"}},
        {"actor": {"type": "user", "id": "1"}, "organization": []},
    ],
)
def test_python_model_and_database_agree_on_what_is_valid(source_db, context):
    from pydantic import ValidationError

    from audit_platform_context.model import TransactionContext

    try:
        TransactionContext.model_validate(context)
        python_ok = True
    except ValidationError:
        python_ok = False
    with psycopg.connect(source_db) as conn:
        try:
            conn.execute("SELECT audit.validate_context(%s::jsonb)", (json.dumps(context),))
            database_ok = True
        except psycopg.errors.InvalidParameterValue:
            database_ok = False
    assert python_ok == database_ok


_texts = st.text(max_size=40)
_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["1e300", "1e-300", "0.10000000000000001", "-0", "12345678901234567890123"]),
)
_contexts = st.fixed_dictionaries(
    {
        "actor": st.fixed_dictionaries(
            {
                "type": st.sampled_from(["user", "service", "job", "system"]),
                "id": st.text(min_size=1, max_size=30),
            },
            optional={"name": st.one_of(st.none(), st.text(max_size=300))},
        )
    },
    optional={
        "request_id": st.one_of(st.none(), _texts),
        "reason": _texts,
        "organization": st.fixed_dictionaries(
            {"id": st.text(min_size=1, max_size=40)},
            optional={"name": st.one_of(st.none(), _texts)},
        ),
        "client_addr": st.sampled_from(
            [
                "01.02.03.04",
                "10.1.2.3/24",
                "::1",
                "fe80::1%eth0",
                "192.168.0.1",
                "1.2.3",
                "::ffff:1.2.3.4",
                "not an ip",
            ]
        ),
        "attributes": st.dictionaries(
            _texts, st.one_of(st.none(), _texts, _numbers, st.lists(_numbers, max_size=3))
        ),
    },
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(context=_contexts)
@example(context={"actor": {"type": "user", "id": "u", "name": "€" * 2000}})
@example(context={"actor": {"type": "user", "id": "u"}, "client_addr": "01.02.03.04"})
@example(context={"actor": {"type": "user", "id": "u"}, "client_addr": "10.1.2.3/24"})
@example(context={"actor": {"type": "user", "id": "u"}, "attributes": {"n": 10**29}})
@example(
    context={"actor": {"type": "user", "id": "u"}, "attributes": {str(i): None for i in range(900)}}
)
def test_whatever_set_context_accepts_capture_accepts_as_the_database_sent_it(source_db, context):
    """The contract is enforced twice (the database, then capture): a context the database
    took must never become a rejection, or whoever fills a field could unattribute writes."""
    text = json.dumps(context)
    for number in ("1e300", "1e-300", "0.10000000000000001", "-0", "12345678901234567890123"):
        text = text.replace(json.dumps(number), number)  # as numbers, not strings
    try:
        with psycopg.connect(source_db) as conn:
            conn.execute("SELECT audit.set_context(%s::jsonb)", (text,))
            conn.execute("SELECT pg_current_xact_id()")
    except psycopg.errors.DataError:
        return  # refused by the database: nothing reaches capture
    [(_, emitted)] = raw_messages(read_test_decoding(source_db, "t_ctx"))
    staged = json.loads(parse_context(emitted.encode()))
    assert staged["actor"]["id"] == context["actor"]["id"]
