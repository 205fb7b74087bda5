"""Backbones: feature extractors that return multi-level feature maps for the detectors.

Every backbone is built by name through the registry (:mod:`dlnotes.backbones.registry`):
``build_backbone(name, input_shape, weights, **knobs)`` returns a functional ``keras.Model``
mapping images to ``[C3, C4, C5]`` (strides 8, 16, 32; ``[C4]`` for the VGG16 trunk), and
``preprocess_for(name)`` the layer that maps RGB ``[0, 255]`` images to its input.
:data:`BACKBONES` lists the names; ``weights="shapes"`` loads the weights pre-trained on the
shapes (:mod:`dlnotes.pretraining`) shipped for the backbones of :data:`SHAPES_WEIGHTS`.

* :mod:`dlnotes.backbones.resnet` — ResNet-18/34/50/101/152 and ResNeXt-50/101 (32x4d), and a
  tiny CPU variant (:func:`build_resnet`).
* :mod:`dlnotes.backbones.darknet` — Darknet-53, YOLOv3's body (conv-BN-leaky, residual
  1x1 + 3x3 blocks, ``initial_filters`` knob; :func:`build_darknet53`); darknet ``.cfg`` /
  ``.weights`` conversion is in :mod:`dlnotes.darknet_io`.
* :mod:`dlnotes.backbones.efficientnet` — EfficientNet-B0...B7, layer for layer
  keras.applications' (MBConv blocks with squeeze-excite, compound scaling, the input
  normalisation inside the model), and a tiny CPU variant (:func:`build_efficientnet`).
* :mod:`dlnotes.backbones.vgg` — VGG16 as Faster R-CNN's trunk: keras.applications' 13 convs
  without the last max pool, C4 = ``block5_conv3`` at stride 16, ``frozen_blocks`` to fix
  conv1-conv2 (:func:`build_vgg16`).
* :mod:`dlnotes.backbones.weights` — what every family shares: the conv initializer, loading
  ``.weights.h5`` files with clear errors, copying weights by layer name (keras.applications).
* :mod:`dlnotes.backbones.preprocessing` — the input conventions (caffe, torch, unit, none).
"""

from dlnotes.backbones.darknet import DARKNET53_BLOCKS, DARKNET53_OUTPUT_LAYERS, build_darknet53
from dlnotes.backbones.efficientnet import (
    EFFICIENTNETS,
    build_efficientnet,
    copy_keras_applications_weights,
)
from dlnotes.backbones.preprocessing import ImagePreprocessing
from dlnotes.backbones.registry import (
    BACKBONES,
    SHAPES_WEIGHTS,
    Backbone,
    build_backbone,
    output_strides,
    preprocess_for,
    register_backbone,
)
from dlnotes.backbones.resnet import IMAGENET_WEIGHTS, RESNETS, build_resnet
from dlnotes.backbones.vgg import VGG16_BLOCKS, VGG16_LEVEL_LAYERS, build_vgg16
from dlnotes.backbones.weights import copy_weights_by_name, kernel_initializer, load_weights_file

__all__ = [
    "BACKBONES",
    "SHAPES_WEIGHTS",
    "DARKNET53_BLOCKS",
    "DARKNET53_OUTPUT_LAYERS",
    "EFFICIENTNETS",
    "IMAGENET_WEIGHTS",
    "RESNETS",
    "VGG16_BLOCKS",
    "VGG16_LEVEL_LAYERS",
    "Backbone",
    "ImagePreprocessing",
    "build_backbone",
    "build_darknet53",
    "build_efficientnet",
    "build_resnet",
    "build_vgg16",
    "copy_keras_applications_weights",
    "copy_weights_by_name",
    "kernel_initializer",
    "load_weights_file",
    "output_strides",
    "preprocess_for",
    "register_backbone",
]
