"""What ships: the wheel the Docker image installs holds the platform and its context SDK and
nothing else (no tests, no local stack, no demo), the SDK's own wheel needs neither the platform
nor its dependencies, and the API and the Dagster code location load from it with no
development dependency importable. No server: the wheel is built (`pip wheel`, as the image's
build stage does) and loaded in a fresh interpreter that refuses every development module."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit_platform.cli import app
from audit_platform.settings import PROJECT_ROOT

#: Importable in development only: the dev/ package, the tests and their tools.
DEV_ONLY = [
    "audit_platform_dev",
    "audit_platform_tests",
    "testcontainers",
    "docker",
    "playwright",
    "pytest",
    "pytest_timeout",
    "hypothesis",
    "schemathesis",
    "mypy",
    "importlinter",
    "kubernetes_validate",
    "ruff",
]
#: The start of a script run in a fresh interpreter: the modules named ``refused`` cannot be
#: imported, nor the checkout's editable installs; the wheel's files come first on the path.
ONLY_THE_WHEEL = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refused(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {refused!r}:
                raise ModuleNotFoundError(f"{{name}} is not installed here", name=name)

    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
    sys.meta_path.insert(0, Refused())
    sys.path.insert(0, {wheel!r})
    """
)
LOAD = ONLY_THE_WHEEL + textwrap.dedent(
    """
    import audit_platform, audit_platform_context
    for module in (audit_platform, audit_platform_context):
        assert module.__file__.startswith({wheel!r}), module.__file__
    from audit_platform.api.main import create_app
    create_app()
    import audit_platform.defs
    assert audit_platform.defs.defs.resolve_job_def("capture_shard_0_job")
    from typer.testing import CliRunner
    from audit_platform.cli import app
    print(CliRunner().invoke(app, ["--help"]).output)
    """
)


def built_wheel(project: Path, out: Path) -> zipfile.ZipFile:
    """The wheel of ``project``, built as the image's build stage builds it."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(project)]
    subprocess.run([*command, "-w", str(out)], check=True, timeout=300)
    [built] = out.glob("*.whl")
    return zipfile.ZipFile(built)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    return built_wheel(PROJECT_ROOT, tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_the_platform_and_nothing_else(wheel):
    tops = {Path(name).parts[0] for name in wheel.namelist()}
    shipped = {top for top in tops if not top.endswith(".dist-info")}
    assert shipped == {"audit_platform", "audit_platform_context"}  # the SDK it validates with
    names = set(wheel.namelist())
    assert not [n for n in names if "/stack/" in n or "/demo/" in n]
    assert "audit_platform/api/ui/templates/base.html" in names  # the Explorer's files do ship


def test_the_api_and_the_code_location_load_without_development_modules(wheel, tmp_path):
    wheel.extractall(tmp_path / "site")
    script = LOAD.format(refused=set(DEV_ONLY), wheel=str(tmp_path / "site"))
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "PATH": "/usr/bin:/bin",
            "AUDIT_ENV": "dev",
            "AUDIT_RESOURCES_DIR": str(PROJECT_ROOT / "resources"),
            "HOME": str(tmp_path),
        },
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "verify" in loaded.stdout and "keys" in loaded.stdout
    assert "stack" not in loaded.stdout and "demo" not in loaded.stdout


def test_a_development_install_adds_the_stack_and_the_demo_to_the_command_line():
    said = CliRunner().invoke(app, ["--help"]).output
    assert "stack" in said and "demo" in said


SDK_LOAD = ONLY_THE_WHEEL + textwrap.dedent(
    """
    import audit_platform_context as sdk
    assert sdk.__file__.startswith({wheel!r}), sdk.__file__
    from audit_platform_context.asgi import AuditContextMiddleware
    from audit_platform_context.psycopg_hook import AuditedConnection
    with sdk.audit_context(actor=sdk.Actor(type="user", id="u-1"), reason="refund"):
        print(sdk.current_context().model_dump_json(exclude_none=True))
    """
)


def test_a_service_installs_the_context_sdk_without_the_platform(tmp_path):
    sdk = built_wheel(PROJECT_ROOT / "sdk", tmp_path / "wheel")
    tops = {Path(name).parts[0] for name in sdk.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"audit_platform_context"}
    metadata = next(n for n in sdk.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in sdk.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert [r for r in requires if "extra ==" not in r] == ["pydantic<3,>=2.10", "psycopg<4,>=3.2"]
    sdk.extractall(tmp_path / "site")
    script = SDK_LOAD.format(
        refused={"audit_platform", "dagster", "elasticsearch", "polars", "fastapi"},
        wheel=str(tmp_path / "site"),
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert '"reason":"refund"' in loaded.stdout
