"""EfficientNet-B0 ... B7 (Tan & Le 2019) as feature extractors returning C3, C4, C5.

Every model is built by :func:`build_efficientnet` (or by name through the registry,
:func:`dlnotes.backbones.build_backbone`) and is a plain functional ``keras.Model`` of stock
``keras.layers``, layer for layer ``keras.applications.EfficientNetB0 ... B7``::

    backbone = build_backbone("efficientnet_b0")       # input (B, H, W, 3), RGB in [0, 255]
    c3, c4, c5 = backbone(images)                      # strides 8, 16, 32
    channels = [t.shape[-1] for t in backbone.outputs]  # (40, 112, 320)

**Architecture.** A stride-2 3x3 stem conv, seven stages of MBConv blocks and a 1x1 "top" conv
(1280 channels for B0). B0's stages (kernel, blocks, output channels, stride of the first
block, expansion): ``(3, 1, 16, 1, 1) (3, 2, 24, 2, 6) (5, 2, 40, 2, 6) (3, 3, 80, 2, 6)
(5, 3, 112, 1, 6) (5, 4, 192, 2, 6) (3, 1, 320, 1, 6)``. An MBConv block with ``c_in`` input
and ``c_out`` output channels and expansion ``e``::

    x -> [1x1 conv to e*c_in, BN, swish]  (only if e != 1)
      -> kxk depthwise conv (stride s), BN, swish
      -> squeeze-excite: global mean, 1x1 conv to max(1, int(c_in * 0.25)) + swish,
         1x1 conv back to e*c_in + sigmoid, times the features
      -> 1x1 projection conv to c_out, BN           (linear: no activation)
      -> + x, if s == 1 and c_in == c_out           (no activation after the add)

The squeeze-excite width is a quarter of the block's *input* channels, not of the expanded ones.
On a residual block the branch goes through drop-connect first: ``Dropout(rate,
noise_shape=(None, 1, 1, 1))`` drops the whole branch of a sample (stochastic depth), with
``rate = drop_connect_rate * b / n`` for block ``b = 0 .. n - 1`` of all ``n`` blocks (0.2 by
default, so it grows linearly from 0). Convolutions have no bias (a BatchNorm follows) except
the squeeze-excite ones; kernels use keras.applications' initialisers (conv: ``VarianceScaling(2,
"fan_out", "truncated_normal")``, dense: ``VarianceScaling(1/3, "fan_out", "uniform")``);
BatchNorm has Keras' defaults (momentum 0.99, epsilon 1e-3).

**Compound scaling.** Variant ``(width, depth, resolution, dropout)``: B0 (1.0, 1.0, 224, 0.2),
B1 (1.0, 1.1, 240, 0.2), B2 (1.1, 1.2, 260, 0.3), B3 (1.2, 1.4, 300, 0.3), B4 (1.4, 1.8, 380,
0.4), B5 (1.6, 2.2, 456, 0.4), B6 (1.8, 2.6, 528, 0.5), B7 (2.0, 3.1, 600, 0.5). Channels ``c``
become ``round_filters(c) = max(8, int(c * width + 4) // 8 * 8)``, plus 8 if that lost more than
10 %; a stage of ``r`` blocks gets ``ceil(depth * r)``. The resolution is the ImageNet training
size (:data:`SCALING`); the network takes any size. ``dropout`` is the rate before the
classifier (``top="classifier"`` only). ``efficientnet_tiny`` is B0 with width 0.25 and depth 0.5
(10 blocks, C3-C5 channels 16 / 32 / 80, 0.18 M parameters) for training on a CPU;
``width_coefficient`` / ``depth_coefficient`` override the scaling of any variant.

**Outputs.** ``[C3, C4, C5]`` by default, Identity layers named ``"C3"``, ``"C4"``, ``"C5"`` after
the last block of stages 3, 5 and 7 (the last stage at strides 8, 16, 32; keras.applications'
``block3b_add``, ``block5c_add``, ``block7a_project_bn`` for B0): 40 / 112 / 320 channels for
B0, 48 / 136 / 384 for B3, 80 / 224 / 640 for B7. ``levels=(1, 2, 3, 4, 5)`` adds C1 and C2 (the
ends of stages 1 and 2: 16 and 24 channels for B0). ``C_l`` has shape
``(B, ceil(H / 2**l), ceil(W / 2**l), channels_l)``: each of the five stride-2 convs uses
"same" padding and maps ``n`` to ``ceil(n / 2)``. The top conv is not part of a detection
backbone; ``top="conv"`` keeps it (C5 is then ``top_activation``, 1280 channels for B0: exactly
keras.applications' ``include_top=False`` network) and ``top="classifier"`` builds the
ImageNet classifier (global average pool, dropout, 1000-way dense; one output, the class
probabilities, or logits with ``classifier_activation=None``).

**keras.applications.** Every layer with weights has keras.applications' name and weight
shapes, so weights copy by name (:func:`copy_keras_applications_weights`, which
``weights="imagenet"`` uses). Two differences, neither of which has weights:

* keras.applications pads each stride-2 conv with an explicit ``ZeroPadding2D`` (``*_pad``)
  computed from the *static* input size; here the convs use "same". That is the same padding
  for every known size, even or odd (identical outputs), but for an input size of None
  keras.applications always pads (0, 1) (3x3) or (1, 2) (5x5), which on odd sizes gives
  ``floor(n / 2)`` and a shifted grid, where dlnotes gives ``ceil(n / 2)`` whether the size is
  known or not.
* keras.applications' input is ``Rescaling(1/255) -> Normalization`` and, with ImageNet
  weights, a second ``Rescaling(1 / sqrt(std))``: its weight files store the ImageNet *std*
  (0.229, 0.224, 0.225) as the Normalization's variance. dlnotes keeps the first two layers
  (named ``"rescaling"``, ``"normalization"``) and folds the second rescaling into the copied
  variance (``std * std``), so one architecture serves every ``weights``.

**Input / preprocessing.** The model normalises its input itself: it takes RGB float images in
``[0, 255]`` and computes ``(x / 255 - mean) / std`` with the ImageNet mean (0.485, 0.456, 0.406)
and std (0.229, 0.224, 0.225), the values its Normalization layer starts with (non-trainable
weights, loaded and saved with the model; an input with other than 3 channels starts at mean 0,
variance 1). The registry's preprocessing mode is therefore ``"none"`` (identity):
:func:`dlnotes.backbones.preprocess_for` returns a layer that only casts.

**Parameter counts** (``count_params()``, BatchNorm statistics and the Normalization's 7
weights included), equal to keras.applications' ``EfficientNetB{i}(weights=None)``:

======= ============ ============ ============ ==============
variant top          top="conv"   backbone     C3 / C4 / C5
======= ============ ============ ============ ==============
B0       5,330,571    4,049,571    3,634,851   40 / 112 / 320
B1       7,856,239    6,575,239    6,160,519   40 / 112 / 320
B2       9,177,569    7,768,569    7,267,321   48 / 120 / 352
B3      12,320,535   10,783,535   10,187,567   48 / 136 / 384
B4      19,466,823   17,673,823   16,863,839   56 / 160 / 448
B5      30,562,527   28,513,527   27,456,759   64 / 176 / 512
B6      43,265,143   40,960,143   39,623,823   72 / 200 / 576
B7      66,658,687   64,097,687   62,449,047   80 / 224 / 640
======= ============ ============ ============ ==============

"top" is ``top="classifier"`` (keras.applications' ``include_top=True``), ``top="conv"``
keras.applications' ``include_top=False``, "backbone" the default ``top=None``.
:func:`efficientnet_cost` gives these counts and the multiply-adds part by part from the
architecture's arithmetic, without building a model (B0: 0.386 G at 224, B7: 37.7 G at 600).
``efficientnet_tiny`` has 179,021 (205,901 with the top conv).

B0 has 5,288,548 trainable parameters (torchvision's and timm's ``efficientnet_b0`` figure:
torch counts no BatchNorm statistics) and 42,023 non-trainable ones (2 x 21,008 BatchNorm
channels and the Normalization's 7). The standalone ``keras-applications`` package had no
Rescaling / Normalization (its ``preprocess_input`` used "torch" mode), hence 5,330,564; it also
divided the drop-connect rate by the *unscaled* 16 blocks (``rate = 0.2 * b / 16``, up to 0.68
for B7), where keras.applications and dlnotes divide by the scaled count.

5,250,196, a figure quoted for B0, is none of these conventions. Computed candidates: trainable
only 5,288,548; without the Normalization 5,330,564; without the squeeze-excite biases
5,321,231; squeeze-excite reduced from the output channels 5,445,011 or from the expanded ones
8,465,871; 1001 classes 5,331,852; and every combination of these with squeeze-excite ratios
1/8 or 1/16, top widths 1024 / 1152 / 1536, without the top conv or the classifier (6,912
configurations). The nearest, 5,251,328 (1,132 off), needs four changes at once
(squeeze-excite from the expanded channels at ratio 1/8, no squeeze-excite biases, trainable
weights only, no classifier): no EfficientNet-B0 has 5,250,196 parameters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from dlnotes.backbones.weights import copy_weights_by_name, load_weights_file
from dlnotes.checks import positive_int

__all__ = [
    "EFFICIENTNETS",
    "IMAGENET_CONSTRUCTORS",
    "SCALING",
    "Scaling",
    "build_efficientnet",
    "copy_keras_applications_weights",
    "describe",
    "efficientnet_cost",
    "preprocessing_mode",
    "round_filters",
    "round_repeats",
]


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Compound scaling of one variant.

    Attributes:
        width: channel multiplier (``round_filters``).
        depth: block-count multiplier (``round_repeats``).
        resolution: the ImageNet training / evaluation size (informative; any size works).
        dropout: dropout rate before the classifier (``top="classifier"``).
    """

    width: float
    depth: float
    resolution: int
    dropout: float


