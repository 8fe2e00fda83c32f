"""The ``Content-Disposition`` of every download, whatever its name holds.

A file name made of ids (a revert plan's) is free text from the audited service. Written raw
into the header, a '"' ends the name, a line break ends the header (the connection dropped)
and a character outside Latin-1 cannot be sent at all. RFC 6266 gives the name twice: an ASCII
fallback in ``filename="..."`` for old clients, and the exact name percent-encoded as UTF-8 in
``filename*`` (RFC 8187, formerly 5987), which current browsers prefer.
"""

from __future__ import annotations

import re
from urllib.parse import quote

#: Never in a saved file's name: path separators, and what a file system or shell mistakes.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def attachment(name: str) -> dict[str, str]:
    """Headers offering ``name`` as a download."""
    name = "".join("_" if not c.isprintable() else c for c in _UNSAFE.sub("_", name)) or "download"
    fallback = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    value = f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
    return {"Content-Disposition": value}
