"""What an identity provider's groups give a person in the Explorer (``audit_platform.sso``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from audit_platform.settings import GroupGrant, SsoSettings
from audit_platform.sso import NoAccess, groups_of, principal, scope_for

GRANTS = [
    GroupGrant(group="northwind-admins", role="auditor", organizations=["northwind"]),
    GroupGrant(group="support", role="reader", envs=["prod"], sources=["shop"]),
    GroupGrant(group="audit-admins", role="admin"),
]


def test_the_first_grant_whose_group_the_person_has_decides():
    claims = {"sub": "u1", "groups": ["audit-admins", "northwind-admins"]}
    scope = scope_for(claims, GRANTS, "groups", "prod")
    assert (scope.role, scope.organizations, scope.sources) == (
        "auditor",
        frozenset({"northwind"}),
        None,
    )
    assert scope_for({"sub": "u2", "groups": ["audit-admins"]}, GRANTS, "groups", "prod").role == (
        "admin"
    )


def test_a_grant_for_other_environments_gives_nothing_here():
    claims = {"sub": "u1", "groups": ["support"]}
    assert scope_for(claims, GRANTS, "groups", "prod").sources == frozenset({"shop"})
    with pytest.raises(
        NoAccess, match="none of your groups \\(support\\) gives access to environment dev"
    ):
        scope_for(claims, GRANTS, "groups", "dev")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "u1"},
        {"sub": "u1", "groups": []},
        {"sub": "u1", "groups": "nobody"},
        {"sub": "u1", "groups": [{"name": "audit-admins"}]},  # not a string: not a group
        {"sub": "u1", "roles": ["audit-admins"]},  # another claim than the configured one
    ],
)
def test_a_person_without_a_granted_group_has_no_access(claims):
    with pytest.raises(NoAccess, match="ask an administrator"):
        scope_for(claims, GRANTS, "groups", "prod")


def test_the_groups_claim_may_be_one_string():
    assert groups_of({"g": "audit-admins"}, "g") == ["audit-admins"]


@pytest.mark.parametrize("subject", [None, "", "x" * 256, "a\nb", 7])
def test_a_subject_that_cannot_name_a_person_is_refused(subject):
    with pytest.raises(NoAccess, match="subject"):
        principal({"sub": subject})


def test_principals_cannot_be_taken_for_key_ids():
    assert principal({"sub": "0123456789ab"}) == "sso:0123456789ab"


def test_an_empty_limit_is_refused_rather_than_read_as_no_limit():
    with pytest.raises(ValidationError, match="at least 1 item"):
        GroupGrant(group="g", organizations=[])


def test_grants_come_from_json_in_the_environment(monkeypatch):
    monkeypatch.setenv("AUDIT_UI_SSO_ISSUER", "https://idp.example.com")
    monkeypatch.setenv(
        "AUDIT_UI_SSO_GRANTS", '[{"group": "support", "role": "reader", "organizations": ["acme"]}]'
    )
    sso = SsoSettings()
    assert sso.enabled and sso.grants[0].organizations == ["acme"]
    monkeypatch.setenv("AUDIT_UI_SSO_GRANTS", '[{"group": "support", "role": "owner"}]')
    with pytest.raises(ValidationError, match="role"):
        SsoSettings()


@pytest.mark.parametrize(
    "issuer", ["http://login.example.com", "ftp://127.0.0.1", "login.example.com"]
)
def test_a_provider_reached_without_tls_is_refused_unless_on_this_machine(issuer):
    with pytest.raises(ValidationError, match="https://"):
        SsoSettings(issuer=issuer)
    assert SsoSettings(issuer="http://127.0.0.1:8080").enabled


def test_every_process_signs_the_sign_in_state_with_the_same_key():
    one = SsoSettings(issuer="https://idp.example.com", client_secret="s3cret")
    other = SsoSettings(issuer="https://idp.example.com", client_secret="s3cret")
    assert one.state_key() == other.state_key() != "s3cret"
    assert SsoSettings(issuer="https://i.example.com", state_secret="k").state_key() == "k"
    with pytest.raises(ValueError, match="AUDIT_UI_SSO_STATE_SECRET"):
        SsoSettings(issuer="https://idp.example.com").state_key()
