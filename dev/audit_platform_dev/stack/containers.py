"""The same servers in containers, for machines where a Docker engine answers.

Containers live as long as the Python process that started them (testcontainers reaps them),
so this backend serves `stack run` and the test session, not the detached `stack up`.
"""

from __future__ import annotations

from contextlib import ExitStack

from audit_platform_dev.stack.elasticsearch import VERSION as ES_VERSION

PG_IMAGE = "postgres:16"
ES_IMAGE = f"docker.elastic.co/elasticsearch/elasticsearch:{ES_VERSION}"


def docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


def start_containers(stack: ExitStack, *, need_pg: bool, need_es: bool) -> dict[str, str]:
    """Start the requested servers; they stop when ``stack`` closes. Returns AUDIT_* exports."""
    from testcontainers.elasticsearch import ElasticSearchContainer
    from testcontainers.postgres import PostgresContainer

    env: dict[str, str] = {}
    if need_pg:
        pg = PostgresContainer(PG_IMAGE, driver=None).with_command(
            "postgres -c wal_level=logical -c max_replication_slots=256 -c max_wal_senders=256"
            " -c max_connections=600"
        )
        stack.enter_context(pg)
        env["AUDIT_PG_URL"] = pg.get_connection_url()
    if need_es:
        es = ElasticSearchContainer(ES_IMAGE, mem_limit="2g").with_env(
            "xpack.security.enabled", "false"
        )
        stack.enter_context(es)
        # Newer testcontainers (4.15 among them) dropped ElasticSearchContainer.get_url().
        host, port = es.get_container_host_ip(), es.get_exposed_port(es.port)
        env["AUDIT_ES_URL"] = f"http://{host}:{port}"
    return env
