"""Where a stream's messages go: an HTTPS webhook (Standard Webhooks) or NDJSON objects in a
bucket with a signed digest each.

A message is a run of one feed entry's records. Its id (``msg_<stream>_<seq>_<first record's
LSN>_<its change index>_<records spanned>``) is the same at every attempt and after a crash: a
webhook receiver deduplicates on ``webhook-id``, and a bucket's object and digest are written
under names made of it, so a repeat replaces them (with the same records, as they read then).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import fsspec
import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from standardwebhooks.webhooks import Webhook

from audit_platform.signing import key_id, sign, signature_valid
from audit_platform.streams.definitions import Stream

#: The event type of every message, as Standard Webhooks recommends (``type``, ``timestamp``,
#: ``data``).
EVENT_TYPE = "audit.records"
#: Answers that refuse the message itself, not the sender: retried up to the stream's bound,
#: then dead-lettered. Any other failure (down, overloaded, a wrong secret: 5xx, 408, 429,
#: 401, 403, 404, a timeout) is waited for.
PERMANENT = frozenset({400, 413, 415, 422})
#: Bytes of a response read at most: its status is what counts, and a receiver must not be
#: able to make the platform hold a large body.
_RESPONSE_BYTES = 4096
#: Signed digests start with this, so a signature over one cannot pass for a checkpoint's.
DIGEST_CONTEXT = b"audit-platform stream digest v1\n"


class DeliveryFailed(Exception):
    """The destination did not take the message; ``permanent``: it refused the message itself."""

    def __init__(self, error: str, permanent: bool = False) -> None:
        super().__init__(error)
        self.permanent = permanent


def encoded(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record)


@dataclass(frozen=True)
class Message:
    id: str
    stream: Stream
    source: str
    seq: int
    after: tuple[int, int] | None  # the cursor it starts from: its entry's last record passed
    indexed_at: datetime
    records: list[dict[str, Any]]

    def body(self) -> bytes:
        """The webhook's JSON body: the same bytes at every attempt (its timestamp is when the
        records were indexed, not when they are sent)."""
        return orjson.dumps(
            {
                "type": EVENT_TYPE,
                "timestamp": self.indexed_at.astimezone(UTC).isoformat(),
                "data": {
                    "stream": self.stream.name,
                    "env": self.stream.env,
                    "source": self.source,
                    "records": self.records,
                },
            }
        )

    def ndjson(self) -> bytes:
        return b"".join(encoded(record) + b"\n" for record in self.records)


class Destination(Protocol):
    def send(self, message: Message) -> None: ...

    def close(self) -> None: ...


class WebhookDestination:
    """POSTs each message, signed per the Standard Webhooks specification: ``webhook-id``,
    ``webhook-timestamp`` (this attempt's, which the receiver checks against its clock) and
    ``webhook-signature`` (``v1,`` HMAC-SHA256 of ``id.timestamp.body``). Redirects are not
    followed (the operator named the URL records may go to), no proxy or ``.netrc`` of the
    platform's environment applies, and at most ``_RESPONSE_BYTES`` of an answer are read."""

    def __init__(self, url: str, secret: str, timeout: float = 10.0) -> None:
        self.url, self.webhook = url, Webhook(secret)
        self.client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)

    def send(self, message: Message) -> None:
        body, now = message.body(), datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": message.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.webhook.sign(message.id, now, body),
        }
        try:
            with self.client.stream("POST", self.url, content=body, headers=headers) as response:
                read = 0
                for part in response.iter_raw():
                    read += len(part)
                    if read >= _RESPONSE_BYTES:
                        break
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc or 'no answer'}") from exc
        if not response.is_success:
            status = response.status_code
            raise DeliveryFailed(f"HTTP {status}", permanent=status in PERMANENT)

    def close(self) -> None:
        self.client.close()


