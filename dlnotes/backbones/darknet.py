"""Darknet-53, the body of YOLOv3 (Redmon & Farhadi 2018), returning the C3, C4, C5 feature maps.

The network is darknet's ``yolov3.cfg`` up to layer 74 (equivalently keras-yolo3's
``darknet_body``)::

    conv3x3 f                                                   darknet conv 0
    5 stages s = 1..5:  conv3x3/2 to 2**s f  +  n_s residual blocks, n = (1, 2, 8, 8, 4)
    residual block (c channels):  x + conv3x3_c(conv1x1_{c/2}(x))

Every conv is conv -> BatchNorm -> leaky ReLU (slope 0.1): 52 convs, 23 residual adds. Stride-2
convs pad one row on top and one column on the left (``ZeroPadding2D(((1, 0), (1, 0)))``) and
then use "valid" padding, as darknet does on even sizes and keras-yolo3 does always; the others
use "same". The model is a plain functional ``keras.Model`` of stock layers::

    body = build_darknet53()                   # input (B, H, W, 3) float32, RGB in [0, 1]
    c3, c4, c5 = body(images)                  # (B, H/8, W/8, 256) (B, H/16, W/16, 512) ...

**Outputs** ``[C3, C4, C5]``, Identity layers named ``"C3"``, ``"C4"``, ``"C5"`` after the last
residual add of stages 3, 4, 5, i.e. darknet layers 36, 61 and 74 (the layers ``yolov3.cfg``
routes to). ``C_l`` has shape ``(B, floor(H / 2**l), floor(W / 2**l), 2**l * f)``: 256 / 512 / 1024
channels for the default ``f = initial_filters = 32``. Every stride-2 step maps a size ``n`` to
``floor((n + 1 - 3) / 2) + 1 = floor(n / 2)``, so sizes that are not multiples of 32 are
**rounded down** (a 100x132 image gives 12x16, 6x8, 3x4; ResNet's symmetric padding rounds up).
YOLO's heads need ``H`` and ``W`` divisible by 32 (each output cell is one stride-32 cell of the
image); the body itself accepts any ``H, W >= 32``. Darknet, whose stride-2 convs pad on both
sides, rounds odd sizes *up*; for the even sizes YOLO uses both give ``n / 2`` and the same
sampling grid, which is why weights convert between them.

**Layer names** follow darknet's cfg order: ``conv{i}``, ``bn{i}``, ``leaky{i}`` for darknet conv
``i = 0..51`` (and ``pad{i}`` before the five stride-2 convs), ``shortcut{k}`` for the residual add
that is darknet layer ``k``. Layers are created in cfg order, so
:func:`dlnotes.darknet_io.darknet_units` lists the (conv, BN) pairs in the order of a darknet
``.weights`` file. The model has 188 layers: keras-yolo3's 185 (its notes count 180 without the
five paddings) plus the three Identity outputs.

**Parameters** (3-channel input): 40,620,640 for ``f = 32`` (darknet's count: conv kernels plus
4 BatchNorm numbers per channel, of which the moving mean and variance, 17,856 x 2, are not
trainable). ``use_bias=True`` adds a bias to every conv, as the notes' Keras code did: 40,638,496
for ``f = 32``, 2,556,808 for ``f = 8`` (the figures in the notes). The bias is redundant before
BatchNorm; darknet files have no slot for it and :mod:`dlnotes.darknet_io` folds it into the BN
moving mean on save.

**Initialisation**: kernels use He-normal on fan-out, ``VarianceScaling(2.0, "fan_out",
"untruncated_normal")``, the initializer of every dlnotes backbone. Darknet itself
draws ``N(0, 2 / fan_in)``, the same He family; since BatchNorm follows every conv the
fan-in / fan-out choice does not change the scale of the activations, and one initializer across
the package's backbones keeps backbone comparisons about architecture, not initialisation.
BatchNorm starts at gamma = 1, beta = 0; ``norm_momentum=0.99`` is darknet's 0.01 update rate of
the rolling statistics.

**Pretrained weights**: darknet's ImageNet-trained body is ``darknet53.conv.74`` from
https://pjreddie.com/media/files/darknet53.conv.74 (162,482,580 bytes = 20-byte header + 4 bytes
x 40,620,640 parameters). On Colab, download it and pass its path as ``weights`` (3-channel
input, ``initial_filters=32``). Darknet normalises with ``(x - mean) / (sqrt(var) + 1e-6)``;
the Keras BN uses ``sqrt(var + norm_epsilon)``, so a small ``norm_epsilon`` (e.g. 1e-5) follows
the converted weights more closely than Keras' default 1e-3 (keras-yolo3 kept 1e-3).

The model works inside ``tf.function(jit_compile=True)`` (stock layers only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from dlnotes.backbones.weights import kernel_initializer, load_weights_file
from dlnotes.checks import positive_int
from dlnotes.darknet_io import load_darknet_weights
from dlnotes.darknet_layout import DARKNET53_BLOCKS, DARKNET53_OUTPUT_LAYERS

__all__ = ["DARKNET53_BLOCKS", "DARKNET53_OUTPUT_LAYERS", "build_darknet53", "preprocessing_mode"]

_MIN_SIZE = 32  # five floor(n / 2) steps must leave C5 at least 1 pixel
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


class _Builder:
    """Appends darknet layers to a functional graph, counting convs and layers in cfg order."""

    def __init__(self, use_bias, negative_slope, norm_momentum, norm_epsilon):
        self.use_bias = use_bias
        self.negative_slope = negative_slope
        self.norm_momentum = norm_momentum
        self.norm_epsilon = norm_epsilon
        self.conv_index = 0  # darknet conv index (position in the .weights file)
        self.layer_index = 0  # darknet layer index ([net] excluded), as routes count

    def conv(self, x, filters, kernel_size, stride=1):
        """conv-BN-leaky; stride 2 pads top/left by one and uses "valid" (darknet's grid)."""
        i = self.conv_index
        padding = "same"
        if stride == 2:
            x = layers.ZeroPadding2D(((1, 0), (1, 0)), name=f"pad{i}")(x)
            padding = "valid"
        x = layers.Conv2D(
            filters,
            kernel_size,
            strides=stride,
            padding=padding,
            use_bias=self.use_bias,
            kernel_initializer=kernel_initializer(),
            name=f"conv{i}",
        )(x)
        x = layers.BatchNormalization(
            momentum=self.norm_momentum, epsilon=self.norm_epsilon, name=f"bn{i}"
        )(x)
        x = layers.LeakyReLU(negative_slope=self.negative_slope, name=f"leaky{i}")(x)
        self.conv_index += 1
        self.layer_index += 1
        return x

    def residual(self, x):
        """x + conv3x3_c(conv1x1_{c/2}(x)): darknet's [conv] [conv] [shortcut from=-3]."""
        channels = x.shape[-1]
        y = self.conv(x, channels // 2, 1)
        y = self.conv(y, channels, 3)
        x = layers.Add(name=f"shortcut{self.layer_index}")([x, y])
        self.layer_index += 1
        return x


# ----------------------------------------------------------------------------- validation


def _resolve_input_shape(input_shape):
    try:
        shape = tuple(input_shape)
    except TypeError as err:
        raise ValueError(
            f"build_darknet53: input_shape must be (H, W, C), got {input_shape!r}"
        ) from err
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            "build_darknet53: input_shape must be (H, W, C) with a known channel count "
            f"(channels last), got {input_shape!r}"
        )
    for dim in shape:
        if dim is not None:
            positive_int(dim, f"every entry of input_shape {shape}", "build_darknet53")
    for dim, what in zip(shape[:2], ("height", "width"), strict=True):
        if dim is not None and dim < _MIN_SIZE:
            raise ValueError(
                f"build_darknet53: input {what} {dim} is below {_MIN_SIZE}: five stride-2 convs "
                f"(each floor(n / 2)) would leave C5 empty; input_shape={shape}"
            )
    return shape


def _weights_kind(weights):
    """None, ("keras", path) or ("darknet", path); the file is sniffed, not trusted by name.

    ``darknet53.conv.74`` has no ``.weights`` suffix, so anything that is not an HDF5 (Keras
    ``.weights.h5``) or zip (``.keras``) file is read as darknet's raw format, whose size check
    rejects files that are not.
    """
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            "build_darknet53: weights must be None, a .weights.h5 file or a darknet .weights "
            f"file, got {weights!r}"
        )
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"build_darknet53: weights file {path!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(_ZIP_MAGIC) or path.endswith(".keras"):
        raise ValueError(
            f"build_darknet53: {path!r} is a whole saved model (.keras); load it with "
            "keras.saving.load_model, or pass a .weights.h5 / darknet .weights file"
        )
    if magic == _HDF5_MAGIC or path.endswith(".h5"):
        if not path.endswith(".weights.h5"):
            raise ValueError(
                f"build_darknet53: {path!r} is an HDF5 file; Keras 3 loads weights only from "
                "files named '*.weights.h5' (model.save_weights('x.weights.h5'))"
            )
        return "keras", path
    return "darknet", path


