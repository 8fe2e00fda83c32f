"""The names of every per-environment resource, in one place (docs/design.md, invariant 6).

An environment name and a source name together identify one capture stream; every resource that
belongs to that stream is named from both, so two environments can share a database server (or
even a source database) and still never read each other's slot, files or indices.
"""

from __future__ import annotations

import re

IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def check_identifier(kind: str, value: str) -> str:
    """Environment and source names end up in SQL identifiers, paths and index names."""
    if not IDENTIFIER.match(value):
        raise ValueError(
            f"{kind} name {value!r} is not valid: use 1 to 32 characters, lowercase letters, "
            "digits and underscores, starting with a letter"
        )
    return value


def slot_name(env: str, source: str) -> str:
    """Logical replication slot, one per (environment, source database)."""
    return f"audit_{check_identifier('environment', env)}_{check_identifier('source', source)}"


def publication_name(env: str, source: str) -> str:
    """Publication listing the tracked tables of one source for one environment."""
    return slot_name(env, source)


def index_name(env: str, source: str, year: int, month: int) -> str:
    """Monthly index per environment and source: retention drops whole months, and one month
    of one source stays a comfortable shard size for the volumes this platform expects."""
    env, source = check_identifier("environment", env), check_identifier("source", source)
    return f"audit-{env}-{source}-{year:04d}.{month:02d}"


def read_alias(env: str) -> str:
    """Every index of one environment, for queries; never spans environments."""
    return f"audit-{check_identifier('environment', env)}"


def template_name(env: str) -> str:
    return f"audit-{check_identifier('environment', env)}"
