"""A fault-injecting HTTP proxy for S3 on 127.0.0.1 (in front of the moto server).

The code under test talks to ``FaultProxy.url`` as its ``endpoint_url``; requests are
forwarded unchanged (Host header included, so SigV4 signatures stay valid) to the
upstream server unless a :class:`Rule` matches. Rules inject what real S3 and real
networks do:

* ``error``          answer an S3 XML error (default ``503 SlowDown``) without forwarding
* ``reset``          reset the TCP connection as soon as the request head arrived
* ``drop_mid_body``  read part of the request body, then reset the connection
* ``drop_response``  forward the request (the server applies it), then reset the
                     connection instead of relaying the answer
* ``hold``           park the request until released, then reset it (never forwarded)
* ``down``           from this request on, refuse new connections (listener closed) and
                     reset every request on open ones, until :meth:`FaultProxy.heal`

A rule matches on the S3 operation (``UploadPart``, ``PutObject``...), optionally a key
suffix and an arbitrary predicate; ``skip`` lets the first N matching requests through,
``count`` limits how many it fires and ``fraction`` fires on a seeded random share of
the matches. Every request is logged (operation, key, action) for assertions.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from .netutil import LOOPBACK

ACTIONS = ("error", "reset", "drop_mid_body", "drop_response", "hold", "down")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te"}


@dataclass
class Request:
    """What the proxy knows about one request when rules are matched."""

    method: str
    target: str
    headers: dict[str, str]
    path: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)
    bucket: str = ""
    key: str = ""
    op: str = ""

    @classmethod
    def parse(cls, method: str, target: str, headers: dict[str, str]) -> Request:
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True)
        path = unquote(parts.path)
        segments = path.lstrip("/").split("/", 1)
        bucket = segments[0] if segments and segments[0] else ""
        key = segments[1] if len(segments) > 1 else ""
        req = cls(method, target, headers, path, query, bucket, key)
        req.op = classify(req)
        return req


def classify(req: Request) -> str:
    """The S3 operation of a path-style request (enough for the engine's calls)."""
    q, m = req.query, req.method
    if req.path.startswith("/moto-api"):
        return "MotoApi"
    if not req.bucket:
        return "ListBuckets"
    if not req.key:
        if m == "HEAD":
            return "HeadBucket"
        if m == "GET" and "uploads" in q:
            return "ListMultipartUploads"
        if m == "GET":
            return "ListObjects"
        if m == "POST" and "delete" in q:
            return "DeleteObjects"
        if m == "PUT":
            return "CreateBucket"
        return "Bucket" + m.title()
    if "uploadId" in q:
        if m == "PUT":
            return "UploadPart"
        if m == "POST":
            return "CompleteMultipartUpload"
        if m == "DELETE":
            return "AbortMultipartUpload"
        return "ListParts"
    if m == "POST" and "uploads" in q:
        return "CreateMultipartUpload"
    return {
        "PUT": "PutObject",
        "GET": "GetObject",
        "HEAD": "HeadObject",
        "DELETE": "DeleteObject",
    }.get(m, "Object" + m.title())


class Rule:
    """One fault: ``action`` on matching requests (see the module docstring)."""

    def __init__(
        self,
        action: str,
        ops: Iterable[str] | None = None,
        key_suffix: str | None = None,
        match: Callable[[Request], bool] | None = None,
        skip: int = 0,
        count: int | None = None,
        fraction: float | None = None,
        seed: int = 0,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "Please reduce your request rate.",
        body_fraction: float = 0.5,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        self.action = action
        self.ops = set(ops) if ops else None
        self.key_suffix = key_suffix
        self.match = match
        self.skip = skip
        self.count = count
        self.fraction = fraction
        self.rng = random.Random(seed)
        self.status = status
        self.code = code
        self.message = message
        self.body_fraction = body_fraction
        self.seen = 0  # matching requests
        self.fired = 0  # faults injected
        self.released = threading.Event()
        self._lock = threading.Lock()

    def applies(self, req: Request) -> bool:
        """True when this rule fires for ``req`` (updates the rule's counters)."""
        if self.ops is not None and req.op not in self.ops:
            return False
        if self.key_suffix is not None and not req.key.endswith(self.key_suffix):
            return False
        if self.match is not None and not self.match(req):
            return False
        with self._lock:
            self.seen += 1
            if self.seen <= self.skip:
                return False
            if self.count is not None and self.fired >= self.count:
                return False
            if self.fraction is not None and self.rng.random() >= self.fraction:
                return False
            self.fired += 1
            return True

    def release(self) -> None:
        """Let parked (``hold``) requests go (they are reset, never forwarded)."""
        self.released.set()

    def __repr__(self) -> str:
        return f"Rule({self.action}, ops={self.ops}, seen={self.seen}, fired={self.fired})"


@dataclass
class LogEntry:
    op: str
    method: str
    key: str
    action: str  # "forwarded" or the injected fault
    status: int | None = None
    at: float = field(default_factory=time.monotonic)


class _Reset(Exception):
    """Abort the client connection with a TCP reset."""


class FaultProxy:
    """Threaded reverse proxy ``127.0.0.1:port`` -> ``upstream``, with fault rules."""

    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = LOOPBACK
        self.port = port
        self.rules: list[Rule] = []
        self.log: list[LogEntry] = []
        self.held = 0  # requests parked by ``hold`` right now
        self._down = False
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._stopped = False
        self._listen()
        return self

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True)
        self._accept_thread.start()

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None

    def stop(self) -> None:
        """Close the listener and every open connection; release parked requests."""
        self._stopped = True
        for rule in list(self.rules):
            rule.release()
        self._close_listener()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _reset(conn)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    def add(self, action: str, **kwargs: object) -> Rule:
        """Add a rule (first matching rule wins); see :class:`Rule`."""
        rule = Rule(action, **kwargs)  # type: ignore[arg-type]
        with self._lock:
            self.rules.append(rule)
        return rule

    def down(self) -> None:
        """Refuse new connections and reset requests on open ones (an outage)."""
        self._down = True
        self._close_listener()

    def heal(self) -> None:
        """Drop every rule, release parked requests, accept connections again."""
        with self._lock:
            rules, self.rules = self.rules, []
        for rule in rules:
            rule.release()
        self._down = False
        if self._listener is None and not self._stopped:
            self._listen()

    def injected(self, action: str | None = None) -> int:
        """How many faults were injected (of ``action``, or of any kind)."""
        return sum(
            1
            for e in self.log
            if e.action != "forwarded" and (action is None or e.action == action)
        )

    def ops(self, action: str = "forwarded") -> Counter[str]:
        """Operations per outcome, e.g. ``proxy.ops()["UploadPart"]``."""
        return Counter(e.op for e in self.log if e.action == action)

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "proxy state"
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what}; log tail: {self.log[-10:]}"
                )
            time.sleep(0.005)

    # ------------------------------------------------------------------ serving
    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _addr = listener.accept()
            except OSError:
                return  # listener closed
            if self._down:
                _reset(conn)
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream: http.client.HTTPConnection | None = None
        reader = conn.makefile("rb")
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                method, target, headers = head
                req = Request.parse(method, target, headers)
                if self._down:
                    self._record(req, "down")
                    raise _Reset()
                rule = self._rule_for(req)
                if rule is not None and rule.action == "down":
                    self._record(req, "down")
                    self.down()
                    raise _Reset()
                if rule is not None and rule.action == "reset":
                    self._record(req, "reset")
                    raise _Reset()
                if rule is not None and rule.action == "hold":
                    self._record(req, "hold")
                    with self._lock:
                        self.held += 1
                    try:
                        while not rule.released.wait(0.05):
                            if self._stopped:
                                break
                    finally:
                        with self._lock:
                            self.held -= 1
                    raise _Reset()
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if rule is not None and rule.action == "drop_mid_body":
                    length = int(headers.get("content-length", "0") or 0)
                    reader.read(int(length * rule.body_fraction))
                    self._record(req, "drop_mid_body")
                    raise _Reset()
                body = _read_body(reader, headers)
                if rule is not None and rule.action == "error":
                    self._record(req, "error", rule.status)
                    _send_error(conn, req, rule)
                    return  # Connection: close was announced
                if upstream is None:
                    upstream = http.client.HTTPConnection(*self.upstream, timeout=300)
                status, reason, resp_headers, resp_body = _forward(upstream, req, body)
                if rule is not None and rule.action == "drop_response":
                    self._record(req, "drop_response", status)
                    raise _Reset()
                self._record(req, "forwarded", status)
                _send_response(conn, method, status, reason, resp_headers, resp_body)
        except _Reset:
            with self._lock:
                self._conns.discard(conn)
            _reset(conn)
            conn = None  # type: ignore[assignment]
        except (OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            reader.close()
            if upstream is not None:
                upstream.close()
            if conn is not None:
                with self._lock:
                    self._conns.discard(conn)
                try:
                    conn.close()
                except OSError:
                    pass

    def _rule_for(self, req: Request) -> Rule | None:
        with self._lock:
            rules = list(self.rules)
        for rule in rules:
            if rule.applies(req):
                return rule
        return None

    def _record(self, req: Request, action: str, status: int | None = None) -> None:
        with self._lock:
            self.log.append(LogEntry(req.op, req.method, req.key, action, status))


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass


def _read_head(reader) -> tuple[str, str, dict[str, str]] | None:  # type: ignore[no-untyped-def]
    line = reader.readline(65537)
    while line in (b"\r\n", b"\n"):
        line = reader.readline(65537)
    if not line:
        return None
    try:
        method, target, _version = line.decode("latin-1").split(" ", 2)
    except ValueError as exc:
        raise ValueError(f"bad request line {line!r}") from exc
    headers: dict[str, str] = {}
    while True:
        raw = reader.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _sep, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    # Keep the original spelling for forwarding: lower-case is fine for HTTP/1.1.
    return method, target, headers


def _read_body(reader, headers: dict[str, str]) -> bytes:  # type: ignore[no-untyped-def]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(reader.read(size))
            reader.readline()
        return b"".join(chunks)
    length = int(headers.get("content-length", "0") or 0)
    data = reader.read(length) if length else b""
    if len(data) != length:
        raise ValueError("client closed mid-body")
    return data


def _forward(
    upstream: http.client.HTTPConnection, req: Request, body: bytes
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    headers = {k: v for k, v in req.headers.items() if k not in _HOP_BY_HOP}
    if body or req.method in ("PUT", "POST"):
        headers["content-length"] = str(len(body))
    upstream.request(req.method, req.target, body=body or None, headers=headers)
    resp = upstream.getresponse()
    data = resp.read()
    return resp.status, resp.reason, resp.getheaders(), data


def _send_response(
    conn: socket.socket,
    method: str,
    status: int,
    reason: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers:
        low = name.lower()
        if low in _HOP_BY_HOP:
            continue
        if low == "content-length" and method != "HEAD":
            continue
        lines.append(f"{name}: {value}")
    if method != "HEAD":
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    conn.sendall(head + (body if method != "HEAD" else b""))


def _send_error(conn: socket.socket, req: Request, rule: Rule) -> None:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{rule.code}</Code><Message>{rule.message}</Message>"
        f"<Resource>{req.path}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    reason = http.client.responses.get(rule.status, "Error")
    head = (
        f"HTTP/1.1 {rule.status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body) if req.method != 'HEAD' else 0}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    conn.sendall(head + (body if req.method != "HEAD" else b""))
