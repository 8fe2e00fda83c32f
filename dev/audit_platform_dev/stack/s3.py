"""A real S3-compatible server for staging on object storage: S3Proxy from Maven Central.

S3Proxy (Apache-2.0) serves the S3 API over a local folder (jclouds' ``filesystem-nio2``
backend), including the conditional writes the staging store relies on (``If-None-Match: *``).
It needs only the Java that Elasticsearch already needs. Clients reach it the way they reach
AWS: the standard ``AWS_*`` variables, with ``AWS_ENDPOINT_URL_S3`` naming this server, so the
platform has no S3 setting of its own beyond an ``s3://`` staging root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from audit_platform_dev.stack import maven
from audit_platform_dev.stack.elasticsearch import SERVICE_USER, find_java_home
from audit_platform_dev.stack.records import LocalServer, ServerRecord, stack_secret
from audit_platform_dev.stack.system import (
    StackError,
    ensure_port_free,
    log_tail,
    pid_alive,
    server_home,
    service_account,
    wait_until,
)

NAME = "s3"
VERSION = "4.1.0"
ARTIFACT = f"org.gaul:s3proxy:{VERSION}:jar:jar-with-dependencies"
#: The bucket the stack creates; tests and the demo stage under prefixes of it.
BUCKET = "audit-staging"
REGION = "us-east-1"

CONF = """\
# Written by audit-platform's local stack; edits are overwritten on `stack up`.
s3proxy.endpoint=http://127.0.0.1:{port}
s3proxy.authorization=aws-v2-or-v4
s3proxy.identity={identity}
s3proxy.credential={credential}
jclouds.provider=filesystem-nio2
jclouds.filesystem.basedir={data}
"""


class LocalS3(LocalServer):
    """Start, reuse and stop one S3Proxy for this checkout."""

    NAME = NAME
    STOP_TIMEOUT = 30

    def __init__(self, stack_dir: Path, port: int) -> None:
        self.stack_dir = stack_dir
        self.port = port
        self.run_as = service_account(SERVICE_USER)

    def up(self) -> tuple[ServerRecord, bool]:
        if (record := self.record()) is not None:
            return record, False
        ensure_port_free(self.port, what="S3 (S3Proxy)", variable="AUDIT_STACK_S3_PORT")
        fetched = maven.fetch(
            ARTIFACT, self.stack_dir / "downloads", f"s3proxy-{VERSION}-jar-with-dependencies.jar"
        )
        home = server_home(self.stack_dir, NAME, self.run_as)
        # The server's account may not reach the checkout (a private CI clone): its own copy.
        jar = home / fetched.name
        if not jar.exists():
            shutil.copyfile(fetched, jar)
        data = home / "data"
        # With the filesystem backend a bucket is a folder: creating it here is creating it.
        (data / BUCKET).mkdir(parents=True, exist_ok=True)
        identity, credential = "audit-local", stack_secret(self.stack_dir, "s3.secret")
        conf = home / "s3proxy.conf"
        conf.write_text(
            CONF.format(port=self.port, identity=identity, credential=credential, data=data)
        )
        os.chmod(conf, 0o600)
        self.run_as.chown_tree(home)
        log = home / "s3proxy.log"
        java = find_java_home() / "bin/java"
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(java), "-Xmx256m", "-jar", str(jar), "--properties", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=home,
                **self.run_as.popen_kwargs(),
            )
        endpoint = f"http://127.0.0.1:{self.port}"
        wait_until(
            lambda: _answers(endpoint),
            timeout=90,
            what="S3Proxy to answer HTTP",
            abort=lambda: (
                None
                if pid_alive(process.pid)
                else f"S3Proxy exited during start.\nLog ({log}):\n{log_tail(log)}"
            ),
        )
        record = ServerRecord(
            name=NAME,
            pid=process.pid,
            marker=str(conf),
            home=home,
            log=log,
            url=endpoint,
            env={
                "AUDIT_S3_URL": f"s3://{BUCKET}",
                "AWS_ENDPOINT_URL_S3": endpoint,
                "AWS_ACCESS_KEY_ID": identity,
                "AWS_SECRET_ACCESS_KEY": credential,
                "AWS_DEFAULT_REGION": REGION,
            },
        )
        record.save(self.stack_dir)
        return record, True


def _answers(endpoint: str) -> bool:
    """Any HTTP answer (an anonymous request gets 403) means the server is up."""
    try:
        urllib.request.urlopen(endpoint, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def describe(endpoint: str) -> str:
    if not _answers(endpoint):
        raise StackError(f"S3 at {endpoint} does not answer")
    return f"S3Proxy {VERSION} at {endpoint}, bucket {BUCKET}"
