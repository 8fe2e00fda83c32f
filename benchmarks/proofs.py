"""Proof latency and the serving process's memory: proofs from tiles (now) against every leaf
hash in memory and ``O(n)`` hashing per request (before), side by side.

Builds two logs once under ``--root`` (kept between runs; ``--rebuild`` rebuilds): 1,000,000 and
10,000,000 leaves, appended through ``TrustLog.append`` (leaves files, tiles, ``log.json``) in
batches of 100,000. Leaf hashes are made directly (SHA-256 of the leaf number) instead of from
real records: what is measured only reads hashes, and building 10,000,000 real leaves would take
an hour here.

Then each measurement runs in a process of its own (``serve``), so its peak RSS is that of a
process serving proofs and nothing else: imports, then proofs of random leaves (inclusion in the
whole tree) and of random older sizes (consistency with the whole tree). ``before`` is the code
this replaced (``proofs.leaf_hashes`` as it was: all hashes read once and kept, then
``merkle.inclusion_proof``/``consistency_proof``, the reference); its first request, which loads
the hashes, is reported apart. Rounds alternate the variants (the machine is shared).

``--backfill`` also measures tiling a log written before tiles (its tiles removed, then its next
append tiles it), for the peak memory of doing it once.

Run: ``.venv/bin/python benchmarks/proofs.py`` (add ``--backfill``). Writes
``benchmarks/results/proofs.md``.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from audit_platform.staging import StagingStore
from audit_platform.trust import merkle, proofs
from audit_platform.trust.leaves import LEAF_SCHEMA
from audit_platform.trust.log import TrustLog

RESULTS = Path(__file__).parent / "results" / "proofs.md"
BATCH = 100_000
SIZES = (1_000_000, 10_000_000)
app = typer.Typer(add_completion=False)


def _log(root: str, size: int) -> TrustLog:
    return TrustLog(StagingStore(root, "benchproofs", f"n{size}"))


def _leaves(start: int, count: int) -> pl.DataFrame:
    """``count`` change leaves, one transaction each; the hash is SHA-256 of the leaf number."""
    lsns = pl.int_range(start + 1, start + count + 1, dtype=pl.Int64, eager=True)
    digests = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(start, start + count)]
    return pl.DataFrame(
        {
            "position": pl.Series([None] * count, dtype=pl.Int64),
            "kind": ["change"] * count,
            "lsn": lsns,
            "seq": pl.zeros(count, pl.Int32, eager=True),
            "xid": lsns,
            "time": [datetime(2026, 11, 27, tzinfo=UTC)] * count,
            "record_id": pl.Series([None] * count, dtype=pl.String),
            "hash": pl.Series(digests, dtype=pl.Binary),
        },
        schema=LEAF_SCHEMA,
    )


def build(root: str, size: int) -> float:
    log = _log(root, size)
    if log.store.fs.exists(log.store.base):
        log.store.fs.rm(log.store.base, recursive=True)
    began = time.perf_counter()
    for start in range(0, size, BATCH):
        log.append(_leaves(start, min(BATCH, size - start)))
        if (start // BATCH) % 10 == 9:
            typer.echo(f"  n{size}: {start + BATCH:,} leaves, {time.perf_counter() - began:.0f} s")
    return time.perf_counter() - began


_cache: dict[str, tuple[int, list[bytes]]] = {}


def _before_hashes(log: TrustLog, size: int) -> list[bytes]:
    """``proofs.leaf_hashes`` as it was before tiles (locking left out: one thread here)."""
    cached = _cache.get(log.dir)
    if cached is not None and cached[0] >= size:
        return cached[1][:size]
    hashes = log.leaves(columns=["position", "hash"])["hash"].to_list()
    _cache[log.dir] = (len(hashes), hashes)
    return hashes[:size]


def _before(log: TrustLog, kind: str, a: int, size: int) -> list[str]:
    hashes = _before_hashes(log, size)
    if kind == "inclusion":
        return [h.hex() for h in merkle.inclusion_proof(hashes, a, size)]
    return [h.hex() for h in merkle.consistency_proof(hashes, a, size)]


def _tiles(log: TrustLog, kind: str, a: int, size: int) -> list[str]:
    if kind == "inclusion":
        return proofs.inclusion(log, a, size)
    return proofs.consistency(log, a, size)


def serve(root: str, size: int, variant: str, requests: int, seed: int) -> None:
    """One process serving ``requests`` proofs of each kind; prints JSON."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log, rng = _log(root, size), random.Random(seed)
    prove = _tiles if variant == "tiles" else _before
    n = log.state().size
    timings: dict[str, list[float]] = {"inclusion": [], "consistency": []}
    first = None
    for _ in range(requests):
        for kind in ("inclusion", "consistency"):
            a = rng.randrange(n) if kind == "inclusion" else rng.randrange(1, n)
            began = time.perf_counter()
            proof = prove(log, kind, a, n)
            spent = time.perf_counter() - began
            if first is None:
                first = spent  # for "before", this one reads the hashes
            else:
                timings[kind].append(spent)
            assert proof or n == 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base": base, "peak": peak, "first": first, **timings}))


