"""Backbones: feature extractors that return multi-level feature maps for the detectors.

* :mod:`dlnotes.backbones.resnet` — ResNet-18/34/50/101/152 and ResNeXt-50/101 (32x4d), returning
  ``[C3, C4, C5]`` (strides 8, 16, 32) through the single entry point :func:`build_backbone`.
* :mod:`dlnotes.backbones.darknet` — Darknet-53, YOLOv3's body (conv-BN-leaky, residual 1x1 + 3x3
  blocks, ``initial_filters`` knob), returning ``[C3, C4, C5]`` through
  :func:`build_darknet53`; darknet ``.cfg`` / ``.weights`` conversion is in
  :mod:`dlnotes.darknet_io`.
"""

from dlnotes.backbones.darknet import DARKNET53_BLOCKS, DARKNET53_OUTPUT_LAYERS, build_darknet53
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
    "DARKNET53_BLOCKS",
    "DARKNET53_OUTPUT_LAYERS",
    "IMAGENET_WEIGHTS",
    "ImagePreprocessing",
    "build_backbone",
    "build_darknet53",
    "copy_weights_by_name",
    "output_strides",
    "preprocess_for",
]
