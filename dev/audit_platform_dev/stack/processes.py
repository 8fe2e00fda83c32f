"""Long-running local processes (Dagster webserver and daemon, the API, the demo service).

Each runs in its own session with its output in a log file. Stopping one stops everything it
spawned (Dagster's code servers, their multiprocessing workers, run workers) and waits until all
of it is gone, and a failure can be read afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from audit_platform_dev.stack.system import stop_tree


class ProcessFailed(RuntimeError):
    """A process exited or did not become ready; the message has its log's tail."""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, url: str, timeout: float = 120) -> None:
        """Until ``url`` answers 200; fails early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ProcessFailed(
                    f"{self.name} exited with {self.popen.returncode}; "
                    f"log {self.log}:\n{self.tail()}"
                )
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ProcessFailed(
            f"{self.name} did not answer {url} within {timeout:.0f} s; "
            f"log {self.log}:\n{self.tail()}"
        )

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process and everything it started, wait up to ``timeout`` seconds for
        all of them, then SIGKILL what is left (``stack.system.stop_tree``)."""
        stop_tree(self.popen.pid, grace=timeout)
        self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process and everything it started: nothing gets to clean up, as in a
        crash."""
        stop_tree(self.popen.pid, grace=0)
        self.popen.wait(timeout=30)


def tool(name: str) -> str:
    """A console script installed beside this interpreter (the project's virtualenv)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise ProcessFailed(f"{name} is not installed beside {sys.executable}: run `make install`")
    return str(path)


def start(
    name: str, args: list[str], environ: dict[str, str], log_dir: Path, cwd: Path | None = None
) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            args,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
    return Process(name, popen, log)
