"""CPU seconds per kind of process, sampled from /proc (Linux), for the load benchmarks.

Short-lived processes (Dagster run workers) are seen by sampling every second; a process that
lives less than a second, or the CPU a process spends after its last sample, is missed, so the
shares are slight underestimates for run workers.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
KINDS = (
    # The code server starts each run in a multiprocessing "spawn" child.
    ("run worker", "spawn_main"),
    ("run worker", "execute_run"),
    ("run worker", "execute_step"),
    ("dagster code server", "code-server"),
    ("dagster code server", "api grpc"),
    ("dagster daemon", "dagster-daemon"),
    ("dagster webserver", "dagster-webserver"),
    ("audit api", "api serve"),
    ("elasticsearch", "org.elasticsearch"),
)


#: Dagster and API processes of another deployment on the same (shared) machine.
OTHERS = "other deployments' dagster and api processes"
#: Kinds that are shared servers: every such process on the machine is counted.
SHARED = {"postgresql", "postgresql walsenders", "elasticsearch"}


def kind_of(pid: int, me: int, mine: bytes | None = None) -> str | None:
    """``mine``: text in the environment of this benchmark's deployment's processes (its
    DAGSTER_HOME); Dagster and API processes without it are another deployment's."""
    if pid == me:
        return "benchmark (load and probes)"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    if comm == "postgres":
        # Each walsender decodes the whole server's WAL, every database's: with many source
        # databases on one server (as here, not as in a fleet of servers) they add up.
        return "postgresql walsenders" if "walsender" in cmdline else "postgresql"
    for kind, marker in KINDS:
        if marker in cmdline:
            if mine is not None and kind not in SHARED:
                try:
                    if mine not in Path(f"/proc/{pid}/environ").read_bytes():
                        return OTHERS
                except OSError:
                    return OTHERS
            return kind
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class CpuSampler:
    """Accumulates CPU seconds per kind between ``start`` and ``stop``."""

    def __init__(
        self,
        interval: float = 1.0,
        series_every: float = 0,
        extra: Callable[[], dict[int, str]] | None = None,
        mine: str | None = None,
    ) -> None:
        """``series_every``: also keep the totals so far every so many seconds (``series``);
        ``extra``: called at each sample, pid -> kind for processes to count apart (e.g. the
        walsenders of some slots, which would otherwise be "postgresql"); ``mine``: text in
        the environment of the benchmark's own Dagster and API processes (see ``kind_of``)."""
        self.interval = interval
        self.series_every = series_every
        self.series: list[tuple[float, dict[str, float]]] = []
        self.extra = extra
        self.mine = mine.encode() if mine else None
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kinds: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started_pids: set[int] = set()

    def start(self) -> None:
        self._machine = _machine_busy()
        self._started_pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        self._sample(initial=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.totals()

    def totals(self) -> dict[str, float]:
        """CPU seconds per kind since ``start``."""
        totals: dict[str, float] = {"whole machine (/proc/stat)": _machine_busy() - self._machine}
        for pid, last in list(self.last.items()):
            kind = self.kinds[pid]
            totals[kind] = totals.get(kind, 0.0) + last - self.first.get(pid, 0.0)
        return totals

    def _run(self) -> None:
        started = last = time.monotonic()
        while not self._stop.wait(self.interval):
            self._sample()
            if self.series_every and time.monotonic() - last >= self.series_every:
                last = time.monotonic()
                self.series.append((last - started, self.totals()))

    def _sample(self, initial: bool = False) -> None:
        me = os.getpid()
        if self.extra is not None:
            with contextlib.suppress(Exception):  # a failed look-up skips this sample's
                self.kinds.update(self.extra())
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid not in self.kinds:
                kind = kind_of(pid, me, self.mine)
                if kind is None:
                    continue
                self.kinds[pid] = kind
            seconds = cpu_seconds(pid)
            if seconds is None:
                continue
            if pid not in self.first and (initial or pid in self._started_pids):
                self.first[pid] = seconds  # running before the start: count from here
            self.last[pid] = seconds


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS
