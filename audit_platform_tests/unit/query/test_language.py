"""The query language, parsed: fields, OR, negation, quotes, times, and errors that point."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from audit_platform.query.filters import EventFilter, filter_clauses
from audit_platform.query.language import QuerySyntaxError, parse

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_fields_or_negation_and_free_words():
    parsed = parse('actor:alice op:insert,delete -actor:bot "disk full" refund -test', now=NOW)
    assert [(t.field, t.values, t.negated) for t in parsed.terms] == [
        ("actor", ("alice",), False),
        ("op", ("insert", "delete"), False),
        ("actor", ("bot",), True),
    ]
    assert parsed.words == ("disk full", "refund")
    assert parsed.not_words == ("test",)
    clauses = parsed.clauses()
    assert {"term": {"context.actor.id": "alice"}} in clauses
    assert {
        "bool": {
            "should": [{"term": {"operation": "insert"}}, {"term": {"operation": "delete"}}],
            "minimum_should_match": 1,
        }
    } in clauses
    [negative] = [c for c in clauses if "bool" in c and "must_not" in c["bool"]]
    assert {"term": {"context.actor.id": "bot"}} in negative["bool"]["must_not"]


def test_quotes_keep_spaces_commas_and_colons_in_a_value():
    parsed = parse(r'after.note:"on hold, see: \"ticket\"" table:public.orders', now=NOW)
    assert parsed.terms[0].values == ('on hold, see: "ticket"',)
    assert parsed.clauses()[0] == {"term": {"after.note": 'on hold, see: "ticket"'}}
    assert parsed.clauses()[1] == {
        "bool": {
            "filter": [{"term": {"table.schema": "public"}}, {"term": {"table.name": "orders"}}]
        }
    }


def test_a_transition_is_a_before_and_an_after_value_on_the_same_record():
    parsed = parse("before.status:paid after.status:refunded", now=NOW)
    assert parsed.clauses() == [
        {"term": {"before.status": "paid"}},
        {"term": {"after.status": "refunded"}},
    ]
    assert parsed.image_columns() == [("before", "status"), ("after", "status")]


def test_relative_and_absolute_times():
    parsed = parse("since:-24h until:2026-11-27T08:00:00Z", now=NOW)
    assert parsed.since == NOW - timedelta(hours=24)
    assert parsed.until == datetime(2026, 11, 27, 8, tzinfo=UTC)
    assert parse("since:-2w", now=NOW).since == NOW - timedelta(weeks=2)
    assert parse("since:2026-11-01", now=NOW).since == datetime(2026, 11, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("actor:alice acter:bob", r"term 2 `acter:bob`: unknown field 'acter'"),
        ("op:upsert", r"term 1 `op:upsert`: 'upsert' is not one of insert, update"),
        ("xid:12x", r"a transaction id is a whole number"),
        ("ip:10.0.0.300", r"not an IP address"),
        ("since:yesterday", r"term 1 `since:yesterday`: 'yesterday' is not a time"),
        ("since:-1h since:-2h", r"since is given twice"),
        ("-since:-1h", r"since takes one time and no '-'"),
        ('actor:"alice', r"the quote opened at character 7 .* is never closed"),
        ("actor:", r"a value is empty"),
    ],
)
def test_errors_point_at_the_term_and_say_what_works(text, message):
    with pytest.raises(QuerySyntaxError, match=message):
        parse(text, now=NOW)


def test_values_are_data_never_syntax():
    """Characters that mean something in Lucene query syntax reach a term clause as is."""
    parsed = parse('actor:"*" after.note:"a OR b" object:(1)', now=NOW)
    assert parsed.clauses() == [
        {"term": {"context.actor.id": "*"}},
        {"term": {"after.note": "a OR b"}},
        {"term": {"object_id": "(1)"}},
    ]


def test_the_filter_takes_the_query_and_value_parameters_in_both_spellings():
    f = EventFilter.model_validate(
        {"query": "actor:alice since:-1h", "after.status": "refunded", "before": ["status:paid"]}
    )
    assert f.after == ["status:refunded"] and f.before == ["status:paid"]
    since, until = f.bounds
    assert since is not None and until is None
    clauses = filter_clauses(f, None, None)
    assert {"term": {"after.status": "refunded"}} in clauses
    assert {"term": {"before.status": "paid"}} in clauses
    assert {"term": {"context.actor.id": "alice"}} in clauses
    assert sorted(f.image_columns()) == [("after", "status"), ("before", "status")]


def test_a_time_given_twice_or_a_bad_query_is_a_validation_error():
    with pytest.raises(ValidationError, match="since is given both"):
        EventFilter(query="since:-1h", since=NOW)
    with pytest.raises(ValidationError, match="unknown field 'acter'"):
        EventFilter(query="acter:bob")
    with pytest.raises(ValidationError, match="not an IP address"):
        EventFilter(client_ip="nope")
    with pytest.raises(ValidationError, match="not an IP address"):  # found by Schemathesis
        EventFilter(client_ip="")


def test_a_range_before_1970_is_cut_at_the_epoch_or_refused():
    """Found by Schemathesis: `until=0.5` made Elasticsearch refuse a date_nanos range in the
    middle of an export stream."""
    from audit_platform.query.filters import EPOCH, QueryError, time_range

    week = timedelta(days=7)
    start, end = time_range(
        None, EPOCH + timedelta(days=1), now=NOW, default=week, maximum=timedelta(days=400)
    )
    assert (start, end) == (EPOCH, EPOCH + timedelta(days=1))
    with pytest.raises(QueryError, match="before 1970-01-01"):
        time_range(
            None,
            datetime(1969, 12, 31, tzinfo=UTC),
            now=NOW,
            default=week,
            maximum=timedelta(days=400),
        )
