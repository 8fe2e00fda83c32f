"""What ops, assets and checks reach the outside world through: one Dagster resource.

The deployment's settings (``AUDIT_*``), its staging, its Elasticsearch client and the
platform's own database come to every op as a parameter instead of each op building
``Settings()`` itself, so a test swaps the resource (another staging root, another database)
rather than patching environment variables, and every op of a run sees the same configuration.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path

import dagster as dg
import psycopg
from elasticsearch import Elasticsearch
from pydantic import Field, PrivateAttr, SecretStr

from audit_platform import platform_db
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.environment import EnvironmentConfig, load_environment
from audit_platform.index.template import ensure_template
from audit_platform.policy import SourcePolicy, load_policy, policy_path
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore

#: The resource's fields and the variables they come from.
VARIABLES = {
    "env": "AUDIT_ENV",
    "pg_url": "AUDIT_PG_URL",
    "es_url": "AUDIT_ES_URL",
    "staging_root": "AUDIT_STAGING_ROOT",
    "resources_dir": "AUDIT_RESOURCES_DIR",
}


class AuditPlatform(dg.ConfigurableResource):
    """This deployment's environment: its settings, staging, Elasticsearch and state database.

    Its fields are the settings an operator checks first, each bound to its variable with
    ``dg.EnvVar`` (:meth:`from_environment`): Dagster's UI shows which variable configures
    what, never a value. The settings themselves are the process's (``Settings``: ``AUDIT_*``,
    ``.env``), as everywhere else, and a field that says otherwise is refused: anyone who may
    launch a run may also edit its resource configuration in the launchpad, and must not point
    a run at another Elasticsearch (with this deployment's credentials), another database, or
    another folder of SQL to install.
    """

    env: str = ""
    pg_url: str = Field(default="", repr=False)
    es_url: str = Field(default="", repr=False)
    staging_root: str = ""
    resources_dir: str = ""
    _settings: Settings | None = PrivateAttr(default=None)

    @classmethod
    def from_environment(cls) -> "AuditPlatform":
        """Bound to the variables this process has (one that is unset keeps its default)."""
        bound = {
            field: dg.EnvVar(name) for field, name in VARIABLES.items() if os.environ.get(name)
        }
        return cls(**bound)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            settings = Settings()
            for field, variable in VARIABLES.items():
                given, own = getattr(self, field), getattr(settings, field)
                own = own.get_secret_value() if isinstance(own, SecretStr) else own
                if given and given != str(own or ""):
                    raise ValueError(
                        f"the platform resource's {field} differs from this deployment's "
                        f"{variable}: set the variable, not the run's configuration"
                    )
            self._settings = settings
        return self._settings

    def environment(self) -> EnvironmentConfig:
        return load_environment(self.settings.resources_dir, self.settings.env)

    def store(self, source: str) -> StagingStore:
        return StagingStore(self.settings.staging_root, self.settings.env, source)

    def policy(self, source: str) -> SourcePolicy:
        return load_policy(policy_path(self.settings.resources_dir, source))

    def mask_key(self) -> bytes | None:
        key = self.settings.mask_key
        return key.get_secret_value().encode() if key else None

    @contextmanager
    def elasticsearch(
        self, environment: EnvironmentConfig | None = None, client: Elasticsearch | None = None
    ) -> Iterator[Elasticsearch]:
        """A client (``client``, or a new one); for indexing (``environment`` given), the
        environment's template is first made current: installed if missing (an index created
        before its template would get dynamic mappings) or older than this code (its strict
        mapping would refuse new fields).
        """
        opened = nullcontext(client) if client is not None else es_from_settings(self.settings)
        with opened as client:
            if environment is not None:
                ensure_template(
                    client,
                    self.settings.resources_dir,
                    self.settings.env,
                    environment.index_replicas,
                    environment.classes,
                )
            yield client

    def state(self) -> psycopg.Connection:
        """The platform's own database (AUDIT_PG_URL), its tables installed on first use."""
        url = pg_url_from_settings(self.settings)
        _installed(url, str(self.settings.resources_dir / "sql"))
        return psycopg.connect(url, autocommit=True)


@cache
def _installed(url: str, sql_dir: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        platform_db.install(conn, Path(sql_dir))
    return True
