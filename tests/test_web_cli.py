"""ldm export-web and serve-web: errors for a missing model, the server's headers and address."""

import threading
import urllib.request

import pytest

from ldm.cli import main


def test_export_without_default_model_says_so(tmp_path, monkeypatch, capsys):
    import ldm.bundle

    monkeypatch.setitem(ldm.bundle.PACKAGED_MODELS, "default", tmp_path / "no_default_model")
    assert main(["export-web", "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert "ldm export-web: error: no default model is installed" in err and "--model" in err
    assert not (tmp_path / "site").exists()


def test_export_with_a_missing_model_folder(tmp_path, capsys):
    assert main(["export-web", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "site")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_rejects_bad_etas(tmp_path, capsys):
    assert main(["export-web", "--model", str(tmp_path), "--out", str(tmp_path / "site"), "--etas", "0,x"]) == 2
    assert "--etas" in capsys.readouterr().err


def test_serve_sends_cross_origin_isolation_headers(tmp_path):
    from ldm.web.serve import make_server

    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "ort").mkdir()
    (tmp_path / "ort" / "x.wasm").write_bytes(b"\0asm")
    server = make_server(tmp_path, 0, quiet=True)
    assert server.server_address[0] == "127.0.0.1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(base + "/") as r:
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with urllib.request.urlopen(base + "/ort/x.wasm") as r:
            assert r.headers["Content-Type"] == "application/wasm"
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_folder_without_a_site(tmp_path, capsys):
    assert main(["serve-web", str(tmp_path)]) == 2
    assert "no index.html" in capsys.readouterr().err


def test_help_lists_the_web_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "export-web" in out and "serve-web" in out
