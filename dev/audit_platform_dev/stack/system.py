"""Operating-system chores for running real servers locally: users, packages, ports, processes.

Failures raise :class:`StackError` with a message that says what failed and what to do,
because the person reading it is usually a newcomer whose first command just went wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class StackError(RuntimeError):
    """A local server could not be installed, started or stopped."""


def is_root() -> bool:
    return os.geteuid() == 0


def log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(f"    {line}" for line in text[-lines:])


def ensure_debian_packages(packages: list[str], *, why: str) -> None:
    """Install Debian packages when missing; only root can, so others get the exact command."""
    cmd = "apt-get update && apt-get install -y --no-install-recommends " + " ".join(packages)
    if not is_root():
        raise StackError(f"{why} is not installed. Install it first, as root: {cmd}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(
            f"Could not install {why} with `{cmd}` (exit {done.returncode}):\n{done.stderr[-2000:]}"
        )


def ensure_system_user(name: str) -> None:
    """Create a locked system account for a server that refuses to run as root."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise StackError(f"Could not create system user {name!r}: {done.stderr.strip()}")


@dataclass(frozen=True)
class RunAs:
    """The OS account a server runs as: a service user when we are root, else ourselves."""

    user: str

    @classmethod
    def service(cls, preferred: str) -> RunAs:
        if is_root():
            return cls(preferred)
        return cls(pwd.getpwuid(os.geteuid()).pw_name)

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    @property
    def gid(self) -> int:
        return pwd.getpwnam(self.user).pw_gid

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def popen_kwargs(self) -> dict:
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        env = kwargs.pop("env", None) or dict(os.environ)
        env["HOME"] = env.get("HOME") if self.is_self else "/"
        return subprocess.run(
            args, env=env, capture_output=True, text=True, **self.popen_kwargs(), **kwargs
        )

    def can_enter(self, path: Path) -> bool:
        """Whether this account can traverse every folder down to ``path``."""
        return self.is_self or self.run(["test", "-x", str(path)]).returncode == 0

    def chown_tree(self, path: Path) -> None:
        if self.is_self:
            return
        for root, dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)


def service_account(name: str) -> RunAs:
    """The account a Java server runs as: ``name``, made when we are root (Elasticsearch
    refuses to run as root), else ourselves."""
    if is_root():
        ensure_system_user(name)
    return RunAs.service(name)


def server_home(stack_dir: Path, name: str, run_as: RunAs) -> Path:
    """Where a server keeps its files: inside the stack folder when its user can reach it.

    A checkout under a private folder (``mktemp -d`` makes 0700 folders, as CI's clone may be)
    cannot be entered by the ``postgres`` account, so such servers live under /var/tmp in a
    folder named from the stack folder's path, still one per checkout.
    """
    stack_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(stack_dir, 0o755)
    if run_as.can_enter(stack_dir):
        home = stack_dir / name
    else:
        digest = hashlib.sha256(str(stack_dir.resolve()).encode()).hexdigest()[:12]
        home = Path("/var/tmp") / f"audit-platform-{digest}" / name
        home.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(home.parent, 0o755)
    home.mkdir(parents=True, exist_ok=True)
    if not run_as.is_self:
        os.chown(home, run_as.uid, run_as.gid)
    return home


#: TCP states in /proc/net/tcp, for saying what a socket holding a port is doing.
_TCP_STATES = {
    "01": "connected",
    "02": "connecting",
    "06": "closing (TIME_WAIT)",
    "08": "closing",
    "0A": "listening",
}


@dataclass(frozen=True)
class PortHolder:
    """A socket bound to a local port, and the process holding it (None: another user's, or
    a connection in TIME_WAIT that no process holds any more)."""

    state: str
    remote: str
    pid: int | None
    command: str

    def __str__(self) -> str:
        doing = self.state if self.state != "connected" else f"connected to {self.remote}"
        if self.pid is None:
            return f"a socket no process of ours holds ({doing})"
        return f"pid {self.pid} ({self.command or '?'}), {doing}"


def _address(text: str) -> str:
    """``0100007F:1F90`` (/proc/net/tcp's little-endian hex) as ``127.0.0.1:8080``; IPv6
    addresses are kept in hex, enough to tell which connection it is."""
    host, port = text.split(":")
    if len(host) == 8:
        host = socket.inet_ntoa(bytes.fromhex(host)[::-1])
    return f"{host}:{int(port, 16)}"


