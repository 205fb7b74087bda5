"""ResNet and ResNeXt backbones: Keras 3 functional models that return the C3, C4, C5 feature maps.

Every backbone is built by :func:`build_backbone` and is a plain ``keras.Model`` made of stock
``keras.layers`` (no custom layer), with deterministic layer names::

    backbone = build_backbone("resnet50")            # input (B, H, W, 3) float32
    c3, c4, c5 = backbone(images)                   # strides 8, 16, 32
    channels = [t.shape[-1] for t in backbone.outputs]   # (512, 1024, 2048)

Outputs
    A list ``[C3, C4, C5]``: ``C_l`` has shape ``(B, ceil(H / 2**l), ceil(W / 2**l), channels_l)``,
    i.e. strides 8, 16 and 32. Each output is an identity layer named ``"C3"``, ``"C4"``,
    ``"C5"`` placed after the last block of its stage (the post-ReLU ``conv{l}_block{n}_out``
    tensor), so a detector recovers the level and stride from ``backbone.output_names`` (stride
    ``2**level``, see :func:`output_strides`) and the channels from
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
  (:func:`copy_weights_by_name`, which folds each keras.applications conv bias exactly into the
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

Preprocessing (the detector applies it; :func:`preprocess_for` returns the layer to put in front):
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
import warnings
from collections.abc import Sequence

import h5py
import keras
import numpy as np
from keras import layers, ops

__all__ = [
    "BACKBONES",
    "IMAGENET_WEIGHTS",
    "ImagePreprocessing",
    "build_backbone",
    "copy_weights_by_name",
    "output_strides",
    "preprocess_for",
]


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

#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = tuple(_SPECS)

#: Backbones with ``weights="imagenet"``: the keras.applications constructor of each.
IMAGENET_WEIGHTS: dict[str, str] = {
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet152": "ResNet152",
}

_KERAS_BN_EPSILON = 1.001e-5  # keras.applications.resnet
_TORCH_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d default
_STAGE_STRIDES = (1, 2, 2, 2)  # conv2 follows the stride-4 stem; conv3..conv5 halve the size


def _kernel_initializer():
    # torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu").
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


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
        kernel_initializer=_kernel_initializer(),
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
        kernel_initializer=_kernel_initializer(),
        name="conv1_conv",
    )(x)
    x = _bn(x, "conv1_bn", spec)
    x = layers.Activation("relu", name="conv1_relu")(x)
    # Zero padding equals torch's -inf padding of the max pool because the input is >= 0.
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


# ----------------------------------------------------------------------------- validation


def _check_positive_int(value, what, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: {what} must be a positive int, got {value!r}")
    return int(value)


def _resolve_spec(name, base_filters, blocks, groups, width_per_group):
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {list(BACKBONES)}")
    spec = _SPECS[name]
    changes = {}
    if base_filters is not None:
        changes["base_filters"] = _check_positive_int(base_filters, "base_filters", name)
    if blocks is not None:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) != 4:
            raise ValueError(
                f"{name}: blocks must be 4 positive ints (blocks in conv2..conv5), got {blocks!r}"
            )
        changes["blocks"] = tuple(
            _check_positive_int(b, "every entry of blocks", name) for b in blocks
        )
    for knob, value in (("groups", groups), ("width_per_group", width_per_group)):
        if value is None:
            continue
        if not spec.grouped:
            raise ValueError(
                f"{name}: the {knob!r} knob only applies to the ResNeXt backbones "
                f"(resnext50_32x4d, resnext101_32x4d); {name} has plain "
                f"{'basic' if spec.block == 'basic' else 'keras.applications'} blocks"
            )
        changes[knob] = _check_positive_int(value, knob, name)
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
            _check_positive_int(dim, f"every entry of input_shape {shape}", name)
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


def build_backbone(
    name: str,
    input_shape: Sequence[int | None] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    *,
    base_filters: int | None = None,
    blocks: Sequence[int] | None = None,
    groups: int | None = None,
    width_per_group: int | None = None,
) -> keras.Model:
    """Build a ResNet / ResNeXt feature extractor.

    Args:
        name: one of :data:`BACKBONES`.
        input_shape: ``(H, W, C)``, channels last; ``H``/``W`` may be None (any size, including
            odd sizes: every stride-2 step rounds up). Input values as :func:`preprocess_for`
            produces them.
        weights: None (random init), ``"imagenet"`` (resnet50/101/152 only; downloads the
            keras.applications weights and copies them by layer name, folding their conv biases
            into the BatchNorms), or the path to a ``.weights.h5`` file saved from a backbone
            built with the same name and knobs (and without conv biases, unlike dlnotes' builds
            of resnet50/101/152 before conv biases were removed).
        base_filters: stem / conv2 width (default 64; 16 for ``resnet_tiny``); stages use
            ``base_filters * (1, 2, 4, 8)`` planes.
        blocks: residual blocks per stage conv2..conv5, overriding the depth of ``name``.
        groups, width_per_group: ResNeXt only (defaults 32 and 4).

    Returns:
        A functional ``keras.Model`` named ``name`` mapping ``(B, H, W, C)`` float images to
        ``[C3, C4, C5]``, where ``C_l`` is
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
        if level >= 3:
            features.append(layers.Identity(name=f"C{level}")(x))
    model = keras.Model(images, features, name=name)

    if kind == "imagenet":
        constructor = getattr(keras.applications, IMAGENET_WEIGHTS[name])
        source = constructor(include_top=False, weights="imagenet", input_shape=(None, None, 3))
        copy_weights_by_name(source, model)
    elif kind == "file":
        published = IMAGENET_WEIGHTS.get(name) if spec == _SPECS[name] else None
        _load_weights_file(model, os.fspath(weights), published)
    return model


