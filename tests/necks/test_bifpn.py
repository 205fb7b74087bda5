"""Tests of dlnotes.necks.bifpn: the node graph, shapes on odd sizes, the EfficientDet-D0
parameter count, float64 NumPy references (one fusion node per mode, the extra levels, the whole
BiFPN), XLA, serialisation and argument errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import randomize

from dlnotes.necks import (
    EFFICIENTDET_SCALING,
    FUSION_MODES,
    NECKS,
    BiFPN,
    BiFPNNode,
    bifpn_graph,
    build_neck,
)

# C3..C5 of a 100x132 image with "same" padding, and of a 200x200 one with floor rounding.
ODD_SIZES = [(13, 17), (7, 9), (4, 5)]
FLOOR_SIZES = [(25, 25), (12, 12), (6, 6)]
CHANNELS = (8, 12, 16)
B0_CHANNELS = (40, 112, 320)  # EfficientNet-B0's C3, C4, C5

# automl's node table for P3-P7 (efficientdet_arch.bifpn_dynamic_config): ids 0-4 are the
# layer's inputs P3..P7, node k gets id 5 + k.
AUTOML_P3_P7 = [
    (6, (3, 4)),  # P6'
    (5, (2, 5)),  # P5'
    (4, (1, 6)),  # P4'
    (3, (0, 7)),  # P3''
    (4, (1, 7, 8)),  # P4''
    (5, (2, 6, 9)),  # P5''
    (6, (3, 5, 10)),  # P6''
    (7, (4, 11)),  # P7''
]
NODE_NAMES = ["p6_td", "p5_td", "p4_td", "p3_out", "p4_out", "p5_out", "p6_out", "p7_out"]


def features(sizes=ODD_SIZES, channels=CHANNELS, batch=2, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(batch, h, w, c)).astype(dtype)
        for (h, w), c in zip(sizes, channels, strict=True)
    ]


def randomize_edges(layer, seed, low=-0.5, high=2.0):
    """Random fusion weights (``randomize`` leaves scalars alone); some are negative."""
    rng = np.random.default_rng(seed)
    nodes = layer.fusion_nodes if isinstance(layer, BiFPN) else [layer]
    for node in nodes:
        for w in node.edge_weights:
            w.assign(rng.uniform(low, high))


def n_weights(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


# ----------------------------------------------------------------------------- NumPy references
def np_pad_same(x, k, stride, value):
    """TF's "same" padding (extra pad at the bottom / right); returns the padded map and the
    output size."""
    _, height, width, _ = x.shape
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + k - height, 0)
    pad_w = max((out_w - 1) * stride + k - width, 0)
    pads = ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    return np.pad(x, pads, constant_values=value), (out_h, out_w)


def np_windows(x, k, stride, value):
    """The k*k shifted views of a "same"-padded ``x``, each ``(B, out_h, out_w, C)``."""
    xp, (out_h, out_w) = np_pad_same(x, k, stride, value)
    return {
        (dy, dx): xp[
            :,
            dy : dy + (out_h - 1) * stride + 1 : stride,
            dx : dx + (out_w - 1) * stride + 1 : stride,
        ]
        for dy in range(k)
        for dx in range(k)
    }


def np_max_pool(x):
    """3x3 stride-2 max pooling, "same" padding (the padding never wins)."""
    return np.max(np.stack(list(np_windows(x, 3, 2, -np.inf).values())), axis=0)


def np_up(x, like):
    """Nearest 2x: output pixel (i, j) = input pixel (min(i // 2, h - 1), min(j // 2, w - 1))."""
    (h, w), (big_h, big_w) = x.shape[1:3], like.shape[1:3]
    rows, cols = np.minimum(np.arange(big_h) // 2, h - 1), np.minimum(np.arange(big_w) // 2, w - 1)
    return x[:, rows][:, :, cols]


def np_fit(x, like):
    """Crop to ``like``'s size, or repeat the last row / column."""
    (h, w), (big_h, big_w) = x.shape[1:3], like.shape[1:3]
    rows, cols = np.minimum(np.arange(big_h), h - 1), np.minimum(np.arange(big_w), w - 1)
    return x[:, rows][:, :, cols]


def np_bn(bn, y):
    """Inference-mode BatchNormalization with the moving statistics."""
    mean, var = np.asarray(bn.moving_mean, np.float64), np.asarray(bn.moving_variance, np.float64)
    gamma, beta = np.asarray(bn.gamma, np.float64), np.asarray(bn.beta, np.float64)
    return (y - mean) / np.sqrt(var + bn.epsilon) * gamma + beta


def np_projection(projection, x):
    """ChannelProjection: 1x1 conv with bias, then BN."""
    conv = projection.conv
    kernel, bias = np.asarray(conv.kernel, np.float64), np.asarray(conv.bias, np.float64)
    return np_bn(projection.norm, x @ kernel[0, 0] + bias)


def np_fusion_weights(node):
    w = np.array([float(v.numpy()) for v in node.edge_weights])
    if node.fusion == "fast_normalized":
        r = np.maximum(w, 0.0)
        return r / (r.sum() + 1e-4)
    if node.fusion == "softmax":
        e = np.exp(w - w.max())
        return e / e.sum()
    assert node.fusion == "sum" and w.size == 0
    return np.ones(node.num_inputs)


def np_node(node, inputs):
    """BiFPNNode: weighted sum -> swish -> depthwise 3x3 -> pointwise 1x1 + bias -> BN."""
    weights = np_fusion_weights(node)
    fused = sum(w * x for w, x in zip(weights, inputs, strict=True))
    assert node.activation == "swish"
    x = fused / (1.0 + np.exp(-fused))
    depthwise = np.asarray(node.conv.depthwise_kernel, np.float64)
    pointwise = np.asarray(node.conv.pointwise_kernel, np.float64)
    bias = np.asarray(node.conv.bias, np.float64)
    y = sum(v * depthwise[dy, dx, :, 0] for (dy, dx), v in np_windows(x, 3, 1, 0.0).items())
    return np_bn(node.norm, y @ pointwise[0, 0] + bias)


def np_input_levels(neck, feats):
    """C3, C4, C5, then P6 = maxpool(1x1 conv-BN(C5)), P7 = maxpool(P6)."""
    p6 = feats[-1]
    if p6.shape[-1] != neck.num_channels:
        p6 = np_projection(neck.extra_projection, p6)
    p6 = np_max_pool(p6)
    return [*feats, p6, np_max_pool(p6)]


def np_bifpn(neck, feats):
    """The whole BiFPN for P3-P7, wired from automl's node table (not from the layer's)."""
    width = neck.num_channels
    projections, nodes = iter(neck.projections), iter(neck.fusion_nodes)
    levels = np_input_levels(neck, feats)
    node_level = [3, 4, 5, 6, 7] + [level for level, _ in AUTOML_P3_P7]
    for _ in range(neck.repeats):
        out = list(levels)
        for level, sources in AUTOML_P3_P7:
            like = levels[level - 3]
            edges = []
            for s in sources:
                y = out[s]
                if y.shape[-1] != width:
                    y = np_projection(next(projections), y)
                if node_level[s] < level:
                    y = np_fit(np_max_pool(y), like)
                elif node_level[s] > level:
                    y = np_up(y, like)
                edges.append(y)
            out.append(np_node(next(nodes), edges))
        levels = [out[i] for i in (8, 9, 10, 11, 12)]  # P3'' .. P7''
    assert next(projections, None) is None and next(nodes, None) is None
    return levels


# ----------------------------------------------------------------------------- graph and shapes
def test_graph_is_automl_bifpn():
    assert bifpn_graph(3, 7) == AUTOML_P3_P7
    # Two levels: P3' = f(P3, P4), P4'' = f(P4, P3').
    assert bifpn_graph(3, 4) == [(3, (0, 1)), (4, (1, 2))]
    neck = BiFPN(8, repeats=2)
    neck.build([(None, None, None, c) for c in CHANNELS])
    assert neck.graph == AUTOML_P3_P7
    names = [f"layer{r}_{n}" for r in range(2) for n in NODE_NAMES]
    assert [node.name for node in neck.fusion_nodes] == names
    assert [node.num_inputs for node in neck.fusion_nodes] == [2, 2, 2, 2, 3, 3, 3, 2] * 2


@pytest.mark.parametrize("sizes", [ODD_SIZES, FLOOR_SIZES], ids=["ceil", "floor"])
def test_levels_and_shapes(sizes):
    neck = build_neck("bifpn", num_channels=8, repeats=2)
    assert isinstance(neck, BiFPN) and NECKS["bifpn"] is BiFPN
    outputs = neck(features(sizes))
    assert neck.levels == [3, 4, 5, 6, 7]
    h6, w6 = -(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)
    extra = [(h6, w6), (-(-h6 // 2), -(-w6 // 2))]
    assert [tuple(o.shape) for o in outputs] == [(2, h, w, 8) for h, w in [*sizes, *extra]]
    # Fewer levels: P3-P5 only (no extra levels), or P3-P6.
    p5 = BiFPN(8, repeats=1, max_level=5)
    assert [tuple(o.shape[1:3]) for o in p5(features(sizes))] == list(sizes)
    assert p5.extra_projection is None and len(p5.fusion_nodes) == 4
    p6 = BiFPN(8, repeats=1, max_level=6)
    assert [tuple(o.shape[1:3]) for o in p6(features(sizes))] == [*sizes, extra[0]]


def test_dynamic_spatial_sizes_match_static():
    inputs = [keras.Input((None, None, c)) for c in CHANNELS]
    neck = BiFPN(8, repeats=2)
    model = keras.Model(inputs, neck(inputs))
    randomize(model, 2, spread=0.3)
    for sizes in (ODD_SIZES, FLOOR_SIZES):
        feats = features(sizes, seed=4)
        for a, b in zip(model(feats, training=False), neck(feats, training=False), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- parameter counts
def test_d0_parameter_count():
    neck = BiFPN.efficientdet("d0")
    assert (neck.num_channels, neck.repeats, neck.fusion) == (64, 3, "fast_normalized")
    neck.build([(None, None, None, c) for c in B0_CHANNELS])
    w = 64
    node = (9 * w + w * w + w) + 2 * w  # separable conv with bias + BN gamma / beta
    edges = 2 + 2 + 2 + 2 + 3 + 3 + 3 + 2  # one fusion weight per input edge

    def projection(c):
        return (c + 1) * w + 2 * w  # 1x1 conv with bias + BN gamma / beta

    c3, c4, c5 = B0_CHANNELS
    extra = projection(c5)  # P6 from C5; P7 = maxpool(P6), no conv
    # Layer 0: C5 feeds P5' and P5'', C4 feeds P4' and P4'', C3 feeds P3''; later layers only
    # see 64-channel maps.
    first_layer = 2 * projection(c5) + 2 * projection(c4) + projection(c3)
    cells = 3 * (8 * node + edges)
    assert (extra, first_layer, cells) == (20_672, 58_816, 116_793)
    trainable = extra + first_layer + cells
    assert trainable == 196_281
    assert n_weights(neck.trainable_weights) == trainable
    assert [p.name for p in neck.projections] == [
        "layer0_p5_td_in0_proj",
        "layer0_p4_td_in0_proj",
        "layer0_p3_out_in0_proj",
        "layer0_p4_out_in0_proj",
        "layer0_p5_out_in0_proj",
    ]
    # 30 BNs (P6, 5 projections, 24 nodes), each with 2 * 64 moving statistics.
    assert n_weights(neck.non_trainable_weights) == 30 * 2 * w == 3_840
    # All parameters of the three layers (with their input convs), without the P6 conv-BN:
    # the 179,321 of the D0 breakdown below.
    assert neck.extra_projection.count_params() == (c5 + 1) * w + 4 * w == 20_800
    assert neck.count_params() - neck.extra_projection.count_params() == 179_321

    # EfficientDet-D0 = EfficientNet-B0 up to block 7 (C5) + BiFPN + class / box heads.
    base = keras.applications.EfficientNetB0(include_top=False, weights=None)
    backbone = keras.Model(base.input, base.get_layer("block7a_project_bn").output)
    normalization = 3 + 3 + 1  # the input Normalization layer's mean, variance, count
    backbone_total = backbone.count_params() - normalization
    backbone_trainable = n_weights(backbone.trainable_weights)
    assert (backbone_total, backbone_trainable) == (3_634_844, 3_595_388)
    # Heads: 3 separable convs shared by the levels, with a BN per level, then the prediction
    # separable conv to 9 anchors x 90 classes (class net) or 9 x 4 (box net).
    shared, bns = 3 * (9 * w + w * w + w), 3 * 5 * 2 * w
    heads_trainable = sum(shared + bns + 9 * w + w * k + k for k in (810, 36))
    heads_total = heads_trainable + 2 * bns  # + the BNs' moving statistics
    assert (heads_trainable, heads_total) == (88_398, 92_238)
    # automl's 3.9M (trainable) and all parameters with BN statistics.
    assert backbone_trainable + trainable + heads_trainable == 3_880_067
    total = backbone_total + 20_800 + 179_321 + heads_total
    assert total == 3_880_067 + (3_634_844 - 3_595_388) + 3_840 + (92_238 - 88_398) == 3_927_203


def test_fusion_modes_parameters_and_projection_rule():
    shapes = [(None, None, None, c) for c in B0_CHANNELS]
    counts = {}
    for fusion in FUSION_MODES:
        neck = BiFPN(64, fusion=fusion)
        neck.build(shapes)
        counts[fusion] = n_weights(neck.trainable_weights)
    # "sum" has no fusion weights, the two weighted modes 19 per layer.
    assert counts == {"fast_normalized": 196_281, "softmax": 196_281, "sum": 196_281 - 3 * 19}

    # A 1x1 conv only where the channels differ: C3 and C5 already have 8 channels here.
    neck = BiFPN(8, repeats=2)
    feats = features(channels=(8, 12, 8))
    neck(feats)
    assert neck.extra_projection is None
    assert [p.name for p in neck.projections] == ["layer0_p4_td_in0_proj", "layer0_p4_out_in0_proj"]
    assert [p.conv.kernel.shape for p in neck.projections] == [(1, 1, 12, 8)] * 2
    wide = BiFPN(8, repeats=1)
    wide(features())
    assert wide.extra_projection.conv.kernel.shape == (1, 1, 16, 8)
    # C3 has 8 channels: 4 projections (2 from C4, 2 from C5).
    assert [p.name for p in wide.projections] == [
        "layer0_p5_td_in0_proj",
        "layer0_p4_td_in0_proj",
        "layer0_p4_out_in0_proj",
        "layer0_p5_out_in0_proj",
    ]


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_fusion_node_matches_numpy_reference(fusion):
    node = BiFPNNode(3, 6, fusion=fusion, dtype="float64")
    rng = np.random.default_rng(5)
    inputs = [rng.normal(size=(2, 5, 7, 6)) for _ in range(3)]
    node(inputs)
    randomize(node, 3, spread=0.3, kernel_gain=1.0)
    if fusion != "sum":
        for w, value in zip(node.edge_weights, (0.7, -0.3, 1.6), strict=True):
            w.assign(value)
    expected = {
        "fast_normalized": np.array([0.7, 0.0, 1.6]) / (2.3 + 1e-4),  # relu, then normalise
        "softmax": np.exp([0.7, -0.3, 1.6]) / np.exp([0.7, -0.3, 1.6]).sum(),
        "sum": np.ones(3),
    }[fusion]
    np.testing.assert_allclose(node.normalized_weights(), expected, rtol=1e-12)
    np.testing.assert_allclose(np_fusion_weights(node), expected, rtol=1e-12)
    np.testing.assert_allclose(
        node.fuse([tf.constant(x) for x in inputs]),
        sum(w * x for w, x in zip(expected, inputs, strict=True)),
        rtol=1e-12,
        atol=1e-12,
    )
    got = node(inputs, training=False)
    assert got.dtype == tf.float64 and got.shape == (2, 5, 7, 6)
    assert node.conv.use_bias and node.conv.depthwise_kernel.shape == (3, 3, 6, 1)
    assert len(node.edge_weights) == (0 if fusion == "sum" else 3)
    np.testing.assert_allclose(got, np_node(node, inputs), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("channels", [CHANNELS, (8, 12, 8)], ids=["c5_16", "c5_8"])
def test_extra_levels_match_numpy_reference(channels):
    neck = BiFPN(8, repeats=1, dtype="float64")
    feats = features(channels=channels, dtype=np.float64)
    neck(feats)
    randomize(neck, 1, spread=0.3, kernel_gain=1.0)
    got = neck.input_levels(feats, training=False)
    assert [tuple(g.shape[1:]) for g in got[3:]] == [(2, 3, 8), (1, 2, 8)]
    want = np_input_levels(neck, feats)
    for level, (g, w) in enumerate(zip(got, want, strict=True), start=3):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9, err_msg=f"P{level}")
    # P7 is max pooled P6 (no conv), and P6 of an 8-channel C5 is max pooled C5.
    np.testing.assert_array_equal(got[4], np_max_pool(got[3].numpy()))
    if channels[-1] == 8:
        np.testing.assert_array_equal(got[3], np_max_pool(feats[-1]))


@pytest.mark.parametrize("sizes", [ODD_SIZES, FLOOR_SIZES], ids=["ceil", "floor"])
@pytest.mark.parametrize("fusion", ["fast_normalized", "softmax"])
def test_bifpn_matches_numpy_reference(sizes, fusion):
    neck = BiFPN(8, repeats=2, fusion=fusion, dtype="float64")
    feats = features(sizes, dtype=np.float64)
    neck(feats)
    randomize(neck, 1, spread=0.3, kernel_gain=1.0)
    randomize_edges(neck, 2)
    got = neck(feats, training=False)
    assert all(o.dtype == tf.float64 for o in got)
    for level, (g, w) in enumerate(zip(got, np_bifpn(neck, feats), strict=True), start=3):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9, err_msg=f"P{level}")


# ----------------------------------------------------------------------------- XLA, training
def test_jit_compile_matches_graph_and_trains():
    neck = BiFPN(8, repeats=1)
    feats = [tf.constant(f) for f in features()]
    neck(feats)
    randomize(neck, 1, spread=0.3)
    randomize_edges(neck, 3, low=0.2)
    graph = tf.function(lambda f: neck(f, training=False))(feats)
    compiled = tf.function(lambda f: neck(f, training=False), jit_compile=True)(feats)
    for a, b in zip(compiled, graph, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # A compiled SGD step (BN in training mode, pooling, upsampling and crops differentiated).
    optimizer = keras.optimizers.SGD(0.01)

    @tf.function(jit_compile=True)
    def step(feats):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_mean(tf.square(o)) for o in neck(feats, training=True)])
        optimizer.apply(tape.gradient(loss, neck.trainable_weights), neck.trainable_weights)
        return loss

    before = {w.path: np.array(w) for w in neck.weights}
    assert np.isfinite(float(step(feats)))
    change = {w.path: np.abs(np.array(w) - before[w.path]).max() for w in neck.weights}
    # The conv biases (automl's) sit in front of a BN, which removes the batch mean in training
    # mode: their gradient is 0 up to rounding. Every other weight (fusion weights, 1x1 and
    # separable kernels, BN gamma / beta) got a gradient, and the BN statistics were updated.
    biases = [p for p in change if p.endswith("conv/bias")]
    assert len(biases) == 5 + 8  # 5 projections (P6's and 4 edges), 8 nodes
    assert all(change[p] < 1e-6 for p in biases), {p: change[p] for p in biases}
    moved = [p for p in change if p not in biases]
    assert all(change[p] > 1e-6 for p in moved), [p for p in moved if change[p] <= 1e-6]
    assert len(neck.trainable_weights) == 5 * 4 + 8 * 5 + 19  # projections, nodes, fusion


# ----------------------------------------------------------------------------- serialisation
def test_config_round_trip_and_automl_names():
    neck = BiFPN(8, repeats=2, fusion="attn", activation="relu", norm_momentum=0.9)
    assert neck.fusion == "softmax" and BiFPN(8, fusion="fastattn").fusion == "fast_normalized"
    feats = features()
    neck(feats)
    randomize(neck, 1, spread=0.3, kernel_gain=1.0)
    randomize_edges(neck, 4)
    config = neck.get_config()
    assert config["fusion"] == "softmax" and config["repeats"] == 2
    clone = BiFPN.from_config(config)
    assert clone.get_config() == config
    clone(feats)
    clone.set_weights(neck.get_weights())
    for a, b in zip(neck(feats, training=False), clone(feats, training=False), strict=True):
        np.testing.assert_array_equal(a, b)
    node = neck.fusion_nodes[4]
    assert node.fusion == "softmax" and node.norm.momentum == 0.9
    assert BiFPNNode.from_config(node.get_config()).get_config() == node.get_config()
    assert (
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(neck)
        ).get_config()
        == config
    )


def test_keras_file_save_load(tmp_path):
    inputs = [keras.Input((h, w, c)) for (h, w), c in zip(ODD_SIZES, CHANNELS, strict=True)]
    neck = BiFPN(8, repeats=2)
    model = keras.Model(inputs, neck(inputs))
    randomize(model, 1, spread=0.3, kernel_gain=1.0)
    randomize_edges(neck, 5)
    path = tmp_path / "bifpn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    feats = features(seed=3)
    got, want = loaded(feats, training=False), model(feats, training=False)
    assert len(got) == 5
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    loaded_neck = loaded.layers[-1]
    assert type(loaded_neck) is BiFPN
    assert [float(w.numpy()) for w in loaded_neck.fusion_nodes[7].edge_weights] == [
        float(w.numpy()) for w in neck.fusion_nodes[7].edge_weights
    ]


# ----------------------------------------------------------------------------- constants
def test_efficientdet_scaling_table():
    table = EFFICIENTDET_SCALING
    assert sorted(table) == [f"d{i}" for i in range(8)]
    column = {key: [table[f"d{i}"][key] for i in range(8)] for key in table["d0"]}
    assert column["bifpn_width"] == [64, 88, 112, 160, 224, 288, 384, 384]
    assert column["bifpn_depth"] == [3, 4, 5, 6, 7, 7, 8, 8]
    assert column["head_depth"] == [3, 3, 3, 4, 4, 4, 5, 5]
    assert column["image_size"] == [512, 640, 768, 896, 1024, 1280, 1280, 1536]
    assert column["backbone"] == [f"efficientnet-b{b}" for b in (0, 1, 2, 3, 4, 5, 6, 6)]
    assert column["fusion"] == ["fast_normalized"] * 6 + ["sum"] * 2
    assert column["anchor_scale"] == [4.0] * 7 + [5.0]
    d3 = BiFPN.efficientdet("D3")
    assert (d3.num_channels, d3.repeats, d3.fusion) == (160, 6, "fast_normalized")
    d7 = BiFPN.efficientdet("efficientdet-d7", repeats=1)
    assert (d7.num_channels, d7.repeats, d7.fusion) == (384, 1, "sum")


# ----------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    for fusion in ("channel_attn", "weighted", None):
        with pytest.raises(ValueError, match=r"unknown `fusion`.*fast_normalized"):
            BiFPN(8, fusion=fusion)
    with pytest.raises(ValueError, match="unknown `fusion`"):
        BiFPNNode(2, 8, fusion="mean")
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        BiFPN(8, repeats=0)
    with pytest.raises(ValueError, match="num_channels must be a positive integer"):
        BiFPN(0)
    with pytest.raises(ValueError, match="at least two levels"):
        BiFPN(8, min_level=5, max_level=5)
    with pytest.raises(ValueError, match="max_level"):
        BiFPN(8, min_level=5, max_level=4)
    with pytest.raises(ValueError, match="max_level"):
        BiFPN(8, max_level=4)(features())
    with pytest.raises(ValueError, match="unknown activation 'swishh'"):
        BiFPN(8, activation="swishh")
    with pytest.raises(ValueError, match=r"unknown variant 'd8'.*'d7'"):
        BiFPN.efficientdet("d8")
    with pytest.raises(ValueError, match="half the resolution"):
        BiFPN(8)(features()[::-1])  # C5, C4, C3: wrong order
    with pytest.raises(ValueError, match="list of feature maps"):
        BiFPN(8)(features()[0])
    with pytest.raises(
        ValueError, match=r"list of feature maps, got a single tensor shape \(2, 13"
    ):
        BiFPN(8).input_levels(features()[0])
    neck = BiFPN(8, repeats=1)
    neck(features())
    with pytest.raises(ValueError, match="built for a list of 3"):
        neck(features()[:2])
    node = BiFPNNode(2, 8)
    with pytest.raises(ValueError, match=r"every input must be \(B, H, W, 8\)"):
        node([tf.zeros((1, 4, 4, 8)), tf.zeros((1, 4, 4, 6))])
    with pytest.raises(ValueError, match="expects a list of 2 maps"):
        BiFPNNode(2, 8)([tf.zeros((1, 4, 4, 8))] * 3)