# ----------------------------------------------------------------------------- public API


def build_darknet53(
    input_shape: Sequence[int | None] = (None, None, 3),
    initial_filters: int = 32,
    use_bias: bool = False,
    negative_slope: float = 0.1,
    norm_momentum: float = 0.99,
    norm_epsilon: float = 1e-3,
    weights: str | os.PathLike | None = None,
    name: str = "darknet53",
) -> keras.Model:
    """Build the Darknet-53 feature extractor of YOLOv3.

    Args:
        input_shape: ``(H, W, C)``, channels last; ``H`` / ``W`` may be None (any size at call
            time). Static sizes must be at least 32. Inputs are RGB floats scaled to ``[0, 1]``
            (darknet's input: ``image / 255``, no mean or std).
        initial_filters: ``f``, the width of the first conv; the stages have
            ``2f, 4f, 8f, 16f, 32f`` channels (the notes' knob for small data sets: ``f = 8``
            has 2.5 M parameters with bias).
        use_bias: add a bias to every conv (the notes' Keras code); darknet has none before BN.
        negative_slope: leaky ReLU slope (darknet: 0.1).
        norm_momentum: BatchNorm moving-average momentum.
        norm_epsilon: BatchNorm epsilon.
        weights: None (random init); the path to a ``.weights.h5`` file saved with
            ``model.save_weights`` from a body built with the same knobs; or a darknet weights
            file (e.g. ``darknet53.conv.74``, see the module docstring), read with
            :func:`dlnotes.darknet_io.load_darknet_weights`.
        name: model name.

    Returns:
        A functional ``keras.Model`` mapping ``(B, H, W, C)`` float images to ``[C3, C4, C5]``,
        ``C_l`` of shape ``(B, floor(H / 2**l), floor(W / 2**l), 2**l * initial_filters)``
        (strides 8, 16, 32), output layers named ``"C3"``, ``"C4"``, ``"C5"``.

    Raises:
        ValueError: a knob out of range, an input smaller than 32, or a weights file that does
            not fit this architecture (wrong knobs, truncated or too long).
        FileNotFoundError: the weights file does not exist.
    """
    f = positive_int(initial_filters, "initial_filters", "build_darknet53")
    input_shape = _resolve_input_shape(input_shape)
    weights_kind = _weights_kind(weights)
    negative_slope = float(negative_slope)
    if not np.isfinite(negative_slope):
        raise ValueError(f"build_darknet53: negative_slope must be finite, got {negative_slope}")

    builder = _Builder(bool(use_bias), negative_slope, float(norm_momentum), float(norm_epsilon))
    images = keras.Input(shape=input_shape, name="images")
    x = builder.conv(images, f, 3)
    features = []
    for stage, n_blocks in enumerate(DARKNET53_BLOCKS):
        x = builder.conv(x, f * 2 ** (stage + 1), 3, stride=2)
        for _ in range(n_blocks):
            x = builder.residual(x)
        level = stage + 1
        if level >= 3:
            features.append(layers.Identity(name=f"C{level}")(x))
    model = keras.Model(images, features, name=name)

    if weights_kind is not None:
        kind, path = weights_kind
        if kind == "keras":
            knobs = f"initial_filters={f}, use_bias={bool(use_bias)}, {input_shape[-1]} channels"
            load_weights_file(model, path, knobs)
        else:
            load_darknet_weights(model, path)
    return model


def preprocessing_mode(weights: str | os.PathLike | None = None) -> str:
    """``"unit"``: darknet's input is RGB ``image / 255``, with no mean or std, for any weights
    (validated as in :func:`build_darknet53`)."""
    _weights_kind(weights)
    return "unit"
