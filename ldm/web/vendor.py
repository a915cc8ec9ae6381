"""onnxruntime-web from npm, vendored into the site: never a CDN.

The package is fetched once with ``npm pack`` (the npm registry through its ordinary client) into
``~/.cache/ldm-toolkit/npm/`` and the files the page loads are copied from there into each site.
``ort.min.js`` carries both execution providers the page uses: WebGPU (JSEP) and wasm, from the
one ``ort-wasm-simd-threaded.jsep.wasm`` binary (threaded when the page is cross-origin isolated).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from ldm_io import atomic_directory

ORT_WEB_VERSION = "1.30.0"  # the one pin of onnxruntime-web
ORT_WEB_FILES = ("ort.min.js", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")


def npm_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-toolkit" / "npm"


def ort_web_dir(cache: Optional[Path] = None) -> Path:
    """The folder holding ``ORT_WEB_FILES`` of onnxruntime-web ``ORT_WEB_VERSION``, fetched with npm if needed."""
    folder = (cache or npm_cache()) / f"onnxruntime-web-{ORT_WEB_VERSION}"
    if all((folder / f).is_file() for f in ORT_WEB_FILES):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"npm is not installed; it fetches onnxruntime-web@{ORT_WEB_VERSION} for the page "
                                f"(apt-get install npm, or put the files {', '.join(ORT_WEB_FILES)} in {folder})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        done = subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--pack-destination", tmp],
                              capture_output=True, text=True, cwd=tmp)
        tarballs = list(Path(tmp).glob("onnxruntime-web-*.tgz"))
        if done.returncode != 0 or not tarballs:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise FileNotFoundError(f"npm pack onnxruntime-web@{ORT_WEB_VERSION} failed ({last}); the page needs it "
                                    f"and fetches it from the npm registry only")
        with tarfile.open(tarballs[0]) as tar, atomic_directory(folder) as staging:
            for name in ORT_WEB_FILES:
                member = tar.getmember(f"package/dist/{name}")
                with tar.extractfile(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return folder


def vendor_ort_web(site: Path) -> str:
    """Copy onnxruntime-web into ``site/ort/``; returns its version."""
    source = ort_web_dir()
    (site / "ort").mkdir(parents=True, exist_ok=True)
    for name in ORT_WEB_FILES:
        shutil.copyfile(source / name, site / "ort" / name)
    return ORT_WEB_VERSION
