"""The audit record is one contract: the model, the index template and the documents the
columnar builder writes name exactly the same fields, and strange values survive the builder."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from audit_platform.index.documents import document_frame, documents, validate_document
from audit_platform.index.template import render_template
from audit_platform.lsn import parse_lsn
from audit_platform.record import (
    ADDED_COLUMNS,
    RECORD_SCHEMA,
    AuditRecord,
    Column,
    Mapped,
    _properties,
    model_leaves,
    record_fields,
)
from audit_platform.settings import Settings
from audit_platform.trust.commitments import Commitments
from audit_platform.trust.leaves import change_leaf

T0 = datetime(2026, 11, 26, 10, 0, 0, 1, tzinfo=UTC)
#: Fields Elasticsearch maps as one value even where the model has structure inside.
OPAQUE = {"before", "after", "context", "row.types"}


def _mapping_fields(properties: dict, prefix: str = "") -> set[str]:
    found = set()
    for name, spec in properties.items():
        if "properties" in spec and prefix + name not in OPAQUE:
            found |= _mapping_fields(spec["properties"], f"{prefix}{name}.")
        else:
            found.add(prefix + name)
    return found


def _document_fields(document: dict, prefix: str = "") -> set[str]:
    found = set()
    for name, value in document.items():
        if isinstance(value, dict) and prefix + name not in OPAQUE:
            found |= _document_fields(value, f"{prefix}{name}.")
        else:
            found.add(prefix + name)
    return found


def _record(**overrides) -> pl.DataFrame:
    row = {
        "id": "dev:shop:0000000100000002:3",
        "commit_time": T0,
        "env": "dev",
        "source": "shop",
        "schema": "public",
        "table": "orders",
        "operation": "update",
        "object_id": "7",
        "changed_columns": '["status"]',
        "before": '{"id":"7","status":"new"}',
        "after": '{"id":"7","status":"paid"}',
        "context": json.dumps(
            {
                "actor": {"type": "user", "id": "u1", "name": "Ada"},
                "service": "shop",
                "trace_id": "0" * 32,
                "client_addr": "203.0.113.9",
                "reason": "refund",
            }
        ),
        "attribution_status": "late",
        "attribution_lag_seconds": 1.5,
        "xid": 9,
        "lsn": (1 << 32) + 2,
        "change_index": 3,
        "policy_version": "1:abc",
        "key_columns": '["id"]',
        "column_types": '{"id":"integer","status":"text"}',
        "txn_changes": 5,
        "txn_ignored": 1,
        "server_version": 150010,
    }
    return pl.DataFrame([{**row, **overrides}], schema=RECORD_SCHEMA)


def _document(records: pl.DataFrame) -> tuple[str, str, dict]:
    [found] = documents(records, database="shopdb", ingested_at=T0 + timedelta(seconds=5))
    return found


def record_of(**overrides) -> AuditRecord:
    """A record as the API reads it back from its document; images and lists given as values."""
    for name in ("before", "after", "changed_columns"):
        if name in overrides and overrides[name] is not None:
            overrides[name] = json.dumps(overrides[name])
    _, doc_id, document = _document(_record(**overrides))
    return validate_document(doc_id, document)


def test_a_schema_changes_document_holds_the_tables_shapes():
    before = {"schema": "public", "table": "orders", "columns": {"id": "integer"}}
    after = {**before, "columns": {"id": "integer", "note": "text"}, "primary_key": ["id"]}
    record = record_of(
        operation="ddl", before=before, after=after, changed_columns=["note"], object_id=None
    )
    assert record.before == before and record.after == after
    assert record.event.action == "ddl" and record.event.type == ["change"]
    assert record.values_text == "public orders integer public orders integer text"


def test_model_template_and_documents_name_the_same_fields():
    model = set(model_leaves(AuditRecord)) - {"id"}  # the id is the document's _id
    template = render_template(Settings().resources_dir, "dev", 0)
    mapping = _mapping_fields(template["template"]["mappings"]["properties"])
    _, _, document = _document(_record())
    assert model == mapping
    assert _document_fields(document) == model


def test_the_mapping_comes_from_the_record_with_its_declared_and_default_types():
    properties = render_template(Settings().resources_dir, "dev", 0)["template"]["mappings"][
        "properties"
    ]
    assert properties["@timestamp"] == {"type": "date_nanos"}
    assert properties["transaction"]["properties"]["xid"] == {"type": "long"}
    assert properties["transaction"]["properties"]["change_index"] == {"type": "integer"}
    assert properties["source"]["properties"]["server_version"] == {"type": "integer"}
    assert properties["client"]["properties"]["ip"]["type"] == "ip"
    assert properties["operation"] == properties["changed_columns"] == {"type": "keyword"}
    # The context's fields come from the SDK's model, which services validate against.
    context = properties["context"]["properties"]
    assert set(context) == {
        "actor",
        "organization",
        "service",
        "request_id",
        "job",
        "trace_id",
        "reason",
        "client_addr",
        "attributes",
    }
    assert context["actor"]["properties"]["type"] == {"type": "keyword"}
    assert properties["organization"]["properties"]["id"] == {"type": "keyword"}
    assert context["reason"]["fields"]["keyword"]["type"] == "keyword"


def test_a_field_whose_mapping_cannot_be_told_from_its_type_must_declare_it():
    from typing import Annotated, Any

    from pydantic import BaseModel

    class Loose(BaseModel):
        bag: dict[str, Any]

    with pytest.raises(TypeError, match=r"Loose.bag: no Elasticsearch mapping .*declare it"):
        _properties(Loose)

    class Declared(BaseModel):
        bag: Annotated[dict[str, Any], Mapped({"type": "flattened"})]

    assert _properties(Declared) == {"bag": {"type": "flattened"}}


def test_the_records_schema_is_the_declared_columns_and_the_trail_commits_those_it_names():
    columns = [leaf.column for leaf in record_fields() if leaf.column is not None]
    assert list(RECORD_SCHEMA) == [c.name for c in columns]
    leaf = change_leaf(
        record_id="dev:shop:0000000100000002:3",
        env="dev",
        source="shop",
        lsn=(1 << 32) + 2,
        xid=9,
        change_index=3,
        time=T0,
        schema="public",
        table="orders",
        operation="update",
        key=["id"],
        types={"id": "integer"},
        object_id="7",
        changed=["status"],
        before={"id": "7"},
        after={"id": "7"},
        policy_version="1:abc",
        txn_changes=5,
        txn_ignored=1,
        organization="acme",
        personal={"of": "public.customers", "columns": ["email"], "before": "5", "after": "5"},
        commitments=Commitments({"public.customers:5": b"k" * 32}),
    )
    assert set(leaf) - {"v", "kind"} == {c.leaf for c in columns if c.leaf is not None}
    # A row naming no organization commits none, and a table declaring no personal data no
    # declaration: leaves from before either keep their bytes.
    plain = change_leaf(**_leaf_fields(leaf))
    assert "org" not in plain and "personal" not in plain
    # Not committed by a change's leaf: what a late context changes, the context (it has
    # leaves of its own, and so has whose its personal fields are), and the server version
    # (leaves written before it stay valid).
    assert {c.name for c in columns if c.leaf is None} == {
        "attribution_status",
        "attribution_lag_seconds",
        "context",
        "context_personal",
        "server_version",
    }


def _leaf_fields(leaf: dict) -> dict:
    """change_leaf's arguments back from a leaf it made."""
    return {
        "record_id": leaf["id"],
        "env": leaf["env"],
        "source": leaf["source"],
        "lsn": parse_lsn(leaf["commit_lsn"]),
        "xid": int(leaf["xid"]),
        "change_index": int(leaf["index"]),
        "time": T0,
        "schema": leaf["schema"],
        "table": leaf["table"],
        "operation": leaf["op"],
        "key": leaf["key"],
        "types": leaf["types"],
        "object_id": leaf["object_id"],
        "changed": leaf["changed"],
        "before": leaf["before"],
        "after": leaf["after"],
        "policy_version": leaf["policy"],
        "txn_changes": leaf["txn_changes"],
        "txn_ignored": leaf["txn_ignored"],
    }


