"""What the deployment-level benchmarks share, for the live capture shape (one long-lived capture
run per shard, kept alive by ``capture_keeper_sensor``; indices per retention class, shared by
the class's sources):

- a ground truth in each source database, independent of the platform: a trigger on every
  tracked table counts each row change into ``bench_truth`` in the same transaction (what the
  fault matrix does; the platform never reads it), compared at the end with the documents
  indexed for that source (``source.service``);
- the environment's live capture runs, from Dagster's own run records;
- a writer per source at a fixed rate with one probe transaction a second, reconnecting when
  its database refuses connections, and a poller that reads the probes back through the API;
- retained WAL per slot as the server measures it.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from audit_platform.policy import SourcePolicy

CHANGES_PER_TX = 5  # an order, three lines, the order's status update
RUNS = """
query { runsOrError(limit: 100000) {
  ... on Runs { results { runId pipelineName status creationTime startTime endTime } } } }"""

TRUTH_FUNCTION = """
CREATE TABLE IF NOT EXISTS bench_truth (
    seq bigserial PRIMARY KEY, tbl text, op text, at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION bench_record_truth() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_truth (tbl, op) VALUES (TG_TABLE_NAME, lower(TG_OP));
    RETURN NULL;
END $$;
"""


def install_truth(url: str, policy: SourcePolicy) -> None:
    """The ground truth: every row change of a tracked table, counted by a trigger."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(TRUTH_FUNCTION)
        for schema, table in policy.table_names():
            conn.execute(
                f'CREATE TRIGGER bench_truth AFTER INSERT OR UPDATE OR DELETE ON "{schema}".'
                f'"{table}" FOR EACH ROW EXECUTE FUNCTION bench_record_truth()'
            )


def truth_count(url: str, between: tuple[float, float] | None = None) -> int:
    """Row changes the trigger saw (committed ones only: the trigger's rows commit with them);
    ``between`` two Unix times, by the change's clock."""
    with psycopg.connect(url, connect_timeout=10) as conn:
        if between is None:
            return conn.execute("SELECT count(*) FROM bench_truth").fetchone()[0]
        return conn.execute(
            "SELECT count(*) FROM bench_truth"
            " WHERE at >= to_timestamp(%s) AND at < to_timestamp(%s)",
            between,
        ).fetchone()[0]


def truth_seq(url: str) -> int:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM bench_truth").fetchone()[0]


def indexed_by_source(es, env: str) -> dict[str, int]:
    """Documents per source in the environment's indices (shared by a class's sources)."""
    index = f"audit-{env}-*"
    if not es.indices.get(index=index, allow_no_indices=True):
        return {}
    es.indices.refresh(index=index)
    reply = es.search(
        index=index,
        size=0,
        track_total_hits=True,
        aggs={"s": {"terms": {"field": "source.service", "size": 10_000}}},
    )
    return {b["key"]: b["doc_count"] for b in reply["aggregations"]["s"]["buckets"]}


class Background:
    """A sampler's thread: ``start``, then ``close`` sets ``stop`` and waits for ``_run``."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=60)


class IndexLag(Background):
    """Every ``every`` seconds, per source, how old the newest searchable change is: now
    minus the greatest commit time among the source's documents, read from Elasticsearch
    directly (not refreshed: what a search sees). A second measure of freshness beside the
    probes: it does not depend on how soon the probe poller looks, and a source written
    several times a second has a newest change at most a fraction of a second old at its
    commit. Samples from before a source's first document are not kept."""

    def __init__(self, es, env: str, every: float = 2.0) -> None:
        self.es, self.index, self.every = es, f"audit-{env}-*", every
        self.samples: dict[str, list[tuple[float, float]]] = {}
        super().__init__()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                reply = self.es.search(
                    index=self.index,
                    size=0,
                    allow_no_indices=True,
                    aggs={
                        "s": {
                            "terms": {"field": "source.service", "size": 10_000},
                            "aggs": {"newest": {"max": {"field": "@timestamp"}}},
                        }
                    },
                )
            except Exception:  # Elasticsearch paused or restarting: no sample
                continue
            now = time.time()
            for bucket in reply.get("aggregations", {}).get("s", {}).get("buckets", []):
                newest = bucket["newest"]["value"]
                if newest is not None:
                    self.samples.setdefault(bucket["key"], []).append((now, now - newest / 1000))

    def lags(self, source: str, window: tuple[float, float] | None = None) -> list[float]:
        return [
            lag
            for t, lag in self.samples.get(source, [])
            if window is None or window[0] <= t <= window[1]
        ]


def index_ops(es, env: str) -> int:
    stats = es.indices.stats(index=f"audit-{env}-*", metric="indexing")["_all"]["primaries"]
    return stats.get("indexing", {}).get("index_total", 0)


@dataclass
class Run:
    run_id: str
    job: str
    status: str
    created: float
    started: float | None
    ended: float | None

    def alive_during(self, start: float, end: float) -> bool:
        began = self.started or self.created
        return began <= end and (self.ended is None or self.ended >= start)


def capture_runs(deployment) -> list[Run]:
    """The environment's live capture runs (``capture_shard_<n>_job``), oldest first."""
    found = deployment.graphql(RUNS)["runsOrError"]["results"]
    runs = [
        Run(
            r["runId"],
            r["pipelineName"],
            r["status"],
            r["creationTime"],
            r["startTime"],
            r["endTime"],
        )
        for r in found
        if r["pipelineName"].startswith("capture_shard_")
    ]
    return sorted(runs, key=lambda r: r.created)


def all_runs(deployment) -> int:
    return len(deployment.graphql(RUNS)["runsOrError"]["results"])


def marker(deployment) -> str:
    """Text in the environment of every process of this deployment (for ``CpuSampler``)."""
    return f"DAGSTER_HOME={deployment.root / 'dagster_home'}"


def run_workers(deployment) -> list[int]:
    """PIDs of the deployment's run processes (they inherit its DAGSTER_HOME)."""
    home = marker(deployment).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if home in (proc / "environ").read_bytes():
                cmdline = (proc / "cmdline").read_bytes()
                if b"spawn_main" in cmdline or b"execute_run" in cmdline:
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def capture_run_process(deployment) -> int | None:
    """The live capture run's process: of the deployment's run processes, the one with the
    most threads (a worker thread per source)."""
    found = []
    for pid in run_workers(deployment):
        try:
            found.append((len(os.listdir(f"/proc/{pid}/task")), pid))
        except OSError:
            continue
    return max(found)[1] if found else None


def renice_postgres(nice: int) -> int:
    """Set every PostgreSQL process's nice value (the postmaster's is inherited by the
    backends and walsenders it starts later); returns how many were set.

    A fleet's source databases run on their own servers, not on the platform's machine: at
    nice 10 they (and the load's writers) take the CPU the platform's processes leave, as
    they would elsewhere, while the whole machine's CPU is still counted."""
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "postgres":
                os.setpriority(os.PRIO_PROCESS, int(proc.name), nice)
                count += 1
        except OSError:
            continue
    return count


def capture_run_kind(deployment) -> Callable[[], dict[int, str]]:
    """For ``CpuSampler(extra=...)``: the live capture run's process counted apart from the
    deployment's other runs (health checks, reconciliation, the trail's duties)."""

    def kinds() -> dict[int, str]:
        pid = capture_run_process(deployment)
        return {} if pid is None else {pid: "capture run"}

    return kinds


def elasticsearch_pid() -> int:
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and b"org.elasticsearch.bootstrap" in (proc / "cmdline").read_bytes()
            ):
                return int(proc.name)
        except OSError:
            continue
    raise RuntimeError("no Elasticsearch process on this machine")


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


