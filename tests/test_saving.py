"""Tests of dlnotes.saving: no silent overwrite, atomic writes, clear errors for bad files."""

import os
import zipfile

import numpy as np
import pytest

from dlnotes.models import RetinaNet
from dlnotes.saving import load_model, save_model, writing


@pytest.fixture(scope="module")
def model():
    return RetinaNet.from_preset(
        "retinanet_tiny_256", num_classes=2, image_size=(64, 64), head_depth=1, num_channels=8
    )


def test_save_never_overwrites_unless_asked(model, tmp_path):
    path = tmp_path / "model.keras"
    assert save_model(model, path) == os.fspath(path)
    saved = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"model\.keras' exists and is kept; pass "
                       "overwrite=True"):  # fmt: skip
        save_model(model, path)  # no terminal prompt, no EOFError
    assert path.read_bytes() == saved
    save_model(model, path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]  # no temporary file left behind
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    loaded = load_model(path)
    assert isinstance(loaded, RetinaNet)
    for key, value in model(x).items():
        np.testing.assert_array_equal(loaded(x)[key], value)


def test_save_errors_name_the_path(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot write .*nowhere/m\.keras': its folder"):
        save_model(model, tmp_path / "nowhere" / "m.keras")
    with pytest.raises(ValueError, match=r"must end with \.keras"):
        save_model(model, tmp_path / "m.h5")
    (tmp_path / "dir.keras").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_model(model, tmp_path / "dir.keras")


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with writing(path, overwrite=True) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.bin"]


def test_load_names_what_is_wrong_with_the_file(model, tmp_path):
    good = tmp_path / "good.keras"
    save_model(model, good)
    data = good.read_bytes()
    cases = {
        "truncated.keras": (data[: len(data) // 2], "truncated or corrupt zip archive"),
        "text.keras": (b"not a model at all", "not a zip archive"),
        "legacy.keras": (b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5 file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"cannot load '.*{name}': .*{message}"):
            load_model(tmp_path / name)
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"lacks \['config.json'"):
        load_model(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.keras")
