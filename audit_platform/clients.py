"""Connections to the servers the platform talks to, built from settings in one place.

Keeping this in one module means credentials, TLS and timeouts are configured identically
for the Dagster code location, the API and the command line.
"""

from __future__ import annotations

from elastic_transport import OrjsonSerializer
from elasticsearch import Elasticsearch

from audit_platform.settings import ElasticsearchConnection, Settings


class NotConfigured(RuntimeError):
    """A server URL is missing; the message says which variable to set."""


def elasticsearch_client(
    conn: ElasticsearchConnection, *, request_timeout: float = 30.0
) -> Elasticsearch:
    """A client with the configured auth (API key wins over user/password) and CA file.

    Retries on timeouts are left to the client's own transport: it retries connection errors
    and 429/502/503/504 with backoff, which is the behaviour we want for every call.
    """
    kwargs: dict = {
        "request_timeout": request_timeout,
        "retry_on_timeout": True,
        "max_retries": 3,
        "verify_certs": conn.verify_certs,
    }
    if conn.api_key is not None:
        kwargs["api_key"] = conn.api_key.get_secret_value()
    elif conn.username:
        password = conn.password.get_secret_value() if conn.password else ""
        kwargs["basic_auth"] = (conn.username, password)
    if conn.ca_certs is not None:
        kwargs["ca_certs"] = str(conn.ca_certs)
    # orjson parses answers several times faster than the standard library (a scan of a
    # million records spends most of its time there); same JSON in, same objects out.
    return Elasticsearch(conn.url, serializer=OrjsonSerializer(), **kwargs)


def es_from_settings(settings: Settings) -> Elasticsearch:
    if settings.elasticsearch is None:
        raise NotConfigured(
            "AUDIT_ES_URL is not set: start the local stack and load its exports with "
            '`eval "$(audit-platform stack env)"`, or point AUDIT_ES_URL at your cluster'
        )
    return elasticsearch_client(settings.elasticsearch)


def pg_url_from_settings(settings: Settings) -> str:
    if not settings.pg_url:
        raise NotConfigured(
            "AUDIT_PG_URL is not set: start the local stack and load its exports with "
            '`eval "$(audit-platform stack env)"`, or point AUDIT_PG_URL at your server'
        )
    return settings.pg_url.get_secret_value()
