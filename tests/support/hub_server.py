"""A loopback stand-in for the part of the Hugging Face Hub HTTP API that huggingface_hub 2.x calls.

It keeps model repos in memory as a small git-like store (commits with a parent and a full file table,
branches, tags, PR refs) and speaks the endpoints sdkiln's publish and fetch paths use:

    POST /api/repos/create                              create a repo with an initial .gitattributes commit
    POST /api/validate-yaml                             README front matter check
    GET  /api/models/{repo}[/revision/{rev}]            repo info (sha, siblings)
    POST /api/models/{repo}/preupload/{rev}             upload mode (regular / lfs) and remote oid per file
    POST /{repo}.git/info/lfs/objects/batch             LFS batch: where to PUT each missing object
    PUT  /_lfs/{repo}/{oid}  POST /_lfs/{repo}/{oid}/verify   the LFS "basic" transfer (sha256 checked)
    POST /api/models/{repo}/commit/{rev}[?create_pr=1]  NDJSON commit; parentCommit enforced (412)
    GET  /api/models/{repo}/tree/{rev}[/{path}]         tree listing (recursive), paginated by Link header
    GET  /api/models/{repo}/refs   /commits/{rev}       refs and history
    POST /api/models/{repo}/tag/{rev}                   create a tag (409 if it exists)
    HEAD/GET /{repo}/resolve/{rev}/{path}               file download with X-Repo-Commit and ETag

Xet is never offered (no Xet headers), so clients must run with ``HF_HUB_DISABLE_XET=1`` (or the constant
patched) to upload through the LFS path. It binds to 127.0.0.1 only. Test hooks let a test inject a
concurrent commit, stall an upload (to kill a client midway) or corrupt what a download serves.

Run it by hand with ``python tests/support/hub_server.py`` (prints its endpoint).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import fnmatch
import hashlib
import hmac
import json
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

# What a fresh Hub repo marks as LFS (a subset of the real default .gitattributes).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.bin",
        "*.onnx",
        "*.onnx_data",
        "*.safetensors",
        "*.pt",
        "*.pth",
        "*.ckpt",
        "*.mlmodel",
        "*.npy",
        "*.npz",
        "*.gz",
        "*.zip",
        "*.tar",
    )
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files above this go to LFS whatever their name
TREE_PAGE_SIZE = 1000


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what `git hash-object` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    """One file in a commit. Regular files carry their bytes; LFS files point into the blob store."""

    size: int
    oid: str  # git blob sha1 (of the content, or of the LFS pointer)
    content: bytes | None = None
    lfs_sha256: str | None = None

    def tree_json(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.lfs_sha256 is not None:
            pointer = lfs_pointer(self.lfs_sha256, self.size)
            out["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": len(pointer)}
        return out

    @property
    def etag(self) -> str:
        return self.lfs_sha256 if self.lfs_sha256 is not None else self.oid


@dataclass(frozen=True)
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)


@dataclass
class Hooks:
    """Fault injection for tests. Each callable runs on the server thread handling the request."""

    # Called with (repo_id, revision) at the start of every preupload call (after the client read the
    # branch head): a test can land a competing commit here to provoke a parent_commit conflict.
    on_preupload: Callable[[str, str], None] | None = None
    # Called with (repo_id, oid) when an LFS PUT arrives, before it is stored; may block to stall it.
    on_lfs_put: Callable[[str, str], None] | None = None
    # Paths whose downloads are served with one byte flipped (same size, wrong content).
    corrupt_downloads: set[str] = field(default_factory=set)


class HubState:
    """All repos and LFS objects, guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content (one store for the whole server)
        self.hooks = Hooks()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.auth_headers: list[str] = []  # Authorization headers seen (tests check the token is sent)
        self.server_errors: list[str] = []  # unexpected exceptions in handlers (should stay empty)
        self._clock = 0

    # -- git-like helpers -----------------------------------------------------------------------
    def _now(self) -> str:
        # A deterministic, increasing clock: commit ids must not depend on wall time to keep tests exact.
        self._clock += 1
        when = _dt.datetime(2026, 1, 1) + _dt.timedelta(seconds=self._clock)
        return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")  # the Hub's format; the client parses exactly this

    def make_commit(
        self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str, message: str = ""
    ) -> Commit:
        date = self._now()
        table = json.dumps(
            {
                "parent": parent,
                "title": title,
                "message": message,
                "date": date,
                "files": {p: [e.oid, e.size] for p, e in sorted(files.items())},
            },
            sort_keys=True,
        )
        commit = Commit(hashlib.sha1(table.encode()).hexdigest(), parent, title, message, date, dict(files))
        repo.commits[commit.id] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private)
            data = DEFAULT_GITATTRIBUTES.encode()
            init = self.make_commit(
                repo,
                None,
                {".gitattributes": FileEntry(len(data), git_blob_sha1(data), data)},
                "initial commit",
            )
            repo.branches["main"] = init.id
            self.repos[repo_id] = repo
            return repo

    def resolve(self, repo: Repo, rev: str) -> str | None:
        """A branch, tag, refs/pr/N, full sha or unique sha prefix (>= 7) -> commit id."""
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev.startswith("refs/pr/") and rev[8:].isdigit():
            return repo.prs.get(int(rev[8:]))
        if rev.startswith("refs/heads/"):
            return repo.branches.get(rev[11:])
        if rev.startswith("refs/tags/"):
            return repo.tags.get(rev[10:])
        if len(rev) >= 7 and all(c in "0123456789abcdef" for c in rev):
            matches = [c for c in repo.commits if c.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        return None

    def history(self, repo: Repo, commit_id: str) -> list[Commit]:
        out = []
        cur: str | None = commit_id
        while cur is not None:
            c = repo.commits[cur]
            out.append(c)
            cur = c.parent
        return out

    def commit_files(self, repo_id: str, rev: str = "main") -> dict[str, FileEntry]:
        """Test helper: the file table at a revision."""
        with self.lock:
            repo = self.repos[repo_id]
            sha = self.resolve(repo, rev)
            assert sha is not None, rev
            return dict(repo.commits[sha].files)

    def push_direct(self, repo_id: str, path: str, data: bytes, title: str = "direct push") -> str:
        """Test helper: land a commit on main as another client would (regular file)."""
        with self.lock:
            repo = self.repos[repo_id]
            head = repo.branches["main"]
            files = dict(repo.commits[head].files)
            files[path] = FileEntry(len(data), git_blob_sha1(data), data)
            commit = self.make_commit(repo, head, files, title)
            repo.branches["main"] = commit.id
            return commit.id

    def seed_repo(self, repo_id: str, files: dict[str, bytes], title: str = "upload") -> str:
        """Test helper: a new repo whose main branch holds ``files`` in one commit after the initial one
        (stored as LFS or regular files as an upload would be, by the .gitattributes among them)."""
        with self.lock:
            repo = self.create_repo(repo_id)
            head = repo.branches["main"]
            table = dict(repo.commits[head].files)
            attrs = files.get(".gitattributes")
            if attrs is not None:
                table[".gitattributes"] = FileEntry(len(attrs), git_blob_sha1(attrs), attrs)
            for path, data in sorted(files.items()):
                if path == ".gitattributes":
                    continue
                if self.is_lfs(repo, table, path, len(data), data[:512]):
                    sha = hashlib.sha256(data).hexdigest()
                    self.lfs[sha] = data
                    table[path] = FileEntry(len(data), git_blob_sha1(lfs_pointer(sha, len(data))), None, sha)
                else:
                    table[path] = FileEntry(len(data), git_blob_sha1(data), data)
            commit = self.make_commit(repo, head, table, title)
            repo.branches["main"] = commit.id
            return commit.id

    def is_lfs(
        self, repo: Repo, rev_files: dict[str, FileEntry], path: str, size: int, sample: bytes
    ) -> bool:
        attrs = rev_files.get(".gitattributes")
        patterns = []
        if attrs is not None and attrs.content is not None:
            for line in attrs.content.decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                    patterns.append(parts[0])
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns):
            return True
        return size > LFS_SIZE_THRESHOLD or b"\0" in sample


