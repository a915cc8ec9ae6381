"""A static file server for the exported site, with the headers that let wasm use threads.

``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``
make the page cross-origin isolated, so ``SharedArrayBuffer`` exists and onnxruntime-web runs its
wasm kernels on several threads; without them it runs on one. Binds 127.0.0.1 by default.

Only files inside the site folder are served: a symlink in it whose target lies outside (a link to
``/etc``, to a home folder) answers 404, as a missing file does (a folder listing may show its name).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
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


def bind_error(exc: OSError, host: str, port: int) -> ValueError:
    """A one-line error for a failed bind of ``host:port``: what went wrong and the fix."""
    if isinstance(exc, socket.gaierror):
        return ValueError(f"host {host!r} cannot be resolved ({exc.strerror}); bind 127.0.0.1 (this machine only), "
                          "0.0.0.0 (every interface) or one of this machine's addresses")
    if exc.errno == errno.EADDRINUSE:
        return ValueError(f"port {port} on {host} is already in use (another server?); pick another port, "
                          "or 0 for a free one")
    if exc.errno == errno.EACCES:
        return ValueError(f"binding port {port} on {host} was refused: ports below 1024 need root; "
                          "use a port of 1024 or more, e.g. 8000")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ValueError(f"{host} is not an address of this machine; bind 127.0.0.1, 0.0.0.0 or one of its addresses")
    return ValueError(f"cannot bind {host}:{port} ({exc.strerror or exc}); try another host or port")


def make_server(directory: Path, port: int = 8000, host: str = "127.0.0.1", quiet: bool = False) -> ThreadingHTTPServer:
    """A server for ``directory`` (not yet serving: call ``serve_forever``); port 0 picks a free port.
    ``host`` may be a name or an IPv4 or IPv6 address. A port outside 0..65535, a host that does not
    resolve or is not this machine's, and a port in use or reserved are ValueErrors saying so."""
    directory = Path(directory)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port {port!r} is not a TCP port; give 1024..65535 (e.g. 8000), or 0 for a free one")
    if not (directory / "index.html").is_file():
        raise FileNotFoundError(f"{directory} has no index.html; give the folder that 'ldm export-web --out' wrote")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        handler = type("Handler", (SiteHandler,), {"quiet": quiet})
        return server_class((host, port), functools.partial(handler, directory=str(directory)))
    except OSError as exc:
        raise bind_error(exc, host, port) from None
