"""What ops, assets and checks reach the outside world through: one Dagster resource.

The deployment's settings (``AUDIT_*``), its staging, its Elasticsearch client and the
platform's own database come to every op as a parameter instead of each op building
``Settings()`` itself, so a test swaps the resource (another staging root, another database)
rather than patching environment variables, and every op of a run sees the same configuration.
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path

import dagster as dg
import psycopg
from elasticsearch import Elasticsearch
from pydantic import PrivateAttr

from audit_platform import platform_db
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.environment import EnvironmentConfig, load_environment
from audit_platform.index.template import ensure_template
from audit_platform.policy import SourcePolicy, load_policy, policy_path
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore


class AuditPlatform(dg.ConfigurableResource):
    """This deployment's environment: its settings, staging, Elasticsearch and state database.

    Fields left empty come from the ``AUDIT_*`` settings of the process.
    """

    staging_root: str = ""
    _settings: Settings | None = PrivateAttr(default=None)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            settings = Settings()
            if self.staging_root:
                settings = settings.model_copy(update={"staging_root": self.staging_root})
            self._settings = settings
        return self._settings

    @property
    def env(self) -> str:
        return self.settings.env

    def environment(self) -> EnvironmentConfig:
        return load_environment(self.settings.resources_dir, self.env)

    def store(self, source: str) -> StagingStore:
        return StagingStore(self.settings.staging_root, self.env, source)

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
                    self.env,
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
