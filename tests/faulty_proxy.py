"""A loopback HTTP proxy that makes an S3 server (moto) flaky, the way object storage fails under load.

    with FaultyProxy(s3_server["endpoint_url"], rate=0.2, seed=1) as proxy:
        opts = {**s3_server, "endpoint_url": proxy.url}   # s3fs talks to the proxy

Each try of a request is forwarded to `upstream` unchanged, or, for a seeded fraction `rate` of
tries, fails in one of these ways:

    503    answered "503 SlowDown" without forwarding: the request had no effect
    drop   the connection is reset without forwarding: no effect, no answer
    500    forwarded, then answered "500 InternalError": the request took effect, the client is told it failed
    reset  forwarded, then the connection is reset before any response: took effect, no answer
    cut    forwarded, then the connection is reset mid-response: after half the body, or half the
           headers of a response without one

Whether a try fails is a function of (seed, method, path and query, how many times this proxy saw
that request before), never of the order in which concurrent requests arrive, so a run through the
proxy meets the same faults every time.

An outage drops every connection before the request reaches the server (a server that is down),
from the moment `down` is set: by the test, or by the proxy itself at the first try for which
`outage(method, path)` is true (a point in a run named by its requests, e.g. the first PUT of a
shard's done marker). `faults` counts the faults injected by kind, the outage's as "outage";
`requests` counts every try, `log` lists them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlparse

KINDS = ("503", "drop", "500", "reset", "cut")
_ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
           "500": (500, "InternalError", "We encountered an internal error. Please try again.")}


class FaultyProxy:
    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 outage: Callable[[str, str], bool] | None = None):
        up = urlparse(upstream)
        self.upstream = (up.hostname, up.port)
        self.rate, self.seed, self.kinds, self.outage = rate, seed, kinds, outage
        self.down = False
        self.faults: Counter = Counter()
        self.requests = 0
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault) of every try
        self._seen: Counter = Counter()  # tries per request, for the seeded decision
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def decide(self, method: str, path: str) -> str | None:
        """The fault for this try of (method, path), or None to forward it."""
        with self._lock:
            self.requests += 1
            key = f"{method} {path}"
            n, self._seen[key] = self._seen[key], self._seen[key] + 1
            self.down = self.down or (self.outage is not None and self.outage(method, path))
            if self.down:
                kind = "drop"
                self.faults["outage"] += 1
            else:
                h = hashlib.sha256(f"{self.seed}|{key}|{n}".encode()).digest()
                draw = int.from_bytes(h[:8], "big") / 2 ** 64
                kind = self.kinds[h[8] % len(self.kinds)] if draw < self.rate else None
                if kind:
                    self.faults[kind] += 1
            self.log.append((method, path, kind))
            return kind


def _handler(proxy: FaultyProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as s3fs's connection pool expects

        def log_message(self, *args):  # quiet
            pass

        def _relay(self):
            if "Transfer-Encoding" in self.headers:  # s3fs sends every body with a Content-Length
                return self.send_error(501, "faulty_proxy forwards bodies with a Content-Length only")
            body = self._read_body()
            kind = proxy.decide(self.command, self.path)
            if kind == "503":
                return self._error(kind)
            if kind == "drop":
                return self._reset()
            status, reason, headers, data = self._forward(body)
            if kind == "500":
                return self._error(kind)
            if kind == "reset":
                return self._reset()
            if self.command == "HEAD":  # its Content-Length is the object's: keep it
                data = b""
            else:
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(data))))
            head = "".join([f"HTTP/1.1 {status} {reason}\r\n", *(f"{k}: {v}\r\n" for k, v in headers), "\r\n"])
            raw = head.encode("latin-1") + data
            if kind == "cut":  # the connection dies mid-body, or mid-headers when there is no body
                self.wfile.write(raw[:len(raw) - len(data) // 2] if data else raw[:len(raw) // 2])
                return self._reset()
            self.wfile.write(raw)

        def _forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
            return resp.status, resp.reason, kept, data

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        def _read_body(self) -> bytes | None:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else None

        def _error(self, kind: str) -> None:
            status, code, message = _ERRORS[kind]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>faulty-proxy</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST, as a crashed server or a middlebox does
            # (closing the fd itself: socket.close() waits for rfile/wfile, and the server's own close
            # would send FIN first)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            os.close(self.connection.detach())

    return Handler
