"""The names of every per-environment resource, in one place (docs/design.md, invariant 6).

An environment name and a source name together identify one capture stream; every resource that
belongs to that stream is named from both, so two environments can share a database server (or
even a source database) and still never read each other's slot, files or indices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


#: The retention class of a source that names none: the environment's ``retention_days``.
STANDARD_CLASS = "standard"


def index_name(env: str, retention_class: str, year: int, month: int) -> str:
    """Monthly index per environment and retention class, shared by every source of the class
    (``source.service`` tells them apart): the number of indices and shards grows with months
    and classes, never with sources (docs/design.md, invariant 9), and a whole month of a class
    expires at once, since every source in it keeps records equally long.

    ``class-`` marks the layout: without it a class and a source of the same name (a source
    called ``standard``) would name the same index in both layouts, and the migration could not
    tell what is still to move."""
    env = check_identifier("environment", env)
    retention_class = check_identifier("retention class", retention_class)
    return f"audit-{env}-class-{retention_class}-{year:04d}.{month:02d}"


def legacy_index_name(env: str, source: str, year: int, month: int) -> str:
    """The layout before retention classes, one index per environment, source and month: what
    ``audit-platform index migrate`` moves into :func:`index_name`'s indices, and what
    retention still expires (per its source's class) until then."""
    env, source = check_identifier("environment", env), check_identifier("source", source)
    return f"audit-{env}-{source}-{year:04d}.{month:02d}"


def index_pattern(env: str) -> str:
    """Every index of one environment, in either layout (the template's pattern, the writer's
    privileges). Names have no hyphen, so ``audit-a-*`` never matches environment ``a_b``."""
    return f"audit-{check_identifier('environment', env)}-*"


def class_index_pattern(env: str, retention_class: str) -> str:
    """Every monthly index of one retention class of one environment."""
    env = check_identifier("environment", env)
    return f"audit-{env}-class-{check_identifier('retention class', retention_class)}-*"


@dataclass(frozen=True)
class ParsedIndex:
    """An index name of either layout: ``retention_class`` for the current one, ``source``
    for the legacy one (exactly one of the two is set)."""

    env: str
    year: int
    month: int
    retention_class: str | None = None
    source: str | None = None


_CLASS_INDEX = re.compile(
    r"^audit-(?P<env>[a-z][a-z0-9_]*)-class-(?P<name>[a-z][a-z0-9_]*)-(?P<y>\d{4})\.(?P<m>\d{2})$"
)
_LEGACY_INDEX = re.compile(
    r"^audit-(?P<env>[a-z][a-z0-9_]*)-(?P<name>[a-z][a-z0-9_]*)-(?P<y>\d{4})\.(?P<m>\d{2})$"
)


def parse_index_name(name: str) -> ParsedIndex | None:
    """What an index name says, or None for a name neither layout makes."""
    if match := _CLASS_INDEX.match(name):
        year, month = int(match["y"]), int(match["m"])
        return ParsedIndex(match["env"], year, month, retention_class=match["name"])
    if match := _LEGACY_INDEX.match(name):
        return ParsedIndex(match["env"], int(match["y"]), int(match["m"]), source=match["name"])
    return None


def read_alias(env: str) -> str:
    """Every index of one environment, for queries; never spans environments."""
    return f"audit-{check_identifier('environment', env)}"


def template_name(env: str) -> str:
    return f"audit-{check_identifier('environment', env)}"


def class_template_name(env: str, retention_class: str) -> str:
    """Where the cluster has ILM: the template of one class's indices, naming its lifecycle
    policy (an index takes the settings of one template only, the highest priority)."""
    env = check_identifier("environment", env)
    return f"audit-{env}-class-{check_identifier('retention class', retention_class)}"


def lifecycle_name(env: str, retention_class: str) -> str:
    """The ILM policy deleting one class's indices at the class's period."""
    return class_template_name(env, retention_class)