#: Scaling of every variant by name.
SCALING: dict[str, Scaling] = {
    "efficientnet_tiny": Scaling(0.25, 0.5, 128, 0.2),
    "efficientnet_b0": Scaling(1.0, 1.0, 224, 0.2),
    "efficientnet_b1": Scaling(1.0, 1.1, 240, 0.2),
    "efficientnet_b2": Scaling(1.1, 1.2, 260, 0.3),
    "efficientnet_b3": Scaling(1.2, 1.4, 300, 0.3),
    "efficientnet_b4": Scaling(1.4, 1.8, 380, 0.4),
    "efficientnet_b5": Scaling(1.6, 2.2, 456, 0.4),
    "efficientnet_b6": Scaling(1.8, 2.6, 528, 0.5),
    "efficientnet_b7": Scaling(2.0, 3.1, 600, 0.5),
}

#: Names accepted by :func:`build_efficientnet` (and :func:`dlnotes.backbones.build_backbone`).
EFFICIENTNETS: tuple[str, ...] = tuple(SCALING)

#: Variants with ``weights="imagenet"``: the keras.applications constructor of each.
IMAGENET_CONSTRUCTORS: dict[str, str] = {
    f"efficientnet_b{i}": f"EfficientNetB{i}" for i in range(8)
}


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One stage of B0: kernel size, blocks, input / output channels, expansion, first stride."""

    kernel: int
    repeats: int
    filters_in: int
    filters_out: int
    expand: int
    stride: int


_B0_STAGES = (
    _Stage(3, 1, 32, 16, 1, 1),
    _Stage(3, 2, 16, 24, 6, 2),
    _Stage(5, 2, 24, 40, 6, 2),
    _Stage(3, 3, 40, 80, 6, 2),
    _Stage(5, 3, 80, 112, 6, 1),
    _Stage(5, 4, 112, 192, 6, 2),
    _Stage(3, 1, 192, 320, 6, 1),
)
_STEM_FILTERS, _TOP_FILTERS = 32, 1280
_SE_RATIO = 0.25
_DEPTH_DIVISOR = 8
_LEVELS = (1, 2, 3, 4, 5)
_TOPS = (None, "conv", "classifier")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _level_stages():
    """``{level: stage}``: the last stage (1-based) at each stride ``2**level`` (the stem is
    stride 2): ``{1: 1, 2: 2, 3: 3, 4: 5, 5: 7}``."""
    ends, stride = {}, 2
    for i, stage in enumerate(_B0_STAGES):
        stride *= stage.stride
        ends[int(math.log2(stride))] = i + 1
    return ends


_LEVEL_STAGE = _level_stages()


def round_filters(filters: int, width: float, divisor: int = _DEPTH_DIVISOR) -> int:
    """keras.applications' channel rounding: ``filters * width`` to a multiple of ``divisor``
    (at least ``divisor``), never more than 10 % below ``filters * width``."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks of a scaled stage: ``ceil(depth * repeats)``."""
    return int(math.ceil(depth * repeats))