def quantile(values: list[float], q: int) -> float:
    if len(values) > 1:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
    return values[0] if values else float("nan")


@dataclass
class SourceLoad:
    """Row changes at a fixed rate into one source (transactions of five with their context)
    and one probe transaction a second, whose ``request_id`` the poller looks for; a refused or
    lost connection is retried every second, as a service would."""

    source: str
    url: str
    rate: float
    writers: int = 1
    #: The writer threads' nice value (``renice_postgres``: the sources on other machines).
    nice: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    probes: dict[str, float] = field(default_factory=dict)  # request id -> commit time
    committed: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._write, args=(i,), daemon=True)
            for i in range(self.writers)
        ]
        for thread in threads:
            thread.start()
        return threads

    def _write(self, writer: int) -> None:
        if self.nice:  # this thread only (Linux: a thread's id is a process id here)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        per_second = self.rate / CHANGES_PER_TX / self.writers
        context = json.dumps(
            {
                "actor": {"type": "service", "id": f"writer-{writer}"},
                "service": self.source,
                "reason": "load",
            }
        )
        start, done, next_probe = time.monotonic(), 0, time.monotonic() + 1
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.url, connect_timeout=5) as conn:
                    customer = _customer(conn)
                    while not self.stop.is_set():
                        if writer == 0 and time.monotonic() >= next_probe:
                            next_probe += 1
                            self._probe(conn, customer)
                        due = start + done / per_second
                        if (wait := due - time.monotonic()) > 0:
                            self.stop.wait(min(wait, 0.1))  # a probe may be due meanwhile
                            continue
                        conn.execute("SELECT audit.set_context(%s::jsonb)", (context,))
                        order = conn.execute(
                            "INSERT INTO orders (customer_id, total) VALUES (%s, 30) RETURNING id",
                            (customer,),
                        ).fetchone()[0]
                        conn.execute(
                            "INSERT INTO order_lines VALUES (%s, 1, 'sku-1', 1, 10),"
                            " (%s, 2, 'sku-2', 1, 10), (%s, 3, 'sku-3', 1, 10)",
                            (order, order, order),
                        )
                        conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (order,))
                        conn.commit()
                        done += 1
                        with self.lock:
                            self.committed += CHANGES_PER_TX
            except psycopg.Error:
                with self.lock:
                    self.failures += 1
                self.stop.wait(1.0)
                # Writes missed while down are not made up for later.
                start, done = time.monotonic(), 0
                next_probe = time.monotonic() + 1

    def _probe(self, conn: psycopg.Connection, customer: int) -> None:
        request = f"probe-{self.source}-{uuid.uuid4().hex[:10]}"
        context = {"actor": {"type": "user", "id": "probe"}, "request_id": request}
        conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
        conn.execute(
            "INSERT INTO payments (order_id, amount, card_last4) VALUES "
            "((SELECT max(id) FROM orders), 1, '4242')"
        )
        conn.commit()
        with self.lock:
            self.probes[request] = time.time()
            self.committed += 1


