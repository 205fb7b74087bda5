"""Feature-pyramid necks: the original FPN, this project's BN / post-activation FPN, PANet, YOLOv3.

Every neck has one interface, so that a chapter can put any of them on the same backbone:

* it is a Keras layer called on a **list of backbone features** ``[C_min, ..., C_top]``, lowest
  stride first, consecutive entries differing by stride 2 (typically ``[C3, C4, C5]`` with
  strides 8 / 16 / 32 and any channel counts), each ``(B, H_l, W_l, C_l)``;
* it returns a **list of pyramid levels, lowest stride first**, each ``(B, H_l, W_l, channels)``;
* it builds its weights from the input shapes (channel counts) and has a ``levels`` property
  (pyramid level numbers of the outputs, stride ``2**level``).

Odd feature sizes are normal (a 100x132 image gives C3..C5 of 13x17, 7x9 and 4x5 with "same"
padding, Darknet's top-left padding gives 12x16, 6x8, 3x4): a coarse map upsampled by 2 is
cropped to the finer map's size, or, when the backbone rounded down, its last row / column is
repeated (:func:`nearest_upsample_like`).

The necks are graph code (TF ops, static shapes) and run inside ``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dlnotes.checks import positive_int

__all__ = [
    "FPN",
    "PANet",
    "NeckConv",
    "YoloFPN",
    "match_spatial_size",
    "nearest_upsample_like",
]

_EXTRA_FROM = ("c5", "p5", "pool")


# ----------------------------------------------------------------------------- resampling helpers
def _fit_axis(x, axis, size):
    """Crops ``x`` along ``axis`` to ``size``, or pads it by repeating its last entry."""
    current = x.shape[axis]
    if current is not None and not tf.is_tensor(size):
        if current == size:
            return x
        if current > size:
            begin = [0] * x.shape.rank
            shape = [-1] * x.shape.rank
            shape[axis] = size
            return tf.slice(x, begin, shape)
        # The backbone rounded down (e.g. Darknet's stride-2 convs): replicate the edge.
        return tf.gather(x, np.minimum(np.arange(size), current - 1), axis=axis)
    # Dynamic sizes: one gather with clipped indices covers both the crop and the pad.
    index = tf.minimum(tf.range(size), tf.shape(x)[axis] - 1)
    return tf.gather(x, index, axis=axis)


def _spatial_size(x):
    """(height, width) of a ``(B, H, W, C)`` tensor: Python ints when static, else tensors."""
    dynamic = tf.shape(x)
    height = x.shape[1] if x.shape[1] is not None else dynamic[1]
    width = x.shape[2] if x.shape[2] is not None else dynamic[2]
    return height, width


def match_spatial_size(x, like):
    """Crops (or edge-pads) ``x`` ``(B, h, w, C)`` to the height and width of ``like``.

    Used where a stride-2 operation's ``ceil`` size meets a backbone map whose size was rounded
    down (or the other way round); the two differ by at most one row / column.

    Returns:
        ``(B, H, W, C)`` with ``(H, W)`` the spatial size of ``like``; rows / columns are cropped
        from the bottom / right or the last one is repeated.
    """
    height, width = _spatial_size(like)
    return _fit_axis(_fit_axis(x, 1, height), 2, width)


def nearest_upsample_like(x, like):
    """Nearest-neighbour 2x upsampling of ``x`` ``(B, h, w, C)`` to the spatial size of ``like``.

    Every input pixel becomes a 2x2 block (``UpSampling2D(2, "nearest")``), then the result is
    cropped to ``like``'s ``(H, W)``: a 7x7 C5 becomes 14x14 and is cropped to a 13x13 C4. When the
    backbone rounded the coarse size down (``h = floor(H / 2)``, e.g. 12 for 25) the last row /
    column is repeated instead. Output pixel ``(i, j)`` is always input pixel
    ``(min(i // 2, h - 1), min(j // 2, w - 1))``.

    Returns:
        ``(B, H, W, C)``, same dtype as ``x``.
    """
    x = tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)
    return match_spatial_size(x, like)


# ----------------------------------------------------------------------------- building block
def _activation(name, negative_slope):
    """The activation function for a name; ``"leaky_relu"`` uses ``negative_slope``."""
    if name is None:
        return None
    if name == "leaky_relu":
        # Not tf.nn.leaky_relu: its slope is a float32 attribute (0.1 would become
        # 0.100000001 in a float64 layer).
        return lambda x: tf.where(x > 0, x, tf.constant(negative_slope, x.dtype) * x)
    return keras.activations.get(name)


@keras.saving.register_keras_serializable(package="dlnotes")
class NeckConv(keras.layers.Layer):
    """conv -> [BatchNorm] -> [activation]: the unit every neck is made of.

    A convolution followed by batch norm has no bias (BN's beta replaces it), as in Darknet and
    Detectron; without batch norm it has one.

    Args:
        filters: output channels.
        kernel_size: square kernel size.
        strides: 1, or 2 for the downsampling convs (``"same"`` padding: output ``ceil(H / 2)``).
        batch_norm: add a ``BatchNormalization`` after the conv.
        activation: ``None`` (linear), a Keras activation name (``"relu"``, ``"swish"``...) or
            ``"leaky_relu"`` with slope ``negative_slope``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs (Darknet: 0.1).
        norm_momentum: BN moving-average momentum.
        norm_epsilon: BN epsilon.

    Input ``(B, H, W, C_in)`` -> output ``(B, ceil(H / s), ceil(W / s), filters)``.
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        batch_norm=False,
        activation=None,
        negative_slope=0.1,
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = positive_int(filters, "filters", type(self).__name__)
        self.kernel_size = positive_int(kernel_size, "kernel_size", type(self).__name__)
        if strides not in (1, 2):
            raise ValueError(f"NeckConv: `strides` must be 1 or 2, got {strides!r}.")
        self.strides = int(strides)
        self.batch_norm = bool(batch_norm)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self._act = _activation(activation, self.negative_slope)
        self.conv = keras.layers.Conv2D(
            self.filters,
            self.kernel_size,
            strides=self.strides,
            padding="same",
            use_bias=not self.batch_norm,
            dtype=self.dtype_policy,
            name="conv",
        )
        self.norm = None
        if self.batch_norm:
            self.norm = keras.layers.BatchNormalization(
                momentum=self.norm_momentum,
                epsilon=self.norm_epsilon,
                dtype=self.dtype_policy,
                name="bn",
            )

    def build(self, input_shape):
        self.conv.build(input_shape)
        if self.norm is not None:
            self.norm.build(self.conv.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        x = self.conv(inputs)
        if self.norm is not None:
            x = self.norm(x, training=training)
        if self._act is not None:
            x = self._act(x)
        return x

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            batch_norm=self.batch_norm,
            activation=self.activation,
            negative_slope=self.negative_slope,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        return config


# ----------------------------------------------------------------------------- validation
def _check_feature_shapes(input_shape, owner, expected_count=None):
    """Validates a list of ``(B, H, W, C)`` shapes, lowest stride first; returns it as tuples."""
    if not isinstance(input_shape, (list, tuple)) or not input_shape:
        raise ValueError(
            f"{owner} expects a non-empty list of backbone features [C3, C4, C5, ...] (lowest "
            f"stride first), got input shape {input_shape!r}."
        )
    # A single shape given as a tuple of ints is not a list of features.
    if all(d is None or isinstance(d, (int, np.integer)) for d in input_shape):
        raise ValueError(
            f"{owner} expects a list of feature maps, got a single tensor shape {input_shape!r}."
        )
    shapes = [tuple(s) for s in input_shape]
    if expected_count is not None and len(shapes) != expected_count:
        raise ValueError(
            f"{owner} expects {expected_count} feature maps (one per entry of `filters`), got "
            f"{len(shapes)} with shapes {shapes}."
        )
    for i, shape in enumerate(shapes):
        if len(shape) != 4 or shape[-1] is None:
            raise ValueError(
                f"{owner}: feature {i} must have shape (B, H, W, C) with a known channel count, "
                f"got {shape}."
            )
    for i in range(len(shapes) - 1):
        for axis, dim in ((1, "height"), (2, "width")):
            fine, coarse = shapes[i][axis], shapes[i + 1][axis]
            if fine is None or coarse is None:
                continue
            if coarse not in ((fine + 1) // 2, fine // 2):
                raise ValueError(
                    f"{owner}: feature {i + 1} must have half the resolution of feature {i} "
                    f"(lowest stride first, stride ratio 2); {dim} {coarse} does not fit {fine} "
                    f"(expected {(fine + 1) // 2} or {fine // 2}). Shapes: {shapes}."
                )
    return shapes


def _check_levels(min_level, max_level, owner):
    min_level = positive_int(min_level, "min_level", owner)
    max_level = positive_int(max_level, "max_level", owner)
    if max_level < min_level:
        raise ValueError(
            f"{owner}: `max_level` ({max_level}) must be >= `min_level` ({min_level})."
        )
    return min_level, max_level


def _check_inputs(inputs, expected, owner):
    if not isinstance(inputs, (list, tuple)) or len(inputs) != expected:
        raise ValueError(
            f"{owner} was built for a list of {expected} feature maps, got "
            f"{type(inputs).__name__} of length {len(inputs) if isinstance(inputs, (list, tuple)) else 1}."
        )
    return list(inputs)


def _none_shape(channels):
    return (None, None, None, channels)


# ----------------------------------------------------------------------------- FPN
@keras.saving.register_keras_serializable(package="dlnotes")
class FPN(keras.layers.Layer):
    """Feature Pyramid Network (Lin et al. 2017) as used by RetinaNet (Lin et al. 2017b).

    For backbone features ``[C_min, ..., C_top]`` (``inputs[i]`` is level ``min_level + i``;
    ``[C3, C4, C5]`` for the defaults)::

        L_l = conv1x1(C_l)                                   lateral connections
        M_top = L_top;  M_l = L_l + up2(M_{l+1})             nearest top-down pathway
        P_l = conv3x3(M_l)                                   output convs, l <= top
        P_{top+1} = conv3x3_s2(C_top or P_top)               extra_from = "c5" / "p5"
        P_{l+1} = conv3x3_s2(act(P_l))                       further extra levels (P7)
        P_{l+1} = maxpool1x1_s2(P_l)                         extra_from = "pool": no weights

    All convs have ``num_channels`` filters; ``up2`` is :func:`nearest_upsample_like`, which crops
    (or edge-pads) to the lateral's size so odd feature sizes work. With the defaults this is
    keras-retinanet's / the RetinaNet paper's FPN: no BN, P3-P5 are the linear outputs of the 3x3
    convs, P6 is a stride-2 conv of C5, P7 a stride-2 conv of ReLU(P6). With ``max_level`` equal
    to the top input level (5) there are no extra levels.

    **The notes' variant** (``batch_norm=True, post_activation=True``, :meth:`notes_variant`,
    ``build_neck("fpn_bn")``): every conv is followed by BN, and every *output* conv (P3-P7) by
    the activation, so the pyramid levels are taken **after** the activation (conv-BN-ReLU).
    keras-retinanet takes them **before**: P3-P5 are the linear 3x3 outputs and P6 is the conv
    output, the ReLU being applied only on the way to P7. The FPN paper's pyramid layers are
    linear too ("no non-linearities in these extra layers, which we have empirically found to
    have minor impacts"). The laterals stay linear (conv-BN) in both, because the top-down merge
    is a sum of linear projections. With BN every level's features are normalised, which suits
    heads that are shared across levels.

    Args:
        num_channels: channels of every lateral, output and extra conv (256 in RetinaNet).
        min_level: pyramid level of ``inputs[0]`` (3 for C3, stride 8).
        max_level: highest output level (7 for P7, stride 128); must be at least the level of
            the last input.
        batch_norm: BN after every conv (convs then have no bias).
        post_activation: apply ``activation`` after every output / extra conv.
        extra_from: ``"c5"`` (the RetinaNet paper, keras-retinanet) or ``"p5"`` (the first extra
            level from the top pyramid output, as in FCOS / detectron2's ``use_P5``); "c5" / "p5"
            name the *top* input / output level whatever its number. ``"pool"``: every extra
            level is the level below subsampled by a 1x1 max pool of stride 2 (every other
            pixel, ``ceil`` sizes), without weights: the P6 of Faster / Mask R-CNN's FPN
            (torchvision's ``LastLevelMaxPool``, used by the RPN only).
        activation: activation name (``"relu"``; ``"swish"``, ``"leaky_relu"``...).
        norm_momentum: BN momentum.
        norm_epsilon: BN epsilon.

    Input: list of ``(B, H_l, W_l, C_l)`` features, lowest stride first, consecutive levels
    differing by stride 2. Output: list of ``max_level - min_level + 1`` tensors
    ``(B, H_l, W_l, num_channels)``, ``P_min`` first; ``H_l`` is the backbone's size for input
    levels and ``ceil(H_{l-1} / 2)`` for extra levels.
    """

    def __init__(
        self,
        num_channels=256,
        min_level=3,
        max_level=7,
        batch_norm=False,
        post_activation=False,
        extra_from="c5",
        activation="relu",
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.num_channels = positive_int(num_channels, "num_channels", owner)
        self.min_level, self.max_level = _check_levels(min_level, max_level, owner)
        if extra_from not in _EXTRA_FROM:
            raise ValueError(
                f"{owner}: `extra_from` must be one of {_EXTRA_FROM}, got {extra_from!r}."
            )
        self.batch_norm = bool(batch_norm)
        self.post_activation = bool(post_activation)
        self.extra_from = extra_from
        self.activation = activation
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self._act = _activation(activation, 0.1)
        if self._act is None:
            raise ValueError(f"{owner}: `activation` must name an activation, got None.")
        self._num_inputs = None

    @classmethod
    def notes_variant(cls, num_channels=256, min_level=3, max_level=7, **kwargs):
        """The notes' FPN: BN after every conv, levels taken after the activation."""
        return cls(
            num_channels=num_channels,
            min_level=min_level,
            max_level=max_level,
            batch_norm=True,
            post_activation=True,
            **kwargs,
        )

    @property
    def levels(self):
        """Pyramid level numbers of the outputs, lowest first (stride ``2**level``)."""
        return list(range(self.min_level, self.max_level + 1))

    def _conv(self, kernel_size, name, strides=1, activated=False):
        return NeckConv(
            self.num_channels,
            kernel_size,
            strides=strides,
            batch_norm=self.batch_norm,
            activation=self.activation if activated else None,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        owner = type(self).__name__
        shapes = _check_feature_shapes(input_shape, owner)
        top_level = self.min_level + len(shapes) - 1
        if self.max_level < top_level:
            raise ValueError(
                f"{owner}: got {len(shapes)} features for levels {self.min_level}..{top_level} "
                f"but `max_level` is {self.max_level}; pass only the levels up to max_level."
            )
        self._num_inputs = len(shapes)
        input_levels = range(self.min_level, top_level + 1)
        # Sub-layers depend on the number of backbone levels, so they are created here.
        self.lateral_convs = [self._conv(1, f"lateral_p{level}") for level in input_levels]
        self.output_convs = [
            self._conv(3, f"output_p{level}", activated=self.post_activation)
            for level in input_levels
        ]
        self.extra_convs = [
            self._conv(3, f"extra_p{level}", strides=2, activated=self.post_activation)
            for level in range(top_level + 1, self.max_level + 1)
            if self.extra_from != "pool"
        ]
        channels = _none_shape(self.num_channels)
        for conv, shape in zip(self.lateral_convs, shapes, strict=True):
            conv.build(shape)
        for conv in self.output_convs:
            conv.build(channels)
        for i, conv in enumerate(self.extra_convs):
            from_c5 = i == 0 and self.extra_from == "c5"
            conv.build(shapes[-1] if from_c5 else channels)

    def call(self, inputs, training=None):
        features = _check_inputs(inputs, self._num_inputs, type(self).__name__)
        laterals = [
            conv(x, training=training) for conv, x in zip(self.lateral_convs, features, strict=True)
        ]
        merged = laterals[-1:]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + nearest_upsample_like(merged[0], lateral))
        outputs = [
            conv(x, training=training) for conv, x in zip(self.output_convs, merged, strict=True)
        ]
        if self.extra_from == "pool":
            for _ in range(self.max_level - self.min_level + 1 - len(outputs)):
                outputs.append(outputs[-1][:, ::2, ::2, :])  # max_pool2d(x, 1, stride=2)
            return outputs
        x = features[-1] if self.extra_from == "c5" else outputs[-1]
        for i, conv in enumerate(self.extra_convs):
            # P7 = conv(ReLU(P6)); with post_activation P6 is already activated.
            if i > 0 and not self.post_activation:
                x = self._act(x)
            x = conv(x, training=training)
            outputs.append(x)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            num_channels=self.num_channels,
            min_level=self.min_level,
            max_level=self.max_level,
            batch_norm=self.batch_norm,
            post_activation=self.post_activation,
            extra_from=self.extra_from,
            activation=self.activation,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        return config


# ----------------------------------------------------------------------------- PANet
@keras.saving.register_keras_serializable(package="dlnotes")
class PANet(keras.layers.Layer):
    """Path Aggregation Network (Liu et al. 2018): an FPN plus a bottom-up augmentation path.

    The top-down part is :class:`FPN` (same arguments, P_min..P_max); then, from the finest level
    up (each conv followed by ``activation``, as in the paper, and by BN if ``batch_norm``)::

        N_min = P_min
        N_{l+1} = conv3x3(conv3x3_s2(N_l) + P_{l+1})

    so the localisation signal of the fine levels reaches the coarse ones in a few layers instead
    of through the whole backbone. The stride-2 result is cropped (or edge-padded) to
    ``P_{l+1}``'s size, so backbones that round sizes down work too.

    Args:
        num_channels, min_level, max_level, batch_norm, post_activation, extra_from, activation,
        norm_momentum, norm_epsilon: as in :class:`FPN` (``batch_norm`` also applies to the
        bottom-up convs).

    Input / output: as :class:`FPN`, the outputs are ``[N_min, ..., N_max]``, each
    ``(B, H_l, W_l, num_channels)``.
    """

    def __init__(
        self,
        num_channels=256,
        min_level=3,
        max_level=7,
        batch_norm=False,
        post_activation=False,
        extra_from="c5",
        activation="relu",
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.fpn = FPN(
            num_channels=num_channels,
            min_level=min_level,
            max_level=max_level,
            batch_norm=batch_norm,
            post_activation=post_activation,
            extra_from=extra_from,
            activation=activation,
            norm_momentum=norm_momentum,
            norm_epsilon=norm_epsilon,
            dtype=self.dtype_policy,
            name="fpn",
        )
        levels = range(self.fpn.min_level + 1, self.fpn.max_level + 1)

        def conv(name, strides):
            return NeckConv(
                self.fpn.num_channels,
                3,
                strides=strides,
                batch_norm=self.fpn.batch_norm,
                activation=activation,
                norm_momentum=self.fpn.norm_momentum,
                norm_epsilon=self.fpn.norm_epsilon,
                dtype=self.dtype_policy,
                name=name,
            )

        self.down_convs = [conv(f"down_n{level - 1}", 2) for level in levels]
        self.fuse_convs = [conv(f"fuse_n{level}", 1) for level in levels]

    @property
    def levels(self):
        """Pyramid level numbers of the outputs, lowest first (stride ``2**level``)."""
        return self.fpn.levels

    def build(self, input_shape):
        self.fpn.build(input_shape)
        channels = _none_shape(self.fpn.num_channels)
        for conv in self.down_convs + self.fuse_convs:
            conv.build(channels)

    def call(self, inputs, training=None):
        pyramid = self.fpn(inputs, training=training)
        outputs = [pyramid[0]]
        for down, fuse, p in zip(self.down_convs, self.fuse_convs, pyramid[1:], strict=True):
            x = match_spatial_size(down(outputs[-1], training=training), p)
            outputs.append(fuse(x + p, training=training))
        return outputs

    def get_config(self):
        config = super().get_config()
        fpn = self.fpn.get_config()
        for key in (
            "num_channels",
            "min_level",
            "max_level",
            "batch_norm",
            "post_activation",
            "extra_from",
            "activation",
            "norm_momentum",
            "norm_epsilon",
        ):
            config[key] = fpn[key]
        return config


# ----------------------------------------------------------------------------- YOLOv3
@keras.saving.register_keras_serializable(package="dlnotes")
class YoloFPN(keras.layers.Layer):
    """YOLOv3's concatenation FPN (Redmon & Farhadi 2018; keras-yolo3, darknet ``yolov3.cfg``).

    With ``filters = (f_0, f_1, f_2)`` for the levels from the top (stride 32) down, and every
    conv a conv-BN-leaky(0.1) without bias::

        level 0:  x_0 = block_{f_0}(C5)
        level k:  x_k = block_{f_k}(concat([up2(conv1x1_{f_{k-1}/2}(x_{k-1})), C_{5-k}]))
        block_f = 1x1 f -> 3x3 2f -> 1x1 f -> 3x3 2f -> 1x1 f       (the 5-conv "1-3-1-3-1")

    ``up2`` is nearest 2x upsampling (:func:`nearest_upsample_like`). The concatenation puts the
    upsampled branch first, as darknet's ``[route] layers = -1, 61`` and keras-yolo3 do; the
    order matters when converting darknet weights. The YOLO heads (3x3 conv-BN-leaky to 2f, then
    a 1x1 conv with bias to ``3 * (5 + num_classes)``) belong to the model, not to the neck.

    **Output order:** like every neck of :mod:`dlnotes.necks`, the outputs are returned lowest
    stride first, ``[x_2, x_1, x_0]`` (stride 8, 16, 32), each ``(B, H_l, W_l, f_l)`` — the
    reverse of the notes' / darknet's order (stride 32, 16, 8; output 0 is the coarse level).

    In darknet cfg order the neck's convs are: block_0, [head 0], up conv 0, block_1, [head 1],
    up conv 1, block_2, [head 2].

    **Parameter count** for input channels ``c_k`` (``c_0`` = C5's) and ``in_k = c_k + f_{k-1}/2``
    (``in_0 = c_0``): each block has ``in_k f_k + 4 * 9 f_k^2 + 4 f_k^2 = in_k f_k + 40 f_k^2``
    conv weights and ``7 f_k`` BN channels (4 parameters each: gamma, beta, moving mean and
    variance; the last two not trainable); each up conv has ``f_k^2 / 2`` weights and ``f_k / 2``
    BN channels. For Darknet-53's C3-C5 (256 / 512 / 1024 channels) and the default filters this
    is 14,723,072 parameters (14,709,760 trainable); with the Darknet-53 body (40,620,640) and
    the three 80-class heads (6,658,045) it gives YOLOv3's 62,001,757 (61,949,149 trainable).

    Args:
        filters: ``f_k`` per level, from the top (stride 32) level down; one per input feature.
        negative_slope: leaky ReLU slope (0.1 in darknet).
        min_level: pyramid level of ``inputs[0]`` (3 for C3); only used for :attr:`levels`.
        norm_momentum: BN momentum.
        norm_epsilon: BN epsilon.

    Input: ``[C3, C4, C5]`` (lowest stride first, any channels, ``len(filters)`` maps).
    Output: ``[x_2, x_1, x_0]``, ``(B, H_l, W_l, f_l)``, lowest stride first.
    """

    def __init__(
        self,
        filters=(512, 256, 128),
        negative_slope=0.1,
        min_level=3,
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        if isinstance(filters, (int, np.integer)) or not len(filters):
            raise ValueError(f"{owner}: `filters` must be a non-empty sequence, got {filters!r}.")
        self.filters = tuple(positive_int(f, "filters", owner) for f in filters)
        if any(f % 2 for f in self.filters[:-1]):
            raise ValueError(
                f"{owner}: `filters` feeding an up branch (all but the last) must be even "
                f"(the up conv has f / 2 filters), got {self.filters}."
            )
        self.negative_slope = float(negative_slope)
        self.min_level = positive_int(min_level, "min_level", owner)
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)

        def conv(filters, kernel_size, name):
            return NeckConv(
                filters,
                kernel_size,
                batch_norm=True,
                activation="leaky_relu",
                negative_slope=self.negative_slope,
                norm_momentum=self.norm_momentum,
                norm_epsilon=self.norm_epsilon,
                dtype=self.dtype_policy,
                name=name,
            )

        # Level k counts from the top (stride 32) level, as in darknet.
        self.blocks = [
            [
                conv(f if i % 2 == 0 else 2 * f, 1 if i % 2 == 0 else 3, f"block{k}_conv{i}")
                for i in range(5)
            ]
            for k, f in enumerate(self.filters)
        ]
        self.up_convs = [conv(f // 2, 1, f"up{k}_conv") for k, f in enumerate(self.filters[:-1])]

    @property
    def levels(self):
        """Pyramid level numbers of the outputs, lowest first (stride ``2**level``)."""
        return list(range(self.min_level, self.min_level + len(self.filters)))

    def build(self, input_shape):
        shapes = _check_feature_shapes(input_shape, type(self).__name__, len(self.filters))
        top_first = shapes[::-1]
        for k, (block, f) in enumerate(zip(self.blocks, self.filters, strict=True)):
            in_channels = top_first[k][-1] + (self.filters[k - 1] // 2 if k else 0)
            for conv in block:
                conv.build(_none_shape(in_channels))
                in_channels = conv.filters
            if k < len(self.up_convs):
                self.up_convs[k].build(_none_shape(f))

    def call(self, inputs, training=None):
        features = _check_inputs(inputs, len(self.filters), type(self).__name__)[::-1]
        outputs = []
        x = features[0]
        for k, block in enumerate(self.blocks):
            if k:
                up = nearest_upsample_like(self.up_convs[k - 1](x, training=training), features[k])
                x = tf.concat([up, features[k]], axis=-1)
            for conv in block:
                x = conv(x, training=training)
            outputs.append(x)
        return outputs[::-1]

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=list(self.filters),
            negative_slope=self.negative_slope,
            min_level=self.min_level,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        return config
