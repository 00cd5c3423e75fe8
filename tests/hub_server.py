"""A loopback Hugging Face Hub: the HTTP endpoints that `huggingface_hub`'s client calls to create a
repo, upload (regular and LFS files, one or several commits), list and download, held in memory.

    with HubServer(tokens={"hf_secret": "alice"}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_secret")

Endpoints (as the real client calls them; verified by running it against this server):
    POST /api/repos/create                          create (403 outside the token's namespace, 409 if it exists)
    GET  /api/whoami-v2                             the token's user
    GET  /api/models/{repo}[/revision/{rev}]        repo info with `siblings` (snapshot_download)
    POST /api/validate-yaml                         README.md front matter must parse as a YAML mapping
    POST /api/models/{repo}/preupload/{rev}         upload mode per file (lfs for weights/images) and the
                                                    remote oid, from which the client drops unchanged files
    POST /{repo}.git/info/lfs/objects/batch         LFS batch API, "basic" transfer; no action for objects
                                                    already stored (a resumed upload sends nothing twice)
    PUT  /lfs-upload/{oid}                          the LFS object itself (sha256 checked)
    POST /{repo}.git/info/lfs/objects/verify        LFS verify
    POST /api/models/{repo}/commit/{rev}            NDJSON commit; answers commitUrl and commitOid
    POST /api/models/{repo}/branch/{branch}         create a branch
    GET  /api/models/{repo}/tree/{rev}[/{path}]     listing (recursive), with blob and LFS oids
    POST /api/models/{repo}/paths-info/{rev}        the same for given paths
    HEAD/GET /{repo}/resolve/{rev}/{path}           download

Every request is recorded in `log` (method, path, status). `uploads` counts file bodies received (LFS
PUTs and regular files inside commits). `fail` injects failures: {"commit": n} answers the n-th and
later commits (1-based) with a dropped connection until cleared.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".png", ".bin", ".pt", ".npy")
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    size: int
    oid: str                  # git blob oid (of the content, or of the LFS pointer)
    content: bytes | None     # regular files
    sha256: str | None = None  # LFS files: the content lives in HubState.lfs


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)          # name -> commit oid
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # oid -> path -> blob


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, int]] = []
        self.uploads: list[str] = []   # paths (regular) or sha256 (LFS) of every file body received
        self.commits = 0
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file at `revision` (LFS files resolved)."""
        repo = self.repos[repo_id]
        tree = repo.commits[repo.branches.get(revision, revision)]
        return {p: (b.content if b.content is not None else self.lfs[b.sha256]) for p, b in tree.items()}


