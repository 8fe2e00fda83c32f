"""A snapshot's condition (capture.row_filter): what someone who may launch a job can make the
platform's role run on a source. Only comparisons of the table's columns with constants pass,
written out again with every name quoted; everything that can run code is refused by name."""

from __future__ import annotations

import pytest

from audit_platform.capture.row_filter import ConditionError, as_sql, row_condition

COLUMNS = {
    "id": "integer",
    "status": "text",
    "created_at": "timestamp with time zone",
    "Name": "text",
    "note": "text",
    "mood": "public.mood",
    "email": "text",
}
HIDDEN = frozenset({"email"})  # masked or excluded by the policy


@pytest.mark.parametrize(
    ("condition", "written"),
    [
        ("status = 'open'", "\"status\" = 'open'"),
        ("STATUS <> 'x' OR id IS NULL", '"status" <> \'x\' OR "id" IS NULL'),
        ("\"Name\" = 'a''b'", "\"Name\" = 'a''b'"),
        ("note LIKE 'a%' AND id IN (1, 2)", '"note" LIKE \'a%\' AND "id" IN (1, 2)'),
        ("id BETWEEN 1 AND 10 AND NOT id = 5", '"id" BETWEEN 1 AND 10 AND NOT "id" = 5'),
        (
            "created_at > now() - interval '30 days'",
            "\"created_at\" > CURRENT_TIMESTAMP - INTERVAL '30 DAYS'",
        ),
        ("created_at::date >= current_date - 7", 'CAST("created_at" AS DATE) >= CURRENT_DATE - 7'),
        ("note = $$it's$$", "\"note\" = 'it''s'"),
        ("id = 1 -- */ ; DROP TABLE t", '"id" = 1'),
        ("id = 1 /* a */ AND id = 2", '"id" = 1 AND "id" = 2'),
        ("mood = 'sad'", "\"mood\" = 'sad'"),  # compared with a constant of its own type
    ],
)
def test_a_comparison_of_columns_with_constants_is_written_out_quoted(condition, written):
    assert row_condition(condition, COLUMNS, HIDDEN) == written


@pytest.mark.parametrize(
    ("condition", "named"),
    [
        ("pg_terminate_backend(42)", "PG_TERMINATE_BACKEND(42)"),
        ("lower(status) = 'x'", "LOWER"),
        ("id IN (SELECT 1)", "Subquery"),
        ("EXISTS (SELECT 1 FROM pg_authid)", "Exists"),
        ("id = 1; DROP TABLE t", "one boolean expression"),
        ("status::public.evil IS NULL", "not one of the built-in types"),
        ("id::regclass IS NULL", "not one of the built-in types"),
        ("id::money > 1", "not one of the built-in types"),
        ("mood::text = 'sad'", "of the database's own type public.mood"),
        ("email LIKE 'a%'", "which the policy masks or excludes"),
        ("CAST(email AS int) = 0", "which the policy masks or excludes"),
        ("E'\\\\' = note", "ByteString"),
        ("t.id = 1", "without a table or schema"),
        ("public.t.id = 1", "without a table or schema"),
        ("secret = 1", "column 'secret', which the table does not have"),
        ('"name" = 1', "column 'name', which the table does not have"),
        ("", "one boolean expression"),
        ("id >", "not SQL PostgreSQL reads"),
        ("id = ANY(ARRAY[1])", None),
        ("status = current_user", None),
    ],
)
def test_anything_that_can_run_code_or_names_no_column_is_refused(condition, named):
    try:
        written = row_condition(condition, COLUMNS, HIDDEN)
    except ConditionError as exc:
        assert named is None or named in str(exc), str(exc)
        assert "condition" in str(exc)
        return
    # What passes may hold only quoted columns and constants: no function, no keyword of a
    # statement, no comment that could hide the rest.
    assert named is None and "--" not in written and "ANY" not in written, written
    pytest.fail(f"{condition!r} was allowed as {written!r}")


def test_a_percent_in_a_constant_survives_the_driver_s_parameters():
    assert as_sql("\"note\" LIKE 'a%'").as_string(None) == "(\"note\" LIKE 'a%%')"
