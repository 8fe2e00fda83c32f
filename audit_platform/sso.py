"""Single sign-on: who a person signed in by their identity provider is, and what their groups
give them (docs/design.md, "Single sign-on").

The provider says who the person is and which groups they are in (a claim of the ID token the
Explorer has verified); the settings say what each group gives (``SsoSettings.grants``): a role
and limits, as an API key has. The first grant whose group the person has decides, so an
operator orders them from the most specific; none, and the person has no access, however well
they signed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from audit_platform.api_keys import Scope, scope_of
from audit_platform.settings import GroupGrant

#: Longest subject a principal keeps (OpenID Connect bounds ``sub`` at 255 ASCII characters).
MAX_SUBJECT = 255


class NoAccess(Exception):
    """The person signed in, but nothing in the settings gives them access; the message says
    what to ask for."""


def groups_of(claims: Mapping[str, Any], claim: str) -> list[str]:
    """The person's groups: the claim's strings (a provider may send one string or none)."""
    value = claims.get(claim)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [g for g in value if isinstance(g, str)]
    return []


def grant_for(groups: Iterable[str], grants: list[GroupGrant], env: str) -> GroupGrant | None:
    held = set(groups)
    for grant in grants:
        if grant.group in held and (grant.envs is None or env in grant.envs):
            return grant
    return None


def principal(claims: Mapping[str, Any]) -> str:
    """Who, as the read log names them: ``sso:`` and the provider's subject, which no API key
    id can be (those are hexadecimal)."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT:
        raise NoAccess("the identity provider sent no usable subject (sub) for this person")
    if not subject.isprintable():
        raise NoAccess("the identity provider's subject (sub) holds unprintable characters")
    return f"sso:{subject}"


def display_name(claims: Mapping[str, Any]) -> str:
    for name in ("preferred_username", "email", "name", "sub"):
        value = claims.get(name)
        if isinstance(value, str) and value.strip() and value.isprintable():
            return value.strip()[:200]
    return "unknown"


def scope_for(claims: Mapping[str, Any], grants: list[GroupGrant], claim: str, env: str) -> Scope:
    groups = groups_of(claims, claim)
    grant = grant_for(groups, grants, env)
    if grant is None:
        raise NoAccess(
            f"you signed in as {display_name(claims)}, but none of your groups "
            f"({', '.join(sorted(groups)[:10]) or 'none'}) gives access to environment {env}: "
            "ask an administrator to add you to one that does"
        )
    return scope_of(env, grant.sources, grant.tables, grant.role, grant.organizations)
