"""A loopback HTTP file server for download tests (127.0.0.1, ephemeral port, one thread per connection).

Files are registered by URL path. Query flags change how a request is answered:

    cut=N       send the full Content-Length but close the connection after N body bytes (first request only)
    corrupt=1   flip one byte of the body (every request)
    slow=S      send the body in 16 KiB pieces with S seconds between them
    error=CODE  answer CODE (e.g. 500, 429) to the first request, then serve normally
    norange=1   ignore Range headers (always answer 200 with the whole file)

"First request only" is tracked per path+query, so a test uses a fresh query string to get a fresh fault. Paths
that are not registered answer 404. Every request is recorded in ``server.requests``.
"""
from __future__ import annotations

import hashlib
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

REPO_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # sent as X-Repo-Commit, for the Hugging Face protocol


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # idle keep-alive connections go away instead of pinning a thread
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        parts = urlsplit(self.path)
        flags = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        owner: FileServer = self.server.owner
        first = owner._first_time(self.path, self.command)
        owner._record(self.command, parts.path, parts.query, self.headers.get("Range"))

        data = owner.files.get(parts.path)
        if data is None:
            return self._status(404, "Not Found", body)
        if "error" in flags and first:
            return self._status(int(flags["error"]), "Injected Error", body)
        if flags.get("corrupt"):
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)

        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        start, end, status = 0, len(data), 200
        wanted = self.headers.get("Range")
        if wanted and not flags.get("norange"):
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range == etag:
                spec = wanted.split("=", 1)[1].split(",")[0].strip()
                lo, _, hi = spec.partition("-")
                start = int(lo) if lo else max(0, len(data) - int(hi))
                end = min(len(data), int(hi) + 1) if lo and hi else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", REPO_COMMIT)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return

        payload = memoryview(data)[start:end]
        cut = int(flags["cut"]) if "cut" in flags and first else None
        if cut is not None:
            payload = payload[:cut]
        delay = float(flags.get("slow", 0))
        step = 16 * 1024 if delay else len(payload) or 1
        for i in range(0, len(payload), step):
            self.wfile.write(payload[i:i + step])
            if delay:
                self.wfile.flush()
                time.sleep(delay)
        self.wfile.flush()
        if cut is not None:
            # Drop the connection with the body unfinished, as a network cut would.
            self.close_connection = True
            self.connection.shutdown(2)

    def _status(self, code: int, reason: str, body: bool) -> None:
        text = f"{code} {reason}\n".encode()
        self.send_response(code, reason)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if body:
            self.wfile.write(text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FileServer"

    def handle_error(self, request, client_address):
        # A client that gives up mid-body (a timeout test) is expected; anything else is reported as usual.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FileServer:
    """Serve ``files`` ({url path: bytes}) on 127.0.0.1 from a background thread; use as a context manager."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[dict] = []
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "FileServer":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="FileServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _first_time(self, key: str, method: str) -> bool:
        # HEAD requests do not consume a one-shot fault.
        if method != "GET":
            return (key, method) not in self._seen
        with self._lock:
            new = (key, method) not in self._seen
            self._seen.add((key, method))
            return new

    def _record(self, method: str, path: str, query: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "query": query, "range": range_header})

    def gets(self, path: str, *, full: bool | None = None) -> list[dict]:
        """Recorded GETs of ``path``; ``full=True`` keeps those without a Range header, ``False`` those with one."""
        with self._lock:
            hits = [r for r in self.requests if r["method"] == "GET" and r["path"] == path]
        if full is None:
            return hits
        return [r for r in hits if (r["range"] is None) == full]
