"""ResNet and ResNeXt backbones: Keras 3 functional models that return the C3, C4, C5 feature maps.

Every backbone is built by :func:`build_resnet` (or by name through the registry,
:func:`dlnotes.backbones.build_backbone`) and is a plain ``keras.Model`` made of stock
``keras.layers`` (no custom layer), with deterministic layer names::

    backbone = build_backbone("resnet50")            # input (B, H, W, 3) float32
    c3, c4, c5 = backbone(images)                   # strides 8, 16, 32
    channels = [t.shape[-1] for t in backbone.outputs]   # (512, 1024, 2048)

Outputs
    A list ``[C3, C4, C5]``: ``C_l`` has shape ``(B, ceil(H / 2**l), ceil(W / 2**l), channels_l)``,
    i.e. strides 8, 16 and 32. Each output is an identity layer named ``"C3"``, ``"C4"``,
    ``"C5"`` placed after the last block of its stage (the post-ReLU ``conv{l}_block{n}_out``
    tensor), so a detector recovers the level and stride from ``backbone.output_names`` (stride
    ``2**level``, see :func:`dlnotes.backbones.output_strides`) and the channels from
    ``backbone.outputs[i].shape[-1]``, both of which survive ``save`` / ``load_model``. C2
    (stride 4) is ``backbone.get_layer("conv2_block{n}_out").output`` for a neck that needs it.

Two families, two layouts, both with keras.applications' layer-naming scheme (``conv1_conv``,
``conv2_block1_1_conv``, ``conv2_block1_0_bn`` (shortcut), ``..._add``, ``..._out``).
No convolution has a bias in either: each one feeds a BatchNorm, whose beta makes a bias
redundant (torchvision, keras-hub and Detectron have none), and a bias would cost an add and its
gradient on every feature map of a train step.

* ``resnet50``, ``resnet101``, ``resnet152`` follow ``keras.applications.ResNet50/101/152``
  layer for layer but for the conv biases (ResNet v1: stride on the first 1x1 conv of a block,
  BatchNorm epsilon 1.001e-5). Their weights copy by layer name from keras.applications
  (:func:`dlnotes.backbones.copy_weights_by_name`, which folds each keras.applications conv bias exactly into the
  following BatchNorm's moving mean); that is how ``weights="imagenet"`` works.
  ResNet-50 has 23,561,152 parameters, exactly keras-hub's ResNet-50. keras.applications'
  ``include_top=False`` ResNet-50 has 23,587,712: + 26,560 conv biases, one per BatchNorm
  channel. torchvision's ResNet-50 without its fc layer has 23,508,032 = 23,561,152 - 2 x 26,560,
  our *trainable* count: torch keeps BatchNorm's running mean and variance as buffers, not
  parameters.
* ``resnet18``, ``resnet34`` (basic blocks), ``resnext50_32x4d``, ``resnext101_32x4d`` (grouped
  bottlenecks) and ``resnet_tiny`` follow torchvision's ``torchvision.models.resnet``: BatchNorm
  epsilon 1e-5, the stride on the (first) 3x3 conv of a block (for bottlenecks this is
  "ResNet v1.5"), and torch's symmetric padding for stride-2 convs (an explicit
  ``ZeroPadding2D`` before a "valid" conv, because Keras' "same" pads only bottom/right at
  stride 2). Trainable parameter counts equal torchvision's published figures minus the
  1000-class fc layer.

Knobs (any family): ``base_filters`` (64 in the published models) sets the stem width and the
stage widths ``base_filters * (1, 2, 4, 8)``; ``blocks`` sets the number of residual blocks per
stage (overrides the depth). ResNeXt also takes ``groups`` and ``width_per_group`` with
torchvision's rule ``width = int(planes * width_per_group / 64) * groups`` for the 3x3 conv
(``groups=1, width_per_group=64`` gives torchvision's ResNet-50/101). ``resnet_tiny`` is a
ResNet-18 layout with ``base_filters=16`` and one block per stage (0.31 M parameters; output
channels 32, 64, 128) that trains on a CPU.

Preprocessing (the detector applies it; :func:`dlnotes.backbones.preprocess_for` returns the layer
to put in front, :func:`preprocessing_mode` its mode):
images are RGB float ``(B, H, W, 3)`` with values in ``[0, 255]``.

* ``resnet50/101/152``: caffe style, exactly ``keras.applications.resnet.preprocess_input``:
  RGB -> BGR, minus the ImageNet BGR mean (103.939, 116.779, 123.68), no scaling. This holds
  for any ``weights`` so that a model fine-tuned from ImageNet and saved keeps its convention.
* the torchvision family: torch style, ``x / 255`` then per-channel ImageNet mean
  (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as torchvision's pretrained weights
  expect (the layer layout and padding match torchvision's, so such weights can be ported).

Convolution kernels use torchvision's initialisation, He-normal on fan-out
(``VarianceScaling(2.0, "fan_out", "untruncated_normal")``); BatchNorm starts at gamma=1, beta=0.
Keras runs every grouped convolution through a small XLA-compiled function (TensorFlow's own
grouped conv kernel is missing on CPU), and every backbone works inside
``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import keras
from keras import layers

from dlnotes.backbones.weights import copy_weights_by_name, kernel_initializer, load_weights_file
from dlnotes.checks import positive_int

__all__ = ["IMAGENET_WEIGHTS", "RESNETS", "build_resnet", "describe", "preprocessing_mode"]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Architecture of one named backbone.

    Attributes:
        block: "basic" (two 3x3 convs, expansion 1) or "bottleneck" (1x1-3x3-1x1, expansion 4).
        blocks: residual blocks in stages conv2..conv5.
        keras_layout: True for the keras.applications v1 layout (stride on the first 1x1,
            eps 1.001e-5); False for torchvision's (stride on the 3x3, eps 1e-5). Neither layout
            has conv biases.
        base_filters: stem width and width of stage conv2 (planes); later stages double it.
        groups, width_per_group: ResNeXt cardinality and bottleneck width per group.
    """

    block: str
    blocks: tuple[int, int, int, int]
    keras_layout: bool
    base_filters: int = 64
    groups: int = 1
    width_per_group: int = 64

    @property
    def grouped(self) -> bool:
        """Whether the ``groups`` / ``width_per_group`` knobs apply (torchvision bottlenecks)."""
        return self.block == "bottleneck" and not self.keras_layout


