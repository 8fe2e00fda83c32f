"""Tracking policy per source: which tables are captured and what happens to each column.

Policies are data (docs/design.md, invariant 7): ``resources/sources/<source>.yaml``. They are
validated here, and a mistake is reported with the file, the key and the problem, because the
person fixing it is editing that file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from audit_platform.naming import check_identifier


class PolicyError(ValueError):
    """A policy file is missing or invalid; the message names the file, key and problem."""


class PersonalData(BaseModel):
    """The personal columns of a table, and whose they are (docs/design.md, "Erasure")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str = Field(
        description="The column naming the person the personal columns belong to, e.g. "
        "customer_id (or id in the person's own table)."
    )
    of: str | None = Field(
        default=None,
        description="The table whose rows are those persons, schema.table (default: this "
        "table): what `erase --subject TABLE:ID` names.",
    )
    columns: list[str] = Field(min_length=1, description="The columns holding personal data.")

    @field_validator("of")
    @classmethod
    def _qualified(cls, value: str | None) -> str | None:
        return None if value is None else _schema_table("of", value)

    def spec(self, table: str) -> str:
        """The declaration as capture stages it with each change (compact JSON)."""
        return json.dumps(
            {"subject": self.subject, "of": self.of or table, "columns": sorted(self.columns)},
            separators=(",", ":"),
        )


#: The context fields that can be declared personal: the actor's display name and the client
#: address (the other fields name services, requests and reasons, not people).
ContextField = Literal["actor.name", "client_addr"]


