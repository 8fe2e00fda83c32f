"""What ships: the wheel the Docker image installs holds the platform and nothing else (no tests,
no local stack, no demo), and the API and the Dagster code location load from it with no
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
    "httpx",
    "testcontainers",
    "docker",
    "playwright",
    "pytest",
    "hypothesis",
    "schemathesis",
]
LOAD = textwrap.dedent(
    """
    import importlib.abc, sys

    class DevOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {dev_only!r}:
                raise ModuleNotFoundError(f"{{name}} is not installed here", name=name)

    sys.meta_path.insert(0, DevOnly())
    sys.path.insert(0, {wheel!r})
    import audit_platform
    assert audit_platform.__file__.startswith({wheel!r}), audit_platform.__file__
    from audit_platform.api.main import create_app
    create_app()
    import audit_platform.defs
    assert audit_platform.defs.defs.resolve_job_def("capture_shard_0_job")
    from typer.testing import CliRunner
    from audit_platform.cli import app
    print(CliRunner().invoke(app, ["--help"]).output)
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            str(PROJECT_ROOT),
            "-w",
            str(out),
        ],
        check=True,
        timeout=300,
    )
    [built] = out.glob("audit_platform-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_the_platform_and_nothing_else(wheel):
    tops = {Path(name).parts[0] for name in wheel.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"audit_platform"}
    names = set(wheel.namelist())
    assert not [n for n in names if "/stack/" in n or "/demo/" in n]
    assert "audit_platform/api/ui/templates/base.html" in names  # the Explorer's files do ship


def test_the_api_and_the_code_location_load_without_development_modules(wheel, tmp_path):
    wheel.extractall(tmp_path / "site")
    script = LOAD.format(dev_only=set(DEV_ONLY), wheel=str(tmp_path / "site"))
    loaded = subprocess.run(
        [sys.executable, "-c", script],
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