def _customer(conn: psycopg.Connection) -> int:
    conn.execute("""SELECT audit.set_context('{"actor": {"type": "service", "id": "bench"}}')""")
    found = conn.execute("SELECT id FROM customers WHERE name = 'Load' LIMIT 1").fetchone()
    if found is None:
        found = conn.execute(
            "INSERT INTO customers (name, email, password_hash) VALUES ('Load', %s, 'x')"
            " RETURNING id",
            (f"load-{uuid.uuid4().hex[:6]}@example.com",),
        ).fetchone()
        conn.execute("INSERT INTO orders (customer_id, total) VALUES (%s, 1)", found)
    conn.commit()
    return found[0]


class ProbePoller(Background):
    """Reads the probes back through the API: every ``every`` seconds the newest page of
    payments (the probes are the only writes to payments), and, for up to ``per_poll``
    sources whose oldest probe still unseen is older than 5 s (a lagging source, whose probes
    sort below newer ones of the others), that source's payments since then. A probe unseen
    for ``give_up`` seconds (a slot's gap) is not looked for any more."""

    def __init__(
        self,
        api: str,
        key: str,
        since: str,
        loads: dict[str, SourceLoad],
        every: float = 0.5,
        per_poll: int = 4,
        give_up: float = 600,
    ) -> None:
        self.api, self.key, self.since, self.loads = api, key, since, loads
        self.every, self.per_poll, self.give_up = every, per_poll, give_up
        self.seen: dict[str, float] = {}
        self.requests = 0
        self._next = 0
        super().__init__()

    def _get(self, client: httpx.Client, params: dict) -> None:
        self.requests += 1
        try:
            reply = client.get("/v1/events", params=params)
            events = reply.json().get("events", [])
        except (httpx.HTTPError, ValueError):
            return
        now = time.time()
        for event in events:
            request = (event.get("context") or {}).get("request_id")
            if request and request not in self.seen:
                self.seen[request] = now

    def _run(self) -> None:
        with httpx.Client(base_url=self.api, headers={"X-API-Key": self.key}, timeout=30) as c:
            while not self.stop.wait(self.every):
                self._get(
                    c, {"since": self.since, "limit": 500, "order": "desc", "table": "payments"}
                )
                now, lagging = time.time(), []
                for source, load in sorted(self.loads.items()):
                    with load.lock:
                        waiting = [
                            t
                            for r, t in load.probes.items()
                            if r not in self.seen and self.give_up > now - t > 5
                        ]
                    if waiting:
                        lagging.append((source, min(waiting)))
                if not lagging:
                    continue
                self._next %= len(lagging)
                for source, oldest in (lagging[self._next :] + lagging[: self._next])[
                    : self.per_poll
                ]:
                    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(oldest - 2))
                    self._get(
                        c,
                        {
                            "since": since,
                            "limit": 500,
                            "order": "asc",
                            "table": "payments",
                            "source": source,
                        },
                    )
                self._next += self.per_poll

    def freshness(self, load: SourceLoad, window: tuple[float, float] | None = None) -> list[float]:
        """Commit to searchable, seconds, of the probes committed in ``window``."""
        with load.lock:
            probes = dict(load.probes)
        return [
            self.seen[r] - t
            for r, t in probes.items()
            if r in self.seen and (window is None or window[0] <= t < window[1])
        ]

    def unseen(self, load: SourceLoad) -> int:
        with load.lock:
            return sum(r not in self.seen for r in load.probes)


def retained_wal(conn: psycopg.Connection, slots: list[str]) -> dict[str, tuple[int, int]]:
    """Per slot, as the server measures it: (current LSN - restart_lsn, current LSN -
    confirmed_flush_lsn), bytes."""
    rows = conn.execute(
        "SELECT slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = ANY(%s)",
        (slots,),
    ).fetchall()
    return {name: (retained or 0, lag or 0) for name, retained, lag in rows}


def slot_pids(conn: psycopg.Connection, slots: list[str]) -> dict[str, int]:
    """The walsender process serving each of these slots that is streamed now."""
    rows = conn.execute(
        "SELECT slot_name, active_pid FROM pg_replication_slots WHERE slot_name = ANY(%s)"
        " AND active_pid IS NOT NULL",
        (slots,),
    ).fetchall()
    return dict(rows)
