"""A tiny HTTP proxy in front of the moto server that injects S3 faults and counts requests.

Each :class:`Fault` matches requests by method and by substrings of the path and query, and
answers the first ``times`` of them with a 500 ``InternalError``, a 503 ``SlowDown``, a dropped
connection (no reply at all), a lost reply (the request reaches the server, its reply never
comes back) or a reply cut off half-way. Every request is logged, so tests can
assert how many were made (one LIST for a listing, ranged GETs for reads). :meth:`gather` makes
the first N matching requests wait for one another: it proves they were in flight at once.
"""

from __future__ import annotations

import http.client
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

Action = Literal["500", "503", "drop", "lost", "truncate"]
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "host"}
_ERRORS = {"500": (500, "InternalError"), "503": (503, "SlowDown")}


@dataclass
class Fault:
    """Answer the first ``times`` matching requests with ``action`` (``times=-1``: all of them)."""

    action: Action
    method: str | None = None
    path: str | None = None
    query: str | None = None
    times: int = 1

    def matches(self, method: str, path: str, query: str) -> bool:
        return (
            self.times != 0
            and (self.method is None or self.method == method)
            and (self.path is None or self.path in path)
            and (self.query is None or self.query in query)
        )


@dataclass(frozen=True)
class Request:
    """One request the proxy saw."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    fault: Action | None


class FaultProxy:
    """A threading HTTP server on 127.0.0.1 that relays to ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._gather: tuple[Fault, threading.Barrier] | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def gather(self, count: int, *, method: str, query: str) -> threading.Barrier:
        """Hold the first ``count`` matching requests until all ``count`` have arrived (10 s at most)."""
        barrier = threading.Barrier(count, timeout=10)
        self._gather = (Fault("500", method=method, query=query, times=count), barrier)
        return barrier

    def seen(self, method: str | None = None, *, query: str = "", path: str = "") -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and query in r.query and path in r.path
            ]

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, method: str, path: str, query: str, headers: dict[str, str]) -> Action | None:
        with self.lock:
            action = None
            for fault in self.faults:
                if fault.matches(method, path, query):
                    fault.times -= 1
                    action = fault.action
                    break
            self.requests.append(Request(method, path, query, headers, action))
            gather = self._gather
            wait = gather is not None and gather[0].matches(method, path, query)
            if wait and gather is not None:
                gather[0].times -= 1
        if wait and gather is not None:
            gather[1].wait()
        return action


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass

    def do_GET(self) -> None:
        self._relay()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _relay(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        path, _, query = self.path.partition("?")
        headers = {k.lower(): v for k, v in self.headers.items()}
        action = proxy._decide(self.command, path, query, headers)
        self.close_connection = True
        if action == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action in _ERRORS:
            status, code = _ERRORS[action]
            self._reply(status, [("Content-Type", "application/xml")], _error_xml(code))
            return
        status, reply_headers, data = self._forward(proxy.upstream, body)
        if action == "lost":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "truncate":
            self.send_response(status)
            for name, value in reply_headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(status, reply_headers, data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, upstream: tuple[str, int], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Host"] = self.headers.get("Host", f"{upstream[0]}:{upstream[1]}")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or body:
                headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD":
                kept.append(("Content-Length", response.getheader("Content-Length") or "0"))
            return response.status, kept, data
        finally:
            connection.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _error_xml(code: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message>"
        "<RequestId>fault</RequestId></Error>"
    ).encode()
