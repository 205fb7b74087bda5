"""Tests of dlnotes.backbones.efficientnet.

* against keras.applications itself: the published parameter counts of B0-B7, the same layers
  (names, types, settings, initialisers), and identical outputs after a weight copy (B0 with
  the classifier, B0 and B2 features at an odd input size), including the ImageNet path with
  keras.applications' extra input Rescaling;
* the block's rules read from the graph: squeeze-excite width from the block's input channels,
  drop-connect only on residual branches with linearly growing rates, no activation after the
  projection or the add;
* output levels, strides and sizes, the CPU variant and knobs, XLA, saving, the registry, errors.

The big models are built once (``functools.cache``) and never run.
"""

import functools
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import randomize

from dlnotes.backbones import (
    BACKBONES,
    EFFICIENTNETS,
    ImagePreprocessing,
    build_backbone,
    build_efficientnet,
    copy_keras_applications_weights,
    output_strides,
    preprocess_for,
)
from dlnotes.backbones import efficientnet as effnet

# keras.applications.EfficientNetB{i}(weights=None).count_params(), with the 1000-class top
# (the figures of keras.io/api/applications, exact); B0 without the top: include_top=False.
PUBLISHED_WITH_TOP = {
    "efficientnet_b0": 5_330_571,
    "efficientnet_b1": 7_856_239,
    "efficientnet_b2": 9_177_569,
    "efficientnet_b3": 12_320_535,
    "efficientnet_b4": 19_466_823,
    "efficientnet_b5": 30_562_527,
    "efficientnet_b6": 43_265_143,
    "efficientnet_b7": 66_658_687,
}
PUBLISHED_B0_NO_TOP = 4_049_571
# torchvision / timm efficientnet_b0 (torch counts no BatchNorm statistics)
PUBLISHED_B0_TRAINABLE = 5_288_548

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
B0_CHANNELS = {1: 16, 2: 24, 3: 40, 4: 112, 5: 320}  # stage ends of B0, keras.applications
# keras.applications layers at the end of the last stage of each stride (levels 1..5)
KERAS_LEVEL_LAYERS = {
    "efficientnet_b0": (
        "block1a_project_bn",  # block1a has 32 -> 16 channels: no residual add
        "block2b_add",
        "block3b_add",
        "block5c_add",
        "block7a_project_bn",
    ),
    # B2: depth 1.2 gives 2, 3, 3, 4, 4, 5, 2 blocks per stage
    "efficientnet_b2": (
        "block1b_add",
        "block2c_add",
        "block3c_add",
        "block5d_add",
        "block7b_add",
    ),
}


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


# The models below are built once per session. Tests read their structure; the weight-copy
# tests overwrite the weights of the B0s, which no structural test depends on.
@functools.cache
def classifier(name):
    """Each variant with its 1000-class top (logits), never run but for B0."""
    return build_efficientnet(name, top="classifier", classifier_activation=None)


@functools.cache
def all_levels(name):
    """The detection backbone returning C1-C5."""
    return build_efficientnet(name, levels=(1, 2, 3, 4, 5))


@functools.cache
def keras_b0():
    """keras.applications' B0 with its top (random init, logits) for 64x64 images."""
    return keras.applications.EfficientNetB0(
        weights=None, input_shape=(64, 64, 3), classifier_activation=None
    )


def layers_by_name(model):
    return {layer.name: layer for layer in model.layers}


def producers(layer):
    """Names of the layers whose outputs ``layer`` consumes."""
    return [t._keras_history.operation.name for t in keras.tree.flatten(layer.input)]


def consumers(layer):
    return [node.operation for node in layer._outbound_nodes]


def block_names(model):
    """MBConv block prefixes ``block{stage}{letter}_`` in build order."""
    names = sorted(
        {layer.name.split("_")[0] for layer in model.layers if layer.name[:5] == "block"}
    )
    return [f"{n}_" for n in sorted(names, key=lambda n: (int(n[5:-1]), n[-1]))]


