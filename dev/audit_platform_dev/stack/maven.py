"""Server distributions from Maven Central, fetched once per checkout with Maven itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from audit_platform_dev.stack.system import StackError, ensure_debian_packages


def fetch(artifact: str, downloads: Path, filename: str) -> Path:
    """``artifact`` (group:name:version:type[:classifier]) as ``downloads/filename``: fetched
    with Maven the first time, then taken from that folder."""
    target = downloads / filename
    if target.exists():
        return target
    if shutil.which("mvn") is None:
        ensure_debian_packages(["maven"], why=f"Maven (used to fetch {filename})")
    downloads.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy",
            f"-Dartifact={artifact}",
            f"-DoutputDirectory={downloads}",
        ],
        capture_output=True,
        text=True,
        cwd=downloads,
    )
    if done.returncode != 0 or not target.exists():
        raise StackError(
            f"Maven could not fetch {artifact} (exit {done.returncode}). Check that Maven Central "
            f"is reachable (`mvn dependency:get -Dartifact={artifact}`).\n"
            f"{(done.stdout + done.stderr)[-2000:]}"
        )
    return target
