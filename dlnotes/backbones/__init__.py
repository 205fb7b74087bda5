"""Backbones: feature extractors that return multi-level feature maps for the detectors.

* :mod:`dlnotes.backbones.resnet` — ResNet-18/34/50/101/152 and ResNeXt-50/101 (32x4d), returning
  ``[C3, C4, C5]`` (strides 8, 16, 32) through the single entry point :func:`build_backbone`.
"""

from dlnotes.backbones.resnet import (
    BACKBONES,
    IMAGENET_WEIGHTS,
    ImagePreprocessing,
    build_backbone,
    copy_weights_by_name,
    output_strides,
    preprocess_for,
)

__all__ = [
    "BACKBONES",
    "IMAGENET_WEIGHTS",
    "ImagePreprocessing",
    "build_backbone",
    "copy_weights_by_name",
    "output_strides",
    "preprocess_for",
]
