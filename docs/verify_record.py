#!/usr/bin/env python3
"""Check, offline, that an audit record is in its source's signed log. Uses no code of
audit-platform: only Python's standard library and the `cryptography` package (Ed25519).

    curl -s -H "X-API-Key: $AUDITOR_KEY" "$API/v1/events/$ID/proof" > proof.json
    python3 verify_record.py proof.json --public-key "$AUDIT_VERIFY_KEY"

It rebuilds the record's leaves from the record itself (the rules are in README, "Verifying the
trail"), hashes them as RFC 6962 does, walks each audit path to the root (RFC 9162, 2.1.3.2),
and checks the checkpoint's Ed25519 signature over its RFC 8785 bytes. Give the public key you
got from a trusted place; the one inside the proof is only used, with a warning, when you don't.
Exit status 0: the record is in the log as it is; 1: it is not, or the proof is not valid.
"""

import argparse
import base64
import hashlib
import json
import re
import sys
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def jcs(value):
    """RFC 8785 bytes of a leaf (strings, null, arrays and objects only)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def leaf_hash(leaf):
    return hashlib.sha256(b"\x00" + jcs(leaf)).digest()


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def moment(text):
    value = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def text(value):
    return None if value is None else str(value)


ERASED = re.compile(r"erased on \d{4}-\d{2}-\d{2} under request \d+")


def sealed(record, side, salts, proven):
    """An image as its leaf holds it: each personal value (``row.personal``) as its
    commitment, SHA-256(salt || column || NUL || JCS(value)) with the image's salt from the
    proof. An erased value (``erased on <date> under request <id>``) is gone, and so is its
    salt: the leaf's commitment stands for it, and is what the audit path checks."""
    image, personal = record.get(side), (record.get("row") or {}).get("personal")
    if image is None or personal is None or personal.get(side) is None:
        return image, []
    image, unchecked = dict(image), []
    salt = salts.get(side)
    for column in personal["columns"]:
        value = image.get(column)
        if value is None:
            continue
        if salt is not None and not ERASED.fullmatch(str(value)):
            digest = hashlib.sha256(bytes.fromhex(salt) + column.encode() + b"\0" + jcs(value))
            image[column] = "c1:" + digest.hexdigest()
        else:
            image[column] = ((proven or {}).get(side) or {}).get(column)
            unchecked.append(f"{side}.{column}")
    return image, unchecked


def field(context, name):
    """A context field by its dotted name (``actor.name``)."""
    for part in name.split("."):
        context = context.get(part) if isinstance(context, dict) else None
    return context


def sealed_context(record, salts, proven):
    """The context as its leaf holds it: each personal field of its actor (the record's
    ``context_personal``) as its commitment, salted with the proof's ``context`` salt; an
    erased field, or one without a salt, as the proven leaf has it."""
    context, shape = record.get("context"), record.get("context_personal")
    if context is None or shape is None:
        return context, []
    context, unchecked = json.loads(json.dumps(context)), []
    salt = salts.get("context")
    for name in shape["fields"]:
        value = field(context, name)
        if value is None:
            continue
        if salt is not None and not ERASED.fullmatch(str(value)):
            digest = hashlib.sha256(bytes.fromhex(salt) + name.encode() + b"\0" + jcs(value))
            committed = "c1:" + digest.hexdigest()
        else:
            committed = field((proven or {}).get("context"), name)
            unchecked.append(f"context.{name}")
        *parents, last = name.split(".")
        node = context
        for part in parents:
            node = node[part]
        node[last] = committed
    return context, unchecked


