"""A Hugging Face Hub on 127.0.0.1 that speaks the file protocol `huggingface_hub.hf_hub_download` uses.

Point a process at it with HF_ENDPOINT=server.endpoint. What it answers (as huggingface.co does,
read from huggingface_hub 2.4's file_download.py and utils/_http.py):

    HEAD|GET /{org}/{name}/resolve/{revision}/{filename}
        revision: a branch or a 40-hex commit (URL-quoted by the client)
        small file:  200, ETag (the git blob sha1), X-Repo-Commit, Content-Length; GET: the bytes
        LFS file (*.safetensors, *.bin):  302 to a "CDN" on another origin (http://localhost:PORT,
            so the client stops following there, as it does for a signed CDN URL) with
            X-Linked-Etag (the sha256), X-Linked-Size, X-Repo-Commit
        no such repo: 404 X-Error-Code: RepoNotFound; no such revision: 404 RevisionNotFound;
        no such file: 404 EntryNotFound with X-Repo-Commit (the client caches the absence)
    GET /cdn/{sha256}   the LFS bytes, Content-Length
    a repo added with drop=True: the connection is closed without an answer (a flaky proxy)

Every request is recorded as (method, path) in `requests`; `files_requested(repo_id)` says which
of a repo's files were asked about or transferred.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


class _Repo:
    def __init__(self, files: dict[str, bytes], branch: str, drop: bool):
        self.files = files
        self.commit = hashlib.sha1(b"".join(hashlib.sha256(name.encode() + data).digest()
                                            for name, data in sorted(files.items()))).hexdigest()
        self.branches = {branch: self.commit}
        self.drop = drop


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """A loopback Hub: `with HubServer() as hub: hub.add_repo("org/name", folder)`."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, tuple[str, str]] = {}  # sha256 → (repo id, filename)
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_repo(self, repo_id: str, folder: Path | None = None, *, branch: str = "main", drop: bool = False) -> str:
        """Serve every file under `folder` as the repo's one commit (returned: 40 hex)."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()} if folder else {}
        repo = _Repo(files, branch, drop)
        self.repos[repo_id] = repo
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(data).hexdigest()] = (repo_id, name)
        return repo.commit

    def commit(self, repo_id: str) -> str:
        return self.repos[repo_id].commit

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def files_requested(self, repo_id: str) -> set[str]:
        """The repo's files that any request named (resolve) or fetched (CDN)."""
        names = set()
        for _, path in self.requests:
            if path.startswith(f"/{repo_id}/resolve/"):
                names.add(path.split("/resolve/", 1)[1].split("/", 1)[1])
            elif path.startswith("/cdn/") and self.blobs.get(path[len("/cdn/"):], (None,))[0] == repo_id:
                names.add(self.blobs[path[len("/cdn/"):]][1])
        return names

    def start(self) -> HubServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the protocol --------------------------------------------------------------------------
    def _answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = urlsplit(h.path).path
        self.requests.append((h.command, path))
        if path.startswith("/cdn/"):
            owner = self.blobs.get(path[len("/cdn/"):])
            if owner is None:
                return _send(h, 404, {}, b"", body)
            data = self.repos[owner[0]].files[owner[1]]
            return _send(h, 200, {"Content-Type": "application/octet-stream"}, data, body)
        if "/resolve/" not in path:
            return _send(h, 404, {}, b"", body)
        repo_id, rest = path.lstrip("/").split("/resolve/", 1)
        revision, _, filename = rest.partition("/")
        revision = unquote(revision)
        repo = self.repos.get(repo_id)
        if repo is None:
            return _send(h, 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"", body)
        if repo.drop:
            h.close_connection = True
            return  # no status line at all: the client sees the connection closed under it
        commit = repo.branches.get(revision, revision if revision == repo.commit else None)
        if commit is None:
            return _send(h, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"", body)
        data = repo.files.get(filename)
        if data is None:
            return _send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit}, b"", body)
        if filename.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            host = f"http://localhost:{self.port}"  # another origin than 127.0.0.1: a CDN to the client
            return _send(h, 302, {"Location": f"{host}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                  "X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'}, b"", body)
        return _send(h, 200, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit, "Content-Type": "application/octet-stream"},
                     data, body)


def _send(h: BaseHTTPRequestHandler, status: int, headers: dict, data: bytes, body: bool) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if body and data:
        h.wfile.write(data)
