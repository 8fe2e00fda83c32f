"""The Explorer's pure rules: facet terms the query language reads back, chart geometry, how a
record's columns are laid out, where sign-in may send a browser, how environments look. And its
sessions against the real platform database: lifetime, idleness, revocation, sign-out."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from audit_platform import platform_db
from audit_platform.api.ui.auth import safe_next
from audit_platform.api.ui.views import (
    columns,
    environment_tone,
    quote,
    record_links,
    refine,
    time_chart,
)
from audit_platform.api_keys import create_key, revoke_key
from audit_platform.query.language import parse
from audit_platform.query.models import TimeBucket
from audit_platform.record import AuditRecord
from audit_platform.settings import Settings
from audit_platform.ui_sessions import close_session, open_session, session_key

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "alice",
        "public.orders",
        "u-12",
        "a b",
        "a,b",
        "key:value",
        'say "hi"',
        "back\\slash",
        "-leading-dash",
        "(paren)",
        "ünïcödé",
        "x" * 300,
    ],
)
def test_a_facet_value_is_read_back_by_the_query_language_as_itself(value):
    (term,) = parse(f"actor:{quote(value)}", now=NOW).terms
    assert term.field == "actor" and term.values == (value,) and not term.negated


def test_refining_adds_a_term_once():
    assert refine("", "table", "public.orders") == "table:public.orders"
    assert refine("op:update", "actor", "a b") == 'op:update actor:"a b"'
    assert refine("op:update table:x", "table", "x") == "op:update table:x"


@pytest.mark.parametrize(
    ("env", "tone"),
    [
        ("production", "production"),
        ("prod", "production"),
        ("eu-prod", "production"),
        ("prd_2", "production"),
        ("staging", "staging"),
        ("uat", "staging"),
        ("qa-eu", "staging"),
        ("dev", "development"),
        ("product_demo", "development"),
        ("produce", "development"),
    ],
)
def test_production_looks_like_production(env, tone):
    assert environment_tone(env) == tone


def test_a_chart_scales_to_its_peak_and_never_hides_a_bucket_with_changes():
    buckets = [
        TimeBucket(start=NOW + timedelta(hours=i), count=c) for i, c in enumerate([0, 1, 1000, 500])
    ]
    chart = time_chart(buckets, width=400, height=100)
    assert [b.x for b in chart.bars] == [0, 100, 200, 300]
    heights = [b.height for b in chart.bars]
    assert heights[0] == 0 and heights[1] == 1.0 and heights[2] == 96 and heights[3] == 48
    assert all(b.y + b.height == 100 for b in chart.bars)
    assert chart.peak == 1000 and chart.total == 1501
    assert chart.bars[2].label == "2026-11-27 14:00 UTC: 1,000"
    assert time_chart([]).bars == []


def _record(operation: str, before: dict | None, after: dict | None, changed: list[str]):
    return AuditRecord.model_validate(
        {
            "id": "dev:shop:1:0",
            "@timestamp": NOW,
            "env": "dev",
            "source": {"service": "shop", "database": "shop"},
            "table": {"schema": "public", "name": "orders"},
            "operation": operation,
            "event": {"action": operation, "type": ["change"]},
            "object_id": "7/8",
            "changed_columns": changed,
            "before": before,
            "after": after,
            "values_text": "",
            "context": {"actor": {"id": "a/b"}, "request_id": "r?1"},
            "user": {},
            "service": {},
            "trace": {},
            "client": {},
            "attribution": {"status": "attributed"},
            "transaction": {"xid": 5, "commit_lsn": "0/1", "lsn": 1, "change_index": 0},
            "row": {"key": ["id"], "types": {}},
            "policy_version": "1",
            "ingested_at": NOW,
        }
    )


def test_a_record_lists_key_and_changed_columns_first_and_marks_only_the_changed():
    record = _record(
        "update",
        {"id": 7, "note": "x", "status": "new", "total": None},
        {"id": 7, "note": "x", "status": "paid", "total": None},
        ["status"],
    )
    rows = columns(record)
    assert [(r.column, r.changed, r.key) for r in rows] == [
        ("id", False, True),
        ("status", True, False),
        ("note", False, False),
        ("total", False, False),
    ]
    assert (rows[1].before, rows[1].after) == ("new", "paid")
    assert (rows[0].before, rows[3].after) == ("7", "null")  # values as text, NULL as null
    inserted = columns(_record("insert", None, {"id": 7, "note": "x"}, ["id", "note"]))
    assert all(r.changed and r.before is None for r in inserted)


def test_links_keep_slashes_and_question_marks_inside_one_path_segment():
    links = record_links(_record("update", {"id": 7}, {"id": 8}, ["id"]))
    assert links == {
        "transaction": "/ui/transactions/shop/5",
        "table": "/ui/tables/shop/public.orders",
        "object": "/ui/objects/shop/public.orders/7%2F8",
        "request": "/ui/requests/r%3F1",
        "actor": "/ui/actors/a%2Fb",
    }


@pytest.mark.parametrize(
    ("asked", "goes"),
    [
        ("/ui/search?q=actor%3Aada", "/ui/search?q=actor%3Aada"),
        ("/ui/", "/ui/"),
        (None, "/ui/"),
        ("https://evil.example/ui/", "/ui/"),
        ("//evil.example/ui", "/ui/"),
        ("/ui\\@evil.example", "/ui/"),
        ("/v1/events", "/ui/"),
        ("javascript:alert(1)", "/ui/"),
    ],
)
def test_sign_in_returns_only_to_a_page_of_the_explorer(asked, goes):
    assert safe_next(asked) == goes


# --- sessions, against the real platform database -----------------------------------------


@pytest.fixture
def platform(servers):
    with psycopg.connect(servers.pg_url, autocommit=True) as conn:
        platform_db.install(conn, Settings().resources_dir / "sql")
        yield conn


def test_a_session_ends_at_its_lifetime_when_idle_for_too_long_on_sign_out_and_on_revocation(
    platform,
):
    env = f"ui_{uuid.uuid4().hex[:8]}"
    key = create_key(platform, env, "sessions").key
    hour = timedelta(hours=1)
    token = open_session(platform, key, hour)
    found = session_key(platform, env, token, idle=hour)
    assert found is not None and found.key_id == key.key_id and found.scope.env == env
    assert session_key(platform, "another_env", token, idle=hour) is None
    assert session_key(platform, env, token + "x", idle=hour) is None
    stored = platform.execute(
        "SELECT token_sha256 FROM audit_platform.ui_sessions WHERE key_id = %s", (key.key_id,)
    ).fetchone()[0]
    assert token.encode() not in bytes(stored)

    short = open_session(platform, key, timedelta(seconds=1))
    time.sleep(1.2)
    assert session_key(platform, env, short, idle=hour) is None  # past its lifetime
    assert session_key(platform, env, token, idle=timedelta(seconds=1)) is None  # idle
    assert session_key(platform, env, token, idle=hour) is not None
    close_session(platform, token)
    assert session_key(platform, env, token, idle=hour) is None

    kept = open_session(platform, key, hour)
    assert revoke_key(platform, env, key.key_id)
    assert session_key(platform, env, kept, idle=hour) is None
    # Signing in again purges expired sessions (the short one) of every key.
    open_session(platform, create_key(platform, env, "other").key, hour)
    left = platform.execute(
        "SELECT count(*) FROM audit_platform.ui_sessions WHERE expires_at < now()"
    ).fetchone()[0]
    assert left == 0
