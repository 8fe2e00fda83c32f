"""Configuration is validated at the boundary with messages that say what to do."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from audit_platform.clients import pg_url_from_settings
from audit_platform.settings import Settings


def test_environment_name_comes_from_audit_env(monkeypatch):
    monkeypatch.setenv("AUDIT_ENV", "staging")
    assert Settings().env == "staging"


@pytest.mark.parametrize("bad", ["Prod", "prod-eu", "", "1dev", "x" * 33, "dev;drop"])
def test_environment_name_that_cannot_name_a_slot_or_index_is_refused(bad):
    with pytest.raises(ValidationError, match=r"environment name .* is not valid"):
        Settings(env=bad)


def test_elasticsearch_connection_carries_credentials_and_ca(tmp_path):
    ca = tmp_path / "ca.crt"
    settings = Settings(
        es_url="https://es.internal:9200", es_api_key="k3y", es_ca_certs=ca, es_username="u"
    )
    conn = settings.elasticsearch
    assert conn is not None
    assert (conn.url, conn.api_key.get_secret_value(), conn.ca_certs) == (
        "https://es.internal:9200",
        "k3y",
        ca,
    )
    assert "k3y" not in repr(settings)


def test_unknown_stack_backend_is_refused():
    from audit_platform_dev.stack.settings import StackSettings

    with pytest.raises(ValidationError, match="'auto', 'local' or 'docker'"):
        StackSettings(backend="podman")


def test_the_api_and_explorer_settings_keep_their_variables(monkeypatch):
    monkeypatch.setenv("AUDIT_API_PORT", "8123")
    monkeypatch.setenv("AUDIT_API_DOCS", "keyed")
    monkeypatch.setenv("AUDIT_UI_IDLE_MINUTES", "5")
    settings = Settings()
    assert (settings.api.port, settings.api.docs, settings.ui.idle_minutes) == (8123, "keyed", 5)


def test_exports_applied_after_a_first_look_still_reach_elasticsearch(monkeypatch):
    """`stack status` asks before the stack's exports are applied, then again after."""
    monkeypatch.delenv("AUDIT_ES_URL", raising=False)
    settings = Settings(es_url=None)
    assert settings.elasticsearch is None
    exported = settings.with_exports({"AUDIT_ES_URL": "https://127.0.0.1:29200"})
    assert exported.elasticsearch is not None
    assert exported.elasticsearch.url == "https://127.0.0.1:29200"


def test_slot_thresholds_out_of_order_are_refused_with_the_rule():
    from audit_platform.environment import EnvironmentConfig

    with pytest.raises(ValidationError, match="slot_heartbeat_bytes < slot_lag_warn_bytes"):
        EnvironmentConfig(slot_lag_warn_bytes=2048, slot_lag_error_bytes=1024)
    assert EnvironmentConfig().slot_heartbeat_bytes < EnvironmentConfig().slot_lag_warn_bytes


def test_an_unknown_environment_on_the_command_line_names_the_known_ones(monkeypatch):
    from typer.testing import CliRunner

    from audit_platform.cli import app

    monkeypatch.delenv("AUDIT_RESOURCES_DIR", raising=False)
    refused = CliRunner().invoke(app, ["hold", "list", "--env", "prdo"])
    assert refused.exit_code == 2, refused.output
    said = " ".join(refused.output.replace("│", " ").split())  # the error box wraps lines
    known = sorted(p.stem for p in (Settings().resources_dir / "environments").glob("*.yaml"))
    assert {"dev", "prod"} <= set(known)
    assert f"unknown environment 'prdo'; known: {', '.join(known)}" in said


def test_an_invalid_environment_name_on_the_command_line_is_an_error_not_a_traceback():
    from typer.testing import CliRunner

    from audit_platform.cli import app

    refused = CliRunner().invoke(app, ["hold", "list", "--env", "Prod;x"])
    assert refused.exit_code == 2, refused.output
    said = " ".join(refused.output.replace("│", " ").split())
    assert "environment name 'Prod;x' is not valid" in said


def test_command_line_tracebacks_never_show_local_variables():
    """A failing command's traceback would otherwise print its locals: settings with their
    passwords and keys among them."""
    from audit_platform.cli import app

    found, waiting = [], [app]
    while waiting:
        current = waiting.pop()
        found.append(current)
        waiting.extend(group.typer_instance for group in current.registered_groups)
    assert len(found) >= 10  # every group of commands, the development ones among them
    assert all(typer_app.pretty_exceptions_show_locals is False for typer_app in found)


def test_the_platform_url_is_a_secret():
    settings = Settings(pg_url="postgresql://audit:hunter2@db.internal/audit")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert pg_url_from_settings(settings) == "postgresql://audit:hunter2@db.internal/audit"


def test_the_dagster_resource_names_its_variables_and_keeps_the_defaults(monkeypatch):
    import dagster as dg

    from audit_platform.defs.resources import AuditPlatform

    monkeypatch.setenv("AUDIT_PG_URL", "postgresql://audit:hunter2@db.internal/audit")
    monkeypatch.setenv("AUDIT_ENV", "staging")
    monkeypatch.delenv("AUDIT_STAGING_ROOT", raising=False)
    resource = AuditPlatform.from_environment()
    # What Dagster's UI shows: the variable, not its value.
    assert isinstance(resource.pg_url, dg.EnvVar) and resource.pg_url == "AUDIT_PG_URL"
    assert resource.staging_root == ""
    with dg.build_resources({"platform": resource}) as built:
        settings = built.platform.settings
        assert settings.env == "staging"
        assert pg_url_from_settings(settings).endswith("@db.internal/audit")
        assert settings.staging_root == Settings().staging_root


def test_a_run_cannot_point_the_platform_resource_elsewhere(monkeypatch):
    """Whoever may launch a run may edit its resource configuration: a value that is not the
    deployment's own is refused, not used (another Elasticsearch would get its credentials)."""
    import dagster as dg

    from audit_platform.defs.resources import AuditPlatform

    monkeypatch.setenv("AUDIT_ES_URL", "https://es.internal:9200")
    monkeypatch.setenv("AUDIT_PG_URL", "postgresql://audit:hunter2@db.internal/audit")
    resource = AuditPlatform(es_url="https://attacker.example:9200")
    refused = pytest.raises(ValueError, match="es_url differs from this deployment's AUDIT_ES_URL")
    with dg.build_resources({"platform": resource}) as built, refused:
        _ = built.platform.settings
    bound = AuditPlatform.from_environment()
    with dg.build_resources({"platform": bound}) as built:
        assert built.platform.settings.es_url == "https://es.internal:9200"
        assert "hunter2" not in repr(built.platform)
