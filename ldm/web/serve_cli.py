"""Serve a site written by `ldm export-web` on 127.0.0.1.

It sends Cross-Origin-Opener-Policy and Cross-Origin-Embedder-Policy headers, so the page is
cross-origin isolated and onnxruntime-web's wasm backend runs on several threads.

examples:
  ldm serve-web site/
  ldm serve-web site/ --port 8080
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="the folder that 'ldm export-web --out' wrote")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")


def run(args: argparse.Namespace) -> int:
    from ldm.web.serve import make_server

    server = make_server(args.dir, args.port, args.host)  # a bad port or host, or one it cannot bind: a ValueError
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    print(f"serving {args.dir} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
