"""ldm_io's atomic writes: success replaces, a failure leaves the old file or folder and no temporaries,
and what is written gets the permissions a plain write would (the umask's, not tempfile's 0o600/0o700)."""

import os
import stat

import pytest
from PIL import Image

from ldm_io import atomic_directory, atomic_path, save_image, write_bytes, write_text


class Boom(Exception):
    pass


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_file_success_replaces_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.is_file() and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_file_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Boom
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_file_failure_with_no_old_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "sub" / "a.bin"):
            raise Boom
    assert os.listdir(tmp_path / "sub") == []


def test_folder_success_replaces_the_old_folder(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "stale.json").write_text("{}")
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == []
        (tmp / "model_index.json").write_text("{}")
        assert (target / "stale.json").is_file()  # the old one is whole until the end
    assert sorted(os.listdir(target)) == ["model_index.json"]
    assert os.listdir(tmp_path) == ["bundle"]  # neither the temporary nor the old folder is left


def test_folder_failure_keeps_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise Boom
    assert (target / "weights").read_text() == "old" and os.listdir(target) == ["weights"]
    assert os.listdir(tmp_path) == ["bundle"]


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_new_folder_and_file_follow_the_umask(tmp_path, umask_022):
    with atomic_directory(tmp_path / "site") as tmp:
        (tmp / "index.html").write_text("<p>")
    assert mode(tmp_path / "site") == 0o755
    write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o644
    os.umask(0o077)
    with atomic_directory(tmp_path / "private"):
        pass
    write_bytes(tmp_path / "b.bin", b"\0")
    assert mode(tmp_path / "private") == 0o700 and mode(tmp_path / "b.bin") == 0o600


def test_conveniences_write_what_they_are_given(tmp_path):
    assert write_text(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("key", "value")
    path = save_image(Image.new("RGB", (3, 2), "red"), tmp_path / "i.png", pnginfo=info)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3, 2) and im.text == {"key": "value"}
    with pytest.raises(ValueError, match="image format"):
        save_image(Image.new("RGB", (1, 1)), tmp_path / "i.tmp")
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "i.png", "t.txt"]
