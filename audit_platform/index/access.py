"""Least privilege in Elasticsearch: per environment, a writer for the pipeline and a reader for
the API, so neither holds a superuser's password and neither reaches another environment.

- ``audit_<env>_writer`` (role and user): everything on ``audit-<env>-*`` (the indices per
  retention class, and those of the layout per source until ``index migrate`` moves them) and
  its alias ``audit-<env>`` (create, write, read for reconciliation and verification, manage
  for aliases, retention's deletes and the migration's reindex); index templates and ILM
  policies at cluster level, because Elasticsearch has no per-name privilege for those;
  ``monitor`` for health.
- ``audit_<env>_reader``: ``read`` on the alias ``audit-<env>`` only, which is all the API
  queries; ``monitor`` for its readiness check.

Two ways to install them, one set of descriptors: the security API (native realm), as on any
real cluster; or, for the local stack's integ-test-zip node, whose native realm cannot store
users (its security index needs the absent analysis-common module), the file realm:
``roles.yml`` and ``elasticsearch-users`` (see ``audit_platform_dev.stack.elasticsearch``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from elasticsearch import Elasticsearch

from audit_platform.naming import check_identifier, index_pattern, read_alias
from audit_platform.settings import ElasticsearchConnection

WRITER, READER = "writer", "reader"


@dataclass(frozen=True)
class Account:
    """A role and the user that holds it, with the user's password."""

    kind: str  # WRITER or READER
    name: str  # both the role's and the user's
    password: str

    def exports(self) -> dict[str, str]:
        return {"AUDIT_ES_USERNAME": self.name, "AUDIT_ES_PASSWORD": self.password}

    def connection(self, cluster: ElasticsearchConnection) -> ElasticsearchConnection:
        """``cluster`` (URL, CA) signed in as this account instead."""
        return cluster.model_validate(
            {
                **cluster.model_dump(),
                "username": self.name,
                "password": self.password,
                "api_key": None,
            }
        )


def account_name(env: str, kind: str) -> str:
    return f"audit_{check_identifier('environment', env)}_{kind}"


def role_descriptors(env: str) -> dict[str, dict[str, Any]]:
    """The two roles of an environment, as the security API and ``roles.yml`` both take them."""
    alias = read_alias(env)
    return {
        account_name(env, WRITER): {
            "cluster": ["monitor", "manage_index_templates", "manage_ilm"],
            "indices": [
                {
                    "names": [index_pattern(env), alias],
                    "privileges": ["create_index", "write", "read", "manage"],
                }
            ],
        },
        account_name(env, READER): {
            "cluster": ["monitor"],
            "indices": [{"names": [alias], "privileges": ["read"]}],
        },
    }


def new_accounts(env: str, known: dict[str, str] | None = None) -> list[Account]:
    """The writer and reader of ``env``, keeping any password in ``known`` (name -> password)."""
    known = known or {}
    names = {kind: account_name(env, kind) for kind in (WRITER, READER)}
    return [
        Account(kind, name, known.get(name) or secrets.token_urlsafe(24))
        for kind, name in names.items()
    ]


def install_native(client: Elasticsearch, env: str, accounts: list[Account]) -> None:
    """Roles and users through the security API (idempotent: a rerun updates both)."""
    for name, descriptor in role_descriptors(env).items():
        client.security.put_role(name=name, **descriptor)
    for account in accounts:
        client.security.put_user(
            username=account.name, password=account.password, roles=[account.name]
        )
