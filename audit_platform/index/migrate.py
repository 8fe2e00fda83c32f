"""Moving an environment's indices from the layout per source to the layout per retention class.

Before retention classes, each source had an index a month (``naming.legacy_index_name``); 200
sources kept 13 months made 2,600 shards an environment. Now each retention class has one
(``naming.index_name``) and ``source.service`` tells the sources apart. ``audit-platform index
migrate`` moves what the old layout holds, one old index at a time:

1. the old index is blocked for writes (nothing writes to it any more, and its count must not
   change between the copy and the deletion);
2. Elasticsearch's ``_reindex`` copies it into the class index of its source and month, under
   the same ``_id`` (``op_type: index``): a rerun overwrites, never duplicates. A cluster
   without the reindex module (the integ-test-zip node of the local stack and the tests) gets
   what the client's ``helpers.reindex`` does instead: a scroll of the old index into bulk
   requests, the same ids;
3. every ``_id`` of the old index is looked up in the class index (count queries by ids, in
   chunks); the class index may hold more (other sources, documents indexed since the upgrade),
   never fewer;
4. only when every one is there is the old index deleted; otherwise it stays, and the report
   says why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from elasticsearch import Elasticsearch, helpers

from audit_platform.environment import EnvironmentConfig
from audit_platform.index.template import installed_template_hash
from audit_platform.naming import check_identifier, index_name, index_pattern, parse_index_name

#: Ids looked up in the class index per count query.
ID_CHUNK = 5_000


class MigrationError(RuntimeError):
    """The migration cannot start; the message says what to do first."""


@dataclass
class IndexMove:
    """One index of the old layout and what became of it."""

    legacy: str
    target: str
    source: str
    documents: int
    #: Of the old index's ids, how many the class index holds (None: not checked, a dry run).
    found: int | None = None
    deleted: bool = False
    problem: str | None = None


@dataclass
class MigrationReport:
    dry_run: bool
    moves: list[IndexMove] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(move.problem is None for move in self.moves)

    def lines(self) -> list[str]:
        if not self.moves:
            return ["no index of the layout per source: nothing to migrate"]
        out = []
        for move in self.moves:
            text = (
                f"{move.legacy} ({move.documents} documents, source {move.source}) -> {move.target}"
            )
            if self.dry_run:
                out.append(f"would move {text}")
            elif move.problem:
                out.append(f"NOT moved {text}: {move.problem}; the old index is kept")
            else:
                out.append(f"moved {text}: all {move.found} found there; old index deleted")
        return out


def legacy_indices(client: Elasticsearch, env: str) -> list[str]:
    """This environment's indices of the layout per source, oldest month first."""
    found = client.options(ignore_status=404).indices.get(
        index=index_pattern(env), expand_wildcards="open,closed"
    )
    names = []
    for name in found:
        parsed = parse_index_name(name)
        if parsed is not None and parsed.env == env and parsed.source is not None:
            names.append(((parsed.year, parsed.month, name), name))
    return [name for _, name in sorted(names)]


def migrate_layout(
    client: Elasticsearch,
    env: str,
    environment: EnvironmentConfig,
    *,
    dry_run: bool,
    poll_seconds: float = 1.0,
) -> MigrationReport:
    """Move every index of the layout per source into its class index (module docstring)."""
    check_identifier("environment", env)
    if not dry_run and installed_template_hash(client, env) is None:
        raise MigrationError(
            f"environment {env} has no index template: class indices would get dynamic "
            "mappings and no read alias. Install it first (the template asset, or any "
            "indexing run); audit-platform index migrate does"
        )
    report = MigrationReport(dry_run=dry_run)
    for legacy in legacy_indices(client, env):
        parsed = parse_index_name(legacy)
        assert parsed is not None and parsed.source is not None
        retention_class = environment.retention_class_of(parsed.source)
        target = index_name(env, retention_class, parsed.year, parsed.month)
        if not dry_run:
            client.indices.add_block(index=legacy, block="write")
            client.indices.refresh(index=legacy)
        move = IndexMove(legacy, target, parsed.source, client.count(index=legacy)["count"])
        report.moves.append(move)
        if dry_run:
            continue
        move.problem = _copy(client, legacy, target, move.documents, poll_seconds)
        if move.problem is not None:
            continue
        client.indices.refresh(index=target)
        move.found = _found(client, legacy, target)
        if move.found != move.documents:
            move.problem = (
                f"only {move.found} of its {move.documents} ids are in {target} after the copy"
            )
            continue
        client.indices.delete(index=legacy)
        move.deleted = True
    return report


def cluster_has_reindex(client: Elasticsearch) -> bool:
    """Whether every node has the reindex module (the integ-test-zip distribution has not)."""
    nodes = client.nodes.info(metric="plugins")["nodes"].values()
    return all(any(m["name"] == "reindex" for m in node.get("modules", [])) for node in nodes)


def _copy(
    client: Elasticsearch, legacy: str, target: str, documents: int, poll_seconds: float
) -> str | None:
    """Copy ``legacy`` into ``target``; the problem, or None when every document was written."""
    if not cluster_has_reindex(client):
        # What helpers.reindex does (a scroll into bulk requests, the same ids), without its
        # first question: it asks for data streams, which this node lacks (a 400 it does not
        # expect), so it cannot run here.
        actions = (
            {"_op_type": "index", "_index": target, "_id": hit["_id"], "_source": hit["_source"]}
            for hit in helpers.scan(client, index=legacy, size=1000)
        )
        written, errors = helpers.bulk(client, actions, raise_on_error=False, chunk_size=1000)
        # A list of the refused actions (an int only with ``stats_only``).
        return _problem(written, errors if isinstance(errors, list) else [], documents)
    # As a task: a large index outlasts any request timeout.
    task = client.reindex(
        source={"index": legacy},
        dest={"index": target, "op_type": "index"},
        wait_for_completion=False,
    )["task"]
    while True:
        status = client.options(ignore_status=408).tasks.get(
            task_id=task, wait_for_completion=True, timeout="30s"
        )
        if status.get("completed"):
            break
        time.sleep(poll_seconds)
    if "error" in status:
        return f"the reindex task failed: {status['error']}"
    response = status.get("response", {})
    written = response.get("created", 0) + response.get("updated", 0)
    return _problem(written, response.get("failures") or [], documents)


def _problem(written: int, failures: list, documents: int) -> str | None:
    if failures:
        first = failures[0]
        cause = first.get("cause") or first.get("index", {}).get("error") or first
        return f"{len(failures)} documents were refused, the first: {cause}"
    if written != documents:
        return f"the copy wrote {written} of {documents} documents"
    return None


def _found(client: Elasticsearch, legacy: str, target: str) -> int:
    """How many of ``legacy``'s ids ``target`` holds (a count query per chunk of ids)."""
    return sum(
        client.count(index=target, query={"ids": {"values": chunk}})["count"]
        for chunk in _id_chunks(client, legacy)
    )


def _id_chunks(client: Elasticsearch, index: str) -> Iterator[list[str]]:
    chunk: list[str] = []
    for hit in helpers.scan(client, index=index, query={"_source": False}, size=ID_CHUNK):
        chunk.append(hit["_id"])
        if len(chunk) == ID_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
