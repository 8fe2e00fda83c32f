"""The environment's index template: its settings from resources/elasticsearch, its mapping
from the record's declaration (``record.mapping_properties``); installed when it is missing or
has changed (its hash is kept in ``_meta``), applying to indices created after; the fields it
adds are added to the environment's existing indices too."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch

from audit_platform.index.retention import cluster_has_ilm, ilm_policy
from audit_platform.naming import (
    class_index_pattern,
    class_template_name,
    index_pattern,
    lifecycle_name,
    template_name,
)
from audit_platform.record import mapping_properties


def render_template(
    resources_dir: Path,
    env: str,
    replicas: int,
    lifecycle: str | None = None,
    retention_class: str | None = None,
) -> dict[str, Any]:
    """The template body; ``lifecycle`` names an ILM policy where the cluster has ILM, and then
    each retention class has a template of its own (``retention_class``), above the
    environment's, because a class's indices are deleted at the class's period."""
    text = (resources_dir / "elasticsearch" / "index-template.json").read_text()
    body = json.loads(text.replace("{env}", env).replace('"{replicas}"', str(replicas)))
    body["template"]["mappings"]["properties"] = mapping_properties()
    if retention_class is not None:
        body["index_patterns"] = [class_index_pattern(env, retention_class)]
        body["priority"] += 1
    if lifecycle is not None:
        body["template"]["settings"]["index.lifecycle.name"] = lifecycle
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    body["_meta"]["template_hash"] = digest
    return body


@dataclass(frozen=True)
class TemplateInstall:
    name: str
    template_hash: str
    previous_hash: str | None

    @property
    def changed(self) -> bool:
        return self.template_hash != self.previous_hash


def install_template(
    client: Elasticsearch,
    resources_dir: Path,
    env: str,
    replicas: int,
    lifecycle: str | None = None,
    retention_class: str | None = None,
) -> TemplateInstall:
    """Create or update the environment's index template (or, with ``retention_class``, that
    class's); new indices pick up a change."""
    name = (
        template_name(env) if retention_class is None else class_template_name(env, retention_class)
    )
    body = render_template(resources_dir, env, replicas, lifecycle, retention_class)
    previous = installed_template_hash(client, env, retention_class)
    if previous != body["_meta"]["template_hash"]:
        client.indices.put_index_template(name=name, **body)
        update_existing_indices(client, env, body["template"]["mappings"])
    return TemplateInstall(name, body["_meta"]["template_hash"], previous)


def update_existing_indices(client: Elasticsearch, env: str, mappings: dict[str, Any]) -> None:
    """Give indices created under an earlier template the fields this one adds.

    Their mapping is strict, so a document carrying a new field would be refused by every index
    that predates it. A change Elasticsearch cannot make in place (a field's type) fails here,
    when the template is installed, instead of at the next bulk request.
    """
    found = client.indices.get(
        index=index_pattern(env),
        expand_wildcards="all",
        ignore_unavailable=True,
        allow_no_indices=True,
    )
    if found:
        client.indices.put_mapping(
            index=",".join(found),
            properties=mappings["properties"],
            dynamic=mappings.get("dynamic"),
        )


def ensure_template(
    client: Elasticsearch, resources_dir: Path, env: str, replicas: int, classes: dict[str, int]
) -> tuple[TemplateInstall, list[str]]:
    """The environment's template as this code version renders it and, where the cluster has
    ILM, per retention class (``EnvironmentConfig.classes``: name -> days) a lifecycle policy
    and a template naming it; (what was installed, the lifecycle policies' names).

    Called before every indexing run as well as by the template asset: documents of a newer
    code version carry fields an older template's strict mapping would refuse.
    """
    lifecycles = []
    if cluster_has_ilm(client):
        for retention_class, days in sorted(classes.items()):
            lifecycle = lifecycle_name(env, retention_class)
            client.ilm.put_lifecycle(name=lifecycle, **ilm_policy(resources_dir, days))
            install_template(client, resources_dir, env, replicas, lifecycle, retention_class)
            lifecycles.append(lifecycle)
    return install_template(client, resources_dir, env, replicas), lifecycles


def installed_template_hash(
    client: Elasticsearch, env: str, retention_class: str | None = None
) -> str | None:
    """The ``_meta.template_hash`` of the environment's (or a class's) template, if any."""
    name = (
        template_name(env) if retention_class is None else class_template_name(env, retention_class)
    )
    found = client.options(ignore_status=404).indices.get_index_template(name=name)
    for template in found.get("index_templates", []):
        return template["index_template"].get("_meta", {}).get("template_hash")
    return None