def test_a_records_file_written_before_the_later_columns_still_makes_documents():
    assert set(ADDED_COLUMNS) == {
        "key_columns",
        "row_organization",
        "column_types",
        "txn_changes",
        "txn_ignored",
        "server_version",
        "personal",
        "context_personal",
    }
    _, doc_id, document = _document(_record().drop(*ADDED_COLUMNS))
    record = validate_document(doc_id, document)
    assert record.source.server_version is None and record.transaction.changes is None
    assert record.row is not None and record.row.key == []
    assert Column.of(AuditRecord.model_fields["env"]) == Column("env", pl.String(), leaf="env")


def test_a_document_carries_every_value_of_its_record():
    index, doc_id, document = _document(_record())
    record = validate_document(doc_id, document)
    assert index == "audit-dev-class-standard-2026.11" and doc_id == "dev:shop:0000000100000002:3"
    assert document["@timestamp"] == "2026-11-26T10:00:00.000001+00:00"
    assert record.transaction.commit_lsn == "1/2" and record.transaction.lsn == (1 << 32) + 2
    assert (record.user.id, record.user.name, record.service.name) == ("u1", "Ada", "shop")
    assert (record.client.ip, record.trace.id) == ("203.0.113.9", "0" * 32)
    assert record.attribution.lag_seconds == 1.5
    assert (record.transaction.changes, record.transaction.ignored) == (5, 1)
    assert record.row.key == ["id"] and record.row.types == {"id": "integer", "status": "text"}
    assert record.event.type == ["change"] and record.changed_columns == ["status"]
    assert record.values_text == "7 new 7 paid"
    assert record.source.database == "shopdb" and record.source.server_version == 150010


