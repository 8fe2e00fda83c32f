"""Log sequence numbers: PostgreSQL's position in its write-ahead log, as this platform writes it.

Every stage speaks of positions (a change's commit LSN, a slot's confirmed position, a staged
file's range, a trail leaf's place, a gap's bounds), so the notations live here, below them all:
an integer in code and Parquet, 16 hex digits in file names and record ids (they sort as the
numbers do), and PostgreSQL's ``X/Y`` for people and SQL.
"""

from __future__ import annotations


def lsn_hex(lsn: int) -> str:
    """16 hex digits: file names and record ids that sort in LSN order."""
    return f"{lsn:016X}"


def lsn_text(lsn: int) -> str:
    """PostgreSQL's own notation, X/Y, for people and SQL."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)