def _conv_initializer():
    """keras.applications' CONV_KERNEL_INITIALIZER."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


def _dense_initializer():
    """keras.applications' DENSE_KERNEL_INITIALIZER."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform")


def _conv1x1(x, filters, name, activation=None, use_bias=False):
    return layers.Conv2D(
        filters,
        1,
        padding="same",
        activation=activation,
        use_bias=use_bias,
        kernel_initializer=_conv_initializer(),
        name=name,
    )(x)


def _mbconv(x, stage, filters_in, filters_out, stride, drop_rate, name):
    """One MBConv block (see the module docstring); ``name`` ends with ``_``.

    ``(B, H, W, filters_in) -> (B, ceil(H / stride), ceil(W / stride), filters_out)``.
    """
    inputs = x
    filters = filters_in * stage.expand
    if stage.expand != 1:
        x = _conv1x1(x, filters, f"{name}expand_conv")
        x = layers.BatchNormalization(name=f"{name}expand_bn")(x)
        x = layers.Activation("swish", name=f"{name}expand_activation")(x)
    x = layers.DepthwiseConv2D(
        stage.kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=_conv_initializer(),
        name=f"{name}dwconv",
    )(x)
    x = layers.BatchNormalization(name=f"{name}bn")(x)
    x = layers.Activation("swish", name=f"{name}activation")(x)

    # squeeze-excite, reduced to a quarter of the block's input channels
    se = layers.GlobalAveragePooling2D(name=f"{name}se_squeeze")(x)
    se = layers.Reshape((1, 1, filters), name=f"{name}se_reshape")(se)
    reduced = max(1, int(filters_in * _SE_RATIO))
    se = _conv1x1(se, reduced, f"{name}se_reduce", activation="swish", use_bias=True)
    se = _conv1x1(se, filters, f"{name}se_expand", activation="sigmoid", use_bias=True)
    x = layers.Multiply(name=f"{name}se_excite")([x, se])

    # linear projection; drop-connect on the residual branch, no activation after the add
    x = _conv1x1(x, filters_out, f"{name}project_conv")
    x = layers.BatchNormalization(name=f"{name}project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = layers.Add(name=f"{name}add")([x, inputs])
    return x


def _normalization(x):
    """``Rescaling(1/255) -> Normalization`` starting at the ImageNet mean and variance std**2
    (mean 0, variance 1 for other than 3 channels)."""
    x = layers.Rescaling(1.0 / 255.0, name="rescaling")(x)
    norm = layers.Normalization(axis=-1, name="normalization")
    x = norm(x)
    if x.shape[-1] == 3:
        norm.adapt_mean.assign(np.asarray(_IMAGENET_MEAN, np.float32))
        norm.adapt_variance.assign(np.square(np.asarray(_IMAGENET_STD, np.float32)))
        norm.finalize_state()  # Normalization reads its variables only here
    return x


# ----------------------------------------------------------------------------- validation


def _coefficient(value, what, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 100:
        raise ValueError(f"{name}: {what} must be a positive number (below 100), got {value!r}")
    return float(value)


def _rate(value, what, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name}: {what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _resolve_scaling(name, width_coefficient, depth_coefficient, dropout_rate):
    if not isinstance(name, str) or name not in SCALING:
        raise ValueError(f"Unknown EfficientNet {name!r}; expected one of {list(EFFICIENTNETS)}")
    scaling = SCALING[name]
    changes = {}
    width = _coefficient(width_coefficient, "width_coefficient", name)
    depth = _coefficient(depth_coefficient, "depth_coefficient", name)
    if width is not None:
        changes["width"] = width
    if depth is not None:
        changes["depth"] = depth
    if dropout_rate is not None:
        changes["dropout"] = _rate(dropout_rate, "dropout_rate", name)
    return dataclasses.replace(scaling, **changes)


def _resolve_levels(levels, top, name):
    if levels is None:
        return (3, 4, 5)
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(f"{name}: levels must be a sequence of levels 1..5, got {levels!r}")
    resolved = tuple(positive_int(level, "every entry of levels", name) for level in levels)
    if not resolved or list(resolved) != sorted(set(resolved)) or not set(resolved) <= set(_LEVELS):
        raise ValueError(
            f"{name}: levels must be distinct levels in 1..5 in increasing order "
            f"(C1 = stride 2 ... C5 = stride 32), got {levels!r}"
        )
    if top == "conv" and resolved[-1] != 5:
        raise ValueError(
            f"{name}: top='conv' makes C5 the top conv's output; levels must end "
            f"with 5, got {levels!r}"
        )
    return resolved


def _resolve_input_shape(input_shape, name):
    try:
        shape = tuple(input_shape)
    except TypeError as err:
        raise ValueError(f"{name}: input_shape must be (H, W, C), got {input_shape!r}") from err
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            f"{name}: input_shape must be (H, W, C) with a known channel count (channels last), "
            f"got {input_shape!r}"
        )
    for dim in shape:
        if dim is not None:
            positive_int(dim, f"every entry of input_shape {shape}", name)
    return shape


def _check_weights_arg(name, weights):
    """Validate ``weights`` before anything is built; returns the kind: None, "imagenet", "file"."""
    if weights is None:
        return None
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str):
        raise ValueError(
            f"{name}: weights must be None, 'imagenet' or a path to a .weights.h5 file, "
            f"got {weights!r}"
        )
    if weights == "imagenet":
        if name not in IMAGENET_CONSTRUCTORS:
            raise ValueError(
                f"{name}: no ImageNet weights; weights='imagenet' exists only for "
                f"{list(IMAGENET_CONSTRUCTORS)} (copied from keras.applications). Use "
                "weights=None or a .weights.h5 file of this backbone."
            )
        return "imagenet"
    if not weights.endswith(".weights.h5"):
        raise ValueError(
            f"{name}: weights={weights!r} is neither None, 'imagenet' nor a '.weights.h5' file "
            "(save one with model.save_weights('x.weights.h5'))"
        )
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{name}: weights file {weights!r} does not exist")
    return "file"


def _check_top_args(name, top, classes, classifier_activation, dropout_rate):
    if top not in _TOPS:
        raise ValueError(f"{name}: top must be one of {list(_TOPS)}, got {top!r}")
    if top != "classifier":
        given = [
            knob
            for knob, value, default in (
                ("classes", classes, 1000),
                ("classifier_activation", classifier_activation, "softmax"),
                ("dropout_rate", dropout_rate, None),
            )
            if value != default
        ]
        if given:
            raise ValueError(f"{name}: {given} only apply with top='classifier' (top={top!r})")
        return None
    return positive_int(classes, "classes", name)


def _check_imagenet(name, scaling, input_shape, top, classes, classifier_activation):
    published = SCALING[name]
    if (scaling.width, scaling.depth) != (published.width, published.depth):
        raise ValueError(
            f"{name}: weights='imagenet' needs the published architecture; the knobs changed "
            f"it (width_coefficient={scaling.width}, depth_coefficient={scaling.depth}; "
            f"{name} has {published.width} and {published.depth})"
        )
    if input_shape[-1] != 3:
        raise ValueError(f"{name}: weights='imagenet' needs 3 input channels, got {input_shape}")
    if top == "classifier" and classes != 1000:
        raise ValueError(
            f"{name}: weights='imagenet' with top='classifier' needs classes=1000, got {classes}"
        )
    if top == "classifier" and classifier_activation not in (None, "softmax"):
        raise ValueError(
            f"{name}: weights='imagenet' with top='classifier' needs classifier_activation "
            f"None or 'softmax', got {classifier_activation!r}"
        )


# ----------------------------------------------------------------------------- public API


def build_efficientnet(
    name: str,
    input_shape: Sequence[int | None] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    *,
    levels: Sequence[int] | None = None,
    top: str | None = None,
    width_coefficient: float | None = None,
    depth_coefficient: float | None = None,
    drop_connect_rate: float = 0.2,
    dropout_rate: float | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build an EfficientNet feature extractor (or, with ``top="classifier"``, the classifier).

    Args:
        name: one of :data:`EFFICIENTNETS`.
        input_shape: ``(H, W, C)``, channels last; ``H``/``W`` may be None (any size, odd sizes
            included: every stride-2 step rounds up). Input values: RGB in ``[0, 255]`` (the
            model normalises them, see the module docstring).
        weights: None (random init), ``"imagenet"`` (B0-B7 with their published scaling;
            downloads keras.applications' weights and copies them by layer name), or the path to
            a ``.weights.h5`` file saved from a backbone built with the same name and knobs.
        levels: feature levels to return, increasing, from 1 (stride 2) to 5 (stride 32);
            default ``(3, 4, 5)``. Ignored with ``top="classifier"`` (must be None).
        top: None (a detection backbone: blocks only), ``"conv"`` (keep keras.applications'
            1x1 top conv + BN + swish as C5; keras.applications' ``include_top=False``
            network) or ``"classifier"`` (also global average pooling, dropout and a dense
            layer: keras.applications' ``include_top=True`` model).
        width_coefficient, depth_coefficient: override the variant's compound scaling.
        drop_connect_rate: the largest drop-connect rate (of the last block); 0 builds no
            drop-connect Dropout layer. Does not change the weights.
        dropout_rate: override the variant's dropout before the classifier (``top="classifier"``).
        classes, classifier_activation: the classifier's size and activation
            (``top="classifier"``; None gives logits).

    Returns:
        A functional ``keras.Model`` named ``name`` mapping ``(B, H, W, C)`` float images to
        ``[C_l for l in levels]``, Identity outputs named ``"C{l}"`` of shape
        ``(B, ceil(H / 2**l), ceil(W / 2**l), channels_l)``; with ``top="classifier"`` to the
        ``(B, classes)`` output of the dense layer ``"predictions"``.

    Raises:
        ValueError: unknown name, a knob out of range or that does not apply, imagenet weights
            for a changed architecture, other than 3 channels or 1000 classes, a weights file
            that does not fit.
        FileNotFoundError: the weights file does not exist.
    """
    scaling = _resolve_scaling(name, width_coefficient, depth_coefficient, dropout_rate)
    classes = _check_top_args(name, top, classes, classifier_activation, dropout_rate)
    if top == "classifier" and levels is not None:
        raise ValueError(f"{name}: top='classifier' returns the class scores; levels must be None")
    levels = _resolve_levels(levels, top, name) if top != "classifier" else ()
    drop_connect_rate = _rate(drop_connect_rate, "drop_connect_rate", name)
    input_shape = _resolve_input_shape(input_shape, name)
    kind = _check_weights_arg(name, weights)
    if kind == "imagenet":
        _check_imagenet(name, scaling, input_shape, top, classes, classifier_activation)

    images = keras.Input(shape=input_shape, name="images")
    x = _normalization(images)
    x = layers.Conv2D(
        round_filters(_STEM_FILTERS, scaling.width),
        3,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_initializer=_conv_initializer(),
        name="stem_conv",
    )(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("swish", name="stem_activation")(x)

    last_stage = max(_LEVEL_STAGE[level] for level in levels) if top is None else len(_B0_STAGES)
    repeats = [round_repeats(stage.repeats, scaling.depth) for stage in _B0_STAGES]
    n_blocks, b = float(sum(repeats)), 0  # every block counts, also those not built
    stage_ends = {}
    for i in range(last_stage):
        stage, n = _B0_STAGES[i], repeats[i]
        filters_in = round_filters(stage.filters_in, scaling.width)
        filters_out = round_filters(stage.filters_out, scaling.width)
        for j in range(n):
            x = _mbconv(
                x,
                stage,
                filters_in if j == 0 else filters_out,
                filters_out,
                stage.stride if j == 0 else 1,
                drop_connect_rate * b / n_blocks,
                name=f"block{i + 1}{chr(ord('a') + j)}_",
            )
            b += 1
        stage_ends[i + 1] = x

    if top is not None:
        x = _conv1x1(x, round_filters(_TOP_FILTERS, scaling.width), "top_conv")
        x = layers.BatchNormalization(name="top_bn")(x)
        stage_ends["top"] = x = layers.Activation("swish", name="top_activation")(x)
    if top == "classifier":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if scaling.dropout > 0:
            x = layers.Dropout(scaling.dropout, name="top_dropout")(x)
        x = layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer=_dense_initializer(),
            name="predictions",
        )(x)
        outputs = x
    else:
        outputs = [
            layers.Identity(name=f"C{level}")(
                stage_ends["top"]
                if (top == "conv" and level == 5)
                else stage_ends[_LEVEL_STAGE[level]]
            )
            for level in levels
        ]
    model = keras.Model(images, outputs, name=name)

    if kind == "imagenet":
        constructor = getattr(keras.applications, IMAGENET_CONSTRUCTORS[name])
        if top == "classifier":  # keras.applications' own input size; the weights fit any
            source = constructor(
                include_top=True, weights="imagenet", classifier_activation=classifier_activation
            )
        else:
            source = constructor(include_top=False, weights="imagenet", input_shape=(None, None, 3))
        copy_keras_applications_weights(source, model)
    elif kind == "file":
        knobs = (
            f"width_coefficient={scaling.width}, depth_coefficient={scaling.depth}, "
            f"levels={levels}, top={top!r}"
        )
        load_weights_file(model, os.fspath(weights), knobs)
    return model


def _input_chain(model):
    """The layers of ``model`` between its input and ``stem_conv`` (keras.applications:
    Rescaling, Normalization, [Rescaling]; dlnotes: Rescaling, Normalization)."""
    chain = []
    for layer in model.layers:
        if layer.name in ("stem_conv", "stem_conv_pad"):
            return chain
        if not isinstance(layer, keras.layers.InputLayer):
            chain.append(layer)
    raise ValueError(f"copy_keras_applications_weights: {model.name!r} has no 'stem_conv' layer")


def _normalization_values(model):
    """``(layer, mean, variance, count)`` equivalent to the input chain of ``model``.

    The chain must be ``Rescaling(1/255) -> Normalization -> Rescaling(s)*`` (no offsets); the
    trailing rescalings fold into the variance: ``(x - m) / sqrt(v) * s == (x - m) / sqrt(v /
    s**2)`` for ``s > 0``.
    """
    chain = _input_chain(model)
    kinds = [type(layer) for layer in chain]
    ok = (
        len(chain) >= 2
        and kinds[:2] == [layers.Rescaling, layers.Normalization]
        and all(kind is layers.Rescaling for kind in kinds[2:])
        and np.allclose(chain[0].scale, 1.0 / 255.0, rtol=1e-6)
        and all(np.all(np.asarray(r.offset) == 0) for r in chain[:1] + chain[2:])
    )
    if not ok:
        raise ValueError(
            f"copy_keras_applications_weights: the input of {model.name!r} is "
            f"{[type(layer).__name__ for layer in chain]}, not keras.applications' "
            "Rescaling(1/255) -> Normalization [-> Rescaling(scale)]"
        )
    norm = chain[1]
    mean, variance, count = norm.get_weights()
    scale = np.ones_like(variance, np.float64)
    for rescaling in chain[2:]:
        scale = scale * np.asarray(rescaling.scale, np.float64)
    if np.any(scale <= 0):
        raise ValueError(
            f"copy_keras_applications_weights: {model.name!r} rescales its normalised input by "
            f"{scale.tolist()}; only positive scales fold into the Normalization"
        )
    variance = (np.asarray(variance, np.float64) / scale**2).astype(variance.dtype)
    return norm, mean, variance, count


_TOP_LAYERS = ("top_conv", "top_bn", "predictions")


def _stage_of(layer_name):
    """The stage ``s`` of a block layer ``block{s}{letter}_...``, else None."""
    if layer_name.startswith("block") and layer_name[5:6].isdigit():
        return int(layer_name[5])
    return None


def _beyond(layer_name, last_stage):
    """Whether a layer comes after a backbone that ends with stage ``last_stage``."""
    stage = _stage_of(layer_name)
    return layer_name in _TOP_LAYERS or (stage is not None and stage > last_stage)


def copy_keras_applications_weights(source: keras.Model, target: keras.Model) -> int:
    """Copy a ``keras.applications.EfficientNetB*`` model's weights into a dlnotes EfficientNet.

    Every layer with weights is copied by name (:func:`dlnotes.backbones.copy_weights_by_name`)
    but the input Normalization, which keras.applications names automatically
    (``normalization_7``): its mean and count are copied, its variance with the trailing
    ``Rescaling`` of keras.applications' ImageNet models folded in (see
    :func:`build_efficientnet`), and the layer is refreshed (Keras' Normalization reads its
    variables only in ``finalize_state``).

    Strict: every layer of ``target`` with weights must exist in ``source`` with the same weight
    shapes, and ``source`` may have more only after the end of ``target``: its top
    (``top_conv``, ``top_bn``, ``predictions``), which a detection backbone leaves out, and the
    stages after the last one ``target`` builds (``levels=(1, 2)`` stops after stage 2).

    Returns:
        The number of layers copied.

    Raises:
        ValueError: a layer missing on either side (another variant or other knobs), different
            weight shapes, an input that is not keras.applications'. Nothing is copied then.
    """
    src_norm, mean, variance, count = _normalization_values(source)
    dst_norm = _normalization_values(target)[0]
    src = {layer.name for layer in source.layers if layer.weights} - {src_norm.name}
    dst = {layer.name for layer in target.layers if layer.weights} - {dst_norm.name}
    missing = sorted(dst - src)
    last_stage = max((_stage_of(n) or 0) for n in dst)
    extra = sorted(n for n in src - dst if not _beyond(n, last_stage))
    if missing or extra:
        raise ValueError(
            f"copy_keras_applications_weights: layers of {target.name!r} missing in "
            f"{source.name!r}: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)}); layers of {source.name!r} missing in {target.name!r}: "
            f"{extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)}); is it another "
            "variant or were the width / depth knobs changed?"
        )
    shapes = [tuple(w.shape) for w in dst_norm.weights]
    if shapes != [np.shape(v) for v in (mean, variance, count)]:
        raise ValueError(
            f"copy_keras_applications_weights: the Normalization of {target.name!r} has weight "
            f"shapes {shapes}, that of {source.name!r} {[np.shape(mean), np.shape(count)]}"
        )
    # copies (after checking every shape) the layers both have; a source Normalization that
    # happens to be called "normalization" too is overwritten below
    copied = copy_weights_by_name(source, target, strict=False)
    dst_norm.set_weights([mean, variance, count])
    dst_norm.finalize_state()
    return copied + (src_norm.name != dst_norm.name)


def preprocessing_mode(name: str, weights: str | os.PathLike | None = None) -> str:
    """``"none"``: an EfficientNet takes RGB ``[0, 255]`` and normalises it itself, for any
    ``weights`` (validated as in :func:`build_efficientnet`)."""
    _resolve_scaling(name, None, None, None)
    _check_weights_arg(name, weights)
    return "none"


def describe(name: str) -> str:
    """One line on EfficientNet ``name``: scaling, blocks, C3-C5 channels."""
    scaling = _resolve_scaling(name, None, None, None)
    blocks = sum(round_repeats(stage.repeats, scaling.depth) for stage in _B0_STAGES)
    channels = "/".join(
        str(round_filters(_B0_STAGES[_LEVEL_STAGE[level] - 1].filters_out, scaling.width))
        for level in (3, 4, 5)
    )
    return (
        f"EfficientNet width {scaling.width}, depth {scaling.depth} ({blocks} MBConv blocks, "
        f"{scaling.resolution} px), C3-C5 channels {channels}"
    )


def _same(size: int, stride: int) -> int:
    return -(-size // stride)  # "same" padding: ceil(size / stride)


def efficientnet_cost(
    name: str, image_size: int | Sequence[int] | None = None, top: str | None = "classifier"
) -> dict[str, tuple[int, int]]:
    """Parameters and multiply-adds of EfficientNet ``name``, part by part, without building it.

    The arithmetic of the architecture (module docstring): a conv with kernel ``k``, ``c_in``
    inputs and ``c_out`` outputs on an ``h x w`` output map costs ``k^2 c_in c_out h w``
    multiply-adds (``k^2 c h w`` for a depthwise one); squeeze-excite's two 1x1 convs run on a
    1x1 map. Parameters count what ``count_params()`` counts: weights, biases, the four numbers
    of every BatchNorm channel and the input Normalization's 7.

    Args:
        name: one of :data:`EFFICIENTNETS`.
        image_size: ``size`` or ``(height, width)``; default the variant's resolution.
        top: None, ``"conv"`` or ``"classifier"`` (1000 classes), as :func:`build_efficientnet`.

    Returns:
        ``{part: (parameters, multiply_adds)}`` for ``"input"``, ``"stem"``, ``"stage1"`` ..
        ``"stage7"`` and, with a top, ``"top"`` and ``"classifier"``; multiply-adds for one
        image. The sums equal ``build_efficientnet(name, top=top).count_params()`` and
        :func:`dlnotes.flops.count_macs` of that model.
    """
    scaling = _resolve_scaling(name, None, None, None)
    if top not in _TOPS:
        raise ValueError(f"{name}: top must be one of {_TOPS}, got {top!r}")
    if image_size is None:
        image_size = scaling.resolution
    h, w = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    h, w = positive_int(h, "image height", name), positive_int(w, "image width", name)

    def conv(k, c_in, c_out, bias=False, bn=True):
        return k * k * c_in * c_out + c_out * bias + 4 * c_out * bn, k * k * c_in * c_out

    h, w = _same(h, 2), _same(w, 2)
    stem = round_filters(_STEM_FILTERS, scaling.width)
    params, macs = conv(3, 3, stem)
    parts = {"input": (7, 0), "stem": (params, macs * h * w)}
    for i, stage in enumerate(_B0_STAGES):
        p_total = m_total = 0
        c_out = round_filters(stage.filters_out, scaling.width)
        for j in range(round_repeats(stage.repeats, scaling.depth)):
            c_in = round_filters(stage.filters_in, scaling.width) if j == 0 else c_out
            hw_in = h * w  # the expansion runs before the (first block's) strided depthwise
            if j == 0:
                h, w = _same(h, stage.stride), _same(w, stage.stride)
            f, r = c_in * stage.expand, max(1, int(c_in * _SE_RATIO))
            expand = conv(1, c_in, f) if stage.expand != 1 else (0, 0)
            depthwise = (stage.kernel**2 * f + 4 * f, stage.kernel**2 * f)
            squeeze = (f * r + r + r * f + f, f * r + r * f)  # on a 1x1 map
            project = conv(1, f, c_out)
            p_total += expand[0] + depthwise[0] + squeeze[0] + project[0]
            m_total += expand[1] * hw_in + (depthwise[1] + project[1]) * h * w + squeeze[1]
        parts[f"stage{i + 1}"] = (p_total, m_total)
    if top is not None:
        top_filters = round_filters(_TOP_FILTERS, scaling.width)
        params, macs = conv(1, c_out, top_filters)
        parts["top"] = (params, macs * h * w)
    if top == "classifier":
        parts["classifier"] = (top_filters * 1000 + 1000, top_filters * 1000)
    return parts