class ContextPersonalData(BaseModel):
    """The personal fields of the contexts a source's services record, and whose they are: the
    actor's, named by ``actor.id`` in ``of`` (docs/design.md, "Erasure")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    of: str = Field(
        description="The table whose rows are the actors, schema.table (for example "
        "public.users): what `erase --subject TABLE:ID` names, with actor.id as the ID."
    )
    fields: list[ContextField] = Field(
        default=["actor.name", "client_addr"], min_length=1, description="The personal fields."
    )
    actor_types: list[Literal["user", "service", "job", "system"]] = Field(
        default=["user"],
        min_length=1,
        description="The actor types that are persons (a service or a job is not one).",
    )

    @field_validator("of")
    @classmethod
    def _qualified(cls, value: str) -> str:
        return _schema_table("of", value)

    def spec(self) -> str:
        """The declaration as capture stages it with each context (compact JSON)."""
        return json.dumps(
            {"of": self.of, "fields": sorted(set(self.fields)), "actors": sorted(self.actor_types)},
            separators=(",", ":"),
        )


def _schema_table(key: str, value: str) -> str:
    if value.count(".") != 1 or not all(value.split(".")):
        raise ValueError(f"{key}: {value!r} must be written schema.table, e.g. public.users")
    if ":" in value:  # an erasure names a person TABLE:ID
        raise ValueError(f"{key}: {value!r} cannot hold ':', which separates table and id")
    return value


class TablePolicy(BaseModel):
    """What is captured from one table.

    ``include`` (only these columns) and ``exclude`` are mutually exclusive; ``mask`` columns
    are replaced by a keyed hash so equal values stay comparable and changes stay visible;
    updates that change only ``ignore_changes_to`` columns (say ``updated_at``) are dropped.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: list[str] | None = Field(
        default=None, description="Columns that identify the object; default: the primary key."
    )
    include: list[str] | None = None
    exclude: list[str] = []
    mask: list[str] = []
    ignore_changes_to: list[str] = []
    organization: str | None = Field(
        default=None,
        description="The column holding the organization (tenant) id a row belongs to: its "
        "changes are that organization's, whoever made them; default: the transaction "
        "context's organization.",
    )
    personal: PersonalData | None = Field(
        default=None,
        description="Which columns hold personal data and whose: what an erasure removes.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TablePolicy:
        if self.include is not None and self.exclude:
            raise ValueError("use either include or exclude, not both")
        if overlap := set(self.mask) & set(self.exclude):
            raise ValueError(f"columns both masked and excluded: {sorted(overlap)}")
        if self.include is not None and (missing := set(self.mask) - set(self.include)):
            raise ValueError(f"masked columns not in include: {sorted(missing)}")
        if self.key and (hidden := set(self.key) & set(self.exclude)):
            raise ValueError(f"key columns cannot be excluded: {sorted(hidden)}")
        if self.organization is not None:
            if not self.keeps(self.organization):
                raise ValueError(
                    f"organization column {self.organization!r} is not captured: include it, "
                    "or stop excluding it"
                )
            if self.organization in self.mask:
                raise ValueError(
                    f"organization column {self.organization!r} is masked: a masked value "
                    "names no organization; unmask it"
                )
        if self.personal is not None:
            self._check_personal(self.personal)
        return self

    def _check_personal(self, personal: PersonalData) -> None:
        if not self.keeps(personal.subject) or personal.subject in self.mask:
            raise ValueError(
                f"personal.subject column {personal.subject!r} is not captured as it is: "
                "capture it unmasked, or name the column that says whose the row is"
            )
        for column in personal.columns:
            if column == personal.subject:
                raise ValueError(
                    f"personal column {column!r} is the subject column: a subject's id is kept "
                    "so its records can be found; name only the columns to erase"
                )
            if self.key and column in self.key:
                raise ValueError(f"personal column {column!r} is a key column, which is kept")
            if column == self.organization:
                raise ValueError(f"personal column {column!r} is the organization column")
            if column in self.mask:
                raise ValueError(
                    f"personal column {column!r} is masked: a masked value is already not the "
                    "value; drop it from mask or from personal.columns"
                )
            if not self.keeps(column):
                raise ValueError(f"personal column {column!r} is not captured")

    def keeps(self, column: str) -> bool:
        if self.key and column in self.key:
            return True
        if self.include is not None:
            return column in self.include
        return column not in self.exclude


class SourcePolicy(BaseModel):
    """The policy of one source database."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    version: int = Field(ge=1, description="Bump on every change; records carry it.")
    tables: dict[str, TablePolicy] = Field(min_length=1)
    context_personal: ContextPersonalData | None = Field(
        default=None,
        description="Which fields of the contexts this source's services record are personal, "
        "and whose: what an erasure of an actor removes.",
    )

    @property
    def organization_columns(self) -> dict[str, str]:
        """schema.table -> the column naming its rows' organization, for tables that have one."""
        return {name: t.organization for name, t in self.tables.items() if t.organization}

    def personal_specs(self) -> dict[str, str]:
        """schema.table -> its personal declaration as staged, for tables that have one."""
        return {name: t.personal.spec(name) for name, t in self.tables.items() if t.personal}

    def context_spec(self) -> str | None:
        """The contexts' personal declaration as staged with each context, if there is one."""
        return None if self.context_personal is None else self.context_personal.spec()

    def persons_tables(self) -> set[str]:
        """The tables of persons this policy declares personal data of (rows and contexts)."""
        found = {t.personal.of or name for name, t in self.tables.items() if t.personal}
        if self.context_personal is not None:
            found.add(self.context_personal.of)
        return found

    @field_validator("source")
    @classmethod
    def _source_identifier(cls, value: str) -> str:
        return check_identifier("source", value)

    @field_validator("tables")
    @classmethod
    def _qualified_names(cls, tables: dict[str, TablePolicy]) -> dict[str, TablePolicy]:
        for name in tables:
            if name.count(".") != 1 or not all(name.split(".")):
                raise ValueError(f"table {name!r} must be written schema.table, e.g. public.orders")
        return tables

    @property
    def fingerprint(self) -> str:
        """A short hash of the policy's content, to tell two edits under one version apart."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:8]

    @property
    def policy_version(self) -> str:
        """What every record carries: the declared version and the content fingerprint."""
        return f"{self.version}:{self.fingerprint}"

    def table_names(self) -> list[tuple[str, str]]:
        return [tuple(name.split(".", 1)) for name in sorted(self.tables)]  # type: ignore[misc]


def policy_path(resources_dir: Path, source: str) -> Path:
    return resources_dir / "sources" / f"{check_identifier('source', source)}.yaml"


def load_policy(path: Path) -> SourcePolicy:
    if not path.exists():
        raise PolicyError(f"{path}: no policy file for this source; create it (see README)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping with source, version and tables")
    try:
        policy = SourcePolicy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PolicyError(f"{path}: {problems}") from exc
    if policy.source != path.stem:
        raise PolicyError(
            f"{path}: source: {policy.source!r} does not match the file name {path.stem!r}"
        )
    return policy
