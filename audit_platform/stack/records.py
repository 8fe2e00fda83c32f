"""What the local stack started, remembered between commands so `down` stops only that."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel


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
        # Written with 0600 first: the record holds the server's generated password.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, stack_dir: Path, name: str) -> ServerRecord | None:
        path = cls.path(stack_dir, name)
        if not path.exists():
            return None
        return cls.model_validate(json.loads(path.read_text()))

    def forget(self, stack_dir: Path) -> None:
        self.path(stack_dir, self.name).unlink(missing_ok=True)
