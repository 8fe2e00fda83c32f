"""The environment's index template: rendered from resources/elasticsearch, installed when it
is missing or has changed (its hash is kept in ``_meta``), applying to indices created after."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch

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
    return TemplateInstall(name, body["_meta"]["template_hash"], previous)


def installed_template_hash(client: Elasticsearch, env: str) -> str | None:
    """The ``_meta.template_hash`` of the environment's installed template, if any."""
    found = client.options(ignore_status=404).indices.get_index_template(name=template_name(env))
    for template in found.get("index_templates", []):
        return template["index_template"].get("_meta", {}).get("template_hash")
    return None
