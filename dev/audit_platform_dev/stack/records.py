"""What the local stack started, remembered between commands so `down` stops only that."""

from __future__ import annotations

import json
import os
import secrets
import signal
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel

from audit_platform_dev.stack.system import pid_matches, stop_pid


class ServerRecord(BaseModel):
    """One server the stack started: enough to find it, reach it and stop it again."""

    name: str
    pid: int
    #: A string that is in the process's command line, checked before any signal is sent.
    marker: str
    home: Path
    log: Path
    url: str
    env: dict[str, str]

    @staticmethod
    def path(stack_dir: Path, name: str) -> Path:
        return stack_dir / f"{name}.json"

    def save(self, stack_dir: Path) -> None:
        path = self.path(stack_dir, self.name)
        # Private from the start: the record holds the server's generated password.
        write_private(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, stack_dir: Path, name: str) -> ServerRecord | None:
        path = cls.path(stack_dir, name)
        if not path.exists():
            return None
        return cls.model_validate(json.loads(path.read_text()))

    @classmethod
    def live(cls, stack_dir: Path, name: str) -> ServerRecord | None:
        """The record, if its process is still the server it names; a stale one is forgotten."""
        record = cls.load(stack_dir, name)
        if record is not None and not pid_matches(record.pid, record.marker):
            record.forget(stack_dir)
            return None
        return record

    def forget(self, stack_dir: Path) -> None:
        self.path(stack_dir, self.name).unlink(missing_ok=True)


class LocalServer:
    """What every server of the stack shares: finding it by its record, and stopping it (only
    the process that record names)."""

    NAME: ClassVar[str]
    STOP_SIGNAL: ClassVar[int] = signal.SIGTERM
    STOP_TIMEOUT: ClassVar[float] = 60.0
    stack_dir: Path

    def record(self) -> ServerRecord | None:
        return ServerRecord.live(self.stack_dir, self.NAME)

    def down(self) -> bool:
        record = self.record()
        if record is None:
            return False
        stop_pid(record.pid, record.marker, sig=self.STOP_SIGNAL, timeout=self.STOP_TIMEOUT)
        record.forget(self.stack_dir)
        return True


def write_private(path: Path, text: str) -> None:
    """A file only this account can read, created that way (never world-readable, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def stack_secret(stack_dir: Path, name: str) -> str:
    """A generated secret kept in ``stack_dir/name``: made once, the same on every start."""
    path = stack_dir / name
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24))
    return path.read_text().strip()
