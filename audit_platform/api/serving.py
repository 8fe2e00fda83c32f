"""How `audit-platform api serve` runs the API under uvicorn: who may say the request came over
TLS, and an access log without the query strings.

uvicorn's own access line holds the request's whole path, query string included, which holds
what investigators search for (e-mail addresses, actors' names): the design says filters are
never logged. So that line is off, and the API's own line (``audit_platform.api.access``, the
route's template, the key id, the status and the time; see :mod:`audit_platform.api.main`) is
the access log, printed where uvicorn's was.
"""

from __future__ import annotations

import copy
from typing import Any

from uvicorn.config import LOGGING_CONFIG

from audit_platform.settings import Settings


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, with the API's access logger on standard output."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["api_access"] = {
        "formatter": "default",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["audit_platform.api.access"] = {
        "handlers": ["api_access"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What `api serve` passes to ``uvicorn.run`` besides the app, host, port and workers."""
    return {
        # X-Forwarded-Proto and -For from these addresses only (a client elsewhere could
        # otherwise claim https); the scheme decides the cookie's Secure flag and the
        # Explorer's Origin check.
        "proxy_headers": True,
        "forwarded_allow_ips": settings.api.trusted_proxies,
        "access_log": False,
        "log_config": log_config(),
    }
