"""A Hub-shaped HTTP server on 127.0.0.1, and the fixture that points huggingface_hub at it.

It answers what huggingface_hub 2.4 asks of the Hub: the model API
(``/api/models/{repo}/revision/{rev}``, ``/api/models/{repo}/tree/{rev}``) and file
resolution (``/{repo}/resolve/{rev}/{file}``, HEAD and GET with ``Range``) with the
headers it reads (``ETag``, ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``,
``X-Error-Code``). Files may be sparse: a header followed by zeros up to any size, so a
405B checkpoint is a few kilobytes of headers here. The server counts the body bytes it
sends, and the fixture refuses any connection that would leave the loopback address.

    def test_something(hub):
        hub.add("org/model", {"config.json": b"{...}"})
        devicemap.plan("org/model", ...)
"""

import hashlib
import importlib
import json
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import huggingface_hub.utils._http
import pytest


@dataclass(frozen=True)
class HubFile:
    """A file's leading bytes, then zeros up to ``size_bytes``."""

    head: bytes
    size_bytes: int

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` inclusive."""
        stop = min(end + 1, self.size_bytes)
        return self.head[start:stop] + bytes(max(0, stop - max(start, len(self.head))))

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.head + str(self.size_bytes).encode()).hexdigest()


def as_file(content: bytes | HubFile) -> HubFile:
    return content if isinstance(content, HubFile) else HubFile(content, len(content))


@dataclass
class HubRepo:
    """A model repository: its files at each commit, branch and tag names for commits, and who may read it."""

    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def commit_of(self, revision: str) -> str | None:
        return revision if revision in self.commits else self.refs.get(revision)


@dataclass
class HubServer:
    """The repositories served, and a log of what was asked and how many body bytes went out."""

    url: str = ""
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    served_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self, repo_id: str, files: Mapping[str, bytes | HubFile], revision: str = "main", token: str | None = None
    ) -> str:
        """Serve ``files`` as ``repo_id`` at a new commit that ``revision`` names; returns the commit's hash."""
        repo = self.repos.setdefault(repo_id, HubRepo(token=token))
        commit = hashlib.sha1(f"{repo_id}@{revision}#{len(repo.commits)}".encode()).hexdigest()
        repo.commits[commit] = {name: as_file(content) for name, content in files.items()}
        repo.refs[revision] = commit
        return commit


_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)")
_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<revision>[^/?]+)")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((self.command, unquote(path)))
            if match := _RESOLVE.fullmatch(path):
                return self._file(match, send_body)
            if match := _API.fullmatch(path):
                return self._api(match)
            self._error(404, "RepoNotFound")

        def _repo_at(self, match: re.Match) -> tuple[HubRepo, str] | None:
            repo = hub.repos.get(match["repo"])
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            if repo.token is not None and self.headers.get("authorization") != f"Bearer {repo.token}":
                self._error(403, "GatedRepo")
                return None
            commit = repo.commit_of(unquote(match["revision"]))
            if commit is None:
                self._error(404, "RevisionNotFound")
                return None
            return repo, commit

        def _file(self, match: re.Match, send_body: bool) -> None:
            found = self._repo_at(match)
            if found is None:
                return
            repo, commit = found
            file = repo.commits[commit].get(unquote(match["file"]))
            if file is None:
                return self._error(404, "EntryNotFound", commit)
            start, end, status = 0, file.size_bytes - 1, 200
            if ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", "")):
                start = int(ranged[1])
                end = min(int(ranged[2]) if ranged[2] else end, end)
                status = 206
            body = file.read(start, end)
            self.send_response(status)
            self.send_header("ETag", f'"{file.etag}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{file.size_bytes}")
            self.end_headers()
            if send_body:
                self.wfile.write(body)
                with hub.lock:
                    hub.served_bytes += len(body)

        def _api(self, match: re.Match) -> None:
            found = self._repo_at(match)
            if found is None:
                return
            repo, commit = found
            files = repo.commits[commit]
            if match["kind"] == "revision":
                siblings = [{"rfilename": name} for name in files]
                payload = {"id": match["repo"], "sha": commit, "private": False, "siblings": siblings}
            else:
                payload = [
                    {"type": "file", "path": name, "size": file.size_bytes, "oid": file.etag[:40]}
                    for name, file in files.items()
                ]
            self._json(payload)

        def _json(self, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with hub.lock:
                hub.served_bytes += len(body)

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A loopback Hub with an empty cache of its own; huggingface_hub points at it through HF_ENDPOINT.

    huggingface_hub reads its environment once, at import, so the fixture reloads its
    constants after setting the variables (and again after restoring them), as a fresh
    process would read them.
    """
    served = HubServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name, value in hub_environment(served.url, tmp_path / "hf-home").items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    outside = _refuse_connections_off_loopback(monkeypatch)
    importlib.reload(huggingface_hub.constants)
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
    assert not outside, f"connections that would have left the loopback address: {outside}"


def hub_environment(url: str, home: Path) -> dict[str, str]:
    """What points huggingface_hub at the loopback Hub with a cache of its own, telemetry off."""
    return {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """Switch HF_HUB_OFFLINE, and have huggingface_hub read it again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    importlib.reload(huggingface_hub.constants)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def point_at_a_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point HF_ENDPOINT at a loopback port nobody listens on, online, without huggingface_hub's retry waits."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    set_offline(monkeypatch, offline=False)
    # huggingface_hub retries a refused connection five times over 24 s; the test keeps the retries, not the waits.
    monkeypatch.setattr(huggingface_hub.utils._http, "time", SimpleNamespace(sleep=lambda seconds: None))


def _refuse_connections_off_loopback(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make sockets refuse to look up or connect to anything but the loopback address; what was tried is listed."""
    tried = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def loopback_names_only(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            tried.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"test Hub: refusing to look up {host}")
        return getaddrinfo(host, *args, **kwargs)

    def loopback_only(sock: socket.socket, address) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
            tried.append(address)
            raise ConnectionRefusedError(f"test Hub: refusing to connect to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(socket, "getaddrinfo", loopback_names_only)
    return tried
