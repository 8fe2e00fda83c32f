"""A real Elasticsearch 9 node from the integ-test-zip distribution on Maven Central.

That distribution is the server core plus security, without most x-pack modules: it has no
index lifecycle management (ILM) and no data streams. The platform therefore writes to plain
time-based indices behind aliases and enforces retention with its own job where ILM is absent
(see README). Security is on, as in production: users authenticate over HTTPS with a CA that
`stack up` generates, so every test exercises the same client configuration a real cluster needs.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import zipfile
from collections.abc import Mapping
from pathlib import Path

import yaml
from elasticsearch import Elasticsearch

from audit_platform.clients import elasticsearch_client
from audit_platform.index import access
from audit_platform.settings import ElasticsearchConnection, Settings
from audit_platform_dev.stack import maven
from audit_platform_dev.stack.records import LocalServer, ServerRecord, write_private
from audit_platform_dev.stack.system import (
    StackError,
    ensure_debian_packages,
    ensure_memory,
    ensure_port_free,
    log_tail,
    parse_size,
    pid_alive,
    server_home,
    service_account,
    wait_until,
)

NAME = "elasticsearch"
#: Pinned server version; the Python client's major version (pyproject.toml) must equal it.
VERSION = "9.5.4"
ARTIFACT = f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{VERSION}:zip"
MIN_JAVA = 21
ADMIN_USER = "audit_admin"
SERVICE_USER = "audit-es"

NODE_CONF = """\
# Written by audit-platform's local stack; edits are overwritten on `stack up`.
cluster.name: audit-platform-local
node.name: local
network.host: 127.0.0.1
http.port: {http_port}
transport.port: {transport_port}
discovery.type: single-node
path.data: {data}
path.logs: {logs}
xpack.security.enabled: true
xpack.security.http.ssl.enabled: true
xpack.security.http.ssl.certificate: certs/node.crt
xpack.security.http.ssl.key: certs/node.key
xpack.security.http.ssl.certificate_authorities: certs/ca.crt
# Single node on loopback: the transport layer never leaves this machine.
xpack.security.transport.ssl.enabled: false
# A developer's nearly full disk must not turn indices read-only in the middle of a test.
cluster.routing.allocation.disk.threshold_enabled: false
"""


def java_major(java_home: Path) -> int | None:
    release = java_home / "release"
    if not (java_home / "bin/java").exists() or not release.exists():
        return None
    match = re.search(r'^JAVA_VERSION="(\d+)', release.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def find_java_home(
    env: Mapping[str, str] | None = None, jvm_root: Path = Path("/usr/lib/jvm")
) -> Path:
    """ES_JAVA_HOME, JAVA_HOME, or the newest JDK 21+ under /usr/lib/jvm, in that order."""
    env = os.environ if env is None else env
    for variable in ("ES_JAVA_HOME", "JAVA_HOME"):
        if value := env.get(variable):
            major = java_major(Path(value))
            if major is not None and major >= MIN_JAVA:
                return Path(value)
            if variable == "ES_JAVA_HOME":
                raise StackError(
                    f"ES_JAVA_HOME={value} is not a JDK {MIN_JAVA} or newer (found "
                    f"{major or 'no JDK'}); point it at one, or unset it to search /usr/lib/jvm"
                )
    candidates = [
        (major, path)
        for path in jvm_root.glob("*")
        if (major := java_major(path)) is not None and major >= MIN_JAVA
    ]
    if not candidates:
        raise StackError(
            f"No Java {MIN_JAVA} or newer found (Elasticsearch {VERSION} needs one). Install a "
            f"JDK {MIN_JAVA}+ (e.g. Temurin) and set ES_JAVA_HOME to its folder."
        )
    return max(candidates)[1]


def fetch_distribution(downloads: Path) -> Path:
    """The integ-test-zip, fetched with Maven once and then taken from the local cache."""
    return maven.fetch(ARTIFACT, downloads, f"elasticsearch-{VERSION}.zip")


def unpack(archive: Path, into: Path) -> Path:
    """Unzip keeping the executable bits that ``zipfile`` would otherwise drop."""
    home = into / f"elasticsearch-{VERSION}"
    if (home / "bin/elasticsearch").exists():
        return home
    partial = into / f".unpacking-{VERSION}"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, partial))
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(path, mode)
    (partial / f"elasticsearch-{VERSION}").rename(home)
    partial.rmdir()
    return home


def make_certificates(certs: Path) -> None:
    """A private CA and a node certificate for 127.0.0.1/localhost, made once per checkout."""
    if (certs / "node.crt").exists():
        return
    certs.mkdir(parents=True, exist_ok=True)
    ext = certs / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=audit-platform local CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "node.key",
            "-out",
            "node.csr",
        ],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "san.ext",
            "-out",
            "node.crt",
        ],
    ]
    if shutil.which("openssl") is None:
        ensure_debian_packages(["openssl"], why="openssl (used for the local CA)")
    for step in steps:
        done = subprocess.run(step, cwd=certs, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"`{' '.join(step)}` failed: {done.stderr.strip()}")
    # The CA file is public (clients read it); private keys stay with the server's account.
    os.chmod(certs / "ca.crt", 0o644)


class LocalElasticsearch(LocalServer):
    """Start, reuse and stop one Elasticsearch node for this checkout."""

    NAME = NAME
    STOP_TIMEOUT = 90

    def __init__(self, stack_dir: Path, http_port: int, transport_port: int, heap: str) -> None:
        self.stack_dir = stack_dir
        self.http_port = http_port
        self.transport_port = transport_port
        self.heap = heap
        self.run_as = service_account(SERVICE_USER)

    def up(self) -> tuple[ServerRecord, bool]:
        if (record := self.record()) is not None:
            return record, False
        heap_bytes = parse_size(self.heap)
        ensure_memory(
            heap_bytes + 512 * 2**20,
            what=f"Elasticsearch with a {self.heap} heap",
            advice="Free memory, or lower the heap with AUDIT_STACK_ES_HEAP=512m.",
        )
        java_home = find_java_home()
        ensure_port_free(self.http_port, what="Elasticsearch HTTP", variable="AUDIT_STACK_ES_PORT")
        ensure_port_free(
            self.transport_port,
            what="Elasticsearch transport",
            variable="AUDIT_STACK_ES_TRANSPORT_PORT",
        )
        archive = fetch_distribution(self.stack_dir / "downloads")
        home_root = server_home(self.stack_dir, NAME, self.run_as)
        es_home = unpack(archive, home_root)
        config = es_home / "config"
        data, logs = home_root / "data", home_root / "logs"
        data.mkdir(exist_ok=True)
        logs.mkdir(exist_ok=True)
        make_certificates(config / "certs")
        (config / "elasticsearch.yml").write_text(
            NODE_CONF.format(
                http_port=self.http_port,
                transport_port=self.transport_port,
                data=data,
                logs=logs,
            )
        )
        (config / "jvm.options.d" / "heap.options").write_text(
            f"-Xms{self.heap}\n-Xmx{self.heap}\n"
        )
        self.run_as.chown_tree(home_root)
        env = {**os.environ, "ES_JAVA_HOME": str(java_home)}
        env.pop("JAVA_HOME", None)
        password = self._admin_password(es_home, env)

        pidfile, launcher_log = home_root / "elasticsearch.pid", home_root / "launcher.log"
        pidfile.unlink(missing_ok=True)
        server_log = logs / "audit-platform-local.log"
        with launcher_log.open("w") as out:
            # -d: the launcher returns once the node has started (or failed), with its PID in -p.
            done = subprocess.run(
                [str(es_home / "bin/elasticsearch"), "-d", "-p", str(pidfile)],
                env={**env, "HOME": "/"} if not self.run_as.is_self else env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=300,
                **self.run_as.popen_kwargs(),
            )
        if done.returncode != 0 or not pidfile.exists():
            raise StackError(
                f"Elasticsearch did not start (launcher exit {done.returncode}).\n"
                f"Launcher output ({launcher_log}):\n{log_tail(launcher_log)}\n"
                f"Server log ({server_log}):\n{log_tail(server_log)}"
            )
        pid = int(pidfile.read_text().strip())
        conn = ElasticsearchConnection(
            url=f"https://127.0.0.1:{self.http_port}",
            username=ADMIN_USER,
            password=password,
            ca_certs=config / "certs/ca.crt",
        )
        client = elasticsearch_client(conn, request_timeout=10)
        wait_until(
            lambda: _healthy(client),
            timeout=180,
            what="Elasticsearch cluster health to be yellow or green",
            abort=lambda: (
                None
                if pid_alive(pid)
                else f"Elasticsearch exited during start.\nServer log:\n{log_tail(server_log)}"
            ),
        )
        record = ServerRecord(
            name=NAME,
            pid=pid,
            marker=str(es_home),
            home=home_root,
            log=server_log,
            url=conn.url,
            env={
                "AUDIT_ES_URL": conn.url,
                "AUDIT_ES_USERNAME": ADMIN_USER,
                "AUDIT_ES_PASSWORD": password,
                "AUDIT_ES_CA_CERTS": str(conn.ca_certs),
                "AUDIT_ES_FILE_REALM": str(es_home),
            },
        )
        record.save(self.stack_dir)
        return record, True

    def _admin_password(self, es_home: Path, env: dict[str, str]) -> str:
        """A file-realm superuser for the platform, created once with Elasticsearch's own tool."""
        secret = self.stack_dir / "elasticsearch.secret"
        users = es_home / "config/users"
        if secret.exists() and users.exists() and ADMIN_USER in users.read_text():
            return secret.read_text().strip()
        password = secrets.token_urlsafe(24)
        tool = str(es_home / "bin/elasticsearch-users")
        if users.exists() and ADMIN_USER in users.read_text():  # secret lost: reset it
            args = [tool, "passwd", ADMIN_USER, "-p", password]
        else:
            args = [tool, "useradd", ADMIN_USER, "-p", password, "-r", "superuser"]
        done = self.run_as.run(args, env=env)
        if done.returncode != 0:
            raise StackError(
                f"elasticsearch-users could not create {ADMIN_USER}: {done.stdout} {done.stderr}"
            )
        write_private(secret, password)
        return password


