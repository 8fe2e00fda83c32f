"""The Python SDK: scopes, the psycopg and SQLAlchemy hooks, the ASGI middleware, jobs."""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from pydantic import ValidationError

from audit_platform_context import Actor, audit_context, audit_job, current_context
from audit_platform_context.asgi import AuditContextMiddleware, trace_id_from_traceparent
from audit_platform_context.psycopg_hook import connect, connect_async
from audit_platform_context.sqlalchemy_hook import instrument_engine
from audit_platform_tests.helpers import changes, context_source, messages, read_test_decoding

ADA = Actor(type="user", id="u-1", name="Ada")


@pytest.fixture
def source_db(pg_database):
    return context_source(
        pg_database,
        "CREATE TABLE notes (id serial PRIMARY KEY, author text, body text);"
        "GRANT ALL ON notes, notes_id_seq TO PUBLIC",
        "t_sdk",
    )


# --- scopes (pure) ---------------------------------------------------------------------------


def test_nested_scopes_merge_inner_wins_and_attributes_combine():
    with audit_context(actor=ADA, reason="support", attributes={"ticket": "T-1"}):
        with audit_context(reason="refund", attributes={"order": "O-9"}):
            inner = current_context()
        outer = current_context()
    assert inner.reason == "refund"
    assert inner.attributes == {"ticket": "T-1", "order": "O-9"}
    assert inner.actor == ADA
    assert outer.reason == "support"
    assert current_context() is None


def test_scope_without_actor_refuses_to_produce_a_context():
    with audit_context(reason="no one"), pytest.raises(ValidationError, match="actor"):
        current_context()


def test_bad_field_fails_where_the_scope_is_written():
    with pytest.raises(ValidationError, match="trace_id"):
        audit_context(actor=ADA, trace_id="not-a-trace")


def test_decorated_function_sees_its_context_in_every_thread_without_leaks():
    seen: dict[str, str | None] = {}

    @audit_context(reason="batch")
    def work(name: str) -> None:
        with audit_context(actor=Actor(type="service", id=name)):
            seen[name] = current_context().actor.id
        try:
            seen[name + "-after"] = current_context().actor.id
        except ValidationError:  # the inner actor is gone; only the outer reason remains
            seen[name + "-after"] = None

    threads = [threading.Thread(target=work, args=(f"svc-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {k: v for k, v in seen.items() if not k.endswith("-after")} == {
        f"svc-{i}": f"svc-{i}" for i in range(8)
    }
    assert {v for k, v in seen.items() if k.endswith("-after")} == {None}
    assert current_context() is None


def test_concurrent_asyncio_tasks_keep_their_own_context():
    async def handle(user: str) -> str:
        with audit_context(actor=Actor(type="user", id=user)):
            await asyncio.sleep(random.random() / 100)
            return current_context().actor.id

    async def main() -> list[str]:
        return await asyncio.gather(*(handle(f"u{i}") for i in range(50)))

    assert asyncio.run(main()) == [f"u{i}" for i in range(50)]


def test_each_job_run_gets_its_own_run_id():
    runs = []

    @audit_job("nightly-reprice")
    def reprice() -> None:
        runs.append(current_context())

    reprice()
    reprice()
    assert [r.actor for r in runs] == [Actor(type="job", id="nightly-reprice")] * 2
    assert {r.job.name for r in runs} == {"nightly-reprice"}
    assert runs[0].job.run_id != runs[1].job.run_id


def test_traceparent_gives_the_trace_id_and_garbage_gives_none():
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id_from_traceparent(tp) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_from_traceparent("00-" + "0" * 32 + "-00f067aa0ba902b7-01") is None
    assert trace_id_from_traceparent("nonsense") is None


# --- psycopg hook ----------------------------------------------------------------------------


def test_psycopg_hook_records_context_with_the_commit(source_db):
    with connect(source_db) as conn, audit_context(actor=ADA, reason="edit"):
        conn.execute("INSERT INTO notes (author, body) VALUES ('ada', 'one')")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO notes (author, body) VALUES ('ada', 'two')")
    rows = read_test_decoding(source_db, "t_sdk")
    ctx = messages(rows)
    assert [c["reason"] for _, c in ctx] == ["edit", "edit"]
    assert [xid for xid, _ in ctx] == [xid for xid, _ in changes(rows, "public.notes")]


def test_psycopg_hook_sends_nothing_without_scope_or_writes(source_db):
    with connect(source_db) as conn:
        conn.execute("INSERT INTO notes (author, body) VALUES ('admin', 'no scope')")
        conn.commit()
        with audit_context(actor=ADA):
            conn.execute("SELECT count(*) FROM notes")
            conn.commit()
    rows = read_test_decoding(source_db, "t_sdk")
    assert messages(rows) == []
    assert len(changes(rows, "public.notes")) == 1


def test_psycopg_hook_fails_closed_on_an_unattributable_scope(source_db):
    with connect(source_db) as conn:
        with audit_context(reason="who?"), pytest.raises(ValidationError, match="actor"):
            conn.execute("INSERT INTO notes (author, body) VALUES ('x', 'lost')")
            conn.commit()
        conn.rollback()
    with psycopg.connect(source_db) as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 0


# --- SQLAlchemy hook -------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_sqlalchemy_hook_records_context_per_transaction(source_db, driver):
    url = sa.engine.make_url(source_db).set(drivername=f"postgresql+{driver}")
    engine = instrument_engine(sa.create_engine(url))
    try:
        with audit_context(actor=ADA, reason="orm"), engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO notes (author, body) VALUES ('ada', 'orm')"))
        with engine.begin() as conn:  # no scope: no context
            conn.execute(sa.text("INSERT INTO notes (author, body) VALUES ('cron', 'bare')"))
    finally:
        engine.dispose()
    rows = read_test_decoding(source_db, "t_sdk")
    [(ctx_xid, ctx)] = messages(rows)
    assert ctx["reason"] == "orm"
    first_insert_xid = changes(rows, "public.notes")[0][0]
    assert first_insert_xid == ctx_xid


# --- ASGI middleware -------------------------------------------------------------------------


def test_middleware_and_async_hook_attribute_each_concurrent_request_to_its_own_user(source_db):
    app = FastAPI()

    @app.post("/notes")
    async def add_note(request: Request) -> dict:
        await asyncio.sleep(random.random() / 50)  # interleave the requests
        user = request.headers["x-user"]
        # The hook, not the endpoint, records the context: nothing here mentions auditing.
        async with await connect_async(source_db) as conn, conn.transaction():
            await conn.execute("INSERT INTO notes (author, body) VALUES (%s, 'hello')", (user,))
        ctx = current_context()
        return {"request_id": ctx.request_id}

    def actor_from_header(scope: dict) -> Actor | None:
        user = dict(scope["headers"]).get(b"x-user")
        return Actor(type="user", id=user.decode()) if user else None

    async def tenant_from_header(scope: dict) -> dict | None:
        tenant = dict(scope["headers"]).get(b"x-tenant")
        return {"id": tenant.decode(), "name": tenant.decode().title()} if tenant else None

    wrapped = AuditContextMiddleware(
        app,
        service="notes-api",
        get_actor=actor_from_header,
        get_organization=tenant_from_header,
    )
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=wrapped, client=("203.0.113.7", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/notes",
                        headers={"x-user": f"user-{i}", "x-request-id": f"req-{i}"}
                        | ({"traceparent": traceparent} if i == 0 else {})
                        | ({"x-tenant": f"org-{i % 3}"} if i % 4 else {}),
                    )
                    for i in range(20)
                )
            )

    responses = asyncio.run(main())
    assert [r.headers["x-request-id"] for r in responses] == [f"req-{i}" for i in range(20)]
    rows = read_test_decoding(source_db, "t_sdk")
    context_by_xid = dict(messages(rows))
    authors = {
        xid: data.split("author[text]:'", 1)[1].split("'", 1)[0]
        for xid, data in changes(rows, "public.notes")
    }
    assert len(authors) == 20
    for xid, author in authors.items():
        ctx = context_by_xid[xid]
        assert ctx["actor"] == {"type": "user", "id": author}
        assert ctx["request_id"] == f"req-{author.split('-')[1]}"
        assert ctx["service"] == "notes-api"
        assert ctx["client_addr"] == "203.0.113.7"
        i = int(author.split("-")[1])
        if i % 4:
            assert ctx["organization"] == {"id": f"org-{i % 3}", "name": f"Org-{i % 3}"}
        else:
            assert "organization" not in ctx
    traced = [c for c in context_by_xid.values() if "trace_id" in c]
    assert [c["request_id"] for c in traced] == ["req-0"]


