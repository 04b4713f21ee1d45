"""A loopback Hugging Face hub for tests: the real huggingface-hub client talks to it through HF_ENDPOINT.

It speaks the part of the hub's file protocol that `hf_hub_download` and `HfApi.list_repo_files` use:
HEAD/GET /{org}/{repo}/resolve/{revision}/{path} with X-Repo-Commit, ETag, Content-Length and X-Linked-Size,
GET with `Range: bytes=N-` answered 206 + Content-Range, 404 + `X-Error-Code: EntryNotFound` for a missing
file, 401 + `RepoNotFound` / `GatedRepo` for missing and gated repos (a gated repo opens to its bearer token),
and GET /api/models/{org}/{repo}/tree/{revision} for the file listing.

Fault injection: `drop_after` makes the first GET of a file send that many bytes and then cut the connection;
`announce_size` makes HEAD claim a different size (for the disk-space check); `etag` overrides the sha256.

    with LoopbackHub() as hub:
        hub.add_file("org/repo", "m.gguf", data)
        env = hub.env(tmp_path)          # HF_ENDPOINT, HF_HOME, ... for a subprocess
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/?]+)")


@dataclass
class HubFile:
    content: bytes
    etag: str
    announce_size: int | None = None
    drop_after: int | None = None  # bytes of the first GET before the connection is cut
    gets: int = 0


class LoopbackHub:
    def __init__(self) -> None:
        self.files: dict[tuple[str, str], HubFile] = {}
        self.repos: set[str] = set()
        self.gated: dict[str, str] = {}  # repo -> token that opens it
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ content

    def add_repo(self, repo: str, *, gated_token: str | None = None) -> None:
        self.repos.add(repo)
        if gated_token is not None:
            self.gated[repo] = gated_token

    def add_file(self, repo: str, path: str, content: bytes, *, etag: str | None = None,
                 announce_size: int | None = None, drop_after: int | None = None) -> HubFile:
        self.repos.add(repo)
        f = HubFile(content, etag or hashlib.sha256(content).hexdigest(), announce_size, drop_after)
        self.files[(repo, path)] = f
        return f

    def gets_with_range(self) -> list[str]:
        return [h.get("range", "") for m, p, h in self.requests if m == "GET" and h.get("range")]

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LoopbackHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # shutdown() waits for serve_forever to notice, up to its poll interval (0.5 s by default, at every teardown)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            # Keep-alive connections would otherwise go on being served by their handler threads.
            with self._lock:
                for conn in list(self.connections):
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that uses this hub and a private HF cache and dspark config under home."""
        return hub_env(self.url, home, base)


def hub_env(url: str, home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment pointing huggingface-hub at `url`, with a private HF cache and dspark config under home."""
    env = dict(base if base is not None else os.environ)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
              "HF_TOKEN_PATH", "HF_HUB_ENABLE_HF_TRANSFER"):
        env.pop(k, None)
    env.update(
        HF_ENDPOINT=url,
        HF_HOME=str(home / "hf"),
        DSPARK_CONFIG_DIR=str(home / "config"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        COLUMNS="200",
    )
    return env


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub.connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _record(self) -> None:
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

    def _error(self, status: int, code: str, message: str, *, commit: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _repo_ok(self, repo: str) -> bool:
        if repo not in self.hub.repos:
            self._error(401, "RepoNotFound", "Repository not found")
            return False
        token = self.hub.gated.get(repo)
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            self._error(401, "GatedRepo", "Access to this model is restricted. You must have access to it.")
            return False
        return True

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        self._record()
        path = self.path.split("?", 1)[0]
        tree = _TREE.match(self.path)
        if tree and not head:
            return self._tree(tree["repo"])
        m = _RESOLVE.match(path)
        if not m:
            return self._error(404, "NotFound", "no such route")
        repo, rel = m["repo"], m["path"]
        if not self._repo_ok(repo):
            return
        f = self.hub.files.get((repo, rel))
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit=True)
        size = len(f.content)
        start = 0
        rng = self.headers.get("Range")
        if rng and not head:
            rm = re.match(r"bytes=(\d+)-", rng)
            start = int(rm.group(1)) if rm else 0
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = f.content[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{f.etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if head:
            announced = f.announce_size if f.announce_size is not None else size
            self.send_header("X-Linked-Size", str(announced))
            self.send_header("X-Linked-Etag", f'"{f.etag}"')
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            return
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with self.hub._lock:
            f.gets += 1
            cut = f.drop_after if f.gets == 1 else None
        if cut is not None:
            # Send part of the body, then cut the connection: the client sees a short read mid-download.
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)

    def _tree(self, repo: str) -> None:
        if not self._repo_ok(repo):
            return
        entries = [
            {"type": "file", "path": p, "size": len(f.content), "oid": hashlib.sha1(f.content).hexdigest(),
             "lfs": {"oid": f.etag, "size": len(f.content), "pointerSize": 134}}
            for (r, p), f in sorted(self.hub.files.items()) if r == repo
        ]
        body = json.dumps(entries).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def write_tiny_gguf(path: Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
                    key_length: int | None = None, n_vocab: int = 300, weights: int = 4096) -> Path:
    """A small but well-formed GGUF (llama arch, gpt2-style token list) for header and memory tests."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_context_length(2048)
    if key_length is not None:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_tensor("token_embd.weight", np.zeros(weights, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
