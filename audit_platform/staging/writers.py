"""Threads that write files side by side.

A durable local write waits mostly for the disk to flush it (two fsyncs, the file's and its
folder's: 1 to 4 ms each on the benchmark machine under load), and a thread waiting in fsync
lets the others run. Written one after another, the twenty sources of a downstream turn (each
its records file, its trail's leaves, tile and state, its ledger entry: five durable writes)
waited for a hundred writes in a row while their turn's lane waited with them; written side by
side, the flushes overlap (docs/design.md, "The capture run").

Staging and the downstream turns have threads of their own, as they have lanes of their own: a
turn's writes (a trail's first append may tile a whole old log) never hold back a batch's
staging, so a slow downstream step never keeps slots from being read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_inside = threading.local()


class Writers:
    """A few threads that run jobs writing different files, each call waiting for all of its
    jobs."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=_mark)

    def side_by_side(self, jobs: Iterable[Callable[[], T]]) -> list[T]:
        """Run ``jobs`` at once and return their results in their order.

        Every job runs to its end before this returns or raises, so no write goes on behind a
        caller that has failed, and what the others wrote is what a process dying just after
        them would leave. Then the first failure in the jobs' order is raised, one that is not
        an ``Exception`` (a ``SimulatedCrash``, an interrupt) before any that is, and the others
        are logged. One job, or a call from a writer thread (a job's own writes), runs in the
        caller's thread: a job waiting for jobs queued behind it could hold every thread."""
        jobs = list(jobs)
        if len(jobs) <= 1 or getattr(_inside, "writer", False):
            return [job() for job in jobs]
        futures = [self._pool.submit(job) for job in jobs]
        wait(futures)
        failed = [f for f in futures if f.exception() is not None]
        if failed:
            first = min(failed, key=lambda f: isinstance(f.exception(), Exception))
            for other in failed:
                if other is not first:
                    log.warning("a write beside a failed one failed too: %r", other.exception())
            raise _error(first)
        return [future.result() for future in futures]


def _mark() -> None:
    _inside.writer = True


def _error(future: Future) -> BaseException:
    error = future.exception()
    assert error is not None
    return error


#: A batch's files (changes and contexts, one of each per commit hour it spans), for the two
#: staging lanes of a run.
STAGING = Writers(4, "staging-writer")
#: A downstream turn's per-source files (up to 32 sources; two turns at once).
TURNS = Writers(8, "turn-writer")
