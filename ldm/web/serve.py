"""A static file server for the exported site, with the headers that let wasm use threads.

``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``
make the page cross-origin isolated, so ``SharedArrayBuffer`` exists and onnxruntime-web runs its
wasm kernels on several threads; without them it runs on one. Binds 127.0.0.1 by default.

Only files inside the site folder are served: a symlink in it whose target lies outside (a link to
``/etc``, to a home folder) answers 404, as a missing file does (a folder listing may show its name).
"""

from __future__ import annotations

import functools
import os
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MIME = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
        ".onnx": "application/octet-stream", ".bin": "application/octet-stream", ".html": "text/html"}


class SiteHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME}
    quiet = False

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def _inside(self, path: str) -> bool:
        """Whether ``path`` (a translated request path), every symlink followed, lies in the site folder."""
        real, root = os.path.realpath(path), os.path.realpath(self.directory)
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    def send_head(self):
        path = self.translate_path(self.path)
        served = [path] + ([os.path.join(path, "index.html"), os.path.join(path, "index.htm")]
                           if os.path.isdir(path) else [])  # a folder answers with its index file
        if not all(self._inside(p) for p in served if os.path.lexists(p) or p == path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


def make_server(directory: Path, port: int = 8000, host: str = "127.0.0.1", quiet: bool = False) -> ThreadingHTTPServer:
    """A server for ``directory`` (not yet serving: call ``serve_forever``); port 0 picks a free port."""
    directory = Path(directory)
    if not (directory / "index.html").is_file():
        raise FileNotFoundError(f"{directory} has no index.html; give the folder that 'ldm export-web --out' wrote")
    handler = type("Handler", (SiteHandler,), {"quiet": quiet})
    return ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(directory)))
