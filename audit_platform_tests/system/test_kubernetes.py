"""The Kubernetes artifacts: the chart renders for every environment with Helm, every object
passes Kubernetes' own schemas (1.37, strict: an unknown field fails), and what the chart
promises holds in what it renders. The Dagster values keep the run queue of dagster.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from audit_platform.settings import PROJECT_ROOT, ApiSettings

CHART = PROJECT_ROOT / "deploy/helm/audit-platform"
ENVIRONMENTS = ("dev", "staging", "uat", "prod")
K8S_VERSION = "1.37.0"


def _helm() -> str:
    found = os.environ.get("AUDIT_HELM") or shutil.which("helm")
    local = PROJECT_ROOT / ".stack/tools/helm"
    found = found or (str(local) if local.exists() else None)
    assert found, "Helm is needed to render the chart: `make helm` builds it (Go module proxy)"
    return found


def render(env: str, *extra: str) -> list[dict]:
    values = PROJECT_ROOT / f"deploy/helm/environments/{env}.yaml"
    done = subprocess.run(
        [
            _helm(),
            "template",
            f"audit-{env}",
            str(CHART),
            "-n",
            f"audit-{env}",
            "-f",
            str(values),
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_the_chart_renders_objects_kubernetes_accepts(env):
    objects = render(env)
    assert {o["kind"] for o in objects} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert all(o["metadata"]["name"].startswith(f"audit-platform-{env}") for o in objects)


def test_the_validator_rejects_what_kubernetes_would():
    """The check above can fail: a misspelt field is refused."""
    [deployment, *_] = [o for o in render("dev") if o["kind"] == "Deployment"]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_api_reads_with_the_reader_and_the_pipeline_writes_with_the_writer():
    objects = render("prod")
    deployments = _by_kind(objects, "Deployment")
    api = deployments["audit-platform-prod-api"]["spec"]["template"]["spec"]
    code = deployments["audit-platform-prod-code-location"]["spec"]["template"]["spec"]
    secrets = {
        name: [s["secretRef"]["name"] for s in spec["containers"][0]["envFrom"] if "secretRef" in s]
        for name, spec in (("api", api), ("code", code))
    }
    assert secrets == {"api": ["audit-platform-api"], "code": ["audit-platform-pipeline"]}
    env = {e["name"]: e["value"] for e in code["containers"][0]["env"]}
    assert env["DAGSTER_CURRENT_IMAGE"] == "registry.example.com/audit-platform:0.1.0"
    for spec in (api, code):
        assert spec["securityContext"]["runAsNonRoot"] is True
        container = spec["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in container["volumeMounts"]} == {
            "/tmp",
            "/etc/audit-platform/es-ca",
        }
    [config] = _by_kind(objects, "ConfigMap").values()
    assert config["data"]["AUDIT_ENV"] == "prod"
    assert config["data"]["AUDIT_STAGING_ROOT"].startswith("s3://")
    assert config["data"]["AUDIT_ES_CA_CERTS"] == "/etc/audit-platform/es-ca/ca.crt"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_the_api_sees_the_ingress_tls_and_keeps_its_documents_and_metrics_closed(env):
    """Production values: the ingress is a trusted proxy (its X-Forwarded-Proto is believed),
    the API documents are off and the metrics need a key; the settings parse as the API's."""
    objects = render(env)
    [config] = _by_kind(objects, "ConfigMap").values()
    data = config["data"]
    assert data["AUDIT_API_DOCS"] == "off" and data["AUDIT_API_METRICS"] == "keyed"
    assert data["AUDIT_API_TRUSTED_PROXIES"] not in {"", "127.0.0.1"}
    api_settings = ApiSettings(
        **{
            name.removeprefix("AUDIT_API_").lower(): value
            for name, value in data.items()
            if name.startswith("AUDIT_API_")
        }
    )
    assert api_settings.trusted_proxies == data["AUDIT_API_TRUSTED_PROXIES"]
    api = _by_kind(objects, "Deployment")[f"audit-platform-{env}-api"]
    # Annotation-based scraping sends no credentials: only an open /metrics is announced so.
    assert "prometheus.io/scrape" not in api["spec"]["template"]["metadata"]["annotations"]
    opened = _by_kind(render(env, "--set", "api.metrics=open"), "Deployment")
    annotations = opened[f"audit-platform-{env}-api"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def test_a_missing_required_setting_fails_the_render_with_its_name():
    done = subprocess.run(
        [_helm(), "template", "x", str(CHART), "--set", "settings.stagingRoot="],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "settings.stagingRoot is required" in done.stderr


def test_the_dagster_values_keep_the_run_queue_and_recovery_of_dagster_yaml():
    """On Kubernetes the instance is configured by the official chart's values, locally by
    dagster.yaml: one capture run per shard, one reconciliation per slot and run monitoring
    must mean the same in both."""
    local = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    values = yaml.safe_load((PROJECT_ROOT / "deploy/dagster/values.yaml").read_text())
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    coordinator = local["run_coordinator"]["config"]
    assert queued["maxConcurrentRuns"] == coordinator["max_concurrent_runs"]
    assert queued["dequeueIntervalSeconds"] == coordinator["dequeue_interval_seconds"]
    assert [
        {
            "key": t["key"],
            "limit": t["limit"],
            "applyLimitPerUniqueValue": t["value"]["applyLimitPerUniqueValue"],
        }
        for t in queued["tagConcurrencyLimits"]
    ] == [
        {
            "key": t["key"],
            "limit": t["limit"],
            "applyLimitPerUniqueValue": t["value"]["applyLimitPerUniqueValue"],
        }
        for t in coordinator["tag_concurrency_limits"]
    ]
    monitoring = local["run_monitoring"]
    assert daemon["runMonitoring"]["startTimeoutSeconds"] == monitoring["start_timeout_seconds"]
    assert daemon["runRetries"]["maxRetries"] == local["run_retries"]["max_retries"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    # The runs get the same ConfigMap and Secret as the code location the chart renders.
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    [config] = _by_kind(render("dev"), "ConfigMap")
    assert launcher["envConfigMaps"] == [{"name": config}]
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert launcher["envSecrets"] == [{"name": chart_values["secrets"]["pipeline"]}]


def test_the_image_installs_the_package_and_ships_the_resources():
    """No Docker engine here to build it: the Dockerfile's inputs exist and its commands are
    the ones the chart runs."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    copied = [
        path
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for path in line.split()[1:-1]
    ]
    assert all((PROJECT_ROOT / path).exists() for path in copied), copied
    assert "ENV AUDIT_RESOURCES_DIR=/app/resources" in dockerfile
    assert "USER 10001" in dockerfile
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart_values["podSecurityContext"]["runAsUser"] == 10001
    assert {"pyproject.toml", "audit_platform", "resources"} <= set(copied)
