"""Bulk indexing of audit records into Elasticsearch: columnar bodies, a few requests in flight.

Each record's ``_id`` is derived from (env, source, commit LSN, change index), so indexing the
same records again replaces documents instead of adding copies (docs/design.md, invariant 2).

Bodies are NDJSON built by polars (``documents.document_frame``) and sent as they are, with a
bounded number of requests in flight, because one Python thread serializing dicts, then waiting
for each response, is what kept indexing at half the cluster's own rate. Per item: 429 (the
cluster is busy) is retried with exponential backoff and jitter; any other refusal (a mapping
conflict, a value too large) is returned with its reason for the dead-letter dataset and never
fails the documents around it. Connection errors and 5xx responses are retried by the client's
transport; if they persist, the exception propagates and the caller's run is retried later
(documents already sent are simply overwritten then).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl
from elasticsearch import Elasticsearch
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from audit_platform.faults import crash_point
from audit_platform.index.documents import PerSource, document_frame
from audit_platform.naming import STANDARD_CLASS

DEAD_LETTER_SCHEMA = pl.Schema(
    {"id": pl.String, "index": pl.String, "status": pl.Int32, "reason": pl.String}
)
#: Chosen by measurement (benchmarks/results/index_throughput.md): past about 1,000 documents
#: (~1 MB) a request gains nothing here, and two in flight keep the node's write threads busy.
CHUNK_DOCUMENTS = 1000
IN_FLIGHT = 2
#: A request also closes past this many bytes: rows are as large as a source makes them, and
#: Elasticsearch refuses a whole request over http.max_content_length (100 MB by default)
#: with a 413 that no item of it could be retried past.
CHUNK_BYTES = 8 * 1024 * 1024
#: A document larger than this is dead-lettered instead of sent: alone it would still be
#: refused whole, and every later run would fail on it again.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024


class Throttled(RuntimeError):
    """Elasticsearch answered 429 for some documents: send them again, later."""


@dataclass
class IndexResult:
    indexed: int = 0
    failed: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=DEAD_LETTER_SCHEMA))
    seconds: float = 0.0


def index_records(
    client: Elasticsearch,
    records: pl.DataFrame,
    *,
    database: PerSource,
    ingested_at: datetime,
    chunk_size: int = CHUNK_DOCUMENTS,
    chunk_bytes: int = CHUNK_BYTES,
    in_flight: int = IN_FLIGHT,
    max_attempts: int = 6,
    retention_class: PerSource = STANDARD_CLASS,
) -> IndexResult:
    """Index records; a document refused for itself is returned in ``failed``, not raised.

    ``retention_class`` is the records' source's: it names the monthly index they go to."""
    started = time.monotonic()
    result = IndexResult()
    if records.is_empty():
        return result
    frame = document_frame(
        records, database=database, ingested_at=ingested_at, retention_class=retention_class
    ).select(
        "index",
        "id",
        pl.concat_str(
            pl.lit('{"index":{"_index":"'),
            "index",
            pl.lit('","_id":"'),
            "id",
            pl.lit('"}}\n'),
            "document",
            pl.lit("\n"),
        ).alias("line"),
    )
    frame = frame.with_columns(pl.col("line").str.len_bytes().alias("bytes"))
    too_large = frame.filter(pl.col("bytes") > MAX_DOCUMENT_BYTES)
    failures = [
        (doc_id, index, 413, _TOO_LARGE.format(size=size, limit=MAX_DOCUMENT_BYTES))
        for index, doc_id, _, size in too_large.iter_rows()
    ]
    sendable = frame.filter(pl.col("bytes") <= MAX_DOCUMENT_BYTES)

    def collect(sent: tuple[int, list]) -> None:
        indexed, failed = sent
        result.indexed += indexed
        failures.extend(failed)
        crash_point("index.chunk_sent")

    chunks = _chunks(sendable, chunk_size, chunk_bytes)
    first, second = next(chunks, None), next(chunks, None)
    if second is None:  # one request (a live batch): no threads to start and hand over to
        if first is not None:
            collect(_send(client, first, max_attempts))
    else:
        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="bulk") as pool:
            waiting: deque[Future[tuple[int, list]]] = deque()
            assert first is not None  # there is a second chunk, so there is a first
            for chunk in itertools.chain((first, second), chunks):
                waiting.append(pool.submit(_send, client, chunk, max_attempts))
                if len(waiting) >= in_flight:  # bounded: at most in_flight bodies in memory
                    collect(waiting.popleft().result())
            for future in waiting:
                collect(future.result())
    result.failed = pl.DataFrame(failures, schema=DEAD_LETTER_SCHEMA, orient="row")
    result.seconds = time.monotonic() - started
    return result


_TOO_LARGE = (
    "document_too_large: {size} bytes; documents over {limit} are not sent (the record stays "
    "staged and in the trail)"
)


def _chunks(frame: pl.DataFrame, documents: int, size: int) -> Iterator[list[str]]:
    """NDJSON lines in requests of at most ``documents`` lines and about ``size`` bytes."""
    chunk: list[str] = []
    total = 0
    for line, length in frame.select("line", "bytes").iter_rows():
        if chunk and (len(chunk) >= documents or total + length > size):
            yield chunk
            chunk, total = [], 0
        chunk.append(line)
        total += length
    if chunk:
        yield chunk


def _send(
    client: Elasticsearch, lines: list[str], max_attempts: int
) -> tuple[int, list[tuple[str | None, str | None, int, str]]]:
    """One bulk request of NDJSON lines; documents answered 429 are sent again with backoff."""
    indexed, failures, pending = 0, [], lines
    retrying = Retrying(
        retry=retry_if_exception_type(Throttled),
        wait=wait_exponential_jitter(initial=1, max=30),
        stop=stop_after_attempt(max_attempts),
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            # NDJSON already serialized: the client sends a str body as it is (its type
            # hints name only a list of actions).
            response = client.bulk(operations="".join(pending))  # type: ignore[arg-type]
            if not response["errors"]:
                indexed += len(pending)
                continue
            throttled = []
            for line, item in zip(pending, response["items"], strict=True):
                outcome = item["index"]
                status = outcome.get("status", 0)
                if status < 300:
                    indexed += 1
                elif status == 429:
                    throttled.append(line)
                else:
                    failures.append(_failure(outcome, status))
            if throttled:
                pending = throttled
                raise Throttled(f"{len(throttled)} documents answered 429")
    return indexed, failures


def _failure(outcome: dict, status: int) -> tuple[str | None, str | None, int, str]:
    error = outcome.get("error", {})
    reason = error.get("reason", str(error)) if isinstance(error, dict) else str(error)
    kind = error.get("type", "error") if isinstance(error, dict) else "error"
    return outcome.get("_id"), outcome.get("_index"), status, f"{kind}: {reason}"
