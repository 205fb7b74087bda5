"""BiFPN, the weighted bidirectional feature pyramid of EfficientDet (Tan, Pang & Le 2020).

Same interface as the other necks (:mod:`dlnotes.necks`): called on backbone features
``[C3, C4, C5]`` (lowest stride first, any channels), it returns the levels ``[P3, ..., P7]``,
each ``(B, H_l, W_l, num_channels)``.

**Extra levels.** The levels above the backbone's are made from its last feature as in the
reference implementation (google/automl, ``resample_feature_map``)::

    P6 = maxpool3x3_s2(BN(conv1x1(C5)))        conv-BN only when C5 has != num_channels channels
    P7 = maxpool3x3_s2(P6)                     P6 already has num_channels channels

**One BiFPN layer** (for P3-P7; node ids as in automl, 0-4 the layer's inputs)::

    P7 (4) ---------------------------> P7'' (12) = f(P7, P6'')
    P6 (3) --> P6' (5) = f(P6, P7) ---> P6'' (11) = f(P6, P6', P5'')
    P5 (2) --> P5' (6) = f(P5, P6') --> P5'' (10) = f(P5, P5', P4'')
    P4 (1) --> P4' (7) = f(P4, P5') --> P4'' (9)  = f(P4, P4', P3'')
    P3 (0) ---------------------------> P3'' (8)  = f(P3, P4')

first the top-down nodes P6'..P4' and P3'' (each fusing the level's input with the coarser
node, upsampled), then the bottom-up nodes P4''..P7'' (the level's input, its top-down node and
the finer output, downsampled). The layer's outputs are ``[P3'', P4'', ..., P7'']``; the BiFPN
stacks ``repeats`` such layers (:func:`bifpn_graph` gives the nodes for any levels).

**Each edge** is resampled to its node: a 1x1 conv-BN (with bias, as automl) when its channels
differ from ``num_channels`` -- only the backbone features C3-C5, i.e. five edges of the first
layer (P5', P4', P3'', P4'', P5''; each has its own conv) -- then 3x3 stride-2 max pooling
("same" padding) from the finer level or nearest 2x upsampling from the coarser one
(:func:`~dlnotes.necks.fpn.nearest_upsample_like`); both are cropped (or edge-padded) to the
node level's size, so odd sizes and backbones that round sizes down work.

**Each node** (:class:`BiFPNNode`) fuses its inputs with one scalar weight per edge and applies
``activation -> depthwise-separable 3x3 conv (with bias) -> BN`` (automl's order: the activation
comes before the conv, the node's output is the linear BN output). Fusion modes
(:data:`FUSION_MODES`; automl's names are accepted too):

* ``"fast_normalized"`` (automl ``"fastattn"``): ``sum_i w_i x_i / (eps + sum_j w_j)`` with
  ``w_i = relu(weight_i)``, ``eps = 1e-4``;
* ``"softmax"`` (automl ``"attn"``): ``sum_i softmax(weights)_i x_i``;
* ``"sum"``: ``sum_i x_i``, no weights (automl's choice for D6 / D7, "for stability").

The weights start at 1 (an average of the inputs).

**EfficientDet-Dx constants**: :data:`EFFICIENTDET_SCALING`, and :meth:`BiFPN.efficientdet`.

Differences from automl: sizes that are not a power of two. automl upsamples with
``tf.image.resize(..., "nearest")`` to the target size (e.g. 7 -> 13 maps output row 7 to input
row 4), here each pixel is repeated 2x2 and the result cropped (row 7 -> row 3), as in the other
necks; automl's pooling stride follows the size ratio, here it is always 2 and the result is
cropped. For inputs whose sizes are divisible by ``2**max_level`` (512, 640, ..., 1536) both
give the same numbers.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dlnotes.checks import positive_int
from dlnotes.necks.fpn import (
    _activation,
    _check_feature_shapes,
    _check_inputs,
    _check_levels,
    _none_shape,
    match_spatial_size,
    nearest_upsample_like,
)

__all__ = [
    "EFFICIENTDET_SCALING",
    "FUSION_MODES",
    "BiFPN",
    "BiFPNNode",
    "ChannelProjection",
    "bifpn_graph",
]

#: Fusion modes of :class:`BiFPNNode`.
FUSION_MODES = ("fast_normalized", "softmax", "sum")
_FUSION_ALIASES = {"fastattn": "fast_normalized", "attn": "softmax"}
_FAST_EPSILON = 1e-4

#: EfficientDet-D0..D7 (Tan et al. 2020, table 1; google/automl ``hparams_config``): input
#: size, backbone, BiFPN width ``W_bifpn`` (``num_channels``) and depth ``D_bifpn`` (repeated
#: layers), depth of the class / box heads ``D_class`` (their convs before the prediction
#: conv, with width ``W_bifpn``), automl's fusion mode and anchor scale. D7 has D6's network
#: on larger images.
EFFICIENTDET_SCALING = {
    name: {
        "image_size": size,
        "backbone": f"efficientnet-b{b}",
        "bifpn_width": width,
        "bifpn_depth": depth,
        "head_depth": head,
        "fusion": "sum" if name in ("d6", "d7") else "fast_normalized",
        "anchor_scale": 5.0 if name == "d7" else 4.0,
    }
    for name, size, b, width, depth, head in (
        ("d0", 512, 0, 64, 3, 3),
        ("d1", 640, 1, 88, 4, 3),
        ("d2", 768, 2, 112, 5, 3),
        ("d3", 896, 3, 160, 6, 4),
        ("d4", 1024, 4, 224, 7, 4),
        ("d5", 1280, 5, 288, 7, 4),
        ("d6", 1280, 6, 384, 8, 5),
        ("d7", 1536, 6, 384, 8, 5),
    )
}


def _fusion_mode(fusion, owner):
    """The canonical name of a fusion mode (automl's names accepted), else ``ValueError``."""
    if isinstance(fusion, str):
        mode = _FUSION_ALIASES.get(fusion, fusion)
        if mode in FUSION_MODES:
            return mode
    raise ValueError(
        f"{owner}: unknown `fusion` {fusion!r}; expected one of {list(FUSION_MODES)} (or "
        f"automl's names {sorted(_FUSION_ALIASES)})."
    )


def bifpn_graph(min_level=3, max_level=7):
    """The nodes of one BiFPN layer for levels ``min_level..max_level``, in computation order.

    Ids ``0 .. L - 1`` (``L = max_level - min_level + 1``) are the layer's inputs (level
    ``min_level + id``), id ``L + k`` is node ``k``. Each node is ``(level, source_ids)``: the
    top-down nodes from ``max_level - 1`` down to ``min_level`` fuse the level's input with the
    coarser node, the bottom-up nodes from ``min_level + 1`` up to ``max_level`` fuse every
    earlier node of their level with the finer node. For P3-P7::

        [(6, (3, 4)), (5, (2, 5)), (4, (1, 6)), (3, (0, 7)),
         (4, (1, 7, 8)), (5, (2, 6, 9)), (6, (3, 5, 10)), (7, (4, 11))]

    The layer's output at each level is the last node of that level (P3: the top-down node).
    """
    level_ids = {level: [i] for i, level in enumerate(range(min_level, max_level + 1))}
    nodes = []

    def add(level, sources):
        level_ids[level].append(len(level_ids) + len(nodes))
        nodes.append((level, tuple(sources)))

    for level in range(max_level - 1, min_level - 1, -1):  # top-down
        add(level, [level_ids[level][-1], level_ids[level + 1][-1]])
    for level in range(min_level + 1, max_level + 1):  # bottom-up
        add(level, [*level_ids[level], level_ids[level - 1][-1]])
    return nodes


def _node_activation(activation, owner):
    """The activation function for a Keras activation name (``None``: linear)."""
    try:
        return _activation(activation, 0.0)
    except ValueError:
        raise ValueError(
            f"{owner}: unknown activation {activation!r}; expected a Keras activation name "
            "such as 'swish' or 'relu'."
        ) from None


def _max_pool(x):
    """3x3 stride-2 max pooling, "same" padding: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C)``."""
    return tf.nn.max_pool2d(x, ksize=3, strides=2, padding="SAME")


# ----------------------------------------------------------------------------- building blocks
@keras.saving.register_keras_serializable(package="dlnotes")
class ChannelProjection(keras.layers.Layer):
    """1x1 conv (with bias) -> BatchNorm: the BiFPN's channel resampling (automl's 1x1 of
    ``resample_feature_map``, which keeps the conv's bias in front of the BN).

    Input ``(B, H, W, C_in)`` -> output ``(B, H, W, filters)``; parameters ``(C_in + 1) * filters``
    conv weights and ``4 * filters`` BN (gamma, beta trainable; moving mean, variance not).
    """

    def __init__(self, filters, norm_momentum=0.99, norm_epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.filters = positive_int(filters, "filters", type(self).__name__)
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self.conv = keras.layers.Conv2D(
            self.filters, 1, padding="same", dtype=self.dtype_policy, name="conv"
        )
        self.norm = keras.layers.BatchNormalization(
            momentum=self.norm_momentum,
            epsilon=self.norm_epsilon,
            dtype=self.dtype_policy,
            name="bn",
        )

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.norm.build(self.conv.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        return self.norm(self.conv(inputs), training=training)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="dlnotes")
class BiFPNNode(keras.layers.Layer):
    """One BiFPN node: weighted fusion of its (already resampled) inputs, then
    ``activation -> separable conv 3x3 (depthwise + pointwise, with bias) -> BN``.

    Args:
        num_inputs: number of input edges (one scalar weight each, initialised to 1).
        num_channels: channels of the inputs and of the output.
        fusion: one of :data:`FUSION_MODES` (automl's ``"fastattn"`` / ``"attn"`` accepted).
        activation: a Keras activation name, applied to the fused map before the conv.
        norm_momentum, norm_epsilon: BN moving-average momentum and epsilon.

    Input: a list of ``num_inputs`` maps ``(B, H, W, num_channels)`` (same size).
    Output: ``(B, H, W, num_channels)``, the linear BN output.
    """

    def __init__(
        self,
        num_inputs,
        num_channels,
        fusion="fast_normalized",
        activation="swish",
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.num_inputs = positive_int(num_inputs, "num_inputs", owner)
        self.num_channels = positive_int(num_channels, "num_channels", owner)
        self.fusion = _fusion_mode(fusion, owner)
        self.activation = activation
        self._act = _node_activation(activation, owner)
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self.conv = keras.layers.SeparableConv2D(
            self.num_channels,
            3,
            padding="same",
            depth_multiplier=1,
            use_bias=True,
            dtype=self.dtype_policy,
            name="conv",
        )
        self.norm = keras.layers.BatchNormalization(
            momentum=self.norm_momentum,
            epsilon=self.norm_epsilon,
            dtype=self.dtype_policy,
            name="bn",
        )
        self.edge_weights = []

    def build(self, input_shape):
        owner = type(self).__name__
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != self.num_inputs:
            raise ValueError(
                f"{owner}: expects a list of {self.num_inputs} maps, got {input_shape}."
            )
        for shape in input_shape:
            if len(shape) != 4 or shape[-1] != self.num_channels:
                raise ValueError(
                    f"{owner}: every input must be (B, H, W, {self.num_channels}), got "
                    f"{[tuple(s) for s in input_shape]}."
                )
        if self.fusion != "sum":
            self.edge_weights = [
                self.add_weight(shape=(), initializer="ones", name=f"edge_weight_{i}")
                for i in range(self.num_inputs)
            ]
        channels = _none_shape(self.num_channels)
        self.conv.build(channels)
        self.norm.build(channels)

    def normalized_weights(self):
        """The fusion weight of each input edge, ``(num_inputs,)`` (ones for ``"sum"``)."""
        if self.fusion == "sum":
            return tf.ones((self.num_inputs,), self.compute_dtype)
        weights = tf.stack([tf.cast(w, self.compute_dtype) for w in self.edge_weights])
        if self.fusion == "softmax":
            return tf.nn.softmax(weights)
        weights = tf.nn.relu(weights)
        return weights / (tf.reduce_sum(weights) + _FAST_EPSILON)

    def fuse(self, inputs):
        """The weighted fusion alone: list of ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        if self.fusion == "sum":
            return tf.add_n(inputs)
        weights = tf.cast(self.normalized_weights(), inputs[0].dtype)
        if self.fusion == "softmax":
            return tf.reduce_sum(tf.stack(inputs, axis=-1) * weights, axis=-1)
        return tf.add_n([weights[i] * x for i, x in enumerate(inputs)])

    def call(self, inputs, training=None):
        inputs = _check_inputs(inputs, self.num_inputs, type(self).__name__)
        x = self.fuse(inputs)
        if self._act is not None:
            x = self._act(x)
        return self.norm(self.conv(x), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_inputs=self.num_inputs,
            num_channels=self.num_channels,
            fusion=self.fusion,
            activation=self.activation,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        return config


# ----------------------------------------------------------------------------- BiFPN
@keras.saving.register_keras_serializable(package="dlnotes")
class BiFPN(keras.layers.Layer):
    """EfficientDet's BiFPN: extra levels, then ``repeats`` BiFPN layers (see the module
    docstring for the graph, the resampling and the nodes).

    Args:
        num_channels: ``W_bifpn``, channels of every node and output (64 for D0).
        repeats: ``D_bifpn``, number of stacked BiFPN layers (3 for D0).
        min_level: pyramid level of ``inputs[0]`` (3 for C3).
        max_level: highest output level (7); levels above the backbone's are made by max
            pooling. Needs ``max_level > min_level``.
        fusion: one of :data:`FUSION_MODES` (automl's ``"fastattn"`` / ``"attn"`` accepted).
        activation: Keras activation name applied before each node's conv (``"swish"``).
        norm_momentum, norm_epsilon: BN momentum / epsilon (automl: 0.99 / 1e-3).

    **Parameter count** (trainable) with ``W = num_channels``, ``D = repeats``, ``n`` nodes per
    layer with ``e`` input edges in all (8 and 19 for P3-P7): each node has ``9W + W^2 + W``
    separable conv weights and ``2W`` BN gamma / beta, each fusion weight is one parameter
    (none for ``"sum"``), each 1x1 conv-BN from ``c`` channels has ``(c + 1)W + 2W``; so
    ``D (n (W^2 + 12W) + e) + sum over projections (c + 3)W``. Every BN also has ``2W`` moving
    statistics (not trainable). For EfficientNet-B0's C3-C5 (40 / 112 / 320 channels), W = 64,
    D = 3 (EfficientDet-D0)::

        P6 conv-BN from C5                                  (320 + 3) * 64        =  20,672
        first layer: 2 edges from C5, 2 from C4, 1 from C3  (646 + 230 + 43) * 64 =  58,816
        nodes and fusion weights: 3 * (8 * (64^2 + 12 * 64) + 19)                 = 116,793
                                                                 trainable        = 196,281

    plus 30 BNs' 3,840 moving statistics. Without the P6 conv-BN (20,800 parameters with its
    statistics), the three layers hold 179,321 parameters, statistics included.

    Input: ``[C_min, ..., C_top]`` (lowest stride first, any channels), each ``(B, H_l, W_l, C_l)``.
    Output: ``[P_min, ..., P_max]``, each ``(B, H_l, W_l, num_channels)``; the extra levels have
    ``ceil`` halved sizes.
    """

    def __init__(
        self,
        num_channels=64,
        repeats=3,
        min_level=3,
        max_level=7,
        fusion="fast_normalized",
        activation="swish",
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.num_channels = positive_int(num_channels, "num_channels", owner)
        self.repeats = positive_int(repeats, "repeats", owner)
        self.min_level, self.max_level = _check_levels(min_level, max_level, owner)
        if self.max_level == self.min_level:
            raise ValueError(
                f"{owner}: needs at least two levels, got min_level = max_level = {self.min_level}."
            )
        self.fusion = _fusion_mode(fusion, owner)
        self.activation = activation
        _node_activation(activation, owner)  # an unknown name fails here, not at build time
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self.graph = bifpn_graph(self.min_level, self.max_level)
        # Each level's output is the last node of that level.
        source_levels = [self._source_level(i) for i in range(len(self.levels) + len(self.graph))]
        self._output_ids = [
            max(i for i, lv in enumerate(source_levels) if lv == level) for level in self.levels
        ]
        # Sub-layers depend on the input channels: created in build.
        self.extra_projection = None
        self.projections = []
        self.fusion_nodes = []

    @classmethod
    def efficientdet(cls, variant, **kwargs):
        """The BiFPN of EfficientDet-``variant`` (``"d0"`` .. ``"d7"``, see
        :data:`EFFICIENTDET_SCALING`): its width, depth and fusion; ``kwargs`` override."""
        key = str(variant).lower().removeprefix("efficientdet-")
        if key not in EFFICIENTDET_SCALING:
            raise ValueError(
                f"BiFPN.efficientdet: unknown variant {variant!r}; expected one of "
                f"{sorted(EFFICIENTDET_SCALING)}."
            )
        scaling = EFFICIENTDET_SCALING[key]
        args = {
            "num_channels": scaling["bifpn_width"],
            "repeats": scaling["bifpn_depth"],
            "fusion": scaling["fusion"],
        }
        return cls(**{**args, **kwargs})

    @property
    def levels(self):
        """Pyramid level numbers of the outputs, lowest first (stride ``2**level``)."""
        return list(range(self.min_level, self.max_level + 1))

    def _source_level(self, source):
        num_levels = len(self.levels)
        return (
            self.min_level + source if source < num_levels else self.graph[source - num_levels][0]
        )

    def _projection(self, name, in_channels):
        projection = ChannelProjection(
            self.num_channels,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
            dtype=self.dtype_policy,
            name=name,
        )
        projection.build(_none_shape(in_channels))
        return projection

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
        width = self.num_channels
        if top_level < self.max_level and shapes[-1][-1] != width:
            self.extra_projection = self._projection(f"extra_p{top_level + 1}_proj", shapes[-1][-1])
        channels = [s[-1] for s in shapes] + [width] * (self.max_level - top_level)
        projections, nodes = [], []
        for r in range(self.repeats):
            # Node k of the layer has id len(channels) + k.
            node_channels = list(channels)
            for k, (level, sources) in enumerate(self.graph):
                # The top-down nodes come first; the lowest one is that level's output.
                kind = "td" if k < len(self.levels) - 2 else "out"
                name = f"layer{r}_p{level}_{kind}"
                for j, source in enumerate(sources):
                    if node_channels[source] != width:
                        projections.append(
                            self._projection(f"{name}_in{j}_proj", node_channels[source])
                        )
                node = BiFPNNode(
                    len(sources),
                    width,
                    fusion=self.fusion,
                    activation=self.activation,
                    norm_momentum=self.norm_momentum,
                    norm_epsilon=self.norm_epsilon,
                    dtype=self.dtype_policy,
                    name=name,
                )
                node.build([_none_shape(width)] * len(sources))
                nodes.append(node)
                node_channels.append(width)
            channels = [width] * len(channels)
        self.projections = projections
        self.fusion_nodes = nodes

    def _resample(self, x, source_level, level, like):
        """``x`` from ``source_level`` to the size of ``like`` (``level``): max pool / nearest."""
        if source_level == level - 1:
            return match_spatial_size(_max_pool(x), like)
        if source_level == level + 1:
            return nearest_upsample_like(x, like)
        return x  # same level, same size

    def input_levels(self, inputs, training=None):
        """The first BiFPN layer's inputs: the backbone features and the extra levels.

        ``[C3, C4, C5]`` -> ``[C3, C4, C5, P6, P7]`` with ``P6 = maxpool(conv-BN(C5))`` (the
        1x1 conv-BN only when C5 has != ``num_channels`` channels) and ``P7 = maxpool(P6)``;
        the extra levels are ``(B, ceil(H / 2), ceil(W / 2), num_channels)`` of the level below.
        """
        if not self.built:
            if isinstance(inputs, (list, tuple)):
                self.build([tuple(f.shape) for f in inputs])
            else:
                self.build(tuple(getattr(inputs, "shape", ())))  # raises: not a list
        features = _check_inputs(inputs, self._num_inputs, type(self).__name__)
        # Tensors: a NumPy float64 map given to tf.nn.max_pool2d may come back as float32.
        features = [tf.convert_to_tensor(f) for f in features]
        x = features[-1]
        for _ in range(len(self.levels) - len(features)):
            if x.shape[-1] != self.num_channels:
                x = self.extra_projection(x, training=training)
            x = _max_pool(x)
            features.append(x)
        return features

    def call(self, inputs, training=None):
        features = self.input_levels(inputs, training=training)
        # Projections are made (in build) and used (here) in the same order: for every edge
        # whose source has != num_channels channels.
        projections = iter(self.projections)
        nodes = iter(self.fusion_nodes)
        for _ in range(self.repeats):
            outputs = list(features)
            for level, sources in self.graph:
                like = features[level - self.min_level]
                edges = []
                for source in sources:
                    y = outputs[source]
                    if y.shape[-1] != self.num_channels:
                        y = next(projections)(y, training=training)
                    edges.append(self._resample(y, self._source_level(source), level, like))
                outputs.append(next(nodes)(edges, training=training))
            features = [outputs[i] for i in self._output_ids]
        return features

    def get_config(self):
        config = super().get_config()
        config.update(
            num_channels=self.num_channels,
            repeats=self.repeats,
            min_level=self.min_level,
            max_level=self.max_level,
            fusion=self.fusion,
            activation=self.activation,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        return config
