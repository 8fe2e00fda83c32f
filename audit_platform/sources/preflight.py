"""Can this database join: what ``source add`` checks before it writes or creates anything.

Each check is a judgment of facts read from the server (:class:`ServerFacts`), so the judgments
are plain functions, tested for every managed service without one. A failure names the fix in
the words of where the database runs: on Amazon RDS and Aurora, Cloud SQL and Azure Database
for PostgreSQL, server settings are flags or parameter groups and the superuser is a role of the
provider's, and ``ALTER SYSTEM`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psycopg

from audit_platform.naming import slot_name
from audit_platform.platform_db import one
from audit_platform.sources.check import Finding, Level


class Provider(StrEnum):
    postgres = "PostgreSQL"
    rds = "Amazon RDS / Aurora"
    cloudsql = "Cloud SQL"
    azure = "Azure Database for PostgreSQL"


#: A setting (or role) only each provider has: how the server says where it runs.
_PROVIDER_SETTINGS = {
    "rds.logical_replication": Provider.rds,
    "cloudsql.logical_decoding": Provider.cloudsql,
    "azure.extensions": Provider.azure,
}
#: The provider's role that stands for a superuser where nobody is one.
SUPERUSER_ROLES = {
    Provider.rds: "rds_superuser",
    Provider.cloudsql: "cloudsqlsuperuser",
    Provider.azure: "azure_pg_admin",
}


@dataclass(frozen=True)
class ServerFacts:
    provider: Provider
    version_num: int
    wal_level: str
    role: str
    #: REPLICATION, superuser, or on RDS a member of rds_replication.
    may_replicate: bool
    #: A superuser, or a member of the provider's stand-in role (event triggers, revoking
    #: pg_logical_emit_message from PUBLIC).
    superuser: bool
    #: May create the audit schema in this database (CREATE on the database), or it exists.
    may_install: bool
    max_replication_slots: int
    slots_used: int
    max_wal_senders: int
    senders_used: int
    #: This environment's slot for the source exists already (a source joining again).
    slot_exists: bool
    max_slot_wal_keep_size: str


def server_facts(conn: psycopg.Connection, env: str, source: str) -> ServerFacts:
    settings: dict[str, str] = dict(
        conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (
                [
                    "server_version_num",
                    "wal_level",
                    "max_replication_slots",
                    "max_wal_senders",
                    "max_slot_wal_keep_size",
                    *_PROVIDER_SETTINGS,
                ],
            ),
        ).fetchall()
    )
    provider = next(
        (p for name, p in _PROVIDER_SETTINGS.items() if name in settings), Provider.postgres
    )
    role, rolsuper, rolreplication = one(
        conn.execute(
            "SELECT rolname, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
        )
    )

    def member_of(name: str) -> bool:
        return bool(
            one(
                conn.execute(
                    "SELECT EXISTS (SELECT FROM pg_roles r WHERE r.rolname = %s"
                    " AND pg_has_role(current_user, r.oid, 'MEMBER'))",
                    (name,),
                )
            )[0]
        )

    stand_in = SUPERUSER_ROLES.get(provider)
    superuser = rolsuper or (stand_in is not None and member_of(stand_in))
    installed = one(conn.execute("SELECT to_regnamespace('audit') IS NOT NULL"))[0]
    may_create = one(conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')"))
    slots, slot_exists = one(
        conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE slot_name = %s) FROM pg_replication_slots",
            (slot_name(env, source),),
        )
    )
    senders = one(conn.execute("SELECT count(*) FROM pg_stat_replication"))[0]
    return ServerFacts(
        provider=provider,
        version_num=int(settings["server_version_num"]),
        wal_level=settings["wal_level"],
        role=role,
        may_replicate=rolsuper or rolreplication or member_of("rds_replication"),
        superuser=superuser,
        may_install=installed or may_create[0],
        max_replication_slots=int(settings["max_replication_slots"]),
        slots_used=slots,
        max_wal_senders=int(settings["max_wal_senders"]),
        senders_used=senders,
        slot_exists=bool(slot_exists),
        max_slot_wal_keep_size=settings.get("max_slot_wal_keep_size", "-1"),
    )


def _server_setting(provider: Provider, name: str, value: str, restart: bool) -> str:
    """How to set a server setting where the database runs."""
    after = " and restart the server" if restart else ""
    if provider is Provider.rds:
        return (
            f"set {name} = {value} in the instance's DB parameter group (the cluster parameter "
            f"group on Aurora){' and reboot the instance' if restart else ''}"
        )
    if provider is Provider.cloudsql:
        return (
            f"gcloud sql instances patch INSTANCE --database-flags={name}={value} (Cloud SQL "
            "restarts the instance; list every flag you keep: the option replaces them all)"
        )
    if provider is Provider.azure:
        return (
            f"az postgres flexible-server parameter set --resource-group GROUP --server-name "
            f"SERVER --name {name} --value {value}{after}"
        )
    then = "restart PostgreSQL" if restart else "SELECT pg_reload_conf();"
    return f"ALTER SYSTEM SET {name} = '{value}'; then {then}"


def _exhausted(facts: ServerFacts, subject: str, setting: str, who: str) -> Finding:
    """Every one of a server's ``setting`` in use: raise it by a few (a restart)."""
    limit = getattr(facts, setting)
    return Finding(
        Level.error,
        subject,
        f"all {limit} are in use; {who} needs one",
        _server_setting(facts.provider, setting, str(limit + 4), restart=True),
    )


