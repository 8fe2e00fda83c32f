"""How far each stream is, per source: what ``streams list``, the API and the Dagster checks show.

Read from the cursors and the dead letters themselves, with the feed only for what is still to
deliver: a source whose entries were all delivered and trimmed still shows what it delivered
and its dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg


@dataclass(frozen=True)
class StreamStatus:
    """One stream's delivery of one source."""

    stream: str
    source: str
    delivered: int
    behind: int  # feed entries not delivered yet
    lag_seconds: float  # since the oldest of them was indexed; 0 when none
    attempts: int  # failed attempts of the message now due; 0: not failing
    last_error: str | None
    dead_letters: int


_STATUS = """
WITH live AS (
    SELECT id, name, start_seq FROM audit_platform.streams
    WHERE env = %(env)s AND deleted_at IS NULL
), sources AS (
    SELECT l.id, c.source FROM live l JOIN audit_platform.stream_cursors c ON c.stream = l.id
    UNION
    SELECT DISTINCT l.id, f.source FROM live l
    JOIN audit_platform.stream_feed f ON f.env = %(env)s AND f.seq > l.start_seq
)
SELECT l.name, s.source, coalesce(c.delivered, 0),
       (SELECT count(*) FROM audit_platform.stream_feed f
         WHERE f.env = %(env)s AND f.source = s.source
           AND f.seq >= coalesce(c.seq, l.start_seq + 1)),
       (SELECT min(f.indexed_at) FROM audit_platform.stream_feed f
         WHERE f.env = %(env)s AND f.source = s.source
           AND f.seq >= coalesce(c.seq, l.start_seq + 1)),
       coalesce(c.attempts, 0), c.last_error,
       (SELECT count(*) FROM audit_platform.stream_dead_letters d
         WHERE d.stream = l.id AND d.source = s.source)
FROM sources s
JOIN live l ON l.id = s.id
LEFT JOIN audit_platform.stream_cursors c ON c.stream = s.id AND c.source = s.source
ORDER BY l.name, s.source
"""


def status(conn: psycopg.Connection, env: str, now: datetime | None = None) -> list[StreamStatus]:
    at = now or datetime.now(UTC)
    return [
        StreamStatus(
            name,
            source,
            delivered,
            behind,
            (at - oldest).total_seconds() if oldest is not None else 0.0,
            attempts,
            error,
            dead,
        )
        for name, source, delivered, behind, oldest, attempts, error, dead in conn.execute(
            _STATUS, {"env": env}
        ).fetchall()
    ]