SWISH = keras.activations.get("swish")


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", list(PUBLISHED_WITH_TOP))
def test_parameter_counts_with_top_equal_keras_applications(name):
    model = classifier(name)
    assert model.count_params() == PUBLISHED_WITH_TOP[name]
    assert tuple(model.output.shape) == (None, 1000)
    if name == "efficientnet_b0":
        assert trainable_count(model) == PUBLISHED_B0_TRAINABLE
        # the rest: BatchNorm moving mean + variance per channel, the Normalization's 7
        bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert sum(2 * layer.gamma.shape[0] for layer in bn) + 7 == 42_023
        assert model.count_params() - trainable_count(model) == 42_023


def test_b0_without_top_and_as_backbone():
    conv = build_efficientnet("efficientnet_b0", top="conv")
    backbone = all_levels("efficientnet_b0")  # C1 and C2 add no parameters
    assert conv.count_params() == PUBLISHED_B0_NO_TOP
    # the detection backbone leaves out the 1x1 top conv 320 -> 1280 and its BatchNorm
    assert backbone.count_params() == PUBLISHED_B0_NO_TOP - 320 * 1280 - 4 * 1280 == 3_634_851
    assert [t.shape[-1] for t in conv.outputs] == [40, 112, 1280]
    assert producers(conv.get_layer("C5")) == ["top_activation"]
    assert [t.shape[-1] for t in backbone.outputs] == [16, 24, 40, 112, 320]
    assert producers(backbone.get_layer("C5")) == ["block7a_project_bn"]
    assert "top_conv" not in layers_by_name(backbone)


def test_scaling_rules():
    # keras.applications' round_filters: multiples of 8, never more than 10 % down
    assert effnet.round_filters(32, 1.1) == 32  # 35.2 -> 32
    assert effnet.round_filters(112, 1.1) == 120  # 123.2 -> 120
    assert effnet.round_filters(40, 0.25) == 16  # 10 -> 8 would lose 20 %, so 16
    assert effnet.round_filters(16, 0.25) == 8  # never below the divisor
    assert effnet.round_filters(1280, 2.0) == 2560
    assert [effnet.round_repeats(r, 3.1) for r in (1, 2, 3, 4)] == [4, 7, 10, 13]
    b7 = classifier("efficientnet_b7")
    assert len(block_names(b7)) == 55 and b7.get_layer("top_conv").filters == 2560
    assert len(block_names(classifier("efficientnet_b0"))) == 16


# ----------------------------------------------------------------------------- keras.applications
def assert_same_layers(ours, theirs):
    """Every keras.applications layer with weights or a computation is in ``ours`` with the same
    type and settings. Skipped: the input, the explicit ``*_pad`` layers ("same" padding here)
    and the auto-named input Rescaling / Normalization (compared by type)."""
    mine = layers_by_name(ours)
    skipped = (keras.layers.InputLayer, keras.layers.ZeroPadding2D)
    for layer in theirs.layers:
        if isinstance(layer, skipped):
            assert isinstance(layer, keras.layers.InputLayer) or layer.name.endswith("_pad")
            continue
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            continue
        assert layer.name in mine, layer.name
        other = mine[layer.name]
        assert type(other) is type(layer), layer.name
        assert [w.shape for w in other.weights] == [w.shape for w in layer.weights], layer.name
        if isinstance(layer, keras.layers.Conv2D):  # DepthwiseConv2D too
            for attr in ("kernel_size", "strides", "use_bias", "activation"):
                assert getattr(other, attr) == getattr(layer, attr), (layer.name, attr)
            init = "depthwise_initializer" if hasattr(layer, "depthwise_initializer") else None
            init = init or "kernel_initializer"
            assert getattr(other, init).get_config() == getattr(layer, init).get_config()
        if isinstance(layer, keras.layers.Dense):
            assert other.activation == layer.activation
            assert other.kernel_initializer.get_config() == layer.kernel_initializer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            assert (other.epsilon, other.momentum) == (layer.epsilon, layer.momentum)
        if isinstance(layer, keras.layers.Dropout):
            assert (other.rate, other.noise_shape) == (layer.rate, layer.noise_shape), layer.name
    # ours adds only its input; the input Rescaling / Normalization have fixed names here
    theirs_names = {layer.name for layer in theirs.layers}
    assert set(mine) - theirs_names - {"rescaling", "normalization"} == {"images"}
    assert isinstance(mine["rescaling"], keras.layers.Rescaling)
    assert isinstance(mine["normalization"], keras.layers.Normalization)