_SPECS: dict[str, _Spec] = {
    "resnet_tiny": _Spec("basic", (1, 1, 1, 1), keras_layout=False, base_filters=16),
    "resnet18": _Spec("basic", (2, 2, 2, 2), keras_layout=False),
    "resnet34": _Spec("basic", (3, 4, 6, 3), keras_layout=False),
    "resnet50": _Spec("bottleneck", (3, 4, 6, 3), keras_layout=True),
    "resnet101": _Spec("bottleneck", (3, 4, 23, 3), keras_layout=True),
    "resnet152": _Spec("bottleneck", (3, 8, 36, 3), keras_layout=True),
    "resnext50_32x4d": _Spec(
        "bottleneck", (3, 4, 6, 3), keras_layout=False, groups=32, width_per_group=4
    ),
    "resnext101_32x4d": _Spec(
        "bottleneck", (3, 4, 23, 3), keras_layout=False, groups=32, width_per_group=4
    ),
}

#: Names accepted by :func:`build_resnet` (and :func:`dlnotes.backbones.build_backbone`).
RESNETS: tuple[str, ...] = tuple(_SPECS)

#: Backbones with ``weights="imagenet"``: the keras.applications constructor of each.
IMAGENET_WEIGHTS: dict[str, str] = {
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet152": "ResNet152",
}

_KERAS_BN_EPSILON = 1.001e-5  # keras.applications.resnet
_TORCH_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d default
_STAGE_STRIDES = (1, 2, 2, 2)  # conv2 follows the stride-4 stem; conv3..conv5 halve the size


