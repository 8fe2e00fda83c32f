"""Connections to the servers the platform talks to, built from settings in one place.

Keeping this in one module means credentials, TLS and timeouts are configured identically
for the Dagster code location, the API and the command line.
"""

from __future__ import annotations

from typing import Any

import psycopg
from elastic_transport import OrjsonSerializer
from elasticsearch import Elasticsearch
from psycopg.conninfo import conninfo_to_dict

from audit_platform.settings import ElasticsearchConnection, Settings

#: How every session the platform opens on a source database starts (docs/design.md,
#: invariant 10): names resolve in the catalogs only, so a role that may create
#: objects in a schema on the default search path (``public``, for everyone before PostgreSQL
#: 15) cannot put a better-matching function in the way of a polymorphic built-in our
#: statements call (``array_position``, ``jsonb_agg``) and have it run as the platform's role;
#: and a string constant is read as the SQL standard says, whatever the server's default.
SOURCE_SESSION = "-c search_path=pg_catalog,pg_temp -c standard_conforming_strings=on"


def connect_source(url: str, **settings: Any) -> psycopg.Connection:
    """A session on a source database, autocommit, started with :data:`SOURCE_SESSION` after
    whatever ``options`` the URL sets itself (a pooler's endpoint id, a statement timeout),
    which a keyword alone would replace."""
    settings = {"autocommit": True, "connect_timeout": 10, **settings}
    return psycopg.connect(url, options=source_options(url), **settings)


def source_options(url: str) -> str:
    """The URL's own ``options``, then :data:`SOURCE_SESSION` (the later setting wins)."""
    given = conninfo_to_dict(url).get("options")
    return f"{given} {SOURCE_SESSION}" if given else SOURCE_SESSION


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