def test_layer_for_layer_keras_applications_b0():
    app = keras_b0()
    ours = classifier("efficientnet_b0")
    assert_same_layers(ours, app)
    # the initialisers are keras.applications' CONV_ / DENSE_KERNEL_INITIALIZER
    conv = ours.get_layer("block2a_expand_conv").kernel_initializer.get_config()
    assert (conv["scale"], conv["mode"], conv["distribution"]) == (
        2.0,
        "fan_out",
        "truncated_normal",
    )
    dense = ours.get_layer("predictions").kernel_initializer.get_config()
    assert (dense["scale"], dense["mode"], dense["distribution"]) == (1 / 3, "fan_out", "uniform")
    # stride-2 convs: keras.applications pads explicitly then "valid"; "same" here
    for name in (
        "stem_conv",
        "block2a_dwconv",
        "block3a_dwconv",
        "block4a_dwconv",
        "block6a_dwconv",
    ):
        assert app.get_layer(name).padding == "valid" and app.get_layer(name).strides == (2, 2)
        assert ours.get_layer(name).padding == "same", name


def randomize_normalization(model, seed, variance=None):
    """Non-trivial input statistics (near ImageNet's); refreshes the layer, which reads its
    variables only in ``finalize_state``."""
    rng = np.random.default_rng(seed)
    (norm,) = [layer for layer in model.layers if isinstance(layer, keras.layers.Normalization)]
    if variance is None:
        variance = IMAGENET_STD**2 * rng.uniform(0.7, 1.4, 3)
    norm.adapt_mean.assign(IMAGENET_MEAN + rng.normal(0, 0.05, 3))
    norm.adapt_variance.assign(variance)
    norm.finalize_state()
    return model


def calibrate(model, x, seed):
    """Random weights whose BatchNorm statistics are near those of ``x`` (then perturbed), so
    that the activations stay O(1) through all blocks and a wrong copy shows."""
    randomize(model, seed, spread=0.1)
    randomize_normalization(model, seed)
    rng = np.random.default_rng(seed)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        bn.momentum = 0.0
    model(x, training=True)  # moving statistics := those of this batch
    for bn in bns:
        bn.momentum = 0.99
        var = np.asarray(bn.moving_variance)
        bn.moving_mean.assign(bn.moving_mean + rng.normal(0, 0.2, var.shape) * np.sqrt(var))
        bn.moving_variance.assign(var * rng.uniform(0.7, 1.4, var.shape))
    return model


def images(shape, seed):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def assert_features_equal(got, want):
    for g, w in zip(keras.tree.flatten(got), keras.tree.flatten(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))


def test_weights_copied_from_keras_applications_classifier_b0():
    x = images((2, 64, 64, 3), seed=0)
    app = calibrate(keras_b0(), x, seed=1)
    ours = classifier("efficientnet_b0")
    before = np.asarray(ours(x, training=False))
    n = copy_keras_applications_weights(app, ours)
    assert n == sum(1 for layer in app.layers if layer.weights) == 132
    want = app(x, training=False)
    assert np.asarray(want).std() > 0.1  # logits that differ between classes and images
    assert_features_equal(ours(x, training=False), want)
    assert not np.allclose(before, np.asarray(want), atol=1e-2)  # the copy changed them


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnet_b2"])
def test_weights_copied_from_keras_applications_features_at_an_odd_size(name):
    # keras.applications' explicit padding from the static odd size is "same"'s padding
    size = (65, 97)
    x = images((2, *size, 3), seed=2)
    constructor = getattr(keras.applications, effnet.IMAGENET_CONSTRUCTORS[name])
    app = calibrate(constructor(include_top=False, weights=None, input_shape=(*size, 3)), x, 3)
    features = keras.Model(app.input, [app.get_layer(n).output for n in KERAS_LEVEL_LAYERS[name]])
    want = features(x, training=False)
    ours = all_levels(name)  # input size None
    # strict: every layer but the top conv, which a backbone leaves out
    assert copy_keras_applications_weights(app, ours) == sum(
        1 for layer in app.layers if layer.weights and not layer.name.startswith("top_")
    )
    got = ours(x, training=False)
    assert [tuple(g.shape[1:3]) for g in got] == [
        (math.ceil(65 / 2**level), math.ceil(97 / 2**level)) for level in range(1, 6)
    ]
    assert_features_equal(got, want)