def port_holders(port: int, proc: Path = Path("/proc")) -> list[PortHolder]:
    """Who holds local TCP ``port``, read from /proc/net/tcp{,6} and each process's fds.

    psutil's ``net_connections`` does the same; it is not a dependency of the platform, and
    the local stack only runs on Linux, where these files are the source psutil reads too.
    """
    sockets: dict[str, tuple[str, str]] = {}  # inode -> (state, remote)
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                state = _TCP_STATES.get(fields[3], f"state {fields[3]}")
                sockets[fields[9]] = (state, _address(fields[2]))
    owners: dict[str, int] = {}
    wanted = {f"socket:[{inode}]": inode for inode in sockets if inode != "0"}
    for entry in proc.iterdir():
        if not wanted or not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                inode = wanted.pop(os.readlink(fd), None)
                if inode is not None:
                    owners[inode] = int(entry.name)
        except OSError:  # gone, or another user's process
            continue
    return [
        PortHolder(
            state,
            remote,
            owners.get(inode),
            pid_cmdline(owners[inode]).strip() if inode in owners else "",
        )
        for inode, (state, remote) in sockets.items()
    ]


def ensure_port_free(port: int, *, what: str, variable: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            holders = "; ".join(str(h) for h in port_holders(port)) or "not found in /proc"
            raise StackError(
                f"Port {port} for {what} is taken ({exc.strerror}) by {holders}. "
                f"Set {variable} to a free port, or stop that process "
                f"(`ss -tanp 'sport = :{port}'` shows it too)."
            ) from exc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available_memory_bytes(meminfo: str | None = None) -> int:
    text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def parse_size(size: str) -> int:
    """JVM-style sizes ('512m', '1g') to bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)", size.strip().lower())
    if not match:
        raise StackError(f"Heap size {size!r} is not a JVM size such as 512m or 1g")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2)]


def ensure_memory(needed: int, *, what: str, advice: str, meminfo: str | None = None) -> None:
    available = available_memory_bytes(meminfo)
    if available and available < needed:
        raise StackError(
            f"Not enough memory for {what}: it needs about {needed // 2**20} MiB and "
            f"{available // 2**20} MiB is available. {advice}"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes: it only waits for its parent to reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def pid_cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except (FileNotFoundError, ProcessLookupError):
        return ""


def pid_matches(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and still the process we started (guards against PID reuse)."""
    return pid_alive(pid) and marker in pid_cmdline(pid)


def stop_pid(pid: int, marker: str, *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> bool:
    """Stop the process we started, and only it. Returns False when it was already gone."""
    if not pid_matches(pid, marker):
        return False
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), timeout=10, what=f"process {pid} to exit")
    return True


@dataclass(frozen=True)
class ProcStat:
    """What /proc/<pid>/stat says about a process that matters for stopping a tree of them."""

    pid: int
    ppid: int
    session: int
    #: Clock ticks after boot at which it started: tells a reused pid from the process seen.
    started: int
    zombie: bool


def process_table(proc: Path = Path("/proc")) -> dict[int, ProcStat]:
    table = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces and parentheses: split after the last.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        table[pid] = ProcStat(
            pid, int(fields[1]), int(fields[3]), int(fields[19]), fields[0] in {"Z", "X"}
        )
    return table


def stop_tree(leader: int, *, grace: float, sig: int = signal.SIGTERM) -> list[int]:
    """Stop ``leader`` (started in a session of its own) and every process it started, however
    deep: SIGTERM to each, up to ``grace`` seconds for all to exit, then SIGKILL to those
    left. Returns the pids that had to be killed.

    Signalling the process group and waiting for the leader alone is not enough: a leader
    that exits first leaves children that take their time (Dagster's code servers and their
    multiprocessing workers) or ignore SIGTERM, and a child that made a session of its own is
    not in the group. So the tree is followed by parent (from before anyone exits, as an
    orphan's parent becomes init) and by session, and waited for as a whole.
    """
    seen: dict[int, int] = {}  # pid -> start time, of every member seen so far

    def members() -> set[int]:
        table = process_table()
        alive = {
            pid
            for pid, started in seen.items()
            if pid in table and table[pid].started == started and not table[pid].zombie
        }
        parents, grew = alive | {leader}, True
        while grew:
            grew = False
            for p in table.values():
                if (
                    not p.zombie
                    and p.pid not in alive
                    and (p.session == leader or p.ppid in parents)
                ):
                    alive.add(p.pid)
                    parents.add(p.pid)
                    seen[p.pid] = p.started
                    grew = True
        return alive

    def send(pids: set[int], signum: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    signalled: set[int] = set()
    deadline = time.monotonic() + grace
    while alive := members():
        if time.monotonic() >= deadline:
            break
        send(alive - signalled, sig)
        signalled |= alive
        time.sleep(0.1)
    else:
        return []
    killed = sorted(alive)
    deadline = time.monotonic() + 10
    while alive := members():
        if time.monotonic() >= deadline:
            raise StackError(f"processes {sorted(alive)} started by {leader} survived SIGKILL")
        send(alive, signal.SIGKILL)
        time.sleep(0.1)
    return killed


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.25,
    abort: Callable[[], str | None] | None = None,
) -> None:
    """Poll ``check`` until true; ``abort`` returns a reason to give up early (process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if abort is not None and (reason := abort()):
            raise StackError(reason)
        time.sleep(interval)
    raise StackError(f"Timed out after {timeout:.0f}s waiting for {what}")
