"""Tests of dlnotes.necks: shapes, values against float64 NumPy references, parameter counts,
serialisation and XLA compilation of FPN, the notes' FPN, PANet and YOLOv3's FPN."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import randomize

from dlnotes.necks import (
    FPN,
    NECKS,
    PANet,
    YoloFPN,
    build_neck,
    match_spatial_size,
    nearest_upsample_like,
)

# C3..C5 of a 100x132 image with "same" padding (ResNet): ceil(100/8)=13, ceil(132/8)=17, ...
ODD_SIZES = [(13, 17), (7, 9), (4, 5)]
# ... and with Darknet's top-left padding (floor) for a 200x200 image: 25, 12, 6.
FLOOR_SIZES = [(25, 25), (12, 12), (6, 6)]
CHANNELS = (8, 12, 16)
SMALL = {
    "fpn": {"num_channels": 8},
    "fpn_bn": {"num_channels": 8},
    "panet": {"num_channels": 8},
    "yolo_fpn": {"filters": (16, 8, 4)},
    "bifpn": {"num_channels": 8, "repeats": 1},
}
R50 = (512, 1024, 2048)
DARKNET = (256, 512, 1024)


def features(sizes=ODD_SIZES, channels=CHANNELS, batch=2, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(batch, h, w, c)).astype(dtype)
        for (h, w), c in zip(sizes, channels, strict=True)
    ]


# ----------------------------------------------------------------------------- NumPy references
def np_conv(x, kernel, stride):
    """'same' convolution, float64, TF's padding rule (extra pad at the bottom / right)."""
    _, height, width, _ = x.shape
    k = kernel.shape[0]
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + k - height, 0)
    pad_w = max((out_w - 1) * stride + k - width, 0)
    xp = np.pad(
        x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    out = 0.0
    for dy in range(k):
        for dx in range(k):
            patch = xp[
                :,
                dy : dy + (out_h - 1) * stride + 1 : stride,
                dx : dx + (out_w - 1) * stride + 1 : stride,
            ]
            out = out + patch @ kernel[dy, dx]
    return out


def np_unit(unit, x):
    """A NeckConv in inference mode: conv (+ bias) -> BN with moving statistics -> activation."""
    conv = unit.conv
    y = np_conv(x, np.asarray(conv.kernel, np.float64), unit.strides)
    if conv.use_bias:
        y = y + np.asarray(conv.bias, np.float64)
    if unit.norm is not None:
        bn = unit.norm
        mean, var = (
            np.asarray(bn.moving_mean, np.float64),
            np.asarray(bn.moving_variance, np.float64),
        )
        gamma, beta = np.asarray(bn.gamma, np.float64), np.asarray(bn.beta, np.float64)
        y = (y - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
    if unit.activation == "relu":
        y = np.maximum(y, 0.0)
    elif unit.activation == "leaky_relu":
        y = np.where(y > 0, y, unit.negative_slope * y)
    else:
        assert unit.activation is None
    return y


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


def np_fpn_p3_p7(fpn, c3, c4, c5):
    """RetinaNet's FPN written out level by level."""
    lat3, lat4, lat5 = (np_unit(u, c) for u, c in zip(fpn.lateral_convs, (c3, c4, c5), strict=True))
    m5 = lat5
    m4 = lat4 + np_up(m5, lat4)
    m3 = lat3 + np_up(m4, lat3)
    out3, out4, out5 = fpn.output_convs
    p3, p4, p5 = np_unit(out3, m3), np_unit(out4, m4), np_unit(out5, m5)
    conv6, conv7 = fpn.extra_convs
    p6 = np_unit(conv6, c5 if fpn.extra_from == "c5" else p5)
    p7 = np_unit(conv7, p6 if fpn.post_activation else np.maximum(p6, 0.0))
    return [p3, p4, p5, p6, p7]


def np_panet(panet, c3, c4, c5):
    p = np_fpn_p3_p7(panet.fpn, c3, c4, c5)
    n = [p[0]]
    for down, fuse, p_next in zip(panet.down_convs, panet.fuse_convs, p[1:], strict=True):
        n.append(np_unit(fuse, np_fit(np_unit(down, n[-1]), p_next) + p_next))
    return n


def np_block(block, x):
    for unit in block:
        x = np_unit(unit, x)
    return x


def np_yolo_fpn(neck, c3, c4, c5):
    x0 = np_block(neck.blocks[0], c5)
    x1 = np_block(
        neck.blocks[1], np.concatenate([np_up(np_unit(neck.up_convs[0], x0), c4), c4], -1)
    )
    x2 = np_block(
        neck.blocks[2], np.concatenate([np_up(np_unit(neck.up_convs[1], x1), c3), c3], -1)
    )
    return [x2, x1, x0]


# ----------------------------------------------------------------------------- resampling
def test_nearest_upsample_crops_odd_sizes():
    x = tf.reshape(tf.range(1.0, 5.0), (1, 2, 2, 1))
    like = tf.zeros((1, 3, 3, 1))
    expected = [[1, 1, 2], [1, 1, 2], [3, 3, 4]]
    np.testing.assert_array_equal(nearest_upsample_like(x, like)[0, ..., 0], expected)
    # 7x7 C5 against a 13x13 C4: 14x14 cropped.
    c5 = np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype(np.float32)
    up = nearest_upsample_like(c5, tf.zeros((2, 13, 13, 5)))
    assert up.shape == (2, 13, 13, 3)
    np.testing.assert_array_equal(up, np.repeat(np.repeat(c5, 2, 1), 2, 2)[:, :13, :13])


def test_nearest_upsample_pads_floor_sizes_and_dynamic_shapes_agree():
    x = tf.reshape(tf.range(1.0, 5.0), (1, 2, 2, 1))
    expected = [[1, 1, 2, 2, 2], [1, 1, 2, 2, 2], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4]]
    like = tf.zeros((1, 5, 5, 1))
    np.testing.assert_array_equal(nearest_upsample_like(x, like)[0, ..., 0], expected)

    spec = tf.TensorSpec((None, None, None, None), tf.float32)
    dynamic = tf.function(nearest_upsample_like, input_signature=[spec, spec])
    for like in (tf.zeros((1, 5, 5, 1)), tf.zeros((1, 3, 4, 1)), tf.zeros((1, 4, 3, 2))):
        np.testing.assert_array_equal(dynamic(x, like), nearest_upsample_like(x, like))
        np.testing.assert_array_equal(dynamic(x, like), np_up(x.numpy(), like.numpy()))
    crop = tf.function(match_spatial_size, input_signature=[spec, spec])
    y = tf.reshape(tf.range(12.0), (1, 3, 4, 1))
    np.testing.assert_array_equal(crop(y, tf.zeros((1, 2, 3, 1))), y[:, :2, :3])
    np.testing.assert_array_equal(match_spatial_size(y, tf.zeros((1, 2, 3, 1))), y[:, :2, :3])


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("sizes", [ODD_SIZES, FLOOR_SIZES], ids=["ceil", "floor"])
@pytest.mark.parametrize("name", sorted(NECKS))
def test_level_shapes_strides_and_channels(name, sizes):
    neck = build_neck(name, **SMALL[name])
    outputs = neck(features(sizes))
    if name == "yolo_fpn":
        assert neck.levels == [3, 4, 5]
        expected = [(2, h, w, c) for (h, w), c in zip(sizes, (4, 8, 16), strict=True)]
    else:
        assert neck.levels == [3, 4, 5, 6, 7]
        (h5, w5) = sizes[-1]
        h6, w6 = -(-h5 // 2), -(-w5 // 2)
        extra = [(h6, w6), (-(-h6 // 2), -(-w6 // 2))]
        expected = [(2, h, w, 8) for h, w in list(sizes) + extra]
    assert [tuple(o.shape) for o in outputs] == expected
    assert [2**level for level in neck.levels][:3] == [8, 16, 32]


def test_max_level_5_has_no_extra_levels_and_p6_from_p5():
    fpn = FPN(num_channels=8, max_level=5)
    assert len(fpn(features())) == 3 and fpn.levels == [3, 4, 5] and not fpn.extra_convs
    fpn6 = FPN(num_channels=8, max_level=6, extra_from="p5")
    out = fpn6(features())
    assert [tuple(o.shape[1:3]) for o in out] == ODD_SIZES + [(2, 3)]
    # P6 from P5 has num_channels inputs, from C5 the backbone's.
    assert fpn6.extra_convs[0].conv.kernel.shape == (3, 3, 8, 8)
    fpn6c = FPN(num_channels=8, max_level=6)
    fpn6c(features())
    assert fpn6c.extra_convs[0].conv.kernel.shape == (3, 3, 16, 8)


def test_pooled_extra_level_is_torchvisions_faster_rcnn_fpn():
    # Faster R-CNN's FPN: C2-C5 -> P2-P6, P6 = max_pool2d(P5, 1, stride=2) without weights
    fpn = FPN(num_channels=8, min_level=2, max_level=6, extra_from="pool")
    sizes = [(26, 33), *ODD_SIZES]
    out = fpn(features(sizes, channels=(4, *CHANNELS)))
    assert fpn.levels == [2, 3, 4, 5, 6] and not fpn.extra_convs
    assert [tuple(o.shape[1:3]) for o in out] == sizes + [(2, 3)]  # ceil(4 / 2), ceil(5 / 2)
    np.testing.assert_array_equal(out[4], out[3][:, ::2, ::2])
    # torchvision's FeaturePyramidNetwork(in_channels=[256, 512, 1024, 2048], 256) with
    # LastLevelMaxPool: 1x1 inner and 3x3 layer convs with biases, 3,344,384 parameters
    tv = FPN(num_channels=256, min_level=2, max_level=6, extra_from="pool")
    tv.build([(None, None, None, c) for c in (256, *R50)])
    assert tv.count_params() == (256 + sum(R50)) * 256 + 4 * 256 + 4 * (9 * 256 * 256 + 256)
    assert tv.count_params() == 3_344_384


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"extra_from": "p5"},
        {"batch_norm": True, "post_activation": True},
        {"batch_norm": True},
        {"post_activation": True, "extra_from": "p5"},
    ],
    ids=["retinanet", "p6_from_p5", "notes", "bn_only", "post_act_only"],
)
@pytest.mark.parametrize("sizes", [ODD_SIZES, FLOOR_SIZES], ids=["ceil", "floor"])
def test_fpn_matches_numpy_reference(kwargs, sizes):
    fpn = FPN(num_channels=8, dtype="float64", **kwargs)
    feats = features(sizes, dtype=np.float64)
    fpn(feats)
    randomize(fpn, 1, spread=0.3, kernel_gain=1.0)
    got = fpn(feats, training=False)
    assert all(o.dtype == tf.float64 for o in got)
    want = np_fpn_p3_p7(fpn, *feats)
    # The reference reads each unit's activation: pin them down. Laterals are always linear.
    post = "relu" if kwargs.get("post_activation") else None
    assert [u.activation for u in fpn.lateral_convs] == [None] * 3
    assert [u.activation for u in fpn.output_convs + fpn.extra_convs] == [post] * 5
    units = fpn.lateral_convs + fpn.output_convs + fpn.extra_convs
    assert all(u.batch_norm == bool(kwargs.get("batch_norm")) for u in units)
    assert [u.strides for u in units] == [1] * 6 + [2] * 2
    for level, (g, w) in enumerate(zip(got, want, strict=True), start=3):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9, err_msg=f"P{level}")


def test_post_activation_levels_are_after_the_activation():
    feats = features()
    notes = FPN.notes_variant(num_channels=8)
    original = FPN(num_channels=8)
    for out in notes(feats, training=False):
        assert float(tf.reduce_min(out)) >= 0.0
    # keras-retinanet's levels are the linear conv outputs: negative values occur on every level.
    for out in original(feats):
        assert float(tf.reduce_min(out)) < 0.0


def test_panet_matches_numpy_reference():
    for sizes in (ODD_SIZES, FLOOR_SIZES):
        panet = PANet(num_channels=8, batch_norm=True, dtype="float64")
        feats = features(sizes, dtype=np.float64)
        panet(feats)
        randomize(panet, 1, spread=0.3, kernel_gain=1.0)
        got = panet(feats, training=False)
        assert all(u.activation == "relu" for u in panet.down_convs + panet.fuse_convs)
        assert [u.strides for u in panet.down_convs + panet.fuse_convs] == [2] * 4 + [1] * 4
        for g, w in zip(got, np_panet(panet, *feats), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)


def test_yolo_fpn_matches_numpy_reference():
    for sizes in (ODD_SIZES, FLOOR_SIZES):
        neck = YoloFPN(filters=(16, 8, 4), dtype="float64")
        feats = features(sizes, dtype=np.float64)
        neck(feats)
        randomize(neck, 1, spread=0.3, kernel_gain=1.0)
        got = neck(feats, training=False)
        for g, w in zip(got, np_yolo_fpn(neck, *feats), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)


def test_yolo_fpn_structure():
    neck = YoloFPN(filters=(16, 8, 4))
    neck(features())
    for block, f in zip(neck.blocks, (16, 8, 4), strict=True):
        assert [u.kernel_size for u in block] == [1, 3, 1, 3, 1]
        assert [u.filters for u in block] == [f, 2 * f, f, 2 * f, f]
    assert [u.filters for u in neck.up_convs] == [8, 4]
    units = [u for block in neck.blocks for u in block] + neck.up_convs
    assert all(u.batch_norm and not u.conv.use_bias and u.activation == "leaky_relu" for u in units)
    assert all(u.negative_slope == 0.1 for u in units)
    # Level 1 sees concat(up branch: 16 / 2 = 8 channels, C4: 12 channels), level 2 4 + 8.
    assert neck.blocks[1][0].conv.kernel.shape == (1, 1, 8 + 12, 8)
    assert neck.blocks[2][0].conv.kernel.shape == (1, 1, 4 + 8, 4)


# ----------------------------------------------------------------------------- BN / no BN
def _count(neck, name):
    return sum(1 for w in neck.weights if w.name == name)


def test_bn_variant_has_bn_layers_and_original_has_none():
    feats = features()
    original, notes = build_neck("fpn", num_channels=8), build_neck("fpn_bn", num_channels=8)
    original(feats)
    notes(feats)
    # 3 laterals + 3 output convs + P6 + P7.
    assert _count(original, "gamma") == 0 and _count(original, "bias") == 8
    assert _count(notes, "gamma") == 8 and _count(notes, "moving_variance") == 8
    assert _count(notes, "bias") == 0  # convs followed by BN have no bias
    assert notes.batch_norm and notes.post_activation
    assert not original.batch_norm and not original.post_activation


# ----------------------------------------------------------------------------- parameter counts
def n_trainable(layer):
    return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


def shapes_for(channels, sizes=(None, None, None)):
    return [(None, s, s, c) for s, c in zip(sizes, channels, strict=True)]


def test_fpn_parameter_counts_on_resnet50_channels():
    c = 256
    conv1, conv3 = (lambda cin: cin * c + c), (lambda cin: 9 * cin * c + c)
    laterals = sum(conv1(ch) for ch in R50)
    outputs = 3 * conv3(c)
    retinanet = laterals + outputs + conv3(2048) + conv3(c)  # P6 from C5, P7 from P6
    assert retinanet == 7_997_440  # the RetinaNet-R50 FPN

    fpn = FPN(256)
    fpn.build(shapes_for(R50))
    assert fpn.count_params() == n_trainable(fpn) == retinanet

    fpn_p5 = FPN(256, extra_from="p5")
    fpn_p5.build(shapes_for(R50))
    assert fpn_p5.count_params() == laterals + outputs + 2 * conv3(c) == 3_868_672

    # BN: each of the 8 convs trades its bias (c) for BN (4c, of which 2c trainable).
    notes = FPN.notes_variant(256)
    notes.build(shapes_for(R50))
    assert notes.count_params() == retinanet + 8 * 3 * c == 8_003_584
    assert n_trainable(notes) == retinanet + 8 * c

    # PANet: 4 bottom-up steps (N4..N7) of two 3x3 convs each.
    panet = PANet(256)
    panet.build(shapes_for(R50))
    assert panet.count_params() == retinanet + 4 * 2 * conv3(c) == 12_718_080


def yolo_fpn_params(channels_top_first, filters):
    """Hand formula (see YoloFPN's docstring): returns (total, trainable)."""
    total = bn_channels = 0
    for k, (c, f) in enumerate(zip(channels_top_first, filters, strict=True)):
        cin = c + (filters[k - 1] // 2 if k else 0)
        total += cin * f + 40 * f * f + 4 * 7 * f  # 1x1 cin->f, 2x(3x3 f->2f), 2x(1x1 2f->f), BN
        bn_channels += 7 * f
        if k < len(filters) - 1:
            total += f * (f // 2) + 4 * (f // 2)
            bn_channels += f // 2
    return total, total - 2 * bn_channels


def test_yolo_fpn_parameter_count_and_yolov3_total():
    neck = YoloFPN()
    neck.build(shapes_for(DARKNET, (52, 26, 13)))
    total, trainable = yolo_fpn_params(DARKNET[::-1], (512, 256, 128))
    assert (total, trainable) == (14_723_072, 14_709_760)
    assert neck.count_params() == total and n_trainable(neck) == trainable

    # YOLOv3 = Darknet-53 body (published 40,620,640, no conv bias) + neck + 80-class heads.
    # The heads are the model's: 3x3 conv-BN-leaky to 2f, then 1x1 conv with bias to 3 * 85.
    outs = neck.compute_output_spec(
        [keras.KerasTensor((1, s, s, c)) for s, c in zip((52, 26, 13), DARKNET, strict=True)]
    )
    heads = []
    for out in outs:
        f = out.shape[-1]
        head = keras.Sequential(
            [
                keras.Input(out.shape[1:]),
                keras.layers.Conv2D(2 * f, 3, padding="same", use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.Conv2D(3 * (5 + 80), 1),
            ]
        )
        heads.append(head)
    head_params = sum(h.count_params() for h in heads)
    assert head_params == sum(18 * f * f + 8 * f + 2 * f * 255 + 255 for f in (512, 256, 128))
    assert head_params == 6_658_045
    # Darknet-53's BN channels: stem 32, then per stage a down conv (f) and n blocks (f/2 + f).
    darknet_bn = 32 + sum(
        f + n * (f // 2 + f)
        for f, n in zip((64, 128, 256, 512, 1024), (1, 2, 8, 8, 4), strict=True)
    )
    yolov3 = 40_620_640 + neck.count_params() + head_params
    yolov3_trainable = (
        40_620_640 - 2 * darknet_bn + n_trainable(neck) + sum(n_trainable(h) for h in heads)
    )
    assert yolov3 == 62_001_757
    assert yolov3_trainable == 61_949_149
    # 248,007,048-byte yolov3.weights: a 20-byte header and 4 bytes per parameter.
    assert 20 + 4 * yolov3 == 248_007_048


# ----------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("name", sorted(NECKS))
def test_config_round_trip(name):
    neck = build_neck(name, **SMALL[name])
    feats = features()
    neck(feats)
    randomize(neck, 1, spread=0.3, kernel_gain=1.0)
    config = neck.get_config()
    clone = type(neck).from_config(config)
    assert clone.get_config() == config
    clone(feats)
    clone.set_weights(neck.get_weights())
    for a, b in zip(neck(feats, training=False), clone(feats, training=False), strict=True):
        np.testing.assert_array_equal(a, b)
    # Plain-Python config (JSON-able constructor arguments).
    assert (
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(neck)
        ).get_config()
        == config
    )


@pytest.mark.parametrize("name", sorted(NECKS))
def test_keras_file_save_load(name, tmp_path):
    inputs = [keras.Input((h, w, c)) for (h, w), c in zip(ODD_SIZES, CHANNELS, strict=True)]
    neck = build_neck(name, **SMALL[name])
    model = keras.Model(inputs, neck(inputs))
    randomize(model, 1, spread=0.3, kernel_gain=1.0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    feats = features(seed=3)
    got, want = loaded(feats, training=False), model(feats, training=False)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert type(loaded.layers[-1]) is type(neck)


# ----------------------------------------------------------------------------- XLA, gradients
@pytest.mark.parametrize("name", sorted(NECKS))
def test_jit_compile_forward_matches_eager(name):
    neck = build_neck(name, **SMALL[name])
    feats = [tf.constant(f) for f in features()]
    eager = neck(feats, training=False)
    compiled = tf.function(lambda f: neck(f, training=False), jit_compile=True)(feats)
    for a, b in zip(compiled, eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(NECKS))
def test_every_trainable_weight_gets_a_gradient(name):
    neck = build_neck(name, **SMALL[name])
    feats = [tf.constant(f) for f in features()]
    with tf.GradientTape() as tape:
        loss = tf.add_n([tf.reduce_sum(tf.square(o)) for o in neck(feats, training=True)])
    grads = tape.gradient(loss, neck.trainable_weights)
    assert all(g is not None and np.isfinite(g).all() and np.any(g != 0) for g in grads)


def test_jit_compile_train_step():
    """A compiled training step (BN in training mode, upsampling and crops differentiated)."""
    neck = build_neck("fpn_bn", **SMALL["fpn_bn"])
    feats = [tf.constant(f) for f in features()]
    neck(feats)
    optimizer = keras.optimizers.SGD(0.01)

    @tf.function(jit_compile=True)
    def step(feats):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_mean(tf.square(o)) for o in neck(feats, training=True)])
        optimizer.apply(tape.gradient(loss, neck.trainable_weights), neck.trainable_weights)
        return loss

    means = [np.asarray(w) for w in neck.non_trainable_weights]
    losses = [float(step(feats)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # BN moving statistics were updated in training mode.
    assert all(
        np.any(np.asarray(w) != m) for w, m in zip(neck.non_trainable_weights, means, strict=True)
    )


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="half the resolution"):
        FPN(8)(features()[::-1])  # C5, C4, C3: wrong order
    with pytest.raises(ValueError, match="max_level"):
        FPN(8, max_level=4)(features())
    with pytest.raises(ValueError, match="max_level"):
        FPN(8, min_level=5, max_level=4)
    with pytest.raises(ValueError, match="extra_from"):
        FPN(8, extra_from="c4")
    with pytest.raises(ValueError, match="expects 3 feature maps"):
        YoloFPN()(features()[:2])
    with pytest.raises(ValueError, match="list of feature maps"):
        FPN(8)(features()[0])
    with pytest.raises(ValueError, match="Unknown neck"):
        build_neck("bifpn2")
    fpn = FPN(8)
    fpn(features())
    with pytest.raises(ValueError, match="built for a list of 3"):
        fpn(features()[:2])
