"""A tiny Hugging Face Hub on loopback: the endpoints huggingface_hub uses to download.

Repos are dicts of files per revision; every request is recorded so tests can assert what
was (and was not) fetched. One file can be made "flaky": its first download is cut off
1 MB before its end, to test that the download resumes with a Range request.

It also fails the ways networks do: `fault` applies to every request ("hang": accept and
never answer; "status:503" etc.; "html": a captive portal's 200 page, "html:403" a proxy's
refusal page), `file_faults` to the
downloads of single files ("reset" mid-file, "stall" mid-file). `closed_port()` gives a port
that refuses connections; an https:// URL to this plain-HTTP server is a TLS failure.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    revisions: dict[str, dict[str, bytes]]  # commit sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.revisions:
            return revision
        return self.refs.get(revision)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def commit_sha(files: dict[str, bytes]) -> str:
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + hashlib.sha1(files[name]).digest())
    return h.hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.flaky: set[str] = set()  # "repo/path" cut off once, 1 MB before the end
        self.fault: str | None = None  # for every request: "hang", "html", "status:<code>"
        self.file_faults: dict[str, str] = {}  # "repo/path" -> "reset" | "stall", at half the file
        self._release = threading.Event()  # ends hanging and stalled answers at shutdown
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        sha = commit_sha(files)
        entry = self.repos.setdefault(repo, Repo({}))
        entry.revisions[sha] = files
        entry.refs[ref] = sha
        return sha

    def downloads(self, repo: str) -> list[str]:
        """Paths of `repo` whose content was requested (GET on resolve/)."""
        prefix = f"/{repo}/resolve/"
        return [p[len(prefix) :].split("/", 1)[1] for m, p, _ in self.requests if m == "GET" and p.startswith(prefix)]

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(
                self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
            ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj: object) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def _error(self, code: str, status: int = 404) -> None:
                self._send(
                    status,
                    json.dumps({"error": code}).encode(),
                    {"X-Error-Code": code, "Content-Type": "application/json"},
                )

            def do_HEAD(self) -> None:
                self._route(head=True)

            def do_GET(self) -> None:
                self._route(head=False)

            def _route(self, head: bool) -> None:
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.requests.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
                self.blobs = "blobs=true" in url.query.lower()
                if hub.fault == "hang":
                    hub._release.wait(120)
                    self.close_connection = True
                    return
                if hub.fault and hub.fault.startswith("html"):  # "html" (200) or "html:<status>"
                    page = b"<!doctype html><html><body><h1>Welcome to Airport Wi-Fi</h1>Please log in.</body></html>"
                    status = int(hub.fault.split(":")[1]) if ":" in hub.fault else 200
                    return self._send(status, page, {"Content-Type": "text/html; charset=utf-8"}, head)
                if hub.fault and hub.fault.startswith("status:"):
                    status = int(hub.fault.split(":")[1])
                    extra = {"Retry-After": "1"} if status == 429 else {}
                    return self._send(status, b"upstream unavailable", {"Content-Type": "text/plain", **extra}, head)
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
                if m:
                    return self._info(m[1], m[2] or "main")
                m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
                if m:
                    return self._tree(m[1], m[2])
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._file(m[1], m[2], m[3], head)
                self._error("EntryNotFound")

            def _repo(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
                entry = hub.repos.get(repo)
                if entry is None:
                    self._error("RepoNotFound", 401)
                    return None
                sha = entry.resolve(revision)
                if sha is None:
                    self._error("RevisionNotFound")
                    return None
                return sha, entry.revisions[sha]

            def _info(self, repo: str, revision: str) -> None:
                found = self._repo(repo, revision)
                if found:
                    sha, files = found
                    self._json(
                        {
                            "id": repo,
                            "modelId": repo,
                            "sha": sha,
                            "private": False,
                            "siblings": [
                                {"rfilename": f, **({"size": len(b)} if self.blobs else {})} for f, b in files.items()
                            ],
                        }
                    )

            def _tree(self, repo: str, revision: str) -> None:
                found = self._repo(repo, revision)
                if found:
                    _, files = found
                    self._json(
                        [
                            {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for f, b in files.items()
                        ]
                    )

            def _file(self, repo: str, revision: str, name: str, head: bool) -> None:
                found = self._repo(repo, revision)
                if not found:
                    return
                sha, files = found
                if name not in files:
                    return self._error("EntryNotFound")
                data = files[name]
                headers = {
                    "X-Repo-Commit": sha,
                    "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                }
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(re.match(r"bytes=(\d+)-", rng)[1])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                headers["Content-Length"] = str(len(data) - start)
                key = f"{repo}/{name}"
                fault = hub.file_faults.get(key) if not head else None
                if fault:
                    return self._broken(headers, data[start:], fault)
                if key in hub.flaky and not head:
                    hub.flaky.discard(key)  # cut this download off near its end, once
                    self.send_response(200)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data[: max(len(data) - (1 << 20), 0)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(206 if start else 200, data[start:], headers, head)

            def _broken(self, headers: dict[str, str], body: bytes, fault: str) -> None:
                """Half of the body, then a reset connection or silence."""
                self.send_response(206 if "Content-Range" in headers else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                if fault == "stall":
                    hub._release.wait(120)
                else:  # an RST instead of a FIN, once the client has read what was sent
                    time.sleep(0.5)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

        return Handler


def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