def test_keras_applications_padding_without_a_static_size():
    # keras.applications computes its stride-2 padding from the static size; for size None it
    # pads (0, 1) (k = 3) or (1, 2) (k = 5) whatever the image: on an odd size n the output is
    # floor(n / 2) (65 -> 32), where "same" here gives ceil(n / 2) (33), like a static build.
    correct_pad = keras.src.applications.imagenet_utils.correct_pad
    assert correct_pad(keras.KerasTensor((None, None, None, 3)), 3) == ((0, 1), (0, 1))
    assert correct_pad(keras.KerasTensor((None, None, None, 3)), 5) == ((1, 2), (1, 2))
    assert correct_pad(keras.KerasTensor((None, 65, 97, 3)), 3) == ((1, 1), (1, 1))
    assert (65 + 0 + 1 - 3) // 2 + 1 == 32 and (65 + 1 + 1 - 3) // 2 + 1 == 33 == -(-65 // 2)
    tiny = build_efficientnet("efficientnet_tiny", levels=(1,))
    (shape,) = tiny.compute_output_shape((None, 65, 97, 3))  # one output, C1
    assert tuple(shape) == (None, 33, 49, 8)


@pytest.mark.parametrize("top", [None, "classifier"])
def test_imagenet_weights_are_copied_from_keras_applications(monkeypatch, top):
    # Stand-in for the download: keras.applications' own ImageNet code path (with the extra
    # input Rescaling by 1/sqrt(std)) whose "weight file" is random weights with the files'
    # Normalization: mean, and the std stored as the variance.
    calls, built = [], []
    real = keras.applications.EfficientNetB0

    def fake_constructor(**kwargs):
        calls.append(kwargs)
        built.append(real(**kwargs))
        return built[-1]

    def fake_load_weights(model, path, *args, **kwargs):
        randomize(model, seed=4, spread=0.1)
        randomize_normalization(model, seed=5, variance=IMAGENET_STD)

    monkeypatch.setattr(keras.applications, "EfficientNetB0", fake_constructor)
    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", lambda *a, **k: "unused.h5")
    monkeypatch.setattr(keras.Model, "load_weights", fake_load_weights)
    ours = build_backbone("efficientnet_b0", weights="imagenet", top=top)
    assert calls[0]["weights"] == "imagenet"
    assert calls[0]["include_top"] is (top == "classifier")
    (app,) = built
    scales = [layer for layer in app.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(scales) == 2  # keras.applications' ImageNet input: 1/255 and 1/sqrt(std)
    norm = ours.get_layer("normalization")
    # (x - m) / sqrt(std) / sqrt(std) == (x - m) / std: variance std**2 after the fold
    np.testing.assert_allclose(norm.adapt_variance, IMAGENET_STD**2, rtol=1e-6)
    x = images((1, 224, 224, 3) if top else (1, 64, 64, 3), seed=6)  # the classifier's size
    if top is None:
        names = KERAS_LEVEL_LAYERS["efficientnet_b0"][2:]
        app = keras.Model(app.input, [app.get_layer(n).output for n in names])
    assert_features_equal(ours(x), app(x))


def test_copy_errors_name_the_mismatch():
    b0 = build_efficientnet("efficientnet_tiny", levels=(1,))
    two_stages = build_efficientnet("efficientnet_tiny", levels=(1, 2))
    deeper = build_efficientnet("efficientnet_tiny", levels=(1, 2), depth_coefficient=1.0)
    before = np.asarray(b0.get_layer("stem_conv").kernel).copy()
    with pytest.raises(ValueError, match=r"missing in 'efficientnet_tiny': \['block2a_.* knobs"):
        copy_keras_applications_weights(b0, two_stages)  # the target has more
    # within a stage the target builds, extra blocks mean another depth
    with pytest.raises(ValueError, match=r"missing in 'efficientnet_tiny': \['block2b_.* knobs"):
        copy_keras_applications_weights(deeper, two_stages)
    wider = build_efficientnet("efficientnet_tiny", levels=(1,), width_coefficient=0.5)
    with pytest.raises(ValueError, match="'stem_conv' has weight shapes"):
        copy_keras_applications_weights(wider, b0)
    np.testing.assert_array_equal(b0.get_layer("stem_conv").kernel, before)  # nothing copied
    images_in = keras.Input((8, 8, 3))
    plain = keras.Model(images_in, keras.layers.Conv2D(2, 3, name="stem_conv")(images_in))
    with pytest.raises(ValueError, match=r"input of .* is \[\], not keras.applications'"):
        copy_keras_applications_weights(plain, b0)
    # a source that goes on after the target's last stage (levels=(1,)) copies
    randomize(two_stages, seed=15)
    assert copy_keras_applications_weights(two_stages, b0) == 1 + sum(
        1 for layer in b0.layers if layer.weights and layer.name != "normalization"
    )
    np.testing.assert_array_equal(
        b0.get_layer("stem_bn").gamma, two_stages.get_layer("stem_bn").gamma
    )


# ----------------------------------------------------------------------------- the block
def test_squeeze_excite_width_is_a_quarter_of_the_block_input():
    for name in ("efficientnet_b0", "efficientnet_b3"):
        model = classifier(name)
        layers = layers_by_name(model)
        blocks = block_names(model)
        for block in blocks:
            first = layers.get(f"{block}expand_conv", layers[f"{block}dwconv"])
            c_in = first.input.shape[-1]
            expanded = layers[f"{block}dwconv"].output.shape[-1]
            reduce, expand = layers[f"{block}se_reduce"], layers[f"{block}se_expand"]
            assert reduce.filters == max(1, int(c_in * 0.25)), block
            assert expand.filters == expanded, block
            assert reduce.activation is SWISH and expand.activation is keras.activations.sigmoid
            assert reduce.use_bias and expand.use_bias
            assert producers(layers[f"{block}se_excite"]) == [
                f"{block}activation",
                f"{block}se_expand",
            ]
    b0 = layers_by_name(classifier("efficientnet_b0"))
    # 16 -> 96 channels: the reduced width is 4 (16 / 4), not 24 (96 / 4)
    assert b0["block2a_se_reduce"].filters == 4 and b0["block2a_se_expand"].filters == 96
    assert b0["block6a_se_reduce"].filters == 28 and b0["block6a_se_expand"].filters == 672


def test_drop_connect_only_on_residual_branches_with_linear_rates():
    for name in ("efficientnet_b0", "efficientnet_b7"):
        model = classifier(name)
        layers = layers_by_name(model)
        blocks = block_names(model)
        drops = {layer.name for layer in model.layers if isinstance(layer, keras.layers.Dropout)}
        expected = {"top_dropout"}
        for b, block in enumerate(blocks):
            residual = f"{block}add" in layers
            first = layers.get(f"{block}expand_conv", layers[f"{block}dwconv"])
            block_input = producers(first)[0]
            if residual:
                add = layers[f"{block}add"]
                if b == 0:  # rate 0: no layer
                    assert producers(add) == [f"{block}project_bn", block_input]
                    continue
                drop = layers[f"{block}drop"]
                expected.add(drop.name)
                assert drop.rate == pytest.approx(0.2 * b / len(blocks)), block
                assert drop.noise_shape == (None, 1, 1, 1)  # the whole branch of a sample
                assert producers(drop) == [f"{block}project_bn"]
                assert producers(add) == [drop.name, block_input]  # branch + identity
            c_in, c_out = first.input.shape[-1], layers[f"{block}project_bn"].output.shape[-1]
            stride = layers[f"{block}dwconv"].strides
            # a residual exactly where the shape is kept
            assert residual == (stride == (1, 1) and c_in == c_out), block
            if not residual:
                assert f"{block}drop" not in layers, block
        assert drops == expected
        assert layers["top_dropout"].noise_shape is None
        assert layers["top_dropout"].rate == effnet.SCALING[name].dropout
    b7_rates = [
        layer.rate for layer in classifier("efficientnet_b7").layers if layer.name.endswith("_drop")
    ]
    assert max(b7_rates) == pytest.approx(0.2 * 54 / 55) and b7_rates == sorted(b7_rates)
    no_drop = build_efficientnet("efficientnet_tiny", drop_connect_rate=0.0)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in no_drop.layers)


