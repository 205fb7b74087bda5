"""Data: the synthetic shapes data set, COCO JSON into ``tf.data``, and box-aware transforms.

* :mod:`dlnotes.data.shapes` — :func:`generate_shapes_dataset` writes the book's deterministic
  synthetic detection data set (COCO format with keypoints).
* :mod:`dlnotes.data.coco` — :class:`CocoDataset` validates a COCO JSON and builds padded,
  static-shape ``tf.data`` pipelines (boxes xyxy pixels, padding -1).
* :mod:`dlnotes.data.transforms` — resize / letterbox / horizontal flip of an image together with
  its boxes and keypoints, as TensorFlow graph ops.

The names below are imported lazily (PEP 562), so ``python -m dlnotes.data.shapes`` neither pays
for importing TensorFlow nor trips runpy's "found in sys.modules" warning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_SOURCE = {
    "CLASS_NAMES": "shapes",
    "KEYPOINT_NAMES": "shapes",
    "KEYPOINT_SKELETON": "shapes",
    "KEYPOINT_FLIP_PAIRS": "shapes",
    "render_sample": "shapes",
    "generate_shapes_dataset": "shapes",
    "default_data_dir": "shapes",
    "load_shapes": "shapes",
    "CocoDataset": "coco",
    "CocoDataWarning": "coco",
    "resize": "transforms",
    "letterbox": "transforms",
    "horizontal_flip": "transforms",
    "random_horizontal_flip": "transforms",
    "undo_letterbox": "transforms",
    "undo_letterbox_keypoints": "transforms",
    "keypoint_flip_pairs": "transforms",
    "valid_box_mask": "transforms",
}

__all__ = [
    "CLASS_NAMES",
    "KEYPOINT_NAMES",
    "KEYPOINT_SKELETON",
    "KEYPOINT_FLIP_PAIRS",
    "render_sample",
    "generate_shapes_dataset",
    "default_data_dir",
    "load_shapes",
    "CocoDataset",
    "CocoDataWarning",
    "resize",
    "letterbox",
    "horizontal_flip",
    "random_horizontal_flip",
    "undo_letterbox",
    "undo_letterbox_keypoints",
    "keypoint_flip_pairs",
    "valid_box_mask",
]

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from dlnotes.data.coco import CocoDataset, CocoDataWarning
    from dlnotes.data.shapes import (
        CLASS_NAMES,
        KEYPOINT_FLIP_PAIRS,
        KEYPOINT_NAMES,
        KEYPOINT_SKELETON,
        default_data_dir,
        generate_shapes_dataset,
        load_shapes,
        render_sample,
    )
    from dlnotes.data.transforms import (
        horizontal_flip,
        keypoint_flip_pairs,
        letterbox,
        random_horizontal_flip,
        resize,
        undo_letterbox,
        undo_letterbox_keypoints,
        valid_box_mask,
    )


def __getattr__(name: str):
    if name in _SOURCE:
        value = getattr(importlib.import_module(f"dlnotes.data.{_SOURCE[name]}"), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'dlnotes.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