def test_middleware_generates_a_request_id_and_defaults_actor_to_the_service():
    seen = {}

    async def app(scope, receive, send):
        seen["ctx"] = current_context()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=AuditContextMiddleware(app, service="svc"))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/", headers={"x-request-id": "bad id with spaces"})

    response = asyncio.run(main())
    ctx = seen["ctx"]
    assert ctx.actor == Actor(type="service", id="svc")
    assert ctx.request_id == response.headers["x-request-id"]
    assert len(ctx.request_id) == 32


def test_sync_endpoints_in_the_threadpool_with_sqlalchemy_do_not_leak_context(source_db):
    url = sa.engine.make_url(source_db).set(drivername="postgresql+psycopg")
    engine = instrument_engine(sa.create_engine(url, pool_size=5))
    app = FastAPI()

    @app.post("/notes")
    def add_note(request: Request) -> dict:  # sync: FastAPI runs it in a worker thread
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO notes (author, body) VALUES (:a, 'sync')"),
                {"a": request.headers["x-user"]},
            )
        return {}

    def actor_from_header(scope: dict) -> Actor:
        return Actor(type="user", id=dict(scope["headers"])[b"x-user"].decode())

    async def tenant_from_header(scope: dict) -> dict | None:
        tenant = dict(scope["headers"]).get(b"x-tenant")
        return {"id": tenant.decode(), "name": tenant.decode().title()} if tenant else None

    wrapped = AuditContextMiddleware(
        app,
        service="notes-api",
        get_actor=actor_from_header,
        get_organization=tenant_from_header,
    )

    async def main() -> None:
        transport = httpx.ASGITransport(app=wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await asyncio.gather(
                *(client.post("/notes", headers={"x-user": f"user-{i}"}) for i in range(20))
            )

    try:
        asyncio.run(main())
    finally:
        engine.dispose()
    rows = read_test_decoding(source_db, "t_sdk")
    context_by_xid = dict(messages(rows))
    authors = {
        xid: data.split("author[text]:'", 1)[1].split("'", 1)[0]
        for xid, data in changes(rows, "public.notes")
    }
    assert sorted(authors.values()) == sorted(f"user-{i}" for i in range(20))
    assert {xid: context_by_xid[xid]["actor"]["id"] for xid in authors} == authors