def leaves_of(record, salts=None, proven=None):
    """The leaves a record claims: its change, and its context when attributed or late; and
    the personal values it could not check (erased, or no salt in the proof). ``proven``:
    kind -> the leaf the proof gives."""
    txn, row = record["transaction"], record.get("row") or {}
    proven = proven or {}
    before, unchecked = sealed(record, "before", salts or {}, proven.get("change"))
    after, more = sealed(record, "after", salts or {}, proven.get("change"))
    status = (record.get("attribution") or {}).get("status")
    context, also = sealed_context(
        record, salts or {}, proven.get("context" if status == "attributed" else "attach")
    )
    common = {"v": "1", "env": record["env"], "source": record["source"]["service"]}
    change = {
        **common,
        "kind": "change",
        "id": record["id"],
        "commit_lsn": txn["commit_lsn"],
        "xid": str(txn["xid"]),
        "index": str(txn["change_index"]),
        "time": moment(record["@timestamp"]),
        "schema": record["table"]["schema"],
        "table": record["table"]["name"],
        "op": record["operation"],
        "key": row.get("key") or [],
        "types": row.get("types") or {},
        "object_id": record.get("object_id"),
        "changed": record.get("changed_columns"),
        "before": before,
        "after": after,
        "policy": record["policy_version"],
        "txn_changes": text(txn.get("changes")),
        "txn_ignored": text(txn.get("ignored")),
    }
    if row.get("organization") is not None:  # committed only where the table names one
        change["org"] = row["organization"]
    if row.get("personal") is not None:
        change["personal"] = row["personal"]
    leaves = {"change": change}
    attribution = record.get("attribution") or {}
    if status == "attributed":
        leaves["context"] = {
            **common,
            "kind": "context",
            "commit_lsn": txn["commit_lsn"],
            "xid": str(txn["xid"]),
            "time": moment(record["@timestamp"]),
            "context": context,
        }
    elif status == "late":
        committed = datetime.fromisoformat(record["@timestamp"].replace("Z", "+00:00"))
        attached = committed + timedelta(seconds=attribution.get("lag_seconds") or 0)
        leaves["attach"] = {
            **common,
            "kind": "attach",
            "xid": str(txn["xid"]),
            "time": moment(attached.isoformat()),
            "context": context,
        }
    for kind in ("context", "attach"):  # committed only where the source declares it
        if kind in leaves and record.get("context_personal") is not None:
            leaves[kind]["personal"] = record["context_personal"]
    return leaves, unchecked + more + also


def root_from_path(leaf, index, size, path):
    """RFC 9162 2.1.3.2: the root an audit path leads to, or None if it cannot lead anywhere."""
    if index >= size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node(p, r)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return r if sn == 0 else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("proof", help="the JSON of GET /v1/events/{id}/proof")
    parser.add_argument("--public-key", help="the environment's Ed25519 public key, base64")
    args = parser.parse_args()
    with open(args.proof, encoding="utf-8") as f:
        proof = json.load(f)
    record, signed = proof["record"], proof["checkpoint"]
    checkpoint, ok = signed["checkpoint"], True

    key_text = args.public_key or proof.get("public_key")
    if not args.public_key:
        print("warning: no --public-key given; using the one the proof carries", file=sys.stderr)
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(key_text))
    try:
        key.verify(base64.b64decode(signed["signature"]), jcs(checkpoint))
        print(
            f"checkpoint {checkpoint['seq']} of {checkpoint['env']}/{checkpoint['source']}: "
            f"signature valid, {checkpoint['tree_size']} leaves, signed {checkpoint['time']}"
        )
    except InvalidSignature:
        print("checkpoint: the signature is NOT valid for this public key")
        ok = False
    root, size = bytes.fromhex(checkpoint["root"]), checkpoint["tree_size"]

    proven = {p["kind"]: p for p in proof["leaves"]}
    claimed, unchecked = leaves_of(
        record, proof.get("salts"), {kind: p.get("leaf") for kind, p in proven.items()}
    )
    if unchecked:
        print(
            f"personal values taken from the proof's leaf, not checked: {', '.join(unchecked)}"
            " (erased, or the person's key is gone)"
        )
    for kind, leaf in claimed.items():
        entry = proven.get(kind)
        if entry is None:
            print(f"{kind}: the proof has no {kind} leaf")
            ok = False
            continue
        mine = leaf_hash(leaf)
        path = [bytes.fromhex(h) for h in entry["audit_path"]]
        if root_from_path(mine, entry["leaf_index"], size, path) == root:
            print(f"{kind}: leaf {entry['leaf_index']} is in the log, as the record has it")
        else:
            print(f"{kind}: NOT in the log as the record has it (altered, or a wrong proof)")
            ok = False
    print(f"record {record['id']}: {'VERIFIED' if ok else 'NOT VERIFIED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
