"""The package's top level: submodules load on first use."""

import subprocess
import sys

import pytest

import dlnotes


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_import_dlnotes_does_not_start_tensorflow():
    out = _run("import sys, dlnotes; print('tensorflow' in sys.modules, dlnotes.__version__)")
    assert out.stdout.split() == ["False", dlnotes.__version__]


def test_submodules_load_on_first_use():
    out = _run(
        "import dlnotes; from dlnotes import boxes; "
        "print(dlnotes.boxes is boxes, dlnotes.viz.__name__)"
    )
    assert out.stdout.split() == ["True", "dlnotes.viz"]
    assert set(dlnotes.__all__) <= set(dir(dlnotes))


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'boxs'"):
        dlnotes.boxs  # noqa: B018
