"""train.run.config: dataclasses from YAML with overrides; unknown keys and wrong types are errors that
name the key and what is allowed; a saved config loads back equal."""

import dataclasses
from typing import Literal, Optional

import pytest

from train.run.config import apply_overrides, from_dict, load_config, parse_override, save_config


@dataclasses.dataclass
class Inner:
    # a documented field
    width: int = 64
    ratio: float = 4.0
    kind: Literal["vit", "resnet"] = "vit"

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"width={self.width} must be >= 1")


@dataclasses.dataclass
class Outer:
    name: str = "run"
    lr: float = 1e-3
    flag: bool = False
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    betas: tuple[float, float] = (0.9, 0.99)
    note: Optional[str] = None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_types_and_overrides(tmp_path):
    path = write(tmp_path, "name: x\nlr: 1e-4\nlayers: [3, 4]\nbetas: [0.8, 0.9]\ninner:\n  width: 32\n  ratio: 2\n")
    cfg = load_config(Outer, path, ["inner.kind=resnet", "flag=true", "note=hello", "extra={a: 1}", "lr=0.5"])
    assert cfg == Outer(name="x", lr=0.5, flag=True, layers=[3, 4], betas=(0.8, 0.9), note="hello",
                        extra={"a": 1.0}, inner=Inner(width=32, ratio=2.0, kind="resnet"))
    assert isinstance(cfg.inner.ratio, float) and isinstance(cfg.extra["a"], float)
    assert load_config(Outer, path).lr == 1e-4  # PyYAML reads 1e-4 as a string; a float field takes it
    assert load_config(Outer).inner == Inner()  # defaults with no file
    assert load_config(Outer, None, ["note=null"]).note is None


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("nmae: x\n", [], r"nmae: unknown key; allowed keys: name, lr, flag"),
        ("inner:\n  widht: 3\n", [], r"inner.widht: unknown key; allowed keys in inner: width, ratio, kind"),
        ("lr: fast\n", [], r"lr: expected a number, got str 'fast'"),
        ("flag: 1\n", [], r"flag: expected true or false"),
        ("inner: {width: 2.5}\n", [], r"inner.width: expected an integer, got float"),
        ("inner: {width: true}\n", [], r"inner.width: expected an integer, got bool"),
        ("inner: {kind: vgg}\n", [], r"inner.kind='vgg' is not allowed; allowed values: 'vit', 'resnet'"),
        ("inner: {width: 0}\n", [], r"inner: width=0 must be >= 1"),
        ("betas: [0.9]\n", [], r"betas: expected 2 items"),
        ("layers: [1, x]\n", [], r"layers\[1\]: expected an integer"),
        ("inner: 3\n", [], r"inner: expected a section"),
        ("- a\n- b\n", [], r"top level must be a mapping"),
        ("", ["inner.depth=3"], r"inner.depth is not a key; allowed keys in inner: width, ratio, kind"),
        ("", ["lr.x=3"], r"lr is a float, not a section"),
        ("", ["lr"], r"must look like key=value"),
        ("", ["lr=[1"], r"not valid YAML"),
        ("", ["inner.width=wide"], r"inner.width: expected an integer, got str 'wide'"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(tmp_path, text, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(Outer, write(tmp_path, text), overrides)


def test_missing_file_and_required_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")

    @dataclasses.dataclass
    class Needs:
        folder: str

    with pytest.raises(ValueError, match="folder: required key is missing"):
        from_dict(Needs, {})


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(Outer, None, ["inner.width=7", "betas=[0.5, 0.6]", "extra={b: 2.5}"])
    save_config(cfg, tmp_path / "sub/config.yaml")
    assert load_config(Outer, tmp_path / "sub/config.yaml") == cfg
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["config.yaml"]  # no temporary file left


def test_overrides_do_not_modify_the_input_mapping():
    data = {"inner": {"width": 3}}
    out = apply_overrides(Outer, data, ["inner.width=4", "inner.ratio=1"])
    assert data == {"inner": {"width": 3}} and out == {"inner": {"width": 4, "ratio": 1}}
    assert parse_override("a.b= [1, 2]") == (["a", "b"], [1, 2])