def judge(facts: ServerFacts) -> list[Finding]:
    """What the server's facts say about capture from it, each failure with its fix."""
    found: list[Finding] = []
    if facts.version_num < 140000:
        found.append(
            Finding(
                Level.error,
                "server version",
                f"is {facts.version_num}; capture needs PostgreSQL 14 or newer (contexts travel "
                "as logical messages, which pgoutput sends from 14 on)",
                "upgrade the server (pg_upgrade, or the provider's major version upgrade)",
            )
        )
    if facts.wal_level == "logical":
        found.append(Finding(Level.ok, "wal_level", "logical"))
    else:
        setting = {
            Provider.rds: ("rds.logical_replication", "1"),
            Provider.cloudsql: ("cloudsql.logical_decoding", "on"),
        }.get(facts.provider, ("wal_level", "logical"))
        found.append(
            Finding(
                Level.error,
                "wal_level",
                f"is {facts.wal_level!r}; logical decoding needs 'logical'",
                _server_setting(facts.provider, *setting, restart=True),
            )
        )
    if facts.may_replicate:
        found.append(Finding(Level.ok, "role", f"{facts.role} may read replication slots"))
    else:
        grant = {
            Provider.rds: f"GRANT rds_replication TO {facts.role};",
            Provider.cloudsql: f"ALTER USER {facts.role} WITH REPLICATION; (as cloudsqlsuperuser)",
            Provider.azure: f"ALTER ROLE {facts.role} WITH REPLICATION; (as azure_pg_admin)",
        }.get(facts.provider, f"ALTER ROLE {facts.role} REPLICATION; (as a superuser)")
        found.append(
            Finding(
                Level.error,
                "role",
                f"{facts.role} may not read replication slots (it needs the REPLICATION attribute)",
                grant,
            )
        )
    if not facts.may_install:
        found.append(
            Finding(
                Level.error,
                "privileges",
                f"{facts.role} may not create the audit schema in this database",
                f"GRANT CREATE ON DATABASE <this database> TO {facts.role};",
            )
        )
    if not facts.superuser:
        stand_in = SUPERUSER_ROLES.get(facts.provider, "a superuser")
        found.append(
            Finding(
                Level.warning,
                "superuser",
                f"{facts.role} is not a superuser ({stand_in} on {facts.provider.value}): "
                "schema changes will not be recorded (event triggers) and every role keeps "
                "pg_logical_emit_message",
                f"run source add as {stand_in}, or accept both and let `source check` show them",
            )
        )
    if not facts.slot_exists and facts.slots_used >= facts.max_replication_slots:
        found.append(_exhausted(facts, "replication slots", "max_replication_slots", "the source"))
    else:
        left = facts.max_replication_slots - facts.slots_used
        found.append(
            Finding(Level.ok, "replication slots", f"{left} of {facts.max_replication_slots} free")
        )
    if facts.senders_used >= facts.max_wal_senders:
        found.append(_exhausted(facts, "wal senders", "max_wal_senders", "a streaming source"))
    if facts.max_slot_wal_keep_size == "-1":
        found.append(
            Finding(
                Level.warning,
                "max_slot_wal_keep_size",
                "is unlimited: a stopped consumer makes the source keep WAL until its disk fills",
                _server_setting(facts.provider, "max_slot_wal_keep_size", "51200", restart=False)
                + " (megabytes: size it to hours of your WAL rate)",
            )
        )
    return found
