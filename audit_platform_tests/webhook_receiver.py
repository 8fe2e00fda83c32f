"""A Standard Webhooks receiver for the stream tests: a real HTTP server that checks each
delivery's signature by the specification's recipe computed here (not with the sender's
library), and records every ``webhook-id`` it accepts and the records each message holds."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Receiver:
    """An HTTP receiver that verifies Standard Webhooks signatures itself."""

    secret: str = ""
    down: bool = False  # answers nothing: the connection is closed unanswered
    on_message: Callable[[dict], None] | None = None
    #: A status to refuse a well-signed message with (a receiver refusing it as such), or None.
    refuse: Callable[[dict], int | None] | None = None
    seen: list[str] = field(default_factory=list)  # webhook-id of each accepted delivery
    records: list[dict] = field(default_factory=list)  # of accepted deliveries, first time
    refused: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    @property
    def duplicates(self) -> int:
        return len(self.seen) - len(set(self.seen))

    def valid(self, headers, body: bytes) -> bool:
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
        return fresh and any(
            hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split(" ")
        )

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers["content-length"]))
        if self.down:
            request.close_connection = True
            return
        if not self.valid(request.headers, body):
            self.refused += 1
            request.send_response(401)
            request.end_headers()
            return
        message = json.loads(body)
        if self.refuse is not None and (status := self.refuse(message)) is not None:
            self.refused += 1
            request.send_response(status)
            request.end_headers()
            return
        if request.headers["webhook-id"] not in self.seen:
            self.records.extend(message["data"]["records"])
        self.seen.append(request.headers["webhook-id"])
        if self.on_message is not None:
            self.on_message(message)
        request.send_response(200)
        request.end_headers()


@contextmanager
def receiving() -> Iterator[Receiver]:
    found = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            found.handle(self)

        def log_message(self, *args) -> None:
            pass

    found.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=found.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()
