"""A tiny in-memory Hugging Face Hub for tests (standard library only, loopback only).

The real `huggingface_hub` client can create model repos on it, commit to them and download from them.
Repos live in memory: `server.repos[repo_id]` is the list of commits, oldest first, each a dict
path -> bytes holding the whole tree at that commit; `server.shas[repo_id]` holds their commit ids.
A Space is kept under the id "spaces/namespace/name", with its SDK in `server.space_sdks`.

Endpoints (model repos, and Spaces through `/api/spaces/...` for the `/api/models/...` routes; `{repo}` is
"namespace/name", `{rev}` is "main" or a commit id):

    POST      /api/repos/create                       create a repo (409 if it exists)     [token]
    POST      /api/validate-yaml                      accept any model card
    POST      /api/models/{repo}/preupload/{rev}      "regular" upload mode for every file [token]
    POST      /api/models/{repo}/commit/{rev}         ndjson commit: files (base64), deletions [token]
    GET       /api/models/{repo}[/revision/{rev}]     repo info: commit id and file list
    GET       /api/models/{repo}/tree/{rev}[/{path}]  files and folders (?recursive=true)
    HEAD/GET  /{repo}/resolve/{rev}/{path}            a file, with X-Repo-Commit and ETag headers

Write endpoints ([token]) answer 401 without an `Authorization: Bearer <token>` header (or with a
token other than `server.token`). Errors carry the Hub's `X-Error-Code` header (RepoNotFound,
RevisionNotFound, EntryNotFound) so that the client raises its usual exceptions. Any other route
answers 404 with a JSON error and is recorded in `server.unknown_requests`; every request is
recorded in `server.requests` as (method, path).
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"
KIND = r"(?P<kind>models|spaces)"
REV = r"(?P<rev>[^/]+)"
# (method, path pattern, handler method name, needs a token); the first match wins.
ROUTES = [
    ("POST", r"/api/repos/create", "create_repo", True),
    ("POST", r"/api/validate-yaml", "validate_yaml", False),
    ("POST", rf"/api/{KIND}/{REPO}/preupload/{REV}", "preupload", True),
    ("POST", rf"/api/{KIND}/{REPO}/commit/{REV}", "commit", True),
    ("GET", rf"/api/{KIND}/{REPO}/revision/{REV}", "repo_info", False),
    ("GET", rf"/api/{KIND}/{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree", False),
    ("GET", rf"/api/{KIND}/{REPO}", "repo_info", False),
    ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve", False),
    ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve", False),
]


def repo_key(repo: str, kind: str = "models") -> str:
    """Where a repo of the route's kind is kept in `HubServer.repos`: a model under its id, a Space under spaces/."""
    return repo if kind == "models" else f"spaces/{repo}"


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub) gives a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer: status, message, optional X-Error-Code and extra JSON fields."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubServer:
    """The Hub's state and its HTTP server; `start()` serves on 127.0.0.1 in a daemon thread."""

    def __init__(self, token: str | None = "hf_test_token", default_namespace: str = "user"):
        self.token = token  # None: any bearer token is accepted
        self.default_namespace = default_namespace  # for create_repo("name") without a namespace
        self.repos: dict[str, list[dict[str, bytes]]] = {}
        self.shas: dict[str, list[str]] = {}
        self.messages: dict[str, list[str]] = {}
        self.space_sdks: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()  # held by every request handler and by the state helpers
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("BoundHubHandler", (HubHandler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # State helpers, also handy in tests.

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The tree of `repo_id` at `revision`: path -> bytes."""
        return self._lookup(repo_id, revision)[1]

    def _lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]]:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        shas = self.shas[repo_id]
        if revision == "main":
            index = len(shas) - 1
        else:
            index = next((i for i, sha in enumerate(shas) if len(revision) >= 7 and sha.startswith(revision)), None)
            if index is None:
                raise HubError(404, f"Revision {revision} not found in {repo_id}", "RevisionNotFound")
        return shas[index], self.repos[repo_id][index]

    def create_repo(self, repo_id: str, files: dict[str, bytes] | None = None) -> str:
        """A new repo with one commit holding `files` (none by default); returns the commit id."""
        with self.lock:
            if repo_id in self.repos:  # the client's exist_ok=True reads the url from this answer
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            return self.add_commit(repo_id, dict(files or {}), "initial commit")

    def add_commit(self, repo_id: str, tree: dict[str, bytes], message: str) -> str:
        """Appends a commit holding the whole `tree`; returns its id."""
        with self.lock:
            parent = self.shas[repo_id][-1] if self.shas.get(repo_id) else ""
            listing = sorted((path, git_blob_id(data)) for path, data in tree.items())
            sha = hashlib.sha1(json.dumps([repo_id, parent, message, listing]).encode()).hexdigest()
            self.repos.setdefault(repo_id, []).append(tree)
            self.shas.setdefault(repo_id, []).append(sha)
            self.messages.setdefault(repo_id, []).append(message)
            return sha


class HubHandler(BaseHTTPRequestHandler):
    """Routes each request to one method below; each returns (status, JSON body) or raises HubError."""

    hub: HubServer  # set on the subclass made by HubServer.start()
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.hub.requests.append((method, url.path))
        body = self._read_body()
        try:
            for route_method, pattern, name, needs_token in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    if needs_token:
                        self._check_token()
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    with self.hub.lock:
                        answer = getattr(self, name)(body, **params)
                    if answer is not None:  # resolve() writes its own answer
                        self._send_json(*answer)
                    return
            self.hub.unknown_requests.append((method, url.path))
            raise HubError(404, f"Test Hub has no route for {method} {url.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json(error.status, {"error": error.message, **error.extra}, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _check_token(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise HubError(401, "Unauthorized: this endpoint needs an access token (Authorization: Bearer ...)")
        if self.hub.token is not None and auth[7:].strip() != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _send(self, status: int, data: bytes, headers: dict[str, str], content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers or {}, "application/json")

    # One method per route.

    def create_repo(self, body: bytes):
        payload = json.loads(body or b"{}")
        kind = payload.get("type", "model")
        if kind not in ("model", "space"):
            raise HubError(400, f"Test Hub only has model repos and Spaces, not {kind!r}")
        if kind == "space" and not payload.get("sdk"):
            raise HubError(400, "A Space needs an sdk (gradio, docker or static)")
        repo_id = f"{payload.get('organization') or self.hub.default_namespace}/{payload['name']}"
        key = repo_key(repo_id, kind + "s")
        self.hub.create_repo(key)
        if kind == "space":
            self.hub.space_sdks[key] = payload["sdk"]
        return 200, {"url": f"{self.hub.url}/{key}", "name": repo_id}

    def validate_yaml(self, body: bytes):
        return 200, {"errors": [], "warnings": []}

    def preupload(self, body: bytes, kind: str, repo: str, rev: str):
        sha, tree = self.hub._lookup(repo_key(repo, kind), rev)
        files = [
            {
                "path": file["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                # The id of the file already there lets the client skip unchanged files, as on the Hub.
                "oid": git_blob_id(tree[file["path"]]) if file["path"] in tree else None,
            }
            for file in json.loads(body)["files"]
        ]
        return 200, {"files": files, "commitOid": sha}

    def commit(self, body: bytes, kind: str, repo: str, rev: str):
        if rev != "main":
            raise HubError(400, f"Test Hub commits only to main, not to {rev!r}")
        repo = repo_key(repo, kind)
        head, tree = self.hub._lookup(repo, rev)
        tree, message = dict(tree), "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or message
                if value.get("parentCommit") and value["parentCommit"] != head:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unknown encoding {value['encoding']!r}")
                tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [path for path in tree if path.startswith(prefix)]:
                    del tree[path]
            else:  # lfsFile, copies: the preupload answer never asks for them
                raise HubError(400, f"Test Hub does not support {key!r} commit entries")
        sha = self.hub.add_commit(repo, tree, message)
        return 200, {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}",
            "pullRequestUrl": None,
        }

    def repo_info(self, body: bytes, kind: str, repo: str, rev: str = "main"):
        sha, tree = self.hub._lookup(repo_key(repo, kind), rev)
        return 200, {
            "_id": repo,
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": sha,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(tree)],
        }

    def tree(self, body: bytes, kind: str, repo: str, rev: str, path: str = ""):
        _, tree = self.hub._lookup(repo_key(repo, kind), rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        files = {p: data for p, data in tree.items() if p.startswith(prefix)}
        if prefix and not files:
            raise HubError(404, f"{path} does not exist in {repo}@{rev}", "EntryNotFound")
        entries = {}
        for file_path, data in files.items():
            parts = file_path[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
                folder = prefix + "/".join(parts[:i])
                entries[folder] = {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()}
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "path": file_path, "size": len(data), "oid": git_blob_id(data)}
        return 200, [entries[key] for key in sorted(entries)]

    def resolve(self, body: bytes, repo: str, rev: str, path: str):
        sha, tree = self.hub._lookup(repo, rev)
        if path not in tree:
            raise HubError(404, f"{path} does not exist in {repo}@{rev}", "EntryNotFound")
        data = tree[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "none"}
        self._send(200, data, headers, "application/octet-stream")
        return None
