"""Failed authentications: counted and logged apart from the signed read log, within bounds.

A request whose key is missing, malformed or not an active key of this environment proves
nobody: writing it to the read log would let anyone fill the signed trail with made-up rows,
and attribute them to any key id they claim. So it leaves no read-log row. It is counted at
``/metrics`` (``audit_api_failed_authentications_total`` by reason: exact, and a fixed set of
series) and logged on ``audit_platform.api.auth`` at most :data:`LOGGED_PER_MINUTE` times a
minute; the next line logged says how many were left out meanwhile. A flood of bad keys costs
a counter increment each, never a database row or an unbounded stream of log lines.
"""

from __future__ import annotations

import logging
import threading

from pyrate_limiter import Duration, Limiter, Rate

log = logging.getLogger("audit_platform.api.auth")

#: Failed authentications logged one by one per minute; the rest are only counted.
LOGGED_PER_MINUTE = 10


class FailedAuthentications:
    """One per API process (the limit is per process, like its metrics)."""

    def __init__(self, per_minute: int = LOGGED_PER_MINUTE) -> None:
        self._limiter = Limiter(Rate(per_minute, Duration.MINUTE))
        self._lock = threading.Lock()
        self._left_out = 0

    def record(self, reason: str, claimed_key_id: str | None, client: str, route: str) -> None:
        """``claimed_key_id`` is the id part of a well-formed key text (never the secret): a
        run of failures naming one real key id is someone guessing that key's secret."""
        if not self._limiter.try_acquire("failed", blocking=False):
            with self._lock:
                self._left_out += 1
            return
        with self._lock:
            left_out, self._left_out = self._left_out, 0
        since = ""
        if left_out:
            since = f"; {left_out} more not logged since the last line (/metrics counts them all)"
        log.warning(
            "failed authentication (%s key) for key id %s from %s on %s%s",
            reason,
            claimed_key_id or "-",
            client,
            route,
            since,
        )
