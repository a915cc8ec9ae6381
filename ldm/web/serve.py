"""A static file server for the exported site, with the headers that let wasm use threads.

``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``
make the page cross-origin isolated, so ``SharedArrayBuffer`` exists and onnxruntime-web runs its
wasm kernels on several threads; without them it runs on one. Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import functools
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