class HubServer:
    def __init__(self, tokens: dict[str, str] | None = None, host: str = "127.0.0.1"):
        self.state = HubState(tokens or {})
        state = self.state

        class Handler(_Handler):
            hub = state
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        Handler.endpoint = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class _Handler(BaseHTTPRequestHandler):
    hub: HubState
    endpoint: str
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # --- plumbing -------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
              head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.hub.log.append((self.command, self.path, status))

    def _user(self, required: bool = True) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            if required:
                raise HubError(401, "Invalid credentials in Authorization header")
            return None
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner != user):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and repo.owner != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _tree(self, repo: Repo, rev: str) -> tuple[str, dict[str, Blob]]:
        oid = repo.branches.get(rev, rev if rev in repo.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid, repo.commits[oid]

    def _dispatch(self) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        parts = path.strip("/").split("/")
        m = self.command
        try:
            with self.hub.lock:
                if m == "POST" and path == "/api/repos/create":
                    return self._create(json.loads(self._body()))
                if m == "GET" and path == "/api/whoami-v2":
                    user = self._user()
                    return self._send(200, {"type": "user", "name": user, "orgs": [],
                                            "auth": {"accessToken": {"role": "write"}}})
                if m == "POST" and path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(self._body()))
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id, rest = "/".join(parts[2:4]), parts[4:]
                    if m == "GET" and not rest:
                        return self._info(repo_id, "main")
                    if m == "GET" and rest[0] == "revision":
                        return self._info(repo_id, "/".join(rest[1:]))
                    if m == "POST" and rest[0] == "preupload":
                        return self._preupload(repo_id, "/".join(rest[1:]), json.loads(self._body()))
                    if m == "POST" and rest[0] == "commit":
                        return self._commit(repo_id, "/".join(rest[1:]), self._body())
                    if m == "POST" and rest[0] == "branch":
                        return self._branch(repo_id, "/".join(rest[1:]), self._body())
                    if m == "GET" and rest[0] == "tree":
                        return self._list_tree(repo_id, rest[1], "/".join(rest[2:]),
                                               query.get("recursive", ["false"])[0].lower() == "true")
                    if m == "POST" and rest[0] == "paths-info":
                        return self._paths_info(repo_id, "/".join(rest[1:]), self._body())
                if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                    return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(self._body()))
                if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "verify"]:
                    req = json.loads(self._body())
                    ok = req["oid"] in self.hub.lfs
                    return self._send(200 if ok else 404, {"message": "ok" if ok else "object missing"})
                if m == "PUT" and parts[0] == "lfs-upload":
                    return self._lfs_put(parts[1], self._body())
                if m in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), m == "HEAD")
            raise HubError(404, f"no such endpoint: {m} {path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message, **e.extra}, headers, head=m == "HEAD")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # --- endpoints -------------------------------------------------------------------------
    def _create(self, req: dict) -> None:
        user = self._user()
        namespace = req.get("organization") or user
        repo_id = f"{namespace}/{req['name']}"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        if repo_id in self.hub.repos:
            raise HubError(409, "You already created this model repo", extra={"url": f"{self.endpoint}/{repo_id}"})
        repo = Repo(owner=user, private=req.get("visibility") == "private" or bool(req.get("private")))
        blob = Blob(len(GITATTRIBUTES), git_blob_oid(GITATTRIBUTES), GITATTRIBUTES)
        oid = hashlib.sha1(f"{repo_id} initial".encode()).hexdigest()
        repo.commits[oid] = {".gitattributes": blob}
        repo.branches["main"] = oid
        self.hub.repos[repo_id] = repo
        self._send(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, req: dict) -> None:
        import yaml
        content = req.get("content", "")
        if not content.startswith("---\n"):
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(content[4:content.index("\n---", 4)])
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a mapping")
        except Exception as e:
            return self._send(400, {"errors": [{"message": str(e)}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        oid, tree = self._tree(repo, rev)
        self._send(200, {"id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": oid,
                         "private": repo.private, "disabled": False, "gated": False, "tags": [],
                         "downloads": 0, "likes": 0, "lastModified": "2025-01-01T00:00:00.000Z",
                         "createdAt": "2025-01-01T00:00:00.000Z",
                         "siblings": [{"rfilename": p} for p in sorted(tree)]})

    def _preupload(self, repo_id: str, rev: str, req: dict) -> None:
        repo = self._repo(repo_id, write=True)
        _, tree = self._tree(repo, rev)
        files = []
        for f in req["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > LFS_SIZE
            old = tree.get(f["path"])
            remote = None if old is None else (old.sha256 if lfs and old.sha256 else old.oid)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": remote})
        self._send(200, {"files": files, "commitOid": repo.branches.get(rev)})

    def _lfs_batch(self, repo_id: str, req: dict) -> None:
        self._repo(repo_id, write=req.get("operation") == "upload")
        objects = []
        for o in req["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "sha256 of the body does not match the object id")
        self.hub.lfs[oid] = data
        self.hub.uploads.append(oid)
        self._send(200)

    def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        parent, tree = self._tree(repo, rev)
        self.hub.commits += 1
        if self.hub.commits >= self.hub.fail.get("commit", 1 << 60):
            self.hub.log.append((self.command, self.path, 0))
            self.close_connection = True  # a network failure: the connection drops, no answer
            self.connection.shutdown(2)
            return
        tree = dict(tree)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                data = base64.b64decode(v["content"])
                tree[v["path"]] = Blob(len(data), git_blob_oid(data), data)
                self.hub.uploads.append(v["path"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.hub.lfs:
                    raise HubError(422, f"LFS object {v['oid']} of {v['path']} was never uploaded")
                size = len(self.hub.lfs[v["oid"]])
                tree[v["path"]] = Blob(size, git_blob_oid(lfs_pointer(v["oid"], size)), None, v["oid"])
            elif item["key"] == "deletedFile":
                tree.pop(v["path"], None)
            elif item["key"] == "deletedFolder":
                tree = {p: b for p, b in tree.items() if not p.startswith(v["path"].rstrip("/") + "/")}
        oid = hashlib.sha1(f"{parent}{time.time_ns()}{header.get('summary')}".encode()).hexdigest()
        repo.commits[oid] = tree
        repo.branches[rev] = oid
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}",
                         "pullRequestUrl": None})

    def _branch(self, repo_id: str, branch: str, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        req = json.loads(body or b"{}")
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch], _ = self._tree(repo, req.get("startingPoint") or "main")
        self._send(200, {})

    def _entry(self, path: str, blob: Blob) -> dict:
        e = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
        if blob.sha256:
            e["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(lfs_pointer(blob.sha256, blob.size))}
        return e

    def _list_tree(self, repo_id: str, rev: str, sub: str, recursive: bool) -> None:
        repo = self._repo(repo_id)
        _, tree = self._tree(repo, rev)
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        under = {p: b for p, b in tree.items() if p.startswith(prefix)}
        if prefix and not under:
            raise HubError(404, f"{sub} does not exist on \"{rev}\"", "EntryNotFound")
        out, dirs = [], set()
        for p, b in sorted(under.items()):
            rel = p[len(prefix):].split("/")
            for i in range(1, len(rel) if recursive else min(len(rel), 2)):
                dirs.add(prefix + "/".join(rel[:i]))
            if recursive or len(rel) == 1:
                out.append(self._entry(p, b))
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)]
        self._send(200, out)

    def _paths_info(self, repo_id: str, rev: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        _, tree = self._tree(repo, rev)
        ctype = self.headers.get("Content-Type", "")
        req = json.loads(body) if "json" in ctype else {k: v for k, v in parse_qs(body.decode()).items()}
        paths = req.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        self._send(200, [self._entry(p, tree[p]) for p in paths if p in tree])

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id)
        oid, tree = self._tree(repo, rev)
        if path not in tree:
            raise HubError(404, "Entry not found", "EntryNotFound")
        blob = tree[path]
        data = blob.content if blob.content is not None else self.hub.lfs[blob.sha256]
        etag = blob.sha256 or blob.oid
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        if blob.sha256:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(blob.size)})
        self._send(200, data, headers, head=head)
