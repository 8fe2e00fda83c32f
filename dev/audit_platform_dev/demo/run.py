"""`audit-platform demo`: the whole product on one machine, with a service that uses it.

Starts (or reuses) the local stack, creates the shop's database and sets up its source, starts
the shop service, Dagster's webserver and daemon and the Audit API, and runs traffic until
Ctrl-C; then stops everything it started.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

from audit_platform.api_keys import create_key
from audit_platform.policy import load_policy, policy_path
from audit_platform.settings import PROJECT_ROOT, Settings
from audit_platform.sources.setup import setup_source
from audit_platform_dev.demo.traffic import Traffic
from audit_platform_dev.stack import processes, served
from audit_platform_dev.stack.deployment import LocalDeployment, ensure_database
from audit_platform_dev.stack.settings import StackSettings
from audit_platform_dev.stack.system import ensure_port_free


def prepare_shop(admin_url: str, env: str, resources_dir: Path) -> str:
    """The shop's database with its schema and this environment's publication and slot."""
    url = ensure_database(admin_url, f"shop_{env}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((resources_dir / "demo" / "shop.sql").read_text())
    policy = load_policy(policy_path(resources_dir, "shop"))
    setup_source(url, env, policy, resources_dir / "sql")
    return url


def _mask_key(root: Path) -> str:
    """A demo-only masking key, kept so masked values stay comparable across restarts."""
    path = root / "mask_key"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def first_record_seconds(
    api_url: str, key: str, started: float, timeout: float, *, since: datetime
) -> float | None:
    """Seconds from ``started`` until the API returns a record committed at or after ``since``,
    or None on timeout. Records of an earlier demo do not count: after a restart, "searchable"
    must mean that capture runs again, not that old records are still there."""
    params: dict[str, str | int] = {"limit": 1, "since": since.isoformat()}
    while time.monotonic() - started < timeout:
        try:
            reply = httpx.get(
                f"{api_url}/v1/events", params=params, headers={"X-API-Key": key}, timeout=5
            )
            if reply.status_code == 200 and reply.json()["events"]:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(1)
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


#: Signals that end the demo like Ctrl-C: `kill`, a supervisor, a closed terminal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _tolerant(say: Callable[[str], None]) -> Callable[[str], None]:
    """``say`` that survives closed output: with `make demo | tee demo.log`, Ctrl-C ends tee
    too, and the next print raised BrokenPipeError before anything was stopped. Once the
    output is gone, later lines (and the interpreter's last flush) go to /dev/null."""

    def tolerant(text: str) -> None:
        try:
            say(text)
        except OSError:  # BrokenPipeError, or EIO from a terminal that was closed
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    return tolerant


def run_demo(
    settings: Settings,
    *,
    say: Callable[[str], None],
    duration: float | None = None,
    dagster_port: int = 3000,
    api_port: int = 8000,
    shop_port: int = 8100,
) -> int:
    """Run until Ctrl-C (or ``duration`` seconds); 0 when records reached the API."""
    env = settings.env
    root = StackSettings().dir / "demo" / env
    say = _tolerant(say)
    # SIGTERM and SIGHUP stop things like Ctrl-C does: the servers run in their own sessions
    # and would otherwise be left behind.
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        return _run(settings, env, root, say, duration, dagster_port, api_port, shop_port)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(settings, env, root, say, duration, dagster_port, api_port, shop_port) -> int:
    with served(settings) as exports:
        say(
            f"stack: PostgreSQL {exports['AUDIT_PG_URL'].split('@')[-1]}, "
            f"Elasticsearch {exports['AUDIT_ES_URL']}"
        )
        shop_url = prepare_shop(exports["AUDIT_PG_URL"], env, settings.resources_dir)
        deployment = LocalDeployment(
            exports,
            env,
            root,
            {"shop": shop_url},
            dagster_port=dagster_port,
            api_port=api_port,
            mask_key=_mask_key(root),
        )
        deployment.prepare()
        with psycopg.connect(exports["AUDIT_PG_URL"], autocommit=True) as conn:
            key = create_key(conn, env, "demo").secret
        # For `make screenshot` (python -m audit_platform_dev.demo.screenshot explorer); the stack
        # directory is local and ignored by git, and the key reads only the demo's data.
        key_file = root / "api-key"
        key_file.touch(mode=0o600)
        key_file.write_text(key)
        stop = threading.Event()
        traffic_thread = None
        try:
            ensure_port_free(shop_port, what="the demo shop service", variable="--shop-port")
            shop = processes.start(
                "shop-service",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "audit_platform_dev.demo.service:app_from_environment",
                    "--port",
                    str(shop_port),
                ],
                {**deployment.environ(), "SHOP_DATABASE_URL": shop_url},
                deployment.logs,
                PROJECT_ROOT,
            )
            deployment.add(shop)
            shop.wait_http(f"http://127.0.0.1:{shop_port}/openapi.json", 60)
            say("starting Dagster (webserver, daemon) and the Audit API ...")
            started, started_at = time.monotonic(), datetime.now(UTC)
            deployment.start()
            traffic = Traffic(f"http://127.0.0.1:{shop_port}", shop_url)
            traffic_thread = threading.Thread(target=traffic.run, args=(stop,), daemon=True)
            traffic_thread.start()
            say(f"""
  Audit Explorer  {deployment.api_url}/ui/   (this link fills in the demo key; click Sign in)
                  {deployment.api_url}/ui/login#key={key}
  Dagster UI      {deployment.dagster_url}   (asset graph, the live capture run, backfills)
  Audit API       {deployment.api_url}/docs
  shop service    http://127.0.0.1:{shop_port}/docs   (traffic is running against it)
  API key (demo)  {key}
  logs            {deployment.logs}

  Try:  curl -s -H 'X-API-Key: {key}' '{deployment.api_url}/v1/events?limit=3'
        curl -s -H 'X-API-Key: {key}' '{deployment.api_url}/v1/events?actor_id=alice&limit=3'
        curl -s -H 'X-API-Key: {key}' '{deployment.api_url}/v1/objects/shop/orders/1/history'
        curl -s -H 'X-API-Key: {key}' '{deployment.api_url}/v1/stats?interval=hour'

Waiting for the first audit records (the keeper sensor starts the live capture run) ...""")
            seconds = first_record_seconds(
                deployment.api_url, key, started, timeout=180, since=started_at
            )
            if seconds is None:
                say("no record reached the API within 180 s; see the logs above")
                return 1
            say(
                f"first audit records searchable {seconds:.0f} s after start. "
                "Press Ctrl-C to stop everything."
            )
            # Show the operator's checks at once rather than at the next five-minute tick.
            deployment.launch("__ASSET_JOB", [["elasticsearch", "index_template"]])
            deployment.launch("health_checks_job")
            deadline = None if duration is None else time.monotonic() + duration
            while deadline is None or time.monotonic() < deadline:
                time.sleep(1)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            # A second Ctrl-C (or the terminal's SIGHUP after it) must not cut the stop short.
            for sig in (signal.SIGINT, *STOP_SIGNALS):
                signal.signal(sig, signal.SIG_IGN)
            say("stopping traffic, the shop service, Dagster and the API ...")
            stop.set()
            if traffic_thread is not None:
                traffic_thread.join(timeout=10)
            deployment.stop()
