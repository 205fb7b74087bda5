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

Two families, two layouts (both with the same layer-naming scheme as keras.applications:
``conv1_conv``, ``conv2_block1_1_conv``, ``conv2_block1_0_bn`` (shortcut), ``..._add``, ``..._out``):

* ``resnet50``, ``resnet101``, ``resnet152`` follow ``keras.applications.ResNet50/101/152``
  layer for layer (ResNet v1: stride on the first 1x1 conv of a block, a bias on every conv,
  BatchNorm epsilon 1.001e-5). Their weights copy by layer name from keras.applications
  (:func:`copy_weights_by_name`), which is how ``weights="imagenet"`` works.
* ``resnet18``, ``resnet34`` (basic blocks), ``resnext50_32x4d``, ``resnext101_32x4d`` (grouped
  bottlenecks) and ``resnet_tiny`` follow torchvision's ``torchvision.models.resnet``: no conv
  bias, BatchNorm epsilon 1e-5, the stride on the (first) 3x3 conv of a block (for bottlenecks
  this is "ResNet v1.5"), and torch's symmetric padding for stride-2 convs (an explicit ``ZeroPadding2D`` before a "valid" conv, because
  Keras' "same" pads only bottom/right at stride 2). Trainable parameter counts equal
  torchvision's published figures minus the 1000-class fc layer.

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
        keras_layout: True for the keras.applications v1 layout (bias, stride on the first 1x1,
            eps 1.001e-5); False for torchvision's (no bias, stride on the 3x3, eps 1e-5).
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


def _conv(x, filters, kernel_size, stride, name, spec, groups=1):
    """Conv2D with torch-style symmetric padding when a 3x3 (or 7x7) conv has stride 2.

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
        use_bias=spec.keras_layout,
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
    s = _conv(x, out_channels, 1, stride, f"{name}_0_conv", spec)
    return _bn(s, f"{name}_0_bn", spec)


def _basic_block(x, planes, stride, name, spec):
    """torchvision BasicBlock: 3x3 (stride) - BN - ReLU - 3x3 - BN, + shortcut, ReLU."""
    shortcut = _shortcut(x, planes, stride, name, spec)
    y = _conv(x, planes, 3, stride, f"{name}_1_conv", spec)
    y = _bn(y, f"{name}_1_bn", spec)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = _conv(y, planes, 3, 1, f"{name}_2_conv", spec)
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
    y = _conv(x, width, 1, stride_1x1, f"{name}_1_conv", spec)
    y = _bn(y, f"{name}_1_bn", spec)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = _conv(y, width, 3, stride_3x3, f"{name}_2_conv", spec, groups=groups)
    y = _bn(y, f"{name}_2_bn", spec)
    y = layers.Activation("relu", name=f"{name}_2_relu")(y)
    y = _conv(y, out_channels, 1, 1, f"{name}_3_conv", spec)
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
        use_bias=spec.keras_layout,
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
            keras.applications weights and copies them by layer name), or the path to a
            ``.weights.h5`` file saved from a backbone built with the same name and knobs.
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
        _load_weights_file(model, os.fspath(weights))
    return model


def _load_weights_file(model, path):
    """``model.load_weights`` with a clear error when the file belongs to another architecture.

    Keras' ``.weights.h5`` stores variables by layer *position* (``layers/conv2d_7/vars/0``), not
    by layer name, so a file only fits a model built with the same name and knobs. The variable
    count is checked first (Keras would skip surplus entries with warnings only), then Keras
    checks every shape.
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


def copy_weights_by_name(source: keras.Model, target: keras.Model, *, strict: bool = True) -> int:
    """Copy layer weights from ``source`` into ``target`` for every layer name they share.

    Used to load keras.applications' ImageNet ResNets into :func:`build_backbone` models (the
    layer names and weight layouts are the same); works for any pair of models.

    Args:
        source: model to read from (e.g. ``keras.applications.ResNet50(include_top=False)``).
        target: model to write to.
        strict: if True, every layer with weights in ``target`` must exist in ``source`` and
            vice versa; if False, layers without a counterpart are skipped.

    Returns:
        The number of layers copied.

    Raises:
        ValueError: a layer is missing on one side (``strict``), or a shared layer's weights
            differ in count or shape. Nothing is copied when this is raised.
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
    pairs = []
    for layer_name, layer in dst.items():
        if layer_name not in src:
            continue
        values = src[layer_name].get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise ValueError(
                f"copy_weights_by_name: layer {layer_name!r} has weight shapes {expected} in "
                f"{target.name!r} but {got} in {source.name!r}"
            )
        pairs.append((layer, values))
    for layer, values in pairs:  # validate everything first so a failure copies nothing
        layer.set_weights(values)
    return len(pairs)


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