def install_file_realm_accounts(settings: Settings, env: str) -> list[access.Account]:
    """The environment's writer and reader in the local node's file realm (this distribution's
    native realm cannot store users): its roles merged into ``roles.yml``, its users made with
    ``elasticsearch-users``, passwords kept beside them so a rerun changes nothing. Returns once
    both can sign in (the node reloads those files every few seconds)."""
    assert settings.es_file_realm is not None and settings.elasticsearch is not None
    es_home, run_as = settings.es_file_realm, service_account(SERVICE_USER)
    kept_path = es_home / "config/audit-platform-accounts.json"
    kept = json.loads(kept_path.read_text()) if kept_path.exists() else {}
    accounts = access.new_accounts(env, kept)
    roles_file = es_home / "config/roles.yml"
    roles = (yaml.safe_load(roles_file.read_text()) if roles_file.exists() else None) or {}
    roles.update(access.role_descriptors(env))
    roles_file.write_text(yaml.safe_dump(roles, sort_keys=True))
    run_as.chown_tree(roles_file)
    env_vars = {**os.environ, "ES_JAVA_HOME": str(find_java_home())}
    env_vars.pop("JAVA_HOME", None)
    tool = str(es_home / "bin/elasticsearch-users")
    users_file = es_home / "config/users"
    for account in accounts:
        lines = users_file.read_text().splitlines() if users_file.exists() else []
        listed = any(line.split(":", 1)[0] == account.name for line in lines)
        if listed and kept.get(account.name) == account.password:
            continue
        if listed:
            run_as.run([tool, "userdel", account.name], env=env_vars)
        done = run_as.run(
            [tool, "useradd", account.name, "-p", account.password, "-r", account.name],
            env=env_vars,
        )
        if done.returncode != 0:
            raise StackError(
                f"elasticsearch-users could not create {account.name}: {done.stdout} {done.stderr}"
            )
    kept.update({a.name: a.password for a in accounts})
    write_private(kept_path, json.dumps(kept))
    for account in accounts:
        client = elasticsearch_client(account.connection(settings.elasticsearch), request_timeout=5)
        what = f"Elasticsearch to load the file-realm user {account.name}"
        wait_until(functools.partial(_signs_in, client), timeout=60, what=what)
    return accounts


def _signs_in(client: Elasticsearch) -> bool:
    try:
        client.security.authenticate()
    except Exception:
        return False
    return True


def _healthy(client: Elasticsearch) -> bool:
    try:
        health = client.cluster.health(wait_for_status="yellow", timeout="5s")
    except Exception:
        return False
    return health["status"] in {"yellow", "green"}


def server_version(client: Elasticsearch) -> str:
    # GET / lives in the rest-root module, which integ-test-zip lacks; node info does not.
    nodes = client.nodes.info(node_id="_local", metric="_none")["nodes"]
    return next(iter(nodes.values()))["version"]


def describe(client: Elasticsearch) -> str:
    health = client.cluster.health()
    return f"Elasticsearch {server_version(client)}, cluster {health['status']}"
