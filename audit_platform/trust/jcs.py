"""The trail's canonical bytes (RFC 8785, JCS), for a leaf and for one committed value alike."""

from __future__ import annotations

import json
from typing import Any

import orjson


def canonical(value: Any) -> bytes:
    """RFC 8785 bytes: orjson's compact, key-sorted UTF-8, which for these values is what
    ``json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)`` gives
    (tested character by character), at a tenth of the cost. orjson refuses integers past
    64 bits, which a context's attributes may hold (jsonb keeps every digit): those values
    take the documented form itself."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
