"""The environment's Ed25519 key: checkpoints are signed with it, and anyone verifies them with
its public half.

The private key is a setting (``AUDIT_SIGNING_KEY``, the 32-byte seed in base64), held by the
deployment that writes the trail and by nobody who only reads it; verifiers need only the public
key (``AUDIT_VERIFY_KEY``, or derived from the private one). A key's id is the first 16 hex
digits of the SHA-256 of its raw public bytes, so a checkpoint names the key it was signed with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class SigningKeyError(ValueError):
    """A key setting is unusable; the message says which and how to make one."""


def _raw(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SigningKeyError(f"{what} is not base64: {exc}") from exc
    if len(raw) != 32:
        raise SigningKeyError(
            f"{what} must be 32 bytes in base64 (it is {len(raw)}); make one with "
            "`audit-platform trust keygen`"
        )
    return raw


def new_private_key() -> str:
    """A fresh private key as the setting holds it (base64 of the 32-byte seed)."""
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    return base64.b64encode(seed).decode()


def private_key(text: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_raw(text, "AUDIT_SIGNING_KEY"))


def public_key(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_raw(text, "AUDIT_VERIFY_KEY"))


def public_text(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode()


def signature_valid(key: Ed25519PublicKey, message: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
