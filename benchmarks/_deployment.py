"""A local deployment of its own for a benchmark: the deployment-level benchmarks measure the real
thing (Dagster webserver and daemon with the capture keeper sensor, the live capture run, the
API) on an environment copied from ``dev``, with fresh source databases, a Dagster instance
database and an API key of their own.

Every source database gets a trigger-based ground truth (``bench_truth``, see ``_live.py``)
before its first change: the benchmarks compare what was indexed with it at the end.

The Dagster processes inherit this process's environment (``PYTHONPATH`` included) and run from
the project root of the imported ``audit_platform``: with ``PYTHONPATH=<worktree>`` they run the
worktree's code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import yaml
from _database import drop_database
from _live import install_truth

from audit_platform.api_keys import create_key
from audit_platform.clients import elasticsearch_client
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform_dev.stack.deployment import LocalDeployment, ensure_database
from audit_platform_dev.stack.system import free_port


class BenchDeployment(NamedTuple):
    root: Path  # DAGSTER_HOME, staging, logs and the copied resources
    resources: Path
    shop_url: str  # the first source's URL (``shop`` for a one-source deployment)
    deployment: LocalDeployment
    key: str  # an API key of the environment
    urls: dict[str, str]  # every source's URL


def environment_file(resources: Path, env: str, sources: list[str], overrides: dict) -> None:
    """``dev``'s settings with these sources (policies copied from ``shop``) and overrides."""
    environment = yaml.safe_load((resources / "environments" / "dev.yaml").read_text())
    environment["sources"] = {s: {"url_env": f"AUDIT_SOURCE_{s.upper()}_URL"} for s in sources}
    environment.update(overrides)
    (resources / "environments" / f"{env}.yaml").write_text(yaml.safe_dump(environment))


def source_database(
    admin_url: str, env: str, source: str, resources: Path, *, slot: bool = True
) -> str:
    """A fresh shop database for ``source`` with the ground truth, and (``slot``) the
    environment's publication and slot."""
    shop_policy = (resources / "sources" / "shop.yaml").read_text()
    policy_file = resources / "sources" / f"{source}.yaml"
    policy_file.write_text(shop_policy.replace("source: shop", f"source: {source}"))
    name = f"{source}_{env}"
    drop_database(admin_url, name)
    url = ensure_database(admin_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((resources / "demo" / "shop.sql").read_text())
    policy = load_policy(policy_file)
    install_truth(url, policy)
    if slot:
        setup_source(url, env, policy, resources / "sql")
    return url


def bench_deployment(
    env: str,
    prefix: str,
    *,
    sources: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    extra_sources: list[str] = (),
) -> BenchDeployment:
    """Prepared, not started. ``sources`` (default ``["shop"]``) are the environment's;
    ``extra_sources`` get a database (without a slot) and a URL variable but are not in the
    environment file; ``overrides`` replace ``dev``'s environment settings."""
    sources = sources or ["shop"]
    exports = {k: v for k, v in os.environ.items() if k.startswith("AUDIT_")}
    admin = exports["AUDIT_PG_URL"]
    remove_environment(env)
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    resources = root / "resources"
    shutil.copytree(Settings().resources_dir, resources)
    environment_file(resources, env, sources, overrides or {})
    urls = {s: source_database(admin, env, s, resources) for s in sources}
    for source in extra_sources:
        urls[source] = source_database(admin, env, source, resources, slot=False)
    deployment = LocalDeployment(
        exports,
        env,
        root,
        urls,
        dagster_port=free_port(),
        api_port=free_port(),
        resources_dir=resources,
    )
    deployment.prepare()  # the instance's tables are made by start(), before its processes
    with psycopg.connect(admin, autocommit=True) as conn:
        key = create_key(conn, env, f"{prefix} benchmark").secret
    return BenchDeployment(root, resources, urls[sources[0]], deployment, key, urls)


def remove_environment(env: str, bench: BenchDeployment | None = None) -> None:
    """What a benchmark made for ``env``: its source databases (with their slots), its Dagster
    instance database, its persons' keys, its indices and templates, and (given ``bench``) its
    directory."""
    admin = os.environ["AUDIT_PG_URL"]
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('audit_platform.subject_keys')").fetchone()[0]:
            conn.execute("DELETE FROM audit_platform.subject_keys WHERE env = %s", (env,))
        names = [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"%\\_{env}",)
            )
        ]
    for name in [*names, f"dagster_{env}"]:
        drop_database(admin, name)
    es = elasticsearch_client(Settings().elasticsearch)
    for index in es.indices.get(index=f"audit-{env}-*"):
        es.indices.delete(index=index)
    quiet = es.options(ignore_status=404)
    for pattern in (f"audit-{env}", f"audit-{env}-*"):  # not another env's that starts alike
        for template in quiet.indices.get_index_template(name=pattern).get("index_templates", []):
            es.indices.delete_index_template(name=template["name"])
    if bench is not None:
        shutil.rmtree(bench.root, ignore_errors=True)
