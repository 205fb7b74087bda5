"""The backbone registry: every feature extractor of the package under one name.

A detector asks for a backbone by name and gets a functional ``keras.Model`` mapping images to
``[C3, C4, C5]`` (output layers named ``"C{level}"``, stride ``2**level``; ``vgg16``, the Faster
R-CNN trunk, returns ``[C4]`` by default) plus the preprocessing layer its weights expect::

    backbone = build_backbone("darknet53", (416, 416, 3), initial_filters=8)
    preprocessing = preprocess_for("darknet53")          # RGB [0, 255] -> [0, 1]
    output_strides(backbone)                             # (8, 16, 32)

:data:`BACKBONES` lists the names with their family; :func:`register_backbone` adds a family
(a builder ``(input_shape, weights, **knobs) -> keras.Model`` and the preprocessing rule).

``weights="shapes"`` loads the weights shipped for the backbones of :data:`SHAPES_WEIGHTS`:
pre-trained to classify the shapes (:mod:`dlnotes.pretraining`), the book's stand-in for
ImageNet.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import keras

from dlnotes.backbones import darknet, efficientnet, resnet, vgg
from dlnotes.backbones.preprocessing import ImagePreprocessing

__all__ = [
    "BACKBONES",
    "SHAPES_WEIGHTS",
    "Backbone",
    "build_backbone",
    "output_strides",
    "preprocess_for",
    "register_backbone",
]


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One registered backbone.

    Attributes:
        family: the module that implements it (``"resnet"``, ``"darknet"``, ...).
        build: ``build(input_shape, weights, **knobs) -> keras.Model`` returning ``[C3, C4, C5]``
            (or the levels its ``levels`` knob selects; ``[C4]`` for vgg16 by default).
        preprocessing: ``preprocessing(weights) -> mode`` of
            :class:`~dlnotes.backbones.preprocessing.ImagePreprocessing`; it validates
            ``weights`` the way ``build`` does (without building anything).
        description: one line for listings.
    """

    family: str
    build: Callable[..., keras.Model]
    preprocessing: Callable[[object], str]
    description: str


#: Backbones with shipped ``weights="shapes"``: name -> file in ``dlnotes/backbones/shapes_weights``
#: (made by ``python -m dlnotes.pretraining``, for the backbone's default knobs).
SHAPES_WEIGHTS = {"resnet_tiny": "resnet_tiny.weights.h5"}


def _resolve_weights(name, weights):
    """``"shapes"`` -> the shipped file of backbone ``name``; anything else unchanged."""
    if not (isinstance(weights, str) and weights == "shapes"):
        return weights
    if name not in SHAPES_WEIGHTS:
        raise ValueError(
            f"{name}: no shapes weights; weights='shapes' exists for {list(SHAPES_WEIGHTS)} "
            "(make them for another backbone with python -m dlnotes.pretraining)"
        )
    return os.fspath(Path(__file__).parent / "shapes_weights" / SHAPES_WEIGHTS[name])


#: Every backbone by name; see :func:`register_backbone`.
BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, backbone: Backbone) -> None:
    """Adds ``backbone`` under ``name`` (``ValueError`` if the name is taken)."""
    if name in BACKBONES:
        raise ValueError(f"register_backbone: a backbone named {name!r} already exists")
    BACKBONES[name] = backbone