def _conv(x, filters, kernel_size, stride, name, groups=1):
    """Bias-free Conv2D with torch-style symmetric padding when a 3x3 (or 7x7) conv has stride 2.

    1x1 convs need no padding ("valid", as in keras.applications). Stride-1 kxk convs use
    "same", which equals torch's ``padding=k // 2`` for odd ``k``. For stride 2, "same" would
    pad (0, 1) on even sizes where torch pads (k // 2, k // 2); the output size is
    ``ceil(n / 2)`` either way, only the sampling grid differs.
    """
    padding = "valid"
    if kernel_size > 1 and stride == 1:
        padding = "same"
    elif kernel_size > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=name.replace("_conv", "_pad"))(x)
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,
        groups=groups,
        use_bias=False,  # the following BatchNorm's beta is the bias
        kernel_initializer=kernel_initializer(),
        name=name,
    )(x)


def _bn(x, name, spec):
    eps = _KERAS_BN_EPSILON if spec.keras_layout else _TORCH_BN_EPSILON
    return layers.BatchNormalization(axis=-1, epsilon=eps, name=name)(x)


def _shortcut(x, out_channels, stride, name, spec):
    """Identity, or a strided 1x1 conv + BN where the shape changes (torchvision's rule)."""
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    s = _conv(x, out_channels, 1, stride, f"{name}_0_conv")
    return _bn(s, f"{name}_0_bn", spec)


def _basic_block(x, planes, stride, name, spec):
    """torchvision BasicBlock: 3x3 (stride) - BN - ReLU - 3x3 - BN, + shortcut, ReLU."""
    shortcut = _shortcut(x, planes, stride, name, spec)
    y = _conv(x, planes, 3, stride, f"{name}_1_conv")
    y = _bn(y, f"{name}_1_bn", spec)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = _conv(y, planes, 3, 1, f"{name}_2_conv")
    y = _bn(y, f"{name}_2_bn", spec)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _bottleneck_block(x, planes, stride, name, spec):
    """1x1 - 3x3 - 1x1 bottleneck, expansion 4.

    keras layout (ResNet v1): the stride sits on the first 1x1 conv and the bottleneck width is
    ``planes``. torchvision layout (v1.5 / ResNeXt): the stride sits on the (grouped) 3x3 conv
    and the bottleneck width is ``int(planes * width_per_group / 64) * groups``.
    """
    out_channels = 4 * planes
    shortcut = _shortcut(x, out_channels, stride, name, spec)
    if spec.keras_layout:
        width, groups, stride_1x1, stride_3x3 = planes, 1, stride, 1
    else:
        width = int(planes * spec.width_per_group / 64) * spec.groups
        groups, stride_1x1, stride_3x3 = spec.groups, 1, stride
    y = _conv(x, width, 1, stride_1x1, f"{name}_1_conv")
    y = _bn(y, f"{name}_1_bn", spec)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = _conv(y, width, 3, stride_3x3, f"{name}_2_conv", groups=groups)
    y = _bn(y, f"{name}_2_bn", spec)
    y = layers.Activation("relu", name=f"{name}_2_relu")(y)
    y = _conv(y, out_channels, 1, 1, f"{name}_3_conv")
    y = _bn(y, f"{name}_3_bn", spec)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _stem(x, spec):
    """7x7/2 conv - BN - ReLU - 3x3/2 max pool: stride 4 (C2's resolution before conv2)."""
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(
        spec.base_filters,
        7,
        strides=2,
        use_bias=False,
        kernel_initializer=kernel_initializer(),
        name="conv1_conv",
    )(x)
    x = _bn(x, "conv1_bn", spec)
    x = layers.Activation("relu", name="conv1_relu")(x)
    # Zero padding equals torch's -inf padding of the max pool because the input is >= 0.
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


# ----------------------------------------------------------------------------- validation


