"""VGG16 (Simonyan & Zisserman 2015) as the stride-16 trunk of Faster R-CNN (Ren et al. 2015).

The model is built by :func:`build_vgg16` (or by name through the registry,
``build_backbone("vgg16")``) and is a plain functional ``keras.Model`` of stock ``keras.layers``,
layer for layer ``keras.applications.VGG16(include_top=False)`` without its last max pool::

    trunk = build_backbone("vgg16", weights="imagenet", frozen_blocks=2)  # RGB -> "caffe" input
    (c4,) = trunk(images)                       # (B, floor(H / 16), floor(W / 16), 512)
    output_strides(trunk)                       # (16,): Faster R-CNN's spatial scale 1/16

**Architecture.** 13 3x3 convs with biases, "same" padding and a ReLU (``activation="relu"``
inside each ``Conv2D``, as keras.applications builds them), no BatchNorm, in five blocks of
``(2, 2, 3, 3, 3)`` convs and ``(64, 128, 256, 512, 512)`` channels; a 2x2 stride-2 "valid" max
pool follows blocks 1-4. Block 5's max pool (``block5_pool``) is what makes the classification
network stride 32; Faster R-CNN's trunk leaves it out and ends with ``block5_conv3`` at stride
16. Layer names are keras.applications' (``block1_conv1`` ... ``block5_conv3``, ``block1_pool``
... ``block4_pool``), so weights copy by name (:func:`dlnotes.backbones.copy_weights_by_name`;
that is how ``weights="imagenet"`` works). Kernels start glorot-uniform, biases at zero (Keras'
``Conv2D`` defaults, keras.applications' initialisation).

**Levels.** As for every backbone of the registry, an output named ``"C{l}"`` has stride
``2**l`` (:func:`dlnotes.backbones.output_strides`). With block 5's pool gone, block ``b`` runs at
stride ``2**(b - 1)``, so level ``l`` is the last conv of block ``l + 1``:

===== ================ ======== ========
level layer            stride   channels
===== ================ ======== ========
C1    ``block2_conv2``  2       128
C2    ``block3_conv3``  4       256
C3    ``block4_conv3``  8       512
C4    ``block5_conv3``  16      512
C5    ``block5_pool``   32      512
===== ================ ======== ========

The default ``levels=(4,)`` returns ``[C4]``, the Faster R-CNN trunk (``block5_pool`` is not
built). C5 is the max pool of C4 (no weights): ``levels=(3, 4, 5)`` gives the registry's usual
``[C3, C4, C5]`` for a feature pyramid, and ``levels=(5,)`` is exactly keras.applications'
``include_top=False`` network. Only the blocks up to the last requested level are built.

**Sizes.** Each 2x2 "valid" max pool maps ``n`` to ``floor(n / 2)``, so ``C_l`` has shape
``(B, floor(H / 2**l), floor(W / 2**l), channels_l)``: a 100x150 image gives C4 of 6x9
(``floor(6.25)``, ``floor(9.375)``), C3 of 12x18. This is keras.applications' and torchvision's
rounding (``MaxPool2d(ceil_mode=False)``); Caffe's pooling, which the original py-faster-rcnn
ran, rounds *up* (7x10 for 100x150), so its feature maps can be one cell larger on sizes that are
not multiples of 16. A static height or width must be at least ``2**l`` for the last level ``l``
(16 for the default C4) so that no output is empty.

**Freezing.** Faster R-CNN fine-tunes VGG16 from conv3_1 on and keeps conv1_1 ... conv2_2 (the
first 4 convs) fixed, since those generic low-level filters gain nothing from detection data and
freezing them saves their gradients. ``frozen_blocks=2`` sets the layers of blocks 1-2
non-trainable (``layer.trainable = False``, which survives ``save`` / ``load_model``):
38,720 + 221,440 parameters, leaving 14,454,528 of 14,714,688 trainable. The default 0 trains
every conv (the choice for random initialisation).

**Parameters** (3-channel input, ``base_filters=64``): 1,792 + 36,928 = 38,720 in block 1,
73,856 + 147,584 = 221,440 in block 2, 1,475,328 in block 3, 5,899,776 in block 4, 7,079,424 in
block 5: 14,714,688 in all, keras.applications' ``VGG16(include_top=False).count_params()``
(the classifier, fc6-fc8, is not part of the trunk). ``base_filters`` scales the widths to
``base_filters * (1, 2, 4, 8, 8)`` (16 gives a CPU-sized trunk of 920,784 parameters).

**Input / preprocessing.** keras.applications' VGG16 weights expect the "caffe" convention
(``keras.applications.vgg16.preprocess_input``): RGB -> BGR, minus the ImageNet BGR mean
(103.939, 116.779, 123.68), no scaling. :func:`dlnotes.backbones.preprocess_for` ``("vgg16")``
returns that :class:`~dlnotes.backbones.ImagePreprocessing` layer for any ``weights``, so a
checkpoint fine-tuned from ImageNet keeps the convention it was trained with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
from keras import layers

from dlnotes.backbones.weights import copy_weights_by_name, load_weights_file
from dlnotes.checks import integer, positive_int

__all__ = [
    "VGG16_BLOCKS",
    "VGG16_DESCRIPTION",
    "VGG16_LEVEL_LAYERS",
    "VGG16_WIDTHS",
    "build_vgg16",
    "preprocessing_mode",
]

#: Convs per block.
VGG16_BLOCKS: tuple[int, ...] = (2, 2, 3, 3, 3)
#: Channels per block for ``base_filters=64`` (``base_filters * (1, 2, 4, 8, 8)``).
VGG16_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
#: The keras.applications layer behind each output level ``C{l}`` (stride ``2**l``).
VGG16_LEVEL_LAYERS: dict[int, str] = {
    1: "block2_conv2",
    2: "block3_conv3",
    3: "block4_conv3",
    4: "block5_conv3",
    5: "block5_pool",
}
#: The registry's one-line description.
VGG16_DESCRIPTION = (
    "VGG16 trunk (13 3x3 convs in blocks 2-2-3-3-3, no BatchNorm, pool5 removed), "
    "C4 = block5_conv3 at stride 16 (512 channels)"
)

_NAME = "vgg16"
_BASE_FILTERS = 64
_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)
_DEFAULT_LEVELS = (4,)


def _blocks_for(levels):
    """Blocks built for ``levels``: up to block ``l + 1`` for the last level (5 at most)."""
    return min(levels[-1] + 1, len(VGG16_BLOCKS))


# ----------------------------------------------------------------------------- validation


def _resolve_levels(levels):
    if levels is None:
        return _DEFAULT_LEVELS
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(f"{_NAME}: levels must be a sequence of levels 1..5, got {levels!r}")
    resolved = tuple(positive_int(level, "every entry of levels", _NAME) for level in levels)
    if not resolved or list(resolved) != sorted(set(resolved)) or resolved[-1] > 5:
        raise ValueError(
            f"{_NAME}: levels must be distinct levels in 1..5 in increasing order (C1 = "
            f"block2_conv2 at stride 2 ... C4 = block5_conv3 at stride 16, C5 = block5_pool at "
            f"stride 32), got {levels!r}"
        )
    return resolved


def _resolve_input_shape(input_shape, levels):
    try:
        shape = tuple(input_shape)
    except TypeError as err:
        raise ValueError(f"{_NAME}: input_shape must be (H, W, C), got {input_shape!r}") from err
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            f"{_NAME}: input_shape must be (H, W, C) with a known channel count (channels "
            f"last), got {input_shape!r}"
        )
    for dim in shape:
        if dim is not None:
            positive_int(dim, f"every entry of input_shape {shape}", _NAME)
    stride = 2 ** levels[-1]
    for dim, what in zip(shape[:2], ("height", "width"), strict=True):
        if dim is not None and dim < stride:
            raise ValueError(
                f"{_NAME}: input {what} {dim} is below {stride}: C{levels[-1]} (stride {stride}, "
                f"floor(n / {stride})) would be empty; input_shape={shape}"
            )
    return shape


def _resolve_frozen_blocks(frozen_blocks, levels):
    blocks = _blocks_for(levels)
    frozen_blocks = integer(frozen_blocks, "frozen_blocks", _NAME, minimum=0)
    if frozen_blocks > blocks:
        raise ValueError(
            f"{_NAME}: frozen_blocks must be in 0..{blocks} (the blocks built for levels "
            f"{levels}), got {frozen_blocks}"
        )
    return frozen_blocks


def _check_weights_arg(weights):
    """Validate ``weights`` before anything is built; returns the kind: None, "imagenet", "file"."""
    if weights is None:
        return None
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str):
        raise ValueError(
            f"{_NAME}: weights must be None, 'imagenet' or a path to a .weights.h5 file, "
            f"got {weights!r}"
        )
    if weights == "imagenet":
        return "imagenet"
    if not weights.endswith(".weights.h5"):
        raise ValueError(
            f"{_NAME}: weights={weights!r} is neither None, 'imagenet' nor a '.weights.h5' file "
            "(save one with model.save_weights('x.weights.h5'))"
        )
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{_NAME}: weights file {weights!r} does not exist")
    return "file"


def _copy_from_keras_applications(source, target):
    """Copy ``keras.applications.VGG16(include_top=False)`` into ``target`` by layer name.

    Every conv of ``target`` must be in ``source``; ``source`` may have more only in the blocks
    that ``target`` does not build (``levels=(3,)`` stops after block 4).
    """
    src = {layer.name for layer in source.layers if layer.weights}
    dst = {layer.name for layer in target.layers if layer.weights}
    last_block = max(int(name[5]) for name in dst)
    missing = sorted(dst - src)
    extra = sorted(n for n in src - dst if not (n[:5] == "block" and int(n[5]) > last_block))
    if missing or extra:
        raise ValueError(
            f"{_NAME}: cannot copy {source.name!r} into {target.name!r} by layer name: missing "
            f"in the source {missing}, unmatched in the source {extra}"
        )
    return copy_weights_by_name(source, target, strict=False)


# ----------------------------------------------------------------------------- public API


def build_vgg16(
    input_shape: Sequence[int | None] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    *,
    levels: Sequence[int] | None = None,
    frozen_blocks: int = 0,
    base_filters: int = _BASE_FILTERS,
) -> keras.Model:
    """Build the VGG16 trunk (keras.applications' convs without ``block5_pool``).

    Args:
        input_shape: ``(H, W, C)``, channels last; ``H``/``W`` may be None (any size at call
            time; every max pool rounds down). A static size must be at least ``2**l`` for the
            last level ``l``. Inputs as :func:`dlnotes.backbones.preprocess_for` ``("vgg16")``
            makes them: "caffe" BGR minus the ImageNet mean, values of about +-128.
        weights: None (random init: glorot-uniform kernels, zero biases), ``"imagenet"``
            (downloads ``keras.applications.VGG16(include_top=False, weights="imagenet")`` and
            copies it by layer name; 3 channels and ``base_filters=64`` only), or the path to a
            ``.weights.h5`` file saved from a trunk built with the same knobs.
        levels: output levels, increasing, in 1..5 (see the module docstring: C4 is
            ``block5_conv3`` at stride 16, C5 ``block5_pool`` at stride 32); default ``(4,)``.
        frozen_blocks: the first ``frozen_blocks`` blocks are set non-trainable; 2 freezes
            conv1_1 ... conv2_2 as Faster R-CNN does. At most the number of blocks built.
        base_filters: width of block 1 (64); blocks have ``base_filters * (1, 2, 4, 8, 8)``
            channels.

    Returns:
        A functional ``keras.Model`` named ``"vgg16"`` mapping ``(B, H, W, C)`` float images to
        ``[C_l for l in levels]``, Identity outputs named ``"C{l}"`` of shape
        ``(B, floor(H / 2**l), floor(W / 2**l), channels_l)``, ``channels_l`` =
        ``base_filters * (2, 4, 8, 8, 8)[l - 1]`` (128, 256, 512, 512, 512).

    Raises:
        ValueError: a knob out of range, an input smaller than the last level's stride,
            imagenet weights for other than 3 channels or ``base_filters=64``, a weights file
            that does not fit.
        FileNotFoundError: the weights file does not exist.
    """
    levels = _resolve_levels(levels)
    input_shape = _resolve_input_shape(input_shape, levels)
    frozen_blocks = _resolve_frozen_blocks(frozen_blocks, levels)
    base = positive_int(base_filters, "base_filters", _NAME)
    kind = _check_weights_arg(weights)
    if kind == "imagenet" and input_shape[-1] != 3:
        raise ValueError(f"{_NAME}: weights='imagenet' needs 3 input channels, got {input_shape}")
    if kind == "imagenet" and base != _BASE_FILTERS:
        raise ValueError(
            f"{_NAME}: weights='imagenet' needs the published widths (base_filters=64), "
            f"got base_filters={base}"
        )

    images = keras.Input(shape=input_shape, name="images")
    x = images
    ends = {}
    for b in range(1, _blocks_for(levels) + 1):
        if b > 1:
            x = layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{b - 1}_pool")(x)
        for i in range(1, VGG16_BLOCKS[b - 1] + 1):
            x = layers.Conv2D(
                base * _WIDTH_MULTIPLIERS[b - 1],
                (3, 3),
                activation="relu",
                padding="same",
                trainable=b > frozen_blocks,
                name=f"block{b}_conv{i}",
            )(x)
        ends[b - 1] = x  # block b ends at stride 2**(b - 1): level b - 1
    if 5 in levels:
        ends[5] = layers.MaxPooling2D((2, 2), strides=(2, 2), name="block5_pool")(x)
    outputs = [layers.Identity(name=f"C{level}")(ends[level]) for level in levels]
    model = keras.Model(images, outputs, name=_NAME)

    if kind == "imagenet":
        source = keras.applications.VGG16(
            include_top=False, weights="imagenet", input_shape=(None, None, 3)
        )
        _copy_from_keras_applications(source, model)
    elif kind == "file":
        knobs = f"levels={levels}, base_filters={base}, {input_shape[-1]} input channels"
        load_weights_file(model, os.fspath(weights), knobs)
    return model


def preprocessing_mode(weights: str | os.PathLike | None = None) -> str:
    """``"caffe"``: keras.applications' VGG16 convention (RGB -> BGR minus the ImageNet BGR
    mean), for any ``weights`` (validated as in :func:`build_vgg16`)."""
    _check_weights_arg(weights)
    return "caffe"
