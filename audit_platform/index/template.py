"""The environment's index template: rendered from resources/elasticsearch, installed when it
is missing or has changed (its hash is kept in ``_meta``), applying to indices created after;
the fields it adds are added to the environment's existing indices too."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch

from audit_platform.index.retention import cluster_has_ilm, ilm_policy
from audit_platform.naming import template_name


def render_template(
    resources_dir: Path, env: str, replicas: int, lifecycle: str | None = None
) -> dict[str, Any]:
    """The template body; ``lifecycle`` names an ILM policy where the cluster has ILM."""
    text = (resources_dir / "elasticsearch" / "index-template.json").read_text()
    body = json.loads(text.replace("{env}", env).replace('"{replicas}"', str(replicas)))
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
) -> TemplateInstall:
    """Create or update the environment's index template; new indices pick up a change."""
    name = template_name(env)
    body = render_template(resources_dir, env, replicas, lifecycle)
    previous = installed_template_hash(client, env)
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
        index=f"audit-{env}-*", expand_wildcards="all", ignore_unavailable=True,
        allow_no_indices=True,
    )  # fmt: skip
    if found:
        client.indices.put_mapping(index=",".join(found), properties=mappings["properties"],
                                   dynamic=mappings.get("dynamic"))  # fmt: skip


def ensure_template(
    client: Elasticsearch, resources_dir: Path, env: str, replicas: int, retention_days: int
) -> tuple[TemplateInstall, str | None]:
    """The environment's template as this code version renders it, with its ILM policy where
    the cluster has ILM; (what was installed, the lifecycle policy's name or None).

    Called before every indexing run as well as by the template asset: documents of a newer
    code version carry fields an older template's strict mapping would refuse.
    """
    lifecycle = None
    if cluster_has_ilm(client):
        lifecycle = template_name(env)
        client.ilm.put_lifecycle(name=lifecycle, **ilm_policy(resources_dir, retention_days))
    return install_template(client, resources_dir, env, replicas, lifecycle), lifecycle


def installed_template_hash(client: Elasticsearch, env: str) -> str | None:
    """The ``_meta.template_hash`` of the environment's installed template, if any."""
    found = client.options(ignore_status=404).indices.get_index_template(name=template_name(env))
    for template in found.get("index_templates", []):
        return template["index_template"].get("_meta", {}).get("template_hash")
    return None
