"""Saving and loading models without losing what the user had, and with errors that say what is
wrong with a file.

Keras' own behaviour, which these helpers guard against:

* ``model.save("x.keras")`` replaces an existing ``x.keras`` without a word (``overwrite=True``
  is its default); with ``overwrite=False`` it *asks* on the terminal, and where nothing can
  answer (a notebook kernel, a job, a test) it fails with ``EOFError``;
* an interrupted save leaves a partial file in place of the old one;
* ``keras.saving.load_model`` reports a truncated or corrupt ``.keras`` file (or a text file
  with that name) as "File not found" or a bare zip error, for a file that exists.

:func:`save_model` never replaces a file unless asked (``FileExistsError``), writes to a
temporary file in the same folder and renames it, so an interrupted save changes nothing;
:func:`load_model` checks the archive first and names the problem. :func:`writing` is the
atomic-write step both use (and :func:`dlnotes.darknet_io.save_darknet_weights`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile

import keras

__all__ = ["load_model", "save_model", "writing"]

# What Keras 3 puts into a .keras archive (keras.src.saving.saving_lib).
_KERAS_ENTRIES = ("config.json", "metadata.json", "model.weights.h5")


@contextlib.contextmanager
def writing(path, overwrite=False, owner="save", suffix=""):
    """Yields a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is False, and
    ``FileNotFoundError`` naming ``path``'s folder when it does not exist, before anything is
    written. On any error the temporary file is removed and ``path`` is left as it was.
    ``suffix``: the temporary file's ending (Keras wants ``.keras``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{owner}: {path!r} is a folder; give a file name")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{owner}: {path!r} exists and is kept; pass overwrite=True to replace it, or "
            "choose another file name"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{owner}: cannot write {path!r}: its folder {folder!r} does not exist"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model, path, overwrite=False):
    """``model.save(path)`` that never replaces an existing file unless ``overwrite=True``.

    Args:
        model: a Keras model (any dlnotes detector).
        path: a ``.keras`` file.
        overwrite: replace an existing file.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``path`` does not end with ``.keras``.
        FileExistsError: ``path`` exists and ``overwrite`` is False (nothing is asked).
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"save_model: {path!r} must end with .keras (Keras' model format)")
    with writing(path, overwrite, owner="save_model", suffix=".keras") as tmp:
        model.save(tmp, overwrite=True)  # the temporary file is ours to replace
    return path


def _archive_problem(path):
    """What is wrong with a ``.keras`` file, or None."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            start = f.read(4)
        if start.startswith(b"PK"):
            return "it is a truncated or corrupt zip archive (a .keras file is a zip)"
        if start.startswith(b"\x89HDF"):
            return (
                "it is an HDF5 file: a legacy .h5 model or a .weights.h5 file (load weights "
                "with model.load_weights)"
            )
        return f"it is not a zip archive (a .keras file is one); it starts with {start!r}"
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"its zip archive is damaged ({err})"
    if damaged is not None:
        return f"the entry {damaged!r} of its zip archive is damaged (a truncated copy?)"
    missing = [name for name in _KERAS_ENTRIES if name not in names]
    if missing:
        return f"the archive lacks {missing}, so it is not a Keras model file"
    return None


def load_model(path, **kwargs):
    """``keras.saving.load_model(path)`` after checking the file, with errors that say what is
    wrong with it (missing, a folder, not a zip archive, truncated, not a Keras model).

    ``kwargs`` go to ``keras.saving.load_model`` (``compile``, ``safe_mode``, ...). The dlnotes
    detectors are registered Keras objects, so no ``custom_objects`` are needed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable ``.keras`` model file (the message says why).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_model: {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(
            f"load_model: {path!r} is a folder (a TensorFlow SavedModel?); dlnotes models are "
            "single .keras files (save_model)"
        )
    problem = _archive_problem(path)
    if problem:
        raise ValueError(f"load_model: cannot load {path!r}: {problem}")
    try:
        return keras.saving.load_model(path, **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise ValueError(f"load_model: cannot load {path!r}: {err}") from err
