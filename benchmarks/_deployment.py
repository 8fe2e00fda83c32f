"""A local deployment of its own for a benchmark: the freshness and sustained-load benchmarks
measure the real thing (Dagster webserver and daemon, the API) on an environment copied from
``dev``, with a fresh demo shop database, Dagster instance database and API key."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import psycopg
from _database import drop_database

from audit_platform.api_keys import create_key
from audit_platform.demo.run import prepare_shop
from audit_platform.settings import Settings
from audit_platform.stack.deployment import LocalDeployment
from audit_platform.stack.system import free_port


class BenchDeployment(NamedTuple):
    root: Path  # DAGSTER_HOME, staging, logs and the copied resources
    resources: Path
    shop_url: str
    deployment: LocalDeployment
    key: str  # an API key of the environment


def bench_deployment(env: str, prefix: str, *, interval: int = 0) -> BenchDeployment:
    """Prepared, not started; ``interval`` overrides the capture sensor's (0: dev's own)."""
    settings = Settings()
    exports = {k: v for k, v in os.environ.items() if k.startswith("AUDIT_")}
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    resources = root / "resources"
    shutil.copytree(settings.resources_dir, resources)
    environment = (resources / "environments" / "dev.yaml").read_text()
    if interval:
        environment = re.sub(r"capture_interval_seconds: \d+",
                             f"capture_interval_seconds: {interval}", environment)  # fmt: skip
    (resources / "environments" / f"{env}.yaml").write_text(environment)
    for name in (f"shop_{env}", f"dagster_{env}"):
        drop_database(exports["AUDIT_PG_URL"], name)
    shop_url = prepare_shop(exports["AUDIT_PG_URL"], env, resources)
    deployment = LocalDeployment(exports, env, root, {"shop": shop_url}, dagster_port=free_port(),
                                 api_port=free_port(), resources_dir=resources)  # fmt: skip
    deployment.prepare()
    with psycopg.connect(exports["AUDIT_PG_URL"], autocommit=True) as conn:
        key = create_key(conn, env, f"{prefix} benchmark").secret
    return BenchDeployment(root, resources, shop_url, deployment, key)
