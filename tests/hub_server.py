"""A tiny stand-in for the Hugging Face Hub's file endpoint, served on 127.0.0.1.

It answers ``/{org}/{repo}/resolve/{revision}/{filename}`` the way huggingface_hub expects
(commit and ETag headers, 404 with an error code for missing files) and counts requests.
Files are hashed once and streamed, so serving a full-size model stays cheap.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 for a ``with`` block; subclasses supply the handler."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class HubServer(LocalServer):
    def __init__(self, files: dict[str, Path]):
        self.files = files  # "org/repo/filename" -> local file
        self.requests: Counter = Counter()
        self.etags: dict[Path, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body: bool):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    self.send_error(404)
                    return
                key = "/".join(parts[:2] + parts[4:])
                server.requests[(self.command, key)] += 1
                local = server.files.get(key)
                if local is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{server.etag(local)}"')
                self.send_header("Content-Length", str(local.stat().st_size))
                self.end_headers()
                if body:
                    with open(local, "rb") as f:
                        shutil.copyfileobj(f, self.wfile, 1 << 20)

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

        super().__init__(Handler)

    def etag(self, path: Path) -> str:
        """The file's sha256, computed on its first request."""
        if path not in self.etags:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self.etags[path] = digest.hexdigest()
        return self.etags[path]

    def downloads(self, filename: str) -> int:
        return sum(n for (method, key), n in self.requests.items() if method == "GET" and key.endswith(filename))