def _resolve_spec(name, base_filters, blocks, groups, width_per_group):
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"Unknown ResNet {name!r}; expected one of {list(RESNETS)}")
    spec = _SPECS[name]
    changes = {}
    if base_filters is not None:
        changes["base_filters"] = positive_int(base_filters, "base_filters", name)
    if blocks is not None:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) != 4:
            raise ValueError(
                f"{name}: blocks must be 4 positive ints (blocks in conv2..conv5), got {blocks!r}"
            )
        changes["blocks"] = tuple(positive_int(b, "every entry of blocks", name) for b in blocks)
    for knob, value in (("groups", groups), ("width_per_group", width_per_group)):
        if value is None:
            continue
        if not spec.grouped:
            raise ValueError(
                f"{name}: the {knob!r} knob only applies to the ResNeXt backbones "
                f"(resnext50_32x4d, resnext101_32x4d); {name} has plain "
                f"{'basic' if spec.block == 'basic' else 'keras.applications'} blocks"
            )
        changes[knob] = positive_int(value, knob, name)
    spec = dataclasses.replace(spec, **changes)
    if spec.grouped and int(spec.base_filters * spec.width_per_group / 64) < 1:
        raise ValueError(
            f"{name}: base_filters={spec.base_filters} with width_per_group="
            f"{spec.width_per_group} leaves int(planes * width_per_group / 64) = 0 channels per "
            "group in stage conv2; raise base_filters or width_per_group"
        )
    return spec


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