class BucketDestination:
    """Writes each message as an NDJSON object, then its digest: the object's SHA-256, what it
    holds, and an Ed25519 signature over them with the trail's signing key, as CloudTrail
    signs its digest files. A reader holding the public key (``audit-platform pubkey``) checks
    an object with :func:`verify_object` without asking the platform."""

    def __init__(self, url: str, signer: Ed25519PrivateKey) -> None:
        self.url, self.signer = url.rstrip("/"), signer
        self.fs, _ = fsspec.core.url_to_fs(self.url)

    def paths(self, message: Message) -> tuple[str, str]:
        stream = message.stream
        day = message.indexed_at.astimezone(UTC).strftime("%Y/%m/%d")
        name = f"{stream.env}/{stream.name}/{message.source}/{day}/{message.id}"
        return f"{self.url}/records/{name}.ndjson", f"{self.url}/digests/{name}.json"

    def send(self, message: Message) -> None:
        obj, digest_path = self.paths(message)
        data = message.ndjson()
        digest = {
            "object": obj,
            "sha256": hashlib.sha256(data).hexdigest(),
            "records": len(message.records),
            "first_record": message.records[0]["id"],
            "last_record": message.records[-1]["id"],
            "stream": message.stream.name,
            "env": message.stream.env,
            "source": message.source,
            "message_id": message.id,
            "key_id": key_id(self.signer.public_key()),
        }
        digest["signature"] = sign(self.signer, _signed(digest))
        try:
            self.fs.pipe_file(obj, data)
            self.fs.pipe_file(digest_path, orjson.dumps(digest, option=orjson.OPT_SORT_KEYS))
        except OSError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        pass

    def rewrite(
        self,
        env: str,
        stream: str,
        source: str,
        wanted: Callable[[dict[str, Any]], bool],
        change: Callable[[list[dict[str, Any]]], bool],
        erasure: int,
        text: str,
    ) -> int:
        """Rewrite the objects a source's messages left under a stream's prefix, where
        ``wanted`` (given an object's digest) says they may hold what ``change`` changes (in
        place, True if it did), each with its digest signed again naming the ``erasure``
        (docs/design.md, "Erasure"). Returns the objects rewritten.

        The object is written before its digest: after a crash between the two, the object no
        longer has its digest's SHA-256, and a rerun, finding nothing more to change in it,
        signs its digest again only when the object holds the erasure's own ``text``."""
        rewritten = 0
        for path in sorted(self.fs.find(f"{self.url}/digests/{env}/{stream}/{source}")):
            digest = orjson.loads(self.fs.cat_file(path))
            if not wanted(digest):
                continue
            data = self.fs.cat_file(digest["object"])
            records = [orjson.loads(line) for line in data.splitlines()]
            changed = change(records)
            torn = hashlib.sha256(data).hexdigest() != digest["sha256"]
            if not changed and not (torn and text.encode() in data):
                continue
            data = b"".join(encoded(record) + b"\n" for record in records)
            digest = {k: v for k, v in digest.items() if k != "signature"}
            digest["sha256"] = hashlib.sha256(data).hexdigest()
            digest["erasures"] = sorted({*digest.get("erasures", []), erasure})
            digest["signature"] = sign(self.signer, _signed(digest))
            self.fs.pipe_file(digest["object"], data)
            self.fs.pipe_file(path, orjson.dumps(digest, option=orjson.OPT_SORT_KEYS))
            rewritten += 1
        return rewritten


def _signed(digest: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in digest.items() if k != "signature"}
    return DIGEST_CONTEXT + orjson.dumps(unsigned, option=orjson.OPT_SORT_KEYS)


def verify_object(fs: fsspec.AbstractFileSystem, digest_path: str, key: Ed25519PublicKey) -> int:
    """Check one object against its digest; returns its records. Raises ``ValueError`` naming
    what does not hold."""
    digest = orjson.loads(fs.cat_file(digest_path))
    if not signature_valid(key, _signed(digest), digest.get("signature", "")):
        raise ValueError(f"{digest_path}: the signature does not verify with this key")
    data = fs.cat_file(digest["object"])
    if hashlib.sha256(data).hexdigest() != digest["sha256"]:
        raise ValueError(f"{digest['object']}: its SHA-256 is not the one its digest signs")
    lines = data.splitlines()
    if len(lines) != digest["records"]:
        raise ValueError(
            f"{digest['object']}: {len(lines)} records, its digest says {digest['records']}"
        )
    return len(lines)


def destination(stream: Stream, signer: Ed25519PrivateKey | None) -> Destination:
    if stream.kind == "webhook":
        assert stream.secret is not None  # the table's CHECK
        return WebhookDestination(stream.target, stream.secret)
    if signer is None:
        raise DeliveryFailed(
            "this bucket stream signs its digests with the trail's key: set AUDIT_SIGNING_KEY"
        )
    return BucketDestination(stream.target, signer)