def test_strange_values_survive_the_columnar_builder():
    before = {
        "note": 'quote " backslash \\ newline \n tab \t',
        "emoji": "\U0001f600 é",
        "empty": "",
        "null": None,
        "json": '{"a": [1, 2]}',
        "sep": 'x":"y',
    }
    records = _record(
        operation="delete",
        before=json.dumps(before),
        after=None,
        context=None,
        attribution_status="unattributed",
        attribution_lag_seconds=None,
        object_id=None,
    )
    _, doc_id, document = _document(records)
    record = validate_document(doc_id, document)
    assert record.before == before and record.after is None and record.context is None
    assert record.user.id is None and record.event.type == ["deletion"]
    expected = " ".join(v for v in before.values() if v)
    assert record.values_text == expected


def test_csv_export_columns_are_the_record_fields_with_the_context_spread():
    from audit_platform.query.export import CSV_COLUMNS, csv_row

    _, doc_id, document = _document(_record())
    row = dict(zip(CSV_COLUMNS, csv_row({"_id": doc_id, "_source": document}), strict=True))
    assert CSV_COLUMNS[0] == "id" and len(set(CSV_COLUMNS)) == len(CSV_COLUMNS)
    assert {c for c in CSV_COLUMNS if not c.startswith("context.")} == set(
        model_leaves(AuditRecord)
    ) - {"context"}
    assert (row["id"], row["table.name"], row["context.actor.id"]) == (doc_id, "orders", "u1")
    assert row["changed_columns"] == "status" and row["event.type"] == "change"
    assert json.loads(row["after"]) == {"id": "7", "status": "paid"}
    assert row["context.job.name"] == "" and row["transaction.commit_lsn"] == "1/2"


def test_every_example_in_the_openapi_document_is_a_valid_answer():
    """Examples are documentation a client copies: each must validate against its model."""
    from audit_platform.capture.gaps import Gap
    from audit_platform.query.models import Completeness, Correlation
    from audit_platform.query.revert import RevertPlan

    for model in (Gap, Completeness, Correlation, RevertPlan):
        examples = model.model_config["json_schema_extra"]["examples"]
        assert examples and all(model.model_validate(e) for e in examples)


def test_a_context_staged_with_line_breaks_stays_on_one_bulk_line():
    # What a file staged before capture re-serialised contexts could hold: valid JSON whose
    # tokens are separated by line breaks, which would end the bulk request's line.
    context = '{\n"actor":\r\n{"type": "user", "id": "line\\nbreak"}}'
    frame = document_frame(_record(context=context), database="shopdb", ingested_at=T0)
    [text] = frame["document"].to_list()
    assert "\n" not in text and "\r" not in text
    assert json.loads(text)["context"] == {"actor": {"type": "user", "id": "line\nbreak"}}


def test_records_of_several_sources_are_each_their_own_sources_documents():
    """A live run's turn indexes many sources' records in one frame: each document has its
    source's database and goes to its source's retention class, as if indexed alone."""
    shop = _record()
    mill = _record(id="dev:mill:0000000100000002:3", source="mill")
    both = document_frame(
        pl.concat([shop, mill]),
        database={"shop": "shopdb", "mill": "milldb"},
        ingested_at=T0,
        retention_class={"shop": "standard", "mill": "long"},
    )
    alone = pl.concat(
        [
            document_frame(shop, database="shopdb", ingested_at=T0),
            document_frame(mill, database="milldb", ingested_at=T0, retention_class="long"),
        ]
    )
    assert both.rows() == alone.rows()
    assert both["index"].n_unique() == 2