def _front_matter(entry: FileEntry | None) -> dict[str, Any] | None:
    """The YAML metadata of a README (what the Hub returns as ``cardData``)."""
    if entry is None or entry.content is None:
        return None
    text = entry.content.decode(errors="replace")
    if not text.startswith("---"):
        return None
    parts = text.split("---", 2)
    try:
        data = yaml.safe_load(parts[1]) if len(parts) == 3 else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, each response waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server: HubServer  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # quiet: tests read state.requests instead

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, err: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers, head=head)

    def _dispatch(self, method: str) -> None:
        st = self.server.state
        url = urlsplit(self.path)
        # Split before unquoting: a quoted revision like refs%2Fpr%2F1 is one segment.
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with st.lock:
            st.requests.append((method, unquote(url.path)))
            if auth := self.headers.get("Authorization"):
                st.auth_headers.append(auth)
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            # LFS PUTs go to a pre-signed URL (as to S3 on the real Hub): the signature, not the token, admits them.
            token = self.server.token
            if (
                token is not None
                and method in ("POST", "DELETE")
                and self.headers.get("Authorization") != f"Bearer {token}"
            ):
                raise HubError(401, "Invalid credentials in Authorization header")
            self._route(method, segs, query, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (a test killed it): nothing to answer
        except HubError as e:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._error(e, head=method == "HEAD")
        except Exception as e:  # a server bug: answer 500 and keep it for the test to see
            with st.lock:
                st.server_errors.append(f"{method} {url.path}: {type(e).__name__}: {e}")
            self._error(HubError(500, f"loopback hub bug: {type(e).__name__}: {e}"), head=method == "HEAD")

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    # -- routing ----------------------------------------------------------------------------------
    def _repo(self, ns: str, name: str) -> Repo:
        repo = self.server.state.repos.get(f"{ns}/{name}")
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _rev(self, repo: Repo, rev: str) -> str:
        sha = self.server.state.resolve(repo, rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def _route(self, method: str, segs: list[str], q: dict[str, str], body: bytes) -> None:
        st = self.server.state
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo(json.loads(body or b"{}"))
            if method == "POST" and rest == ["validate-yaml"]:
                return self._validate_yaml(json.loads(body or b"{}"))
            if len(rest) >= 3 and rest[0] == "models":
                ns, name, tail = rest[1], rest[2], rest[3:]
                with st.lock:
                    repo = self._repo(ns, name)
                if method == "GET" and (not tail or tail[0] == "revision"):
                    return self._info(repo, "/".join(tail[1:]) if tail else "main")
                if method == "POST" and tail[:1] == ["preupload"]:
                    return self._preupload(repo, "/".join(tail[1:]), json.loads(body))
                if method == "POST" and tail[:1] == ["commit"]:
                    return self._commit(repo, "/".join(tail[1:]), body, q.get("create_pr") == "1")
                if method == "GET" and tail[:1] == ["tree"]:
                    return self._tree(repo, tail[1], "/".join(tail[2:]), q)
                if method == "GET" and tail == ["refs"]:
                    return self._refs(repo, q.get("include_prs") == "1")
                if method == "GET" and tail[:1] == ["commits"]:
                    return self._commits(repo, "/".join(tail[1:]))
                if method == "POST" and tail[:1] == ["tag"]:
                    return self._tag(repo, "/".join(tail[1:]), json.loads(body))
            raise HubError(404, f"no such endpoint: {method} /{'/'.join(segs)}")
        if segs[:1] == ["_lfs"] and len(segs) >= 4:
            oid = segs[3]
            if method == "PUT" and len(segs) == 4:
                if q.get("sig") != self.server.sign(oid):
                    raise HubError(403, "bad or missing upload signature")
                return self._lfs_put(f"{segs[1]}/{segs[2]}", oid, body)
            if method == "POST" and segs[4:] == ["verify"]:
                with st.lock:
                    ok = oid in st.lfs
                if not ok:
                    raise HubError(404, f"LFS object {oid} not found")
                return self._json(200, {"success": True})
        if len(segs) >= 2 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            with st.lock:
                self._repo(segs[0], segs[1][:-4])
            return self._lfs_batch(f"{segs[0]}/{segs[1][:-4]}", json.loads(body))
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            with st.lock:
                repo = self._repo(segs[0], segs[1])
            return self._resolve(repo, segs[3], "/".join(segs[4:]), head=method == "HEAD")
        raise HubError(404, f"no such endpoint: {method} /{'/'.join(segs)}")

    # -- endpoints --------------------------------------------------------------------------------
    def _create_repo(self, payload: dict[str, Any]) -> None:
        st = self.server.state
        if payload.get("type", "model") != "model":
            raise HubError(400, "only model repos are served here")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        with st.lock:
            if repo_id in st.repos:
                # The Hub answers a conflict with the existing repo's url; the client reads it.
                raise HubError(409, "You already created this model repo", extra={"url": url})
            st.create_repo(
                repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
            )
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content", "")
        if content.startswith("---"):
            block = content.split("---", 2)
            try:
                data = yaml.safe_load(block[1]) if len(block) == 3 else None
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            if data is not None and not isinstance(data, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
        self._json(200, {"warnings": []})

    def _info(self, repo: Repo, rev: str) -> None:
        st = self.server.state
        with st.lock:
            sha = self._rev(repo, rev)
            commit = repo.commits[sha]
        card_data = _front_matter(commit.files.get("README.md"))
        self._json(
            200,
            {
                **({"cardData": card_data} if card_data else {}),
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "lastModified": commit.date,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            },
        )

    def _preupload(self, repo: Repo, rev: str, payload: dict[str, Any]) -> None:
        st = self.server.state
        if st.hooks.on_preupload is not None:
            st.hooks.on_preupload(repo.repo_id, rev)
        with st.lock:
            sha = self._rev(repo, rev)
            files = repo.commits[sha].files
            out = []
            for f in payload["files"]:
                sample = base64.b64decode(f.get("sample", ""))
                lfs = st.is_lfs(repo, files, f["path"], int(f["size"]), sample)
                existing = files.get(f["path"])
                out.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": existing.etag if existing is not None else None,
                    }
                )
        self._json(200, {"files": out, "commitOid": sha})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        st = self.server.state
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with st.lock:
                present = oid in st.lfs
            if not present:
                base = f"{self.server.endpoint}/_lfs/{repo_id}/{oid}"
                upload = f"{base}?sig={self.server.sign(oid)}"
                entry["actions"] = {"upload": {"href": upload}, "verify": {"href": f"{base}/verify"}}
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, repo_id: str, oid: str, body: bytes) -> None:
        st = self.server.state
        if st.hooks.on_lfs_put is not None:
            st.hooks.on_lfs_put(repo_id, oid)
        # An object is stored only when complete and intact, as S3 + the Hub's verify step ensure.
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"LFS upload for {oid}: content does not match its sha256")
        with st.lock:
            st.lfs[oid] = body
        self._send(200, b"", {"ETag": '"' + hashlib.md5(body).hexdigest() + '"'})

    def _commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool) -> None:
        st = self.server.state
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with st.lock:
            head = self._rev(repo, rev)
            parent = header.get("parentCommit")
            if parent is not None:
                resolved = st.resolve(repo, parent)
                if resolved is None:
                    raise HubError(400, f"parentCommit {parent} is not a commit of this repo")
                if not create_pr and resolved != head:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
                base = resolved if create_pr else head
            else:
                base = head
            files = dict(repo.commits[base].files)
            for item in lines[1:]:
                key, value = item["key"], item["value"]
                path = value["path"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path] = FileEntry(len(data), git_blob_sha1(data), data)
                elif key == "lfsFile":
                    oid = value["oid"]
                    blob = st.lfs.get(oid)
                    if blob is None:
                        raise HubError(
                            400, f"Your push was rejected: LFS object {oid} for {path} was never uploaded"
                        )
                    pointer = lfs_pointer(oid, len(blob))
                    files[path] = FileEntry(len(blob), git_blob_sha1(pointer), None, oid)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            commit = st.make_commit(
                repo, base, files, header.get("summary", ""), header.get("description", "")
            )
            pr_url = None
            if create_pr:
                num = max(repo.prs, default=0) + 1
                repo.prs[num] = commit.id
                pr_url = f"{self.server.endpoint}/{repo.repo_id}/discussions/{num}"
            else:
                branch = rev if rev in repo.branches else "main"
                repo.branches[branch] = commit.id
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{self.server.endpoint}/{repo.repo_id}/commit/{commit.id}",
                "pullRequestUrl": pr_url,
            },
        )

    def _tree(self, repo: Repo, rev: str, path: str, q: dict[str, str]) -> None:
        st = self.server.state
        with st.lock:
            sha = self._rev(repo, rev)
            files = repo.commits[sha].files
        recursive = q.get("recursive", "").lower() == "true"
        prefix = path.rstrip("/") + "/" if path else ""
        entries: dict[str, dict[str, Any]] = {}
        for p, e in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            parts = rel.split("/")
            # Directories are listed before their content, like the Hub does.
            for depth in range(1, len(parts)):
                d = prefix + "/".join(parts[:depth])
                if d not in entries and (recursive or depth == 1):
                    entries[d] = {
                        "type": "directory",
                        "oid": hashlib.sha1(d.encode()).hexdigest(),
                        "size": 0,
                        "path": d,
                    }
            if recursive or len(parts) == 1:
                entries[p] = e.tree_json(p)
        if path and not entries and path not in files:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        rows = list(entries.values())
        start = int(q.get("cursor", "0"))
        page = rows[start : start + self.server.tree_page_size]
        headers = {}
        nxt = start + self.server.tree_page_size
        if nxt < len(rows):
            base = f"{self.server.endpoint}{urlsplit(self.path).path}"
            headers["Link"] = f'<{base}?recursive={q.get("recursive", "False")}&cursor={nxt}>; rel="next"'
        self._json(200, page, headers)

    def _refs(self, repo: Repo, include_prs: bool) -> None:
        def ref(kind: str, name: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        with self.server.state.lock:
            out: dict[str, Any] = {
                "branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items())],
                "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
                "converts": [],
            }
            if include_prs:
                out["pullRequests"] = [
                    {"name": str(n), "ref": f"refs/pr/{n}", "targetCommit": s}
                    for n, s in sorted(repo.prs.items())
                ]
        self._json(200, out)

    def _commits(self, repo: Repo, rev: str) -> None:
        with self.server.state.lock:
            sha = self._rev(repo, rev or "main")
            history = self.server.state.history(repo, sha)
        self._json(
            200,
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": "sdkiln-test"}],
                }
                for c in history
            ],
        )

    def _tag(self, repo: Repo, rev: str, payload: dict[str, Any]) -> None:
        st = self.server.state
        with st.lock:
            sha = self._rev(repo, rev)
            tag = payload["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = sha
        self._json(200, {"tag": tag})

    def _resolve(self, repo: Repo, rev: str, path: str, head: bool) -> None:
        st = self.server.state
        with st.lock:
            sha = self._rev(repo, rev)
            entry = repo.commits[sha].files.get(path)
            if entry is None:
                err = HubError(404, f"Entry not found: {path}", "EntryNotFound")
                headers = {
                    "X-Error-Code": "EntryNotFound",
                    "X-Error-Message": err.message,
                    "X-Repo-Commit": sha,
                }
                self._send(404, json.dumps({"error": err.message}).encode(), headers, head=head)
                return
            data = entry.content if entry.content is not None else st.lfs[entry.lfs_sha256 or ""]
            if path in st.hooks.corrupt_downloads and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.etag}"'}
        if entry.lfs_sha256 is not None:
            headers["X-Linked-Etag"] = f'"{entry.lfs_sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        self._send(200, data, headers, content_type="application/octet-stream", head=head)


class HubServer(ThreadingHTTPServer):
    """``with HubServer() as hub: ...`` serves on ``hub.endpoint`` (127.0.0.1, a free port) until exit."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, token: str | None = None, tree_page_size: int = TREE_PAGE_SIZE):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = HubState()
        self.token = token  # when set, writes without "Bearer <token>" get 401
        self.tree_page_size = tree_page_size
        self._secret = secrets.token_bytes(16)
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def sign(self, oid: str) -> str:
        """The signature of a pre-signed LFS upload URL for ``oid``."""
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        # A short poll interval: stop() waits for the loop to notice, and tests start and stop many servers.
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open keep-alive connection: the Hub is gone for its clients."""
        self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, repo_id: str, rev: str, path: str) -> str:
        return f"{self.endpoint}/{repo_id}/resolve/{quote(rev, safe='')}/{quote(path)}"


if __name__ == "__main__":
    import time

    with HubServer() as hub:
        print(f"serving a loopback Hub on {hub.endpoint} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