def _load_weights_file(model, path, keras_app=None):
    """``model.load_weights`` with a clear error when the file belongs to another architecture.

    Keras' ``.weights.h5`` stores variables by layer *position* (``layers/conv2d_7/vars/0``), not
    by layer name, so a file only fits a model built with the same name and knobs. The variable
    count is checked first (Keras would skip surplus entries with warnings only; a file with
    surplus *conv* variables, one per conv, comes from an older dlnotes build with conv biases),
    then Keras checks every shape. ``keras_app``: the keras.applications constructor of the
    same architecture, if any, for the error message.
    """
    saved = []

    def collect(key, obj):  # must return None: h5py stops visiting at any other value
        if isinstance(obj, h5py.Dataset):
            saved.append(key)

    try:
        with h5py.File(path, "r") as f:
            f.visititems(collect)
    except OSError as err:
        raise ValueError(f"{model.name}: {path!r} is not a readable HDF5 file ({err})") from err
    if len(saved) != len(model.weights):
        # keys look like "layers/conv2d_7/vars/1"; Keras names the groups after the layer class
        saved_conv = sum(1 for key in saved if key.split("/")[1].startswith("conv2d"))
        convs = [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]
        model_conv = sum(len(layer.weights) for layer in convs)
        if saved_conv - model_conv == len(saved) - len(model.weights) == len(convs):
            biased = (
                f"keras.applications.{keras_app}(include_top=False, weights=None)"
                if keras_app
                else "this backbone rebuilt with use_bias=True convs"
            )
            raise ValueError(
                f"{model.name}: {path!r} was saved from a backbone with conv biases (an older "
                f"dlnotes build: {saved_conv} conv variables, this backbone has {model_conv}). "
                f"Load it into {biased} and copy_weights_by_name() that into this backbone, "
                "which folds the biases into the BatchNorms."
            )
        raise ValueError(
            f"{model.name}: {path!r} holds {len(saved)} variables but this backbone has "
            f"{len(model.weights)}; it was saved from a backbone with another name or knobs"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{model.name}: could not load {path!r} into this backbone; was it saved from a "
                f"backbone built with the same name and knobs? ({err})"
            ) from err
    # Keras only warns when it skips part of a file, leaving those layers at random init.
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    if skipped:
        raise ValueError(f"{model.name}: {path!r} did not fit every layer: {skipped[0]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _feeds(conv, bn):
    """Whether ``bn``'s input is ``conv``'s output itself (False if either is called twice)."""
    try:
        return bn.input is conv.output
    except (AttributeError, ValueError):  # a layer called more than once has no single tensor
        return False


def _batch_norm_after(model, conv):
    """The BatchNormalization of ``model`` applied directly to ``conv``'s output, or None.

    Found by keras.applications' naming, the ``_conv`` suffix replaced by ``_bn``
    (``conv1_conv`` -> ``conv1_bn``, ``conv2_block1_1_conv`` -> ``conv2_block1_1_bn``,
    ``conv2_block1_0_conv`` -> ``conv2_block1_0_bn``), else as the only BatchNormalization that
    consumes the conv's output. Either way it must consume that output directly, over the conv's
    channel axis, or a bias folded into it would not be exact.
    """
    candidates = []
    if conv.name.endswith("_conv"):
        try:
            candidates = [model.get_layer(conv.name[: -len("_conv")] + "_bn")]
        except ValueError:
            pass
    candidates = [c for c in candidates if isinstance(c, layers.BatchNormalization)]
    if not candidates or not _feeds(conv, candidates[0]):
        candidates = [
            layer
            for layer in model.layers
            if isinstance(layer, layers.BatchNormalization) and _feeds(conv, layer)
        ]
    if len(candidates) != 1:
        return None
    bn = candidates[0]
    rank = len(conv.output.shape)
    channel_axis = rank - 1 if conv.data_format == "channels_last" else 1
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if [a % rank for a in axes] != [channel_axis]:
        return None
    return bn


def copy_weights_by_name(source: keras.Model, target: keras.Model, *, strict: bool = True) -> int:
    """Copy layer weights from ``source`` into ``target`` for every layer name they share.

    Used to load keras.applications' ImageNet ResNets into :func:`build_backbone` models (the
    layer names and weight layouts are the same but for the conv biases); works for any pair of
    models.

    A conv that has a bias in ``source`` but none in ``target`` gets the kernel only, and its
    bias ``b`` is folded exactly into the BatchNorm that follows it: in inference mode
    ``BN(conv(x) + b) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta``, so the target
    BN's ``moving_mean`` becomes ``mean - b`` (gamma, beta and the variance unchanged); in
    training mode the batch mean absorbs ``b`` anyway. That BN is found by keras.applications'
    naming (``conv2_block1_1_conv`` -> ``conv2_block1_1_bn``, ``conv1_conv`` -> ``conv1_bn``)
    or else as the only BatchNormalization consuming the conv's output; in both models it must
    be applied directly to the conv's output, and it is copied from ``source`` too.

    Args:
        source: model to read from (e.g. ``keras.applications.ResNet50(include_top=False)``).
        target: model to write to.
        strict: if True, every layer with weights in ``target`` must exist in ``source`` and
            vice versa, and every dropped bias must be folded; if False, layers without a
            counterpart are skipped, and so (with a warning) is a conv whose bias has no
            BatchNorm to go to.

    Returns:
        The number of layers copied (a BatchNorm that received a bias counts once).

    Raises:
        ValueError: a layer is missing on one side (``strict``), a shared layer's weights differ
            in count or shape (other than a dropped conv bias), or a dropped conv bias has no
            BatchNorm to fold into (``strict``). Nothing is copied when this is raised.
    """
    src = {layer.name: layer for layer in source.layers if layer.weights}
    dst = {layer.name: layer for layer in target.layers if layer.weights}
    if strict:
        only_dst = sorted(set(dst) - set(src))
        only_src = sorted(set(src) - set(dst))
        if only_dst or only_src:
            raise ValueError(
                f"copy_weights_by_name: layers of {target.name!r} missing in {source.name!r}: "
                f"{only_dst[:5]}{' ...' if len(only_dst) > 5 else ''} ({len(only_dst)}); "
                f"layers of {source.name!r} missing in {target.name!r}: "
                f"{only_src[:5]}{' ...' if len(only_src) > 5 else ''} ({len(only_src)})"
            )
    planned = {}  # target layer name -> (layer, values to set)
    biases = []  # (target conv, source bias): biases to fold into the following BN
    for layer_name, layer in dst.items():
        if layer_name not in src:
            continue
        source_layer = src[layer_name]
        values = source_layer.get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        drops_bias = (
            isinstance(layer, layers.Conv2D)
            and isinstance(source_layer, layers.Conv2D)
            and source_layer.use_bias
            and not layer.use_bias
            and got[:-1] == expected  # Keras orders a conv's weights (kernel, bias)
        )
        if drops_bias:
            biases.append((layer, values.pop()))
        elif expected != got:
            raise ValueError(
                f"copy_weights_by_name: layer {layer_name!r} has weight shapes {expected} in "
                f"{target.name!r} but {got} in {source.name!r}"
            )
        planned[layer_name] = (layer, values)

    for conv, bias in biases:
        bn = _batch_norm_after(target, conv)
        ok = (
            bn is not None
            and bn.name in planned
            and _batch_norm_after(source, src[conv.name]) is src[bn.name]
            and tuple(bn.moving_mean.shape) == bias.shape
        )
        if not ok:
            message = (
                f"copy_weights_by_name: conv {conv.name!r} has a bias in {source.name!r} but "
                f"none in {target.name!r}, and no BatchNormalization copied from "
                f"{source.name!r} follows it directly in both models (expected "
                f"{conv.name.removesuffix('_conv') + '_bn'!r}) to fold the bias into"
            )
            if strict:
                raise ValueError(message)
            warnings.warn(message + "; the conv is left unchanged", stacklevel=2)
            del planned[conv.name]
            continue
        values = planned[bn.name][1]
        i = next(k for k, w in enumerate(bn.weights) if w is bn.moving_mean)
        # BN(conv(x) + b) uses (conv(x) + b - mean): the same as conv(x) with mean - b.
        values[i] = (values[i].astype(np.float64) - bias).astype(values[i].dtype)

    for layer, values in planned.values():  # validate everything first so a failure copies nothing
        layer.set_weights(values)
    return len(planned)


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


_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_RGB_MEAN = (0.485, 0.456, 0.406)
_TORCH_RGB_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="dlnotes")
class ImagePreprocessing(layers.Layer):
    """Map RGB images with values in ``[0, 255]`` to a backbone's expected input.

    Modes (equal to ``keras.applications.imagenet_utils.preprocess_input(x, mode=...)``):

    * ``"caffe"``: RGB -> BGR, minus the ImageNet BGR mean (103.939, 116.779, 123.68), no scaling
      (``keras.applications.resnet.preprocess_input``).
    * ``"torch"``: ``x / 255``, minus mean (0.485, 0.456, 0.406), divided by std
      (0.229, 0.224, 0.225), in RGB order.

    Input ``(..., 3)`` of any real dtype; output the same shape in the layer's compute dtype.
    """

    MODES = ("caffe", "torch")

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"ImagePreprocessing: mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def build(self, input_shape):
        if input_shape[-1] != 3:
            raise ValueError(
                f"ImagePreprocessing({self.mode!r}) needs RGB images (..., 3), got shape "
                f"{tuple(input_shape)}"
            )
        self.built = True

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
        mean = ops.convert_to_tensor(_TORCH_RGB_MEAN, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(_TORCH_RGB_STD, dtype=self.compute_dtype)
        return (x / 255.0 - mean) / std

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def preprocess_for(name: str, weights: str | os.PathLike | None = None) -> ImagePreprocessing:
    """The preprocessing layer a detector puts in front of backbone ``name``.

    ``"caffe"`` for resnet50/101/152 (keras.applications' convention, whatever ``weights``),
    ``"torch"`` for the torchvision-layout backbones. ``weights`` is validated like in
    :func:`build_backbone` (e.g. ``"imagenet"`` for resnet18 raises) but does not change the mode,
    so that a checkpoint fine-tuned from ImageNet keeps the convention it was trained with.

    Returns:
        A new :class:`ImagePreprocessing` layer named ``"{name}_preprocessing"``; it maps
        ``(B, H, W, 3)`` RGB in ``[0, 255]`` to the backbone's input.
    """
    spec = _resolve_spec(name, None, None, None, None)
    _check_weights_arg(name, weights, spec)
    mode = "caffe" if spec.keras_layout else "torch"
    return ImagePreprocessing(mode, name=f"{name}_preprocessing")
