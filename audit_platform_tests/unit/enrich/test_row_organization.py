"""Whose a change is, by its table's organization column: the rule enrichment applies."""

from __future__ import annotations

import pytest

from audit_platform.enrich.join import _row_organization
from audit_platform.record import Operation

ACME = {"id": "1", "org": "acme"}


@pytest.mark.parametrize(
    ("column", "operation", "before", "after", "expected"),
    [
        # No column: the context decides.
        (None, Operation.insert, None, ACME, None),
        (None, Operation.update, ACME, {**ACME, "org": "globex"}, None),
        # The row's value, after the change or, for a delete, before it.
        ("org", Operation.insert, None, ACME, "acme"),
        ("org", Operation.snapshot, None, ACME, "acme"),
        ("org", Operation.update, ACME, {**ACME, "note": "x"}, "acme"),
        ("org", Operation.delete, ACME, None, "acme"),
        # A before image holding the key only (default replica identity) is no move.
        ("org", Operation.update, {"id": "1"}, ACME, "acme"),
        # A move between organizations is nobody's: each side would read the other's values.
        ("org", Operation.update, ACME, {**ACME, "org": "globex"}, ""),
        ("org", Operation.update, {**ACME, "org": None}, ACME, ""),
        # Values no key could name are no organization, and the context is not asked.
        ("org", Operation.insert, None, {"id": "1", "org": None}, ""),
        ("org", Operation.insert, None, {"id": "1", "org": ""}, ""),
        ("org", Operation.insert, None, {"id": "1", "org": "x" * 257}, ""),
        ("org", Operation.insert, None, {"id": "1", "org": "tab\there"}, ""),
        ("org", Operation.insert, None, {"id": "1"}, ""),
        # A schema change's images are shapes, not rows; a truncate has none.
        ("org", Operation.ddl, {"org": "acme"}, {"org": "acme"}, ""),
        ("org", Operation.truncate, None, None, ""),
    ],
)
def test_a_change_is_its_rows_organization_or_none(column, operation, before, after, expected):
    assert _row_organization(column, operation, before, after) == expected