def backfill(root: str, size: int) -> None:
    """Tile a log as if it were written before tiles; prints JSON."""
    log = _log(root, size)
    state = log.store.read_json(f"{log.dir}/log.json")
    del state["tiled"]
    log.store.write_json(f"{log.dir}/log.json", state)
    log.store.fs.rm(f"{log.dir}/tiles", recursive=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    log.append(_leaves(0, 0))
    seconds = time.perf_counter() - began
    assert log.state().tiled == size
    assert log.tiles.reader().root(size) == log.state().frontier.root()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base": base, "peak": peak, "seconds": seconds}))


CHILDREN = {"serve": serve, "backfill": backfill}


def _child(*args: object) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


@app.command()
def main(
    root: Annotated[str, typer.Option(help="Where the logs are built.")] = "/tmp/benchproofs",
    size: Annotated[
        list[int] | None, typer.Option(help="Log sizes (the smallest one is also served before).")
    ] = None,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the logs even if built.")] = False,
    rounds: Annotated[int, typer.Option(help="Rounds of each variant, alternated.")] = 2,
    requests: Annotated[int, typer.Option(help="Tile proofs of each kind per round.")] = 300,
    before_requests: Annotated[int, typer.Option(help="The same, before.")] = 15,
    backfill_size: Annotated[
        int,
        typer.Option(
            "--backfill", help="Also tile a log of this size as if written before tiles (0: no)."
        ),
    ] = 0,
) -> None:
    sizes, built = sorted(size or SIZES), {}
    for n in sizes:
        if rebuild or _log(root, n).state().size != n:
            typer.echo(f"building {n:,} leaves")
            built[n] = build(root, n)
    runs = [("before", sizes[0], before_requests), *(("tiles", n, requests) for n in sizes)]
    rows = []
    for r in range(rounds):
        for variant, n, count in runs:
            found = _child("serve", root, n, variant, count, r)
            rows.append((r + 1, variant, n, found))
            p50, peak = _pct(found["inclusion"], 0.5), found["peak"]
            typer.echo(f"round {r + 1} {variant} {n:,}: inclusion p50 {p50:.1f} ms, {peak:.0f} MiB")
    filled = None
    if backfill_size:
        filled = _child("backfill", root, backfill_size)
        typer.echo(f"backfill {backfill_size:,}: {filled}")
    lines = [
        "# Proofs: from tiles against every leaf hash in memory",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local machine (2 cores shared "
        "with four other engineers' work; read differences under ~10% as noise), logs on the "
        "local filesystem.",
        "",
        f"Logs of {' and '.join(f'{n:,}' for n in sizes)} leaves, appended through "
        f"`TrustLog.append` in batches of {BATCH:,} (leaves files, tiles and `log.json`, as "
        "the pipeline appends; hashes made directly, not from records). Each row is one process"
        " of its own that imports the project and serves proofs: inclusion of a random leaf in "
        "the whole tree, consistency of a random older size with the whole tree. *before* is "
        "the code tiles replaced (every leaf hash read once and kept, then RFC 9162's recursion"
        " over them, `O(n)` per proof); its first request, which reads the hashes, is apart and"
        " not in p50/p95. *tiles* is `trust.proofs` now. Peak RSS is the process's maximum; "
        "*base* is after imports, before any proof.",
        "",
        "| round | variant | leaves | proofs | first request ms | inclusion p50 / p95 ms | "
        "consistency p50 / p95 ms | base MiB | peak MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, variant, n, f in rows:
        proofs_done = len(f["inclusion"]) + len(f["consistency"]) + 1
        lines.append(
            f"| {r} | {variant} | {n:,} | {proofs_done} | {f['first'] * 1000:.0f} | "
            f"{_pct(f['inclusion'], 0.5):.1f} / {_pct(f['inclusion'], 0.95):.1f} | "
            f"{_pct(f['consistency'], 0.5):.1f} / {_pct(f['consistency'], 0.95):.1f} | "
            f"{f['base']:.0f} | {f['peak']:.0f} |"
        )
    if built:
        lines += [
            "",
            "Build (this run), through `TrustLog.append`: "
            + ", ".join(f"{n:,} leaves in {seconds:.0f} s" for n, seconds in built.items())
            + ".",
        ]
    if filled:
        lines += [
            "",
            f"Tiling a log of {backfill_size:,} leaves written before tiles (its next append "
            f"does it once): {filled['seconds']:.0f} s, peak RSS {filled['peak']:.0f} MiB "
            f"(base {filled['base']:.0f} MiB).",
        ]
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/proofs.py"
    if size:
        command += "".join(f" --size {n}" for n in sizes)
    if backfill_size:
        command += f" --backfill {backfill_size}"
    lines += ["", f"Run: `{command}`"]
    RESULTS.write_text("\n".join(lines) + "\n")
    typer.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        name, *values = sys.argv[1:]
        CHILDREN[name](values[0], *(v if v in ("tiles", "before") else int(v) for v in values[1:]))
    else:
        app()