def _check_weights_arg(name, weights, spec):
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
        if name not in IMAGENET_WEIGHTS:
            raise ValueError(
                f"{name}: no ImageNet weights; weights='imagenet' exists only for "
                f"{list(IMAGENET_WEIGHTS)} (copied from keras.applications). Use weights=None "
                "or a .weights.h5 file of this backbone."
            )
        if spec != _SPECS[name]:
            raise ValueError(
                f"{name}: weights='imagenet' needs the published architecture; the knobs changed "
                f"it (base_filters={spec.base_filters}, blocks={spec.blocks})"
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


# ----------------------------------------------------------------------------- public API


def build_resnet(
    name: str,
    input_shape: Sequence[int | None] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    *,
    base_filters: int | None = None,
    blocks: Sequence[int] | None = None,
    groups: int | None = None,
    width_per_group: int | None = None,
    levels: Sequence[int] | None = None,
) -> keras.Model:
    """Build a ResNet / ResNeXt feature extractor.

    Args:
        name: one of :data:`RESNETS`.
        input_shape: ``(H, W, C)``, channels last; ``H``/``W`` may be None (any size, including
            odd sizes: every stride-2 step rounds up). Input values as ``preprocess_for``
            produces them.
        weights: None (random init), ``"imagenet"`` (resnet50/101/152 only; downloads the
            keras.applications weights and copies them by layer name, folding their conv biases
            into the BatchNorms), or the path to a ``.weights.h5`` file saved from a backbone
            built with the same name and knobs (and without conv biases, unlike dlnotes' builds
            of resnet50/101/152 before conv biases were removed); with ``levels`` that stop
            below 5, the file may also be the full backbone's (its top stages are dropped).
        base_filters: stem / conv2 width (default 64; 16 for ``resnet_tiny``); stages use
            ``base_filters * (1, 2, 4, 8)`` planes.
        blocks: residual blocks per stage conv2..conv5, overriding the depth of ``name``.
        groups, width_per_group: ResNeXt only (defaults 32 and 4).
        levels: feature levels to return, increasing, from 2 (stride 4, the end of conv2) to 5;
            default ``(3, 4, 5)``. ``(2, 3, 4, 5)`` is the input of the FPN of Faster / Mask
            R-CNN.

    Returns:
        A functional ``keras.Model`` named ``name`` mapping ``(B, H, W, C)`` float images to
        ``[C3, C4, C5]`` (or the requested ``levels``), where ``C_l`` is
        ``(B, ceil(H / 2**l), ceil(W / 2**l), channels_l)`` and the output layers are named
        ``"C3"``, ``"C4"``, ``"C5"``. Channels are ``base_filters * 2**(l-2)`` (basic blocks) or
        4x that (bottlenecks): (128, 256, 512) for ResNet-18/34, (512, 1024, 2048) for the
        bottleneck models, (32, 64, 128) for ``resnet_tiny``.

    Raises:
        ValueError: unknown name, a knob that does not apply or is out of range, imagenet weights
            for a variant keras.applications does not have, a weights file that does not fit.
        FileNotFoundError: the weights file does not exist.
    """
    spec = _resolve_spec(name, base_filters, blocks, groups, width_per_group)
    levels = _resolve_levels(levels, name)
    input_shape = _resolve_input_shape(input_shape, name)
    kind = _check_weights_arg(name, weights, spec)
    if kind == "imagenet" and input_shape[-1] != 3:
        raise ValueError(f"{name}: weights='imagenet' needs 3 input channels, got {input_shape}")

    block_fn = _basic_block if spec.block == "basic" else _bottleneck_block
    images = keras.Input(shape=input_shape, name="images")
    x = _stem(images, spec)
    features = []
    for stage, (n_blocks, stride) in enumerate(zip(spec.blocks, _STAGE_STRIDES, strict=True)):
        level = stage + 2
        planes = spec.base_filters * 2**stage
        for i in range(n_blocks):
            x = block_fn(x, planes, stride if i == 0 else 1, f"conv{level}_block{i + 1}", spec)
        if level in levels:
            features.append(layers.Identity(name=f"C{level}")(x))
    model = keras.Model(images, features, name=name)

    if kind == "imagenet":
        constructor = getattr(keras.applications, IMAGENET_WEIGHTS[name])
        source = constructor(include_top=False, weights="imagenet", input_shape=(None, None, 3))
        copy_weights_by_name(source, model)
    elif kind == "file":
        published = IMAGENET_WEIGHTS.get(name) if spec == _SPECS[name] else None
        knobs = f"base_filters={spec.base_filters}, blocks={spec.blocks}"
        if spec.grouped:
            knobs += f", groups={spec.groups}, width_per_group={spec.width_per_group}"
        try:
            load_weights_file(model, os.fspath(weights), knobs, keras_app=published)
        except ValueError:
            if max(levels) == 5:
                raise
            # The top stages are not built (levels stop below C5): the file may be a full
            # backbone's. Load it into one and copy the shared layers by name; a file that
            # fits neither raises the full model's error.
            full = build_resnet(
                name, input_shape, weights, base_filters=base_filters, blocks=blocks,
                groups=groups, width_per_group=width_per_group,
            )  # fmt: skip
            copy_weights_by_name(full, model, strict=False)
    return model


def _resolve_levels(levels, name):
    """``levels`` as a tuple of increasing ints in 2..5 (default ``(3, 4, 5)``)."""
    if levels is None:
        return (3, 4, 5)
    try:
        resolved = tuple(int(level) for level in levels)
    except (TypeError, ValueError):
        resolved = ()
    if (
        not resolved
        or any(isinstance(level, bool) for level in levels)
        or any(level not in (2, 3, 4, 5) for level in resolved)
        or list(resolved) != sorted(set(resolved))
    ):
        raise ValueError(
            f"{name}: levels must be increasing feature levels from 2 (stride 4) to 5 (stride "
            f"32), e.g. (2, 3, 4, 5); got {levels!r}."
        )
    return resolved


def preprocessing_mode(name: str, weights: str | os.PathLike | None = None) -> str:
    """The :class:`~dlnotes.backbones.preprocessing.ImagePreprocessing` mode of ResNet ``name``.

    ``"caffe"`` for resnet50/101/152 (keras.applications' convention, whatever ``weights``),
    ``"torch"`` for the torchvision-layout backbones. ``weights`` is validated as in
    :func:`build_resnet` (e.g. ``"imagenet"`` for resnet18 raises) but does not change the mode,
    so that a checkpoint fine-tuned from ImageNet keeps the convention it was trained with.
    """
    spec = _resolve_spec(name, None, None, None, None)
    _check_weights_arg(name, weights, spec)
    return "caffe" if spec.keras_layout else "torch"


def describe(name: str) -> str:
    """One line on ResNet ``name``: block type, blocks per stage, layout."""
    spec = _resolve_spec(name, None, None, None, None)
    layout = "keras.applications" if spec.keras_layout else "torchvision"
    kind = "basic" if spec.block == "basic" else "bottleneck"
    if spec.grouped and spec.groups > 1:
        kind = f"{spec.groups}x{spec.width_per_group}d grouped bottleneck"
    blocks = "-".join(str(b) for b in spec.blocks)
    return f"{kind} blocks {blocks}, width {spec.base_filters}, {layout} layout"