def _entry(name):
    if not isinstance(name, str) or name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {list(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(
    name: str,
    input_shape: Sequence[int | None] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    **knobs,
) -> keras.Model:
    """Build backbone ``name`` of :data:`BACKBONES` (knobs as its family's builder takes them:
    :func:`~dlnotes.backbones.resnet.build_resnet`,
    :func:`~dlnotes.backbones.darknet.build_darknet53`,
    :func:`~dlnotes.backbones.efficientnet.build_efficientnet`,
    :func:`~dlnotes.backbones.vgg.build_vgg16`).

    ``weights``: None, a ``.weights.h5`` file, ``"imagenet"`` where the family has it, or
    ``"shapes"`` for the backbones of :data:`SHAPES_WEIGHTS`.

    Returns a functional ``keras.Model`` from ``(B, H, W, C)`` images (as :func:`preprocess_for`
    makes them) to ``[C3, C4, C5]`` (strides 8, 16, 32); for ``vgg16`` to ``[C4]``
    (``block5_conv3``, stride 16) unless its ``levels`` knob asks for others.

    Raises:
        ValueError: unknown name, or what the family's builder raises (knobs out of range, a
            weights file that does not fit); ``FileNotFoundError`` for a missing weights file.
    """
    return _entry(name).build(input_shape, _resolve_weights(name, weights), **knobs)


def preprocess_for(name: str, weights: str | os.PathLike | None = None) -> ImagePreprocessing:
    """The preprocessing layer a detector puts in front of backbone ``name``.

    Maps ``(B, H, W, 3)`` RGB in ``[0, 255]`` to the backbone's input: ``"caffe"`` for
    resnet50/101/152 and vgg16 (keras.applications), ``"torch"`` for the torchvision-layout
    ResNets, ``"unit"`` (``x / 255``) for Darknet-53, ``"none"`` (identity) for the EfficientNets,
    which normalise inside the model. ``weights`` is validated as by
    :func:`build_backbone` but does not change the mode, so that a checkpoint fine-tuned from
    pretrained weights keeps the convention it was trained with.

    Returns:
        A new :class:`~dlnotes.backbones.preprocessing.ImagePreprocessing` layer named
        ``"{name}_preprocessing"``.
    """
    mode = _entry(name).preprocessing(_resolve_weights(name, weights))
    return ImagePreprocessing(mode, name=f"{name}_preprocessing")


def output_strides(model: keras.Model) -> tuple[int, ...]:
    """Strides of a backbone's outputs, read from the output layer names ``"C{level}"``.

    Returns ``2**level`` per output: ``(8, 16, 32)`` for ``[C3, C4, C5]``.
    Works on a model reloaded with ``keras.saving.load_model``.
    """
    strides = []
    for out_name in model.output_names:
        if len(out_name) != 2 or out_name[0] != "C" or not out_name[1].isdigit():
            raise ValueError(
                f"output_strides: output {out_name!r} of {model.name!r} is not named C<level>; "
                "was the model built by dlnotes.backbones.build_backbone?"
            )
        strides.append(2 ** int(out_name[1]))
    return tuple(strides)


def _register_builtins():
    for name in resnet.RESNETS:
        register_backbone(
            name,
            Backbone(
                family="resnet",
                build=lambda shape, weights, _name=name, **knobs: resnet.build_resnet(
                    _name, shape, weights, **knobs
                ),
                preprocessing=lambda weights, _name=name: resnet.preprocessing_mode(_name, weights),
                description=resnet.describe(name),
            ),
        )
    register_backbone(
        "darknet53",
        Backbone(
            family="darknet",
            build=lambda shape, weights, **knobs: darknet.build_darknet53(
                shape, weights=weights, **knobs
            ),
            preprocessing=darknet.preprocessing_mode,
            description="Darknet-53, YOLOv3's body (conv-BN-leaky, 5 stages of residual blocks)",
        ),
    )
    for name in efficientnet.EFFICIENTNETS:
        register_backbone(
            name,
            Backbone(
                family="efficientnet",
                build=lambda shape, weights, _name=name, **knobs: efficientnet.build_efficientnet(
                    _name, shape, weights, **knobs
                ),
                preprocessing=lambda weights, _name=name: efficientnet.preprocessing_mode(
                    _name, weights
                ),
                description=efficientnet.describe(name),
            ),
        )
    register_backbone(
        "vgg16",
        Backbone(
            family="vgg",
            build=lambda shape, weights, **knobs: vgg.build_vgg16(shape, weights, **knobs),
            preprocessing=vgg.preprocessing_mode,
            description=vgg.VGG16_DESCRIPTION,
        ),
    )


_register_builtins()
