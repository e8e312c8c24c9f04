"""A release feed served over HTTP on 127.0.0.1, in a thread of the test process, with byte
ranges (RFC 9110, single ranges) and injected faults.

``FeedServer(root)`` serves the files under ``root``. ``faults`` decides, per request, what
goes wrong: a callable ``(path, range header or None) -> Fault | None``. A fault can

- ``cut``: send ``at`` bytes of the body, then drop the connection;
- ``stall``: send ``at`` bytes, then go silent for ``seconds`` (past the client's read
  timeout) and drop the connection;
- ``status``: answer with an HTTP error (503, 404, ...) and no body;
- ``flip``: send the whole body with the byte at ``at`` inverted;
- ``no_range``: ignore the Range header and send the whole file with 200;
- ``redirect``: answer 302 with ``Location: location``;
- ``bad_range``: answer a Range request with 206 and the whole file, labelled ``bytes 0-``;
- ``drip``: send the body one byte every ``seconds`` (never long enough apart to trip a read
  timeout), for as long as the client listens.

Every request is logged (path, Range header, status, body bytes sent) for the tests to read.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    kind: str  # cut, stall, status, flip, no_range, redirect, bad_range, drip
    at: int = 0
    status: int = 503
    seconds: float = 1.0
    location: str = ""


@dataclass
class Logged:
    path: str
    range: str | None
    status: int
    sent: int
    fault: str | None
    agent: str | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, fmt, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        rel = self.path.split("?", 1)[0].lstrip("/")
        full = os.path.join(srv.root, rel)
        if ".." in rel.split("/") or not os.path.isfile(full):
            self._plain(404, rel)
            return
        with open(full, "rb") as f:
            data = f.read()
        rng = self.headers.get("Range")
        start, end = 0, len(data)
        status = 200
        fault = srv.faults(rel, rng) if srv.faults else None
        if fault and fault.kind == "redirect":
            self._plain(302, rel, extra={"Location": fault.location}, fault="redirect")
            return
        if rng and fault and fault.kind == "bad_range":
            rng = None
            status = 206
        if rng and not (fault and fault.kind == "no_range"):
            m = _RANGE.match(rng)
            if not m or int(m.group(1)) >= len(data):
                self._plain(416, rel, extra={"Content-Range": f"bytes */{len(data)}"})
                return
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            status = 206
        if fault and fault.kind == "status":
            self._plain(fault.status, rel, fault="status")
            return
        body = data[start:end]
        if fault and fault.kind == "flip" and body:
            i = min(fault.at, len(body) - 1)
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        sent = len(body)
        if fault and fault.kind in ("cut", "stall"):
            sent = min(fault.at, len(body))
            body = body[:sent]
        srv.record(Logged(rel, self.headers.get("Range"), status, sent, fault.kind if fault else None,
                          self.headers.get("User-Agent")))
        try:
            if fault and fault.kind == "drip":
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(fault.seconds)
            else:
                self.wfile.write(body)
            self.wfile.flush()
            if fault and fault.kind == "stall":
                time.sleep(fault.seconds)
            if fault and fault.kind in ("cut", "stall"):
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _plain(self, status: int, rel: str, *, extra: dict | None = None, fault: str | None = None) -> None:
        body = f"{status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        # recorded before the answer goes out: a client that has its answer finds the request in the log
        self.server.record(Logged(rel, self.headers.get("Range"), status, 0, fault, self.headers.get("User-Agent")))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: str
    faults = None

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up on a stalled or cut transfer: expected here

    def record(self, entry: Logged) -> None:
        with self.lock:
            self.log.append(entry)


class FeedServer:
    """``with FeedServer(root) as srv: srv.url("manifest.json")``."""

    def __init__(self, root: str | os.PathLike[str], faults=None) -> None:
        self._srv = _Server(("127.0.0.1", 0), _Handler)
        self._srv.root = os.fspath(root)
        self._srv.faults = faults
        self._srv.lock = threading.Lock()
        self._srv.log = []
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def log(self) -> list[Logged]:
        with self._srv.lock:
            return list(self._srv.log)

    def clear_log(self) -> None:
        with self._srv.lock:
            self._srv.log.clear()

    def set_faults(self, faults) -> None:
        self._srv.faults = faults

    @property
    def base(self) -> str:
        host, port = self._srv.server_address[:2]
        return f"http://{host}:{port}/"

    def url(self, name: str) -> str:
        return self.base + name

    def __enter__(self) -> FeedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(5)
