"""HTTP for operators, served from the supervisor's own loop (no thread): ``/metrics``
(Prometheus text, OpenMetrics when asked), ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder

from gdriver.loop import TcpServer

if TYPE_CHECKING:
    from gdriver.control import Control

log = logging.getLogger("gdriver.http")

MAX_REQUEST = 16 * 1024
MAX_CONNECTIONS = 64  # past it, the least recently active connection is closed
HEADER_TIMEOUT = 2.0  # s from accept to the end of the request header
SEND_STALL = 2.0  # s a response may make no progress (a client that does not read)
TIMEOUT = 10.0  # s for the whole exchange
REAP_INTERVAL = 0.5
HEALTH_STALE = 10.0  # s without a loop tick before /healthz fails
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class HttpConnection:
    def __init__(self, server: HttpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = b""
        self.started = self.last_active = time.monotonic()

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ and not self.outbuf:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if not data:
                self.close()
                return
            self.last_active = time.monotonic()
            self.inbuf += data
            end = self.inbuf.find(b"\r\n\r\n")
            if end < 0:
                end = self.inbuf.find(b"\n\n")
            if end < 0:
                if len(self.inbuf) > MAX_REQUEST:
                    self.respond(431, b"request header too large\n")
                return
            self.respond_with(self.server.handle(bytes(self.inbuf[:end])))
        if mask & selectors.EVENT_WRITE and self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            self.last_active = time.monotonic()
            self.outbuf = self.outbuf[n:]
            if not self.outbuf:
                self.close()

    def stale(self, now: float) -> bool:
        """A request header still incomplete after HEADER_TIMEOUT (slowloris), a response
        stuck for SEND_STALL, or any exchange longer than TIMEOUT."""
        if now - self.started > TIMEOUT:
            return True
        if self.outbuf:
            return now - self.last_active > SEND_STALL
        return now - self.started > HEADER_TIMEOUT

    def respond(self, code: int, body: bytes) -> None:
        self.respond_with(self.server.response(code, body, "text/plain; charset=utf-8"))

    def respond_with(self, response: bytes) -> None:
        self.outbuf = response
        self.last_active = time.monotonic()  # the stall deadline counts from here
        self.server.loop.modify(self.sock, selectors.EVENT_WRITE, self.on_event)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.server.loop.remove(self.sock)
            with contextlib.suppress(OSError):
                self.sock.close()
        self.server.connections.discard(self)


class HttpServer(TcpServer):
    name = "metrics"
    max_connections = MAX_CONNECTIONS
    reap_interval = REAP_INTERVAL

    def __init__(self, control: Control, host: str, port: int) -> None:
        self.control = control
        super().__init__(control.loop, host, port)

    def connect(self, sock: socket.socket) -> HttpConnection:
        return HttpConnection(self, sock)

    @staticmethod
    def response(code: int, body: bytes, ctype: str, head_only: bool = False) -> bytes:
        reason = REASONS[code]
        head = (
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        return head if head_only else head + body

    def handle(self, raw: bytes) -> bytes:
        lines = raw.decode("latin-1").split("\n")
        parts = lines[0].strip().split()
        if len(parts) < 2:
            return self.response(400, b"bad request\n", "text/plain; charset=utf-8")
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return self.response(405, b"method not allowed\n", "text/plain; charset=utf-8")
        head = method == "HEAD"
        path = target.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            encoder, ctype = choose_encoder(headers.get("accept", ""))
            return self.response(200, encoder(self.control.scrape()), ctype, head)
        if path == "/healthz":
            stale = self.control.loop_lag()
            if stale > HEALTH_STALE:
                return self.response(503, f"loop stalled for {stale:.0f}s\n".encode(), text, head)
            return self.response(200, b"ok\n", text, head)
        if path == "/readyz":
            ready, reason = self.control.is_ready()
            return self.response(200 if ready else 503, reason.encode() + b"\n", text, head)
        return self.response(404, b"not found\n", text, head)
