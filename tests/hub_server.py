"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for upload tests through huggingface_hub's
real HTTP client (point it here with `HfApi(endpoint=hub.url)` or `push_to_hub(..., endpoint=hub.url)`).

It implements exactly the endpoints that `create_repo`, `create_branch`, `model_info` and `create_commit`
(README validation, preupload, NDJSON commit) of huggingface_hub 2.x call, plus GET of a file
(`/{repo}/resolve/{revision}/{path}`):

    POST /api/repos/create                       {"name", "organization", "visibility"?}
    POST /api/validate-yaml                      {"content", "repoType"}
    POST /api/models/{repo}/branch/{branch}      {"startingPoint"?}
    GET  /api/models/{repo}[/revision/{rev}]
    POST /api/models/{repo}/preupload/{rev}      {"files": [{"path", "sample", "size"}]}
    POST /api/models/{repo}/commit/{rev}         NDJSON: header, then {"key": "file", "value": {path, content, encoding}}
    GET  /{repo}/resolve/{rev}/{path}

Every file is declared "regular" at preupload, so the client sends its content inline (base64) in the
commit; the LFS/Xet transfer the real Hub uses for large files is not implemented. A new repo gets an
initial commit holding `.gitattributes`, as on the Hub. A commit is applied all at once or not at all;
`fail_commits` makes the next commit calls fail (HTTP 500) after reading their payload.
Errors carry the `X-Error-Code` header the client maps to its exception types (RepoNotFound, ...).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]  # the whole tree after this commit
    added: dict[str, bytes]  # what this commit wrote


@dataclass
class Repo:
    repo_id: str
    private: bool
    visibility: str | None
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def tree(self, revision: str) -> dict[str, bytes]:
        oid = self.branches.get(revision, revision)
        return self.commits[oid].files

    def history(self, branch: str = "main") -> list[Commit]:
        """Commits reachable from `branch`, newest first."""
        out, oid = [], self.branches.get(branch)
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class LocalHub:
    """The server's state and its thread. Use as a context manager, or call `start()` / `stop()`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict[str, Any]] = []  # method, path, query, headers, json (when JSON)
        self.fail_commits = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- state helpers for tests ---------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> Repo:
        """A repo that already exists (e.g. a verifier), with `files` in its first commit."""
        with self.lock:
            repo = self._create(repo_id, "private" if private else None)
            if files:
                self._commit(repo, "main", "add files", "", dict(files))
            return repo

    def requests_to(self, fragment: str, method: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.requests if fragment in r["path"] and (method is None or r["method"] == method)]

    # -- repo operations (called with the lock held) ---------------------------------------------------
    def _new_oid(self) -> str:
        self._counter += 1
        return hashlib.sha1(f"commit-{self._counter}".encode()).hexdigest()

    def _create(self, repo_id: str, visibility: str | None) -> Repo:
        repo = Repo(repo_id, private=visibility == "private", visibility=visibility)
        oid = self._new_oid()
        files = {".gitattributes": GITATTRIBUTES}
        repo.commits[oid] = Commit(oid, None, "initial commit", "", dict(files), dict(files))
        repo.branches["main"] = oid
        self.repos[repo_id] = repo
        return repo

    def _commit(self, repo: Repo, branch: str, message: str, description: str, added: dict[str, bytes]) -> Commit:
        parent = repo.branches[branch]
        oid = self._new_oid()
        commit = Commit(oid, parent, message, description, {**repo.commits[parent].files, **added}, added)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _branch(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- endpoints --------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self.lock:
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                if method == "GET" and not rest:
                    return self._model_info(repo_id, "main")
                if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    return self._model_info(repo_id, rest[1])
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._create_branch(repo_id, rest[1], json.loads(body or b"{}"))
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._preupload(repo_id, rest[1], json.loads(body))
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit_endpoint(repo_id, rest[1], query, body)
            if method == "GET" and len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo(f"{parts[0]}/{parts[1]}")
                tree = repo.tree(self._branch(repo, parts[3]))
                name = "/".join(parts[4:])
                if name not in tree:
                    raise HubError(404, f"Entry not found: {name}", "EntryNotFound")
                return 200, tree[name]
        raise HubError(404, f"no endpoint {method} {path} in the local test Hub")

    def _create_repo(self, payload: dict[str, Any]) -> tuple[int, Any]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self._create(repo_id, payload.get("visibility"))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _validate_yaml(self, payload: dict[str, Any]) -> tuple[int, Any]:
        content = payload["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content[4 : content.index("\n---", 3)])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except (ValueError, yaml.YAMLError) as err:
                errors.append({"message": f"invalid YAML: {err}"})
        if errors:
            return 400, {"errors": errors, "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _model_info(self, repo_id: str, revision: str) -> tuple[int, Any]:
        repo = self._repo(repo_id)
        oid = repo.branches[self._branch(repo, revision)]
        files = repo.commits[oid].files
        card_data = None
        readme = files.get("README.md", b"").decode()
        if readme.startswith("---\n"):
            card_data = yaml.safe_load(readme[4 : readme.index("\n---", 3)])
        return 200, {
            "id": repo_id,
            "modelId": repo_id,
            "sha": oid,
            "private": repo.private,
            "siblings": [{"rfilename": name} for name in sorted(files)],
            "cardData": card_data,
            "tags": [],
        }

    def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> tuple[int, Any]:
        repo = self._repo(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = repo.branches.get(start, start)
        return 200, {}

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> tuple[int, Any]:
        repo = self._repo(repo_id)
        branch = self._branch(repo, revision)
        tree = repo.tree(branch)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(tree[f["path"]]) if f["path"] in tree else None,
            }
            for f in payload["files"]
        ]
        return 200, {"files": files, "commitOid": repo.branches[branch]}

    def _commit_endpoint(
        self, repo_id: str, revision: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, Any]:
        repo = self._repo(repo_id)
        branch = self._branch(repo, revision)
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not implemented by the local test Hub")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            if self.fail_commits:  # fail part-way through the operations: nothing may be applied
                self.fail_commits -= 1
                raise HubError(500, "Internal Error - simulated failure while applying the commit")
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                raise HubError(400, f"unsupported commit operation {line['key']!r} (this test Hub takes inline files)")
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        if "parentCommit" in header and header["parentCommit"] != repo.branches[branch]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self._commit(repo, branch, header["summary"], header.get("description", ""), added)
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "success": True}


class _Handler(BaseHTTPRequestHandler):
    state: LocalHub
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads to stop
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record: dict[str, Any] = {
            "method": self.command,
            "path": unquote(split.path),
            "query": parse_qs(split.query),
            "headers": dict(self.headers.items()),
            "body": body,
        }
        if "json" in (self.headers.get("Content-Type") or ""):
            with contextlib.suppress(ValueError):
                record["json"] = json.loads(body)
        self.state.requests.append(record)
        try:
            status, payload = self.state.handle(self.command, split.path, record["query"], body)
            headers: dict[str, str] = {}
        except HubError as err:
            status, payload = err.status, {"error": err.message, **err.extra}
            headers = {"X-Error-Code": err.code} if err.code else {}
            headers["X-Error-Message"] = err.message
        except Exception as err:  # a bug in this server: report it to the client, not as a hang
            status, payload, headers = 500, {"error": f"test hub crashed: {err!r}"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        )
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _serve