def test_no_activation_after_projection_or_add():
    model = classifier("efficientnet_b0")
    activations = {
        layer.name for layer in model.layers if isinstance(layer, keras.layers.Activation)
    }
    blocks = block_names(model)
    expected = {"stem_activation", "top_activation"}
    for block in blocks:
        expected.add(f"{block}activation")
        if f"{block}expand_conv" in layers_by_name(model):
            expected.add(f"{block}expand_activation")
    assert activations == expected
    assert all(model.get_layer(name).activation is SWISH for name in activations)
    for layer in model.layers:
        if layer.name.endswith(("_project_conv", "_project_bn", "_add", "_drop")):
            if isinstance(layer, keras.layers.Conv2D):
                assert layer.activation is keras.activations.linear, layer.name
            for user in consumers(layer):
                assert not isinstance(user, keras.layers.Activation), (layer.name, user.name)
                activation = getattr(user, "activation", keras.activations.linear)
                assert activation is keras.activations.linear, (layer.name, user.name)


# ----------------------------------------------------------------------------- outputs and knobs
def test_levels_strides_and_sizes():
    model = all_levels("efficientnet_b0")
    assert model.output_names == ["C1", "C2", "C3", "C4", "C5"]
    assert output_strides(model) == (2, 4, 8, 16, 32)
    shapes = [tuple(s) for s in model.compute_output_shape((None, 65, 97, 3))]
    assert shapes == [
        (None, -(-65 // 2**level), -(-97 // 2**level), B0_CHANNELS[level]) for level in range(1, 6)
    ]
    shallow = build_efficientnet("efficientnet_b0", levels=(1, 2))
    assert [t.shape[-1] for t in shallow.outputs] == [16, 24]
    assert "block3a_expand_conv" not in layers_by_name(shallow)  # built up to stage 2 only
    assert shallow.get_layer("block2b_drop").rate == pytest.approx(0.2 * 2 / 16)


def test_tiny_variant_and_knobs():
    tiny = build_backbone("efficientnet_tiny")
    assert tiny.output_names == ["C3", "C4", "C5"] and output_strides(tiny) == (8, 16, 32)
    assert [t.shape[-1] for t in tiny.outputs] == [16, 32, 80]
    assert tiny.count_params() == 179_021
    assert len(block_names(tiny)) == 10  # ceil(0.5 * (1, 2, 2, 3, 3, 4, 1))
    knobs = build_backbone("efficientnet_b0", width_coefficient=0.25, depth_coefficient=0.5)
    assert knobs.count_params() == tiny.count_params()
    x = images((2, 100, 75, 3), seed=7)
    feats = tiny(preprocess_for("efficientnet_tiny")(x))
    assert [tuple(f.shape) for f in feats] == [(2, 13, 10, 16), (2, 7, 5, 32), (2, 4, 3, 80)]
    assert all(np.isfinite(np.asarray(f)).all() for f in feats)
    # the model normalises RGB [0, 255] with ImageNet's mean and std itself
    norm = tiny.get_layer("normalization")
    np.testing.assert_allclose(norm.adapt_mean, IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(norm.adapt_variance, IMAGENET_STD**2, rtol=1e-6)
    pixel = np.array([[[[255.0, 0.0, 127.5]]]], np.float32)
    normalised = keras.Model(tiny.input, tiny.get_layer("normalization").output)(pixel)
    want = (np.array([1.0, 0.0, 0.5]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(np.asarray(normalised)[0, 0, 0], want, rtol=1e-5)
    gray = build_efficientnet("efficientnet_tiny", input_shape=(32, 32, 1))
    assert np.asarray(gray.get_layer("normalization").adapt_variance).tolist() == [1.0]


def test_xla_training_step_and_inference_match_eager():
    # Stages 1-2 at full depth (a drop-connect block2b) keep XLA's compile time short.
    model = build_backbone("efficientnet_tiny", depth_coefficient=1.0, levels=(1, 2))
    randomize(model, seed=8)
    assert model.get_layer("block2b_drop").rate > 0
    x = tf.constant(images((2, 40, 48, 3), seed=9))

    def step(batch):
        # the loss depends on C1 only (upstream of every drop-connect): eager and XLA agree;
        # 0 * C2 gives the later variables zero gradients
        with tf.GradientTape() as tape:
            c1, c2 = model(batch, training=True)
            loss = tf.reduce_mean(tf.square(c1)) + 0.0 * tf.reduce_mean(c2)
        grads = tape.gradient(loss, model.trainable_variables)
        return c1, c2, loss, grads, model(batch, training=False)

    state = [np.asarray(v) for v in model.non_trainable_variables]
    c1, _, loss, grads, inference = step(x)
    for v, value in zip(model.non_trainable_variables, state, strict=True):
        v.assign(value)  # the training call moved the BatchNorm statistics
    c1_xla, c2_xla, loss_xla, grads_xla, inference_xla = tf.function(step, jit_compile=True)(x)
    assert_features_equal(c1_xla, c1)
    assert np.isfinite(np.asarray(c2_xla)).all()  # training mode with drop-connect compiled
    np.testing.assert_allclose(loss_xla, loss, rtol=1e-4)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in grads)
    for g, g_xla, v in zip(grads, grads_xla, model.trainable_variables, strict=True):
        np.testing.assert_allclose(g_xla, g, rtol=1e-3, atol=1e-4 * scale, err_msg=v.path)
    assert np.abs(np.asarray(grads[0])).max() > 0  # the stem kernel learns
    assert_features_equal(inference_xla, inference)


def test_save_and_load_keras_file_and_weights_file(tmp_path):
    model = randomize_normalization(randomize(build_backbone("efficientnet_tiny"), seed=11), 12)
    x = images((1, 40, 40, 3), seed=13)
    want = model(x)
    path = os.fspath(tmp_path / "bb.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.output_names == ["C3", "C4", "C5"] and output_strides(loaded) == (8, 16, 32)
    assert_features_equal(loaded(x), want)  # the Normalization's statistics came along

    weights = tmp_path / "bb.weights.h5"
    model.save_weights(weights)
    again = build_backbone("efficientnet_tiny", weights=weights)
    assert_features_equal(again(x), want)
    with pytest.raises(ValueError, match="variables"):
        build_backbone("efficientnet_tiny", weights=weights, levels=(3, 4))


# ----------------------------------------------------------------------------- registry
def test_registry_entries_and_preprocessing():
    assert set(EFFICIENTNETS) == {f"efficientnet_b{i}" for i in range(8)} | {"efficientnet_tiny"}
    for name in EFFICIENTNETS:
        assert BACKBONES[name].family == "efficientnet"
        assert preprocess_for(name).mode == "none"
        assert "EfficientNet" in BACKBONES[name].description
    assert "C3-C5 channels 40/112/320" in BACKBONES["efficientnet_b0"].description
    assert effnet.SCALING["efficientnet_b4"] == effnet.Scaling(1.4, 1.8, 380, 0.4)
    x = images((2, 5, 7, 3), seed=14)
    identity = preprocess_for("efficientnet_b0", "imagenet")
    np.testing.assert_array_equal(identity(x), x)
    assert ImagePreprocessing.from_config(identity.get_config()).mode == "none"
    with pytest.raises(ValueError, match="no ImageNet weights"):
        preprocess_for("efficientnet_tiny", "imagenet")


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "efficientnet_b8"}, ValueError, "Unknown backbone 'efficientnet_b8'"),
        ({"name": "efficientnet_tiny", "weights": "imagenet"}, ValueError, "no ImageNet weights"),
        (
            {"name": "efficientnet_b0", "weights": "imagenet", "width_coefficient": 0.5},
            ValueError,
            r"published architecture.*width_coefficient=0.5",
        ),
        (
            {"name": "efficientnet_b1", "weights": "imagenet", "depth_coefficient": 1.0},
            ValueError,
            "published architecture",
        ),
        (
            {"name": "efficientnet_b0", "weights": "imagenet", "input_shape": (None, None, 1)},
            ValueError,
            "3 input channels",
        ),
        (
            {"name": "efficientnet_b0", "weights": "imagenet", "top": "classifier", "classes": 10},
            ValueError,
            "classes=1000, got 10",
        ),
        ({"name": "efficientnet_b0", "weights": "coco"}, ValueError, "weights.h5"),
        ({"name": "efficientnet_b0", "weights": "gone.weights.h5"}, FileNotFoundError, "gone"),
        ({"name": "efficientnet_b0", "weights": 3}, ValueError, "weights must be"),
        ({"name": "efficientnet_b0", "width_coefficient": 0}, ValueError, "width_coefficient.*0"),
        ({"name": "efficientnet_b0", "depth_coefficient": "2"}, ValueError, "depth_coefficient"),
        ({"name": "efficientnet_b0", "drop_connect_rate": 1.0}, ValueError, r"\[0, 1\), got 1.0"),
        ({"name": "efficientnet_b0", "levels": (5, 4)}, ValueError, "increasing order"),
        ({"name": "efficientnet_b0", "levels": (3, 6)}, ValueError, "levels in 1..5"),
        ({"name": "efficientnet_b0", "levels": (0, 3)}, ValueError, "positive integer, got 0"),
        ({"name": "efficientnet_b0", "levels": ()}, ValueError, "levels"),
        ({"name": "efficientnet_b0", "top": "conv", "levels": (3, 4)}, ValueError, "end with 5"),
        ({"name": "efficientnet_b0", "top": "dense"}, ValueError, "top must be one of"),
        ({"name": "efficientnet_b0", "classes": 10}, ValueError, r"\['classes'\] only apply"),
        (
            {"name": "efficientnet_b0", "top": "classifier", "levels": (3, 4, 5)},
            ValueError,
            "levels must be None",
        ),
        ({"name": "efficientnet_b0", "input_shape": (64, 64)}, ValueError, "input_shape"),
        ({"name": "efficientnet_b0", "input_shape": (64, 0, 3)}, ValueError, "input_shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_backbone(**kwargs)


def test_unknown_variant_named_by_the_builder():
    with pytest.raises(ValueError, match=r"Unknown EfficientNet 'b0'; expected one of .*b7"):
        build_efficientnet("b0")
    with pytest.raises(ValueError, match="Unknown EfficientNet"):
        effnet.preprocessing_mode("efficientnet-b0")


# ----------------------------------------------------------------------------- cost model
# Tan & Le 2019, table 2: FLOPs (multiply-adds) at each variant's resolution, in billions
PAPER_MULTIPLY_ADDS = {
    "efficientnet_b0": 0.39,
    "efficientnet_b1": 0.70,
    "efficientnet_b2": 1.0,
    "efficientnet_b3": 1.8,
    "efficientnet_b4": 4.2,
    "efficientnet_b5": 9.9,
    "efficientnet_b6": 19.0,
    "efficientnet_b7": 37.0,
}


@pytest.mark.parametrize("name", list(PUBLISHED_WITH_TOP))
def test_cost_model_parameters_and_the_papers_multiply_adds(name):
    cost = effnet.efficientnet_cost(name)
    assert list(cost) == ["input", "stem"] + [f"stage{i}" for i in range(1, 8)] + [
        "top",
        "classifier",
    ]
    assert sum(p for p, _ in cost.values()) == PUBLISHED_WITH_TOP[name]
    # within 5 % of the paper's rounded figures (B4: 4.39 G against 4.2)
    macs = sum(m for _, m in cost.values()) / 1e9
    assert macs == pytest.approx(PAPER_MULTIPLY_ADDS[name], rel=0.05)


@pytest.mark.parametrize(
    "name, size, top",
    [
        ("efficientnet_b0", 224, "classifier"),
        ("efficientnet_b0", (97, 131), None),
        ("efficientnet_tiny", (64, 50), "conv"),
    ],
)
def test_cost_model_equals_the_built_model(name, size, top):
    from dlnotes.flops import count_macs

    hw = (size, size) if isinstance(size, int) else size
    model = build_efficientnet(name, input_shape=(*hw, 3), top=top)
    cost = effnet.efficientnet_cost(name, size, top=top)
    assert sum(p for p, _ in cost.values()) == model.count_params()
    assert sum(m for _, m in cost.values()) == count_macs(model, (1, *hw, 3))


def test_cost_model_bad_arguments():
    with pytest.raises(ValueError, match="Unknown EfficientNet"):
        effnet.efficientnet_cost("efficientnet_b9")
    with pytest.raises(ValueError, match="top must be one of"):
        effnet.efficientnet_cost("efficientnet_b0", top="dense")
    with pytest.raises(ValueError, match="image height"):
        effnet.efficientnet_cost("efficientnet_b0", (0, 224))
