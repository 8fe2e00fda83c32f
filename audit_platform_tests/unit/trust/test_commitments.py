"""Personal values in leaves: declared in the policy, committed with salts from a key per
person, and rebuilt from an erasure's commitments once the values are gone."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime

import pytest
from pydantic import ValidationError

from audit_platform.enrich.join import personal_shape
from audit_platform.policy import ContextPersonalData, TablePolicy
from audit_platform.record import Operation
from audit_platform.trust.commitments import (
    Commitments,
    ErasedRecord,
    attach_ref,
    commit,
    context_ref,
    context_shape,
    erase_context,
    marker,
    subjects_in,
)

SPEC = json.dumps({"subject": "customer_id", "of": "public.customers", "columns": ["email"]})
KEY = bytes(range(32))
RID = "dev:shop:0000000100000002:3"
PERSONAL = {"of": "public.customers", "columns": ["email"], "before": "7", "after": "7"}


def test_a_commitment_is_the_documented_salted_hash_and_differs_per_place():
    salt = hmac.new(KEY, b"audit-platform commitment v1\0" + RID.encode() + b"\0after", "sha256")
    expected = "c1:" + hashlib.sha256(salt.digest() + b'email\0"ada@example.com"').hexdigest()
    assert commit(KEY, RID, "after", "email", "ada@example.com") == expected
    # The same value in another record, side or column, or under another key, commits
    # differently: commitments do not link records, and the key is what makes them.
    others = {
        commit(KEY, RID + "0", "after", "email", "ada@example.com"),
        commit(KEY, RID, "before", "email", "ada@example.com"),
        commit(KEY, RID, "after", "name", "ada@example.com"),
        commit(bytes(32), RID, "after", "email", "ada@example.com"),
    }
    assert expected not in others and len(others) == 4


def test_sealing_replaces_personal_values_only_and_needs_the_key():
    before = {"id": "1", "customer_id": "7", "email": "old@example.com", "total": "3"}
    after = {**before, "email": "new@example.com"}
    sealed = Commitments({"public.customers:7": KEY}).seal(RID, PERSONAL, (before, after))
    assert sealed[0] == {**before, "email": commit(KEY, RID, "before", "email", before["email"])}
    assert sealed[1]["email"] == commit(KEY, RID, "after", "email", "new@example.com")
    assert before["email"] == "old@example.com"  # the caller's images are not changed
    with pytest.raises(ValueError, match=r"no key for public\.customers:7"):
        Commitments().seal(RID, PERSONAL, (before, after))
    # A null value, and a side naming no person, keep their values: nobody can ask for them.
    nobody = {**PERSONAL, "after": None}
    assert Commitments().seal(RID, nobody, (None, {"email": "x"})) == (None, {"email": "x"})
    assert Commitments({"public.customers:7": KEY}).seal(RID, PERSONAL, (None, {"email": None}))[
        1
    ] == {"email": None}


def test_verification_tells_erased_from_tampered_and_from_not_erased():
    text = marker(12, datetime(2026, 12, 4))
    assert text == "erased on 2026-12-04 under request 12"
    kept = commit(KEY, RID, "after", "email", "ada@example.com")
    erased = {RID: ErasedRecord({"after": {"email": (text, kept)}})}
    found = Commitments(erased=erased, strict=False)
    # Erased as its leaf says: the leaf is rebuilt from the kept commitment.
    assert found.seal(RID, PERSONAL, (None, {"email": text}))[1] == {"email": kept}
    assert found.findings == []
    # Still there although the erasure leaf names it.
    found.seal(RID, PERSONAL, (None, {"email": "ada@example.com"}))
    # Replaced, with the key gone, where no erasure leaf names it.
    found.seal(RID + "9", PERSONAL, (None, {"email": text}))
    found.seal(RID + "8", PERSONAL, (None, {"email": "someone"}))
    assert [kind for kind, _, _ in found.findings] == [
        "not_erased",
        "erased_unlogged",
        "unverifiable",
    ]


@pytest.mark.parametrize(
    ("operation", "before", "after", "expected"),
    [
        (Operation.insert, None, {"customer_id": 7}, (None, "7")),
        (Operation.delete, {"customer_id": "7"}, None, ("7", None)),
        # An old key image without the subject column is the after image's person's.
        (Operation.update, {"id": 1}, {"id": 1, "customer_id": "7"}, ("7", "7")),
        # A row moved from one person to another: each image is its own person's.
        (Operation.update, {"customer_id": "7"}, {"customer_id": "8"}, ("7", "8")),
        (Operation.insert, None, {"customer_id": None}, (None, None)),
    ],
)
def test_each_image_is_its_subject_columns_person(operation, before, after, expected):
    shape = json.loads(personal_shape(SPEC, operation, before, after))
    assert (shape["before"], shape["after"]) == expected
    assert shape["of"] == "public.customers" and shape["columns"] == ["email"]
    assert subjects_in([json.dumps(shape), None]) == {
        f"public.customers:{s}" for s in expected if s is not None
    }


def test_no_declaration_for_schema_changes_truncates_or_tables_without_one():
    assert personal_shape(SPEC, Operation.ddl, {"a": 1}, {"a": 2}) is None
    assert personal_shape(SPEC, Operation.truncate, None, None) is None
    assert personal_shape(None, Operation.insert, None, {"a": 1}) is None


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"personal": {"subject": "id", "columns": []}}, "at least 1 item"),
        ({"personal": {"subject": "id", "columns": ["id"]}}, "is the subject column"),
        ({"key": ["code"], "personal": {"subject": "id", "columns": ["code"]}}, "key column"),
        ({"mask": ["email"], "personal": {"subject": "id", "columns": ["email"]}}, "masked"),
        ({"exclude": ["email"], "personal": {"subject": "id", "columns": ["email"]}}, "not capt"),
        ({"exclude": ["cid"], "personal": {"subject": "cid", "columns": ["e"]}}, "subject column"),
        (
            {"organization": "org", "personal": {"subject": "id", "columns": ["org"]}},
            "organization column",
        ),
        ({"personal": {"subject": "id", "of": "customers", "columns": ["e"]}}, "schema.table"),
    ],
)
def test_a_personal_declaration_is_checked_with_a_clear_error(table, problem):
    with pytest.raises(ValidationError, match=problem):
        TablePolicy.model_validate(table)


def test_the_declaration_is_staged_with_its_table_as_the_default_person():
    policy = TablePolicy.model_validate({"personal": {"subject": "id", "columns": ["name", "e"]}})
    assert policy.personal is not None
    assert json.loads(policy.personal.spec("public.customers")) == {
        "subject": "id",
        "of": "public.customers",
        "columns": ["e", "name"],
    }


# --- the context's personal fields ---------------------------------------------------------

CONTEXT_SPEC = json.dumps(
    {"of": "public.users", "fields": ["actor.name", "client_addr"], "actors": ["user"]}
)
CONTEXT = {
    "actor": {"type": "user", "id": "u-7", "name": "Ada Lovelace"},
    "client_addr": "203.0.113.9",
    "reason": "refund",
}
REF = context_ref("shop", "0/16B3748")


def test_a_context_names_its_actor_where_the_declaration_makes_that_actor_a_person():
    shape = json.loads(context_shape(CONTEXT_SPEC, json.dumps(CONTEXT)))
    assert shape == {
        "of": "public.users",
        "subject": "u-7",
        "fields": ["actor.name", "client_addr"],
    }
    assert subjects_in([json.dumps(shape)]) == {"public.users:u-7"}
    service = {**CONTEXT, "actor": {"type": "service", "id": "billing", "name": "Billing"}}
    assert context_shape(CONTEXT_SPEC, json.dumps(service)) is None  # a service is no person
    assert context_shape(None, json.dumps(CONTEXT)) is None  # nothing declared
    assert context_shape(CONTEXT_SPEC, None) is None  # no context


def test_sealing_a_context_commits_its_actors_personal_fields_only():
    shape = json.loads(context_shape(CONTEXT_SPEC, json.dumps(CONTEXT)))
    sealed = Commitments({"public.users:u-7": KEY}).seal_context(REF, shape, CONTEXT)
    assert sealed == {
        "actor": {
            "type": "user",
            "id": "u-7",
            "name": commit(KEY, REF, "context", "actor.name", "Ada Lovelace"),
        },
        "client_addr": commit(KEY, REF, "context", "client_addr", "203.0.113.9"),
        "reason": "refund",
    }
    assert CONTEXT["actor"]["name"] == "Ada Lovelace"  # the caller's context is not changed
    # Another transaction's context of the same actor commits differently: no link.
    other = context_ref("shop", "0/16B3750")
    again = Commitments({"public.users:u-7": KEY}).seal_context(other, shape, CONTEXT)
    assert again["client_addr"] != sealed["client_addr"]
    assert attach_ref("shop", 42, "2026-12-04T10:00:00.000000Z") not in (REF, other)
    with pytest.raises(ValueError, match=r"no key for public\.users:u-7"):
        Commitments().seal_context(REF, shape, CONTEXT)


def test_an_erased_context_is_rebuilt_from_its_erasure_and_a_leftover_value_is_named():
    shape = json.loads(context_shape(CONTEXT_SPEC, json.dumps(CONTEXT)))
    text = marker(3, datetime(2026, 12, 4))
    erased_context = erase_context(CONTEXT, shape["fields"], text)
    assert erased_context["actor"] == {"type": "user", "id": "u-7", "name": text}
    assert erased_context["client_addr"] == text and erased_context["reason"] == "refund"
    kept = {
        f: commit(KEY, REF, "context", f, v)
        for f, v in (("actor.name", "Ada Lovelace"), ("client_addr", "203.0.113.9"))
    }
    sealed = Commitments({"public.users:u-7": KEY}).seal_context(REF, shape, CONTEXT)
    found = Commitments(
        erased={REF: ErasedRecord({"context": {f: (text, c) for f, c in kept.items()}})},
        strict=False,
    )
    assert found.seal_context(REF, shape, erased_context) == sealed
    assert found.findings == []
    found.seal_context(REF, shape, CONTEXT)
    assert [kind for kind, _, _ in found.findings] == ["not_erased", "not_erased"]
    # Replaced without an erasure: with the key gone, named; with the key, a suspect.
    gone = Commitments(strict=False)
    gone.seal_context(REF, shape, erased_context)
    assert {kind for kind, _, _ in gone.findings} == {"erased_unlogged"}
    keyed = Commitments({"public.users:u-7": KEY}, strict=False)
    keyed.seal_context(REF, shape, erased_context)
    assert keyed.suspects == {REF}


@pytest.mark.parametrize(
    ("declared", "problem"),
    [
        ({"of": "users"}, "schema.table"),
        ({"of": "public.users", "fields": []}, "at least 1 item"),
        ({"of": "public.users", "fields": ["reason"]}, "actor.name"),
        ({"of": "public.users", "actor_types": ["robot"]}, "user"),
        ({"fields": ["actor.name"]}, "of"),
    ],
)
def test_a_context_declaration_is_checked_with_a_clear_error(declared, problem):
    with pytest.raises(ValidationError, match=problem):
        ContextPersonalData.model_validate(declared)


def test_the_context_declaration_defaults_to_both_fields_of_user_actors():
    declared = ContextPersonalData.model_validate({"of": "public.users"})
    assert json.loads(declared.spec()) == json.loads(CONTEXT_SPEC)
