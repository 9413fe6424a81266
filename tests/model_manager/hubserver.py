"""A local HTTP server that serves hub-layout repositories the way the Hugging Face Hub API does, for offline tests."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import json
import re
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


@dataclasses.dataclass
class Repo:
    """One repository: commits (sha -> {path: bytes}) and refs (name -> sha)."""

    commits: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)
    refs: dict[str, str] = dataclasses.field(default_factory=dict)

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        digest = hashlib.sha1(usedforsecurity=False)
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        digest.update(str(len(self.commits)).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha


@dataclasses.dataclass
class Cut:
    """Send `at` bytes of `path`, then drop the connection; answer the next `fail_after` requests with HTTP 503."""

    path: str
    at: int
    fail_after: int = 1


@dataclasses.dataclass
class Stall:
    """Send `at` bytes of `path`, set `reached`, then wait for `release` before sending the rest."""

    path: str
    at: int
    reached: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under `folder` as {relative path: bytes}."""
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class HubServer:
    """Serves repositories on 127.0.0.1 (port 0); `url` is the HF_ENDPOINT value. Thread-safe controls for tests."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.corrupt: set[tuple[str, str]] = set()
        self.cuts: list[Cut] = []
        self.stalls: list[Stall] = []
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        self._connections: set[Any] = set()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner._connections.add(self.connection)

            def finish(self) -> None:
                with owner.lock:
                    owner._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                owner._handle(self, head=False)

            def do_HEAD(self) -> None:
                owner._handle(self, head=True)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops serving and closes the socket: the Hub becomes unreachable."""
        for stall in self.stalls:
            stall.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        # Keep-alive connections would go on answering: close them, as a vanished Hub would.
        with self.lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def ranges(self, path_suffix: str) -> list[str]:
        """Range headers of GET requests for files ending in `path_suffix`."""
        with self.lock:
            return [r for m, p, r in self.requests if m == "GET" and p.endswith(path_suffix)]

    # ---- request handling --------------------------------------------------------------------

    def _error(self, h: http.server.BaseHTTPRequestHandler, status: int, code: str = "") -> None:
        body = json.dumps({"error": code or "error"}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _lookup(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo.refs.get(rev, rev)
        files = repo.commits.get(sha)
        return (sha, files) if files is not None else None

    def _handle(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        url = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(url.path)
        with self.lock:
            self.requests.append((h.command, path, h.headers.get("Range", "")))
        info = _INFO.match(path)
        if info:
            repo_id, rev = info["repo"], info["rev"]
            if repo_id not in self.repos:
                return self._error(h, 404, "RepoNotFound")
            found = self._lookup(repo_id, rev)
            if found is None:
                return self._error(h, 404, "RevisionNotFound")
            sha, files = found
            siblings = []
            for name, data in sorted(files.items()):
                sib: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                if is_lfs(name):
                    sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append(sib)
            body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings}).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return None
        resolve = _RESOLVE.match(path)
        if not resolve:
            return self._error(h, 404, "EntryNotFound")
        found = self._lookup(resolve["repo"], resolve["rev"])
        if found is None:
            return self._error(h, 404, "RevisionNotFound")
        sha, files = found
        name = resolve["path"]
        if name not in files:
            return self._error(h, 404, "EntryNotFound")
        data = files[name]
        if (resolve["repo"], name) in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return self._send_file(h, head, name, sha, data)

    def _send_file(self, h: http.server.BaseHTTPRequestHandler, head: bool, name: str, sha: str, data: bytes) -> None:
        with self.lock:
            for cut in self.cuts:
                if cut.path == name and cut.at < 0 and cut.fail_after > 0 and not head:
                    cut.fail_after -= 1
                    return self._error(h, 503)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("X-Repo-Commit", sha)
        etag = hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_id(data)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return None
        at = -1
        with self.lock:
            stall = next((s for s in self.stalls if s.path == name and not s.reached.is_set()), None)
            for c in self.cuts:
                if c.path == name and c.at >= 0:
                    # Later requests for this file fail with 503 (`at` < 0 marks the cut as spent).
                    c.at, at = -1, c.at
                    break
        if at >= 0:
            h.wfile.write(body[:at])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return None
        if stall is not None:
            h.wfile.write(body[: stall.at])
            h.wfile.flush()
            stall.reached.set()
            stall.release.wait()
            body = body[stall.at :]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            h.wfile.write(body)
        return None
