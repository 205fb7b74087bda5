"""Tests of dlnotes.backbones.resnet.

* keras-layout models (resnet50/101/152) against keras.applications itself: the same layers by
  name and type, the same conv/BN settings but no conv bias, and identical C3-C5 after a weight
  copy that folds keras.applications' conv biases into the BatchNorms.
* torchvision-layout models (resnet18/34, ResNeXt, resnet_tiny) against a float64 NumPy
  re-implementation of torchvision's forward pass (symmetric padding, stride on the 3x3 conv,
  grouped 3x3, BN eps 1e-5), and against torchvision's published parameter counts.
* no backbone has a conv bias; parameter counts against torchvision, keras.applications (minus
  its conv biases) and keras-hub.
"""

import functools
import os

import _reference
import keras
import numpy as np
import pytest
import tensorflow as tf

from dlnotes.backbones import (
    IMAGENET_WEIGHTS,
    RESNETS,
    ImagePreprocessing,
    build_backbone,
    copy_weights_by_name,
    load_weights_file,
    output_strides,
    preprocess_for,
)

# ----------------------------------------------------------------------------- published figures
# torchvision num_params (with the 1000-class fc), from the model pages
# https://pytorch.org/vision/stable/models/generated/torchvision.models.<name>.html
TV_PUBLISHED = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
}
# keras.applications parameter counts with the top: keras.io/api/applications rounds them to
# 25.6M / 44.7M / 60.4M; the exact 25,636,712 / 44,707,176 / 60,419,944 are the Keras 2
# applications table, and `keras.applications.ResNetXX(weights=None).count_params()` gives them.
KERAS_PUBLISHED = {"resnet50": 25_636_712, "resnet101": 44_707_176, "resnet152": 60_419_944}
# keras-hub's ResNet-50 backbone (no conv bias): ResNetBackbone(stackwise_num_filters=[64, 128,
# 256, 512], stackwise_num_blocks=[3, 4, 6, 3], block_type="bottleneck_block").count_params(),
# as in benchmarks/README.md; BN statistics counted as in every Keras model.
KERAS_HUB_RESNET50 = 23_561_152


def fc_params(features):
    """The 1000-class classifier the published figures include: weights + biases."""
    return features * 1000 + 1000


def tv_trainable_params(block, blocks, base=64, groups=1, width_per_group=64):
    """torchvision's parameter count without fc, spelled out from torchvision.models.resnet.

    torch's ``parameters()`` holds conv kernels and BN weight/bias (2 per channel), not the BN
    running statistics; Keras counts those as non-trainable weights, so this equals the Keras
    *trainable* count. Stem: 7x7 conv 3->base, BN. Stage s has ``planes = base * 2**s``.
    BasicBlock: 3x3 in->planes, 3x3 planes->planes. Bottleneck: 1x1 in->width,
    3x3 width->width in ``groups`` groups (``9 * width * width / groups``), 1x1 width->4 planes,
    with ``width = int(planes * width_per_group / 64) * groups``. A 1x1 conv + BN shortcut
    wherever the stride is 2 or the channel count changes.
    """
    total = 3 * 49 * base + 2 * base
    inplanes = base
    for s, n in enumerate(blocks):
        planes = base * 2**s
        for i in range(n):
            stride = 2 if (s > 0 and i == 0) else 1
            if block == "basic":
                out = planes
                total += inplanes * 9 * planes + 2 * planes + planes * 9 * planes + 2 * planes
            else:
                out = 4 * planes
                width = int(planes * width_per_group / 64) * groups
                total += inplanes * width + 2 * width
                total += 9 * width * (width // groups) + 2 * width
                total += width * out + 2 * out
            if stride != 1 or inplanes != out:
                total += inplanes * out + 2 * out
            inplanes = out
    return total


def bn_channels(blocks, base=64):
    """BatchNorm channels of a bottleneck ResNet = conv biases of keras.applications' one.

    Every conv feeds one BN of its output width: stem ``base``; per block ``planes`` (1x1),
    ``planes`` (3x3), ``4 * planes`` (1x1), plus ``4 * planes`` for the first block's shortcut.
    """
    total = base
    for s, n in enumerate(blocks):
        planes = base * 2**s
        total += n * 6 * planes + 4 * planes
    return total


def test_reference_formula_reproduces_torchvision_published_counts():
    # The formula used for resnext101_32x4d (which torchvision does not publish) reproduces
    # every published torchvision figure it can express; so a bug in it would show here.
    assert tv_trainable_params("basic", (2, 2, 2, 2)) + fc_params(512) == TV_PUBLISHED["resnet18"]
    assert tv_trainable_params("basic", (3, 4, 6, 3)) + fc_params(512) == TV_PUBLISHED["resnet34"]
    r50 = tv_trainable_params("bottleneck", (3, 4, 6, 3))
    assert r50 + fc_params(2048) == TV_PUBLISHED["resnet50"]
    x50 = tv_trainable_params("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4)
    assert x50 + fc_params(2048) == TV_PUBLISHED["resnext50_32x4d"]
    x101_8 = tv_trainable_params("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8)
    assert x101_8 + fc_params(2048) == TV_PUBLISHED["resnext101_32x8d"]
    x101_64 = tv_trainable_params("bottleneck", (3, 4, 23, 3), groups=64, width_per_group=4)
    assert x101_64 + fc_params(2048) == TV_PUBLISHED["resnext101_64x4d"]


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def keras_layout_counts(name, blocks):
    """resnet50/101/152: keras.applications' layout without its conv biases.

    "total": keras.applications' include_top=False count (Keras counts the BN running stats)
    minus one bias per BN channel. "trainable": torchvision's formula (the stride placement,
    v1 or v1.5, does not change the count), 2 per BN channel fewer than "total".
    """
    return {
        "total": KERAS_PUBLISHED[name] - fc_params(2048) - bn_channels(blocks),
        "trainable": tv_trainable_params("bottleneck", blocks),
    }


# Expected (C3, C4, C5) channels and parameter counts of every named backbone.
#   "trainable": torchvision figure minus fc (torch counts no BN running stats),
#   "total": every Keras variable, BN running stats included.
EXPECTED = {
    "resnet_tiny": (
        (32, 64, 128),
        {"trainable": tv_trainable_params("basic", (1, 1, 1, 1), base=16)},
    ),
    "resnet18": (
        (128, 256, 512),
        {"trainable": TV_PUBLISHED["resnet18"] - fc_params(512)},  # 11,176,512
    ),
    "resnet34": (
        (128, 256, 512),
        {"trainable": TV_PUBLISHED["resnet34"] - fc_params(512)},  # 21,284,672
    ),
    "resnet50": ((512, 1024, 2048), keras_layout_counts("resnet50", (3, 4, 6, 3))),
    "resnet101": ((512, 1024, 2048), keras_layout_counts("resnet101", (3, 4, 23, 3))),
    "resnet152": ((512, 1024, 2048), keras_layout_counts("resnet152", (3, 8, 36, 3))),
    "resnext50_32x4d": (
        (512, 1024, 2048),
        {"trainable": TV_PUBLISHED["resnext50_32x4d"] - fc_params(2048)},  # 22,979,904
    ),
    # Not published by torchvision (it ships 32x8d and 64x4d): computed from the architecture
    # with the formula validated above, 42,128,704 (44,177,704 with fc; timm lists 44.2 M).
    "resnext101_32x4d": (
        (512, 1024, 2048),
        {
            "trainable": tv_trainable_params(
                "bottleneck", (3, 4, 23, 3), groups=32, width_per_group=4
            )
        },
    ),
}


def test_every_backbone_has_expectations():
    assert set(EXPECTED) == set(RESNETS)
    assert EXPECTED["resnext101_32x4d"][1]["trainable"] == 42_128_704
    assert bn_channels((3, 4, 6, 3)) == 26_560  # = keras.applications ResNet-50's conv biases
    for name, blocks in (
        ("resnet50", (3, 4, 6, 3)),
        ("resnet101", (3, 4, 23, 3)),
        ("resnet152", (3, 8, 36, 3)),
    ):
        # the two independent routes (keras.applications, torchvision) agree
        counts = EXPECTED[name][1]
        assert counts["total"] == counts["trainable"] + 2 * bn_channels(blocks), name
    r50 = EXPECTED["resnet50"][1]
    assert r50["total"] == KERAS_HUB_RESNET50 == 23_561_152
    assert r50["trainable"] == TV_PUBLISHED["resnet50"] - fc_params(2048) == 23_508_032
    assert EXPECTED["resnet101"][1]["total"] == 42_605_504
    assert EXPECTED["resnet152"][1]["total"] == 58_295_232


@functools.cache
def default_backbone(name):
    """Each named backbone built once per session (ResNet-152 takes seconds to build)."""
    return build_backbone(name)


@pytest.mark.parametrize("name", RESNETS)
def test_output_shapes_names_and_parameter_counts(name):
    model = default_backbone(name)
    channels, counts = EXPECTED[name]
    assert model.name == name
    assert model.output_names == ["C3", "C4", "C5"]
    assert output_strides(model) == (8, 16, 32)
    assert [t.shape[-1] for t in model.outputs] == list(channels)
    # Odd sizes: every stride-2 step rounds up, so C_l is ceil(size / 2**l).
    shapes = [tuple(s) for s in model.compute_output_shape((None, 65, 97, 3))]
    assert shapes == [
        (None, -(-65 // s), -(-97 // s), c) for s, c in zip((8, 16, 32), channels, strict=True)
    ]
    if "trainable" in counts:
        assert trainable_count(model) == counts["trainable"]
    if "total" in counts:
        assert model.count_params() == counts["total"]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and not any(conv.use_bias for conv in convs)
    assert all(len(conv.weights) == 1 for conv in convs)


def test_resnext_knobs_reproduce_torchvision_resnet50():
    # groups=1, width_per_group=64 is torchvision's ResNet-50 (v1.5, published 25,557,032).
    r50 = build_backbone("resnext50_32x4d", groups=1, width_per_group=64)
    assert trainable_count(r50) == TV_PUBLISHED["resnet50"] - fc_params(2048)
    assert r50.get_layer("conv3_block1_2_conv").strides == (2, 2)  # v1.5: stride on the 3x3


def test_grouped_conv_layout():
    model = build_backbone("resnext50_32x4d")
    conv = model.get_layer("conv2_block1_2_conv")  # first 3x3: 128 channels in 32 groups of 4
    assert conv.groups == 32 and conv.filters == 128 and conv.strides == (1, 1)
    assert tuple(conv.kernel.shape) == (3, 3, 4, 128)
    assert model.get_layer("conv2_block1_3_conv").filters == 256
    # torchvision puts the stride on the 3x3 conv, with symmetric padding
    assert model.get_layer("conv3_block1_1_conv").strides == (1, 1)
    assert model.get_layer("conv3_block1_2_conv").strides == (2, 2)
    assert model.get_layer("conv3_block1_2_pad").padding == ((1, 1), (1, 1))
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert not layer.use_bias, layer.name
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-5, layer.name


# ----------------------------------------------------------------------------- keras.applications
def randomize(model, seed, bias_std=0.1):
    """Random He-scaled kernels, biases and non-trivial BN statistics, so a copy is really
    tested."""
    return _reference.randomize(
        model, seed, spread=0.1, bias_spread=bias_std, kernel_gain=np.sqrt(2.0)
    )


def calibrate(model, x, seed):
    """BN statistics near those of ``x`` (then perturbed), so that activations stay O(1).

    Random statistics (``randomize``) do not normalise: after 16 blocks the features of an
    image are ~1e4 and a conv bias of ~1 would be invisible. One training-mode pass with
    momentum 0 sets every moving mean / variance to its batch statistics (the forward pass is
    normalised by those as it goes); a random shift and scale keep them non-trivial.
    """
    rng = np.random.default_rng(seed)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    model(x, training=True)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
        var = np.asarray(bn.moving_variance)
        bn.moving_mean.assign(bn.moving_mean + rng.normal(0, 0.2, var.shape) * np.sqrt(var))
        bn.moving_variance.assign(var * rng.uniform(0.7, 1.4, var.shape))
    return model


KERAS_OUTPUTS = {
    "resnet50": ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    "resnet101": ("conv3_block4_out", "conv4_block23_out", "conv5_block3_out"),
    "resnet152": ("conv3_block8_out", "conv4_block36_out", "conv5_block3_out"),
}


def assert_same_layers(ours, theirs):
    """Every keras.applications layer exists in ours with the same type and settings.

    The one difference: keras.applications' convs have a bias, ours do not.
    """
    mine = {layer.name: layer for layer in ours.layers}
    for layer in theirs.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        assert layer.name in mine, layer.name
        other = mine[layer.name]
        assert type(other) is type(layer), layer.name
        want_shapes = [tuple(w.shape) for w in layer.weights]
        if isinstance(layer, keras.layers.Conv2D):
            for attr in ("filters", "kernel_size", "strides", "padding", "groups"):
                assert getattr(other, attr) == getattr(layer, attr), (layer.name, attr)
            assert layer.use_bias and not other.use_bias, layer.name
            want_shapes = want_shapes[:1]  # the kernel only
        if isinstance(layer, keras.layers.BatchNormalization):
            assert other.epsilon == layer.epsilon == 1.001e-5, layer.name
        if isinstance(layer, keras.layers.ZeroPadding2D):
            assert other.padding == layer.padding, layer.name
        if isinstance(layer, keras.layers.MaxPooling2D):
            assert (other.pool_size, other.strides) == (layer.pool_size, layer.strides)
        assert [tuple(w.shape) for w in other.weights] == want_shapes, layer.name
    # ours adds only the input and the three output identities
    extra = set(mine) - {layer.name for layer in theirs.layers}
    assert extra == {"images", "C3", "C4", "C5"}


def conv_bias_count(model):
    return sum(
        int(np.prod(layer.bias.shape))
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias
    )


def keras_features(app, name):
    return keras.Model(app.input, [app.get_layer(n).output for n in KERAS_OUTPUTS[name]])


def assert_features_equal(got, want):
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize(
    "name, constructor, blocks, last_block",
    [
        ("resnet101", keras.applications.ResNet101, (3, 4, 23, 3), "conv4_block23_3"),
        ("resnet152", keras.applications.ResNet152, (3, 8, 36, 3), "conv4_block36_3"),
    ],
)
def test_resnet101_152_are_keras_applications_layer_for_layer(
    name, constructor, blocks, last_block
):
    # Same block code as ResNet-50 (tested with a forward pass below), so the structure and a
    # strict weight copy are enough here; a forward pass would only cost CPU time.
    app = randomize(constructor(include_top=False, weights=None), seed=9)
    ours = default_backbone(name)
    assert_same_layers(ours, app)
    assert copy_weights_by_name(app, ours) == sum(1 for layer in app.layers if layer.weights)
    assert conv_bias_count(app) == bn_channels(blocks)
    assert ours.count_params() == app.count_params() - bn_channels(blocks)
    conv, bn = app.get_layer(last_block + "_conv"), app.get_layer(last_block + "_bn")
    np.testing.assert_array_equal(ours.get_layer(last_block + "_conv").kernel, conv.kernel)
    np.testing.assert_allclose(
        ours.get_layer(last_block + "_bn").moving_mean,
        np.asarray(bn.moving_mean, np.float64) - np.asarray(conv.bias, np.float64),
        rtol=1e-6,
        atol=1e-7,
    )


def test_weights_copied_from_keras_applications_give_identical_features():
    name, size = "resnet50", 64
    app = randomize(
        keras.applications.ResNet50(include_top=False, weights=None, input_shape=(size, size, 3)),
        seed=1,
        bias_std=0.5,
    )
    # a caffe-preprocessed image has values of about +-128
    x = np.random.default_rng(0).uniform(-120, 130, (2, size, size, 3)).astype("float32")
    calibrate(app, x, seed=2)
    ours = build_backbone(name, input_shape=(size, size, 3))
    assert_same_layers(ours, app)
    n_copied = copy_weights_by_name(app, ours)
    assert n_copied == sum(1 for layer in app.layers if layer.weights)
    assert ours.count_params() == app.count_params() - conv_bias_count(app)
    assert conv_bias_count(app) == bn_channels((3, 4, 6, 3)) == 26_560
    want = keras_features(app, name)(x, training=False)
    got = ours(x, training=False)
    assert_features_equal(got, want)
    # The folding matters: with the biases dropped (BN means as in keras.applications) the
    # features are far off. And the copy is real: a fresh model gives different features.
    for layer in app.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            ours.get_layer(layer.name).moving_mean.assign(layer.moving_mean)
    unfolded = ours(x, training=False)
    for u, w in zip(unfolded, want, strict=True):
        w = np.asarray(w)
        assert np.abs(np.asarray(u) - w).max() > 0.05 * np.abs(w).max()
    fresh = build_backbone(name, input_shape=(size, size, 3))(x, training=False)
    assert not np.allclose(np.asarray(fresh[2]), np.asarray(want[2]), atol=1e-3)


def test_imagenet_weights_are_copied_from_keras_applications(monkeypatch):
    # Stand-in for the download: the same constructor with random weights; build_backbone must
    # ask for imagenet weights without a top and copy every layer.
    calls = []
    real = keras.applications.ResNet50

    def fake_resnet50(**kwargs):
        calls.append(kwargs)
        kwargs = {**kwargs, "weights": None}
        calls.append(randomize(real(**kwargs), seed=3))
        return calls[-1]

    monkeypatch.setattr(keras.applications, "ResNet50", fake_resnet50)
    ours = build_backbone("resnet50", input_shape=(64, 64, 3), weights="imagenet")
    assert calls[0]["weights"] == "imagenet" and calls[0]["include_top"] is False
    x = np.random.default_rng(1).uniform(-120, 130, (1, 64, 64, 3)).astype("float32")
    assert_features_equal(ours(x), keras_features(calls[1], "resnet50")(x))


def test_copy_weights_by_name_errors_and_non_strict():
    a = build_backbone("resnet_tiny")
    b = build_backbone("resnet_tiny", blocks=(2, 1, 1, 1))
    with pytest.raises(ValueError, match="conv2_block2_1_conv"):
        copy_weights_by_name(a, b)  # b has layers a lacks
    randomize(b, seed=5)
    assert copy_weights_by_name(b, a, strict=False) == sum(1 for x in a.layers if x.weights)
    np.testing.assert_array_equal(
        a.get_layer("conv5_block1_2_conv").kernel, b.get_layer("conv5_block1_2_conv").kernel
    )
    c = build_backbone("resnet_tiny", base_filters=8)
    before = c.get_layer("conv1_conv").get_weights()[0].copy()
    with pytest.raises(ValueError, match="weight shapes"):
        copy_weights_by_name(a, c)
    np.testing.assert_array_equal(c.get_layer("conv1_conv").get_weights()[0], before)


def conv_bn_model(use_bias, conv_name="a_conv", bn_name="a_bn", relu_between=False, bn_axis=-1):
    """(4, 4, 3) -> 3x3 conv, 4 filters -> [ReLU] -> BatchNorm over ``bn_axis``."""
    x = keras.Input((4, 4, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=use_bias, name=conv_name)(x)
    if relu_between:
        y = keras.layers.ReLU()(y)
    y = keras.layers.BatchNormalization(axis=bn_axis, epsilon=1e-3, name=bn_name)(y)
    return keras.Model(x, y)


def test_conv_bias_folding_is_exact_and_found_without_the_naming_convention():
    # "stem" -> "norm" does not follow keras.applications' naming: found through the graph.
    src = randomize(conv_bn_model(True, "stem", "norm"), seed=20, bias_std=1.0)
    dst = conv_bn_model(False, "stem", "norm")
    assert copy_weights_by_name(src, dst) == 2
    bias = np.asarray(src.get_layer("stem").bias, np.float64)
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in src.get_layer("norm").weights)
    np.testing.assert_allclose(dst.get_layer("norm").moving_mean, mean - bias, rtol=1e-6)
    np.testing.assert_array_equal(dst.get_layer("norm").moving_variance, var.astype("float32"))
    np.testing.assert_array_equal(dst.get_layer("norm").gamma, gamma.astype("float32"))
    np.testing.assert_array_equal(dst.get_layer("norm").beta, beta.astype("float32"))
    x = np.random.default_rng(9).normal(0, 1, (3, 4, 4, 3))
    # float64 reference of the biased model, written out: BN(conv(x) + b)
    kernel = np.asarray(src.get_layer("stem").kernel, np.float64)
    want = (np_conv(x, kernel, 1, 1) + bias - mean) / np.sqrt(var + 1e-3) * gamma + beta
    assert np.abs(bias).max() / np.sqrt(var).min() > 0.5  # the bias is not negligible
    np.testing.assert_allclose(dst(x.astype("float32"), training=False), want, atol=1e-4)
    # in training mode the batch mean absorbs the bias
    np.testing.assert_allclose(
        dst(x.astype("float32"), training=True), src(x.astype("float32"), training=True), atol=1e-4
    )


@pytest.mark.parametrize("case", ["relu_between", "wrong_axis"])
def test_a_conv_bias_that_cannot_be_folded_is_an_error(case):
    # A ReLU between conv and BN, or a BN over a spatial axis (4 = the channel count): folding
    # the bias would not be exact.
    kwargs = {"relu_between": True} if case == "relu_between" else {"bn_axis": 1}
    src = randomize(conv_bn_model(True, **kwargs), seed=21)
    dst = conv_bn_model(False, **kwargs)
    before = np.asarray(dst.get_layer("a_conv").kernel).copy()
    with pytest.raises(ValueError, match=r"'a_conv' has a bias .* to fold the bias into"):
        copy_weights_by_name(src, dst)
    np.testing.assert_array_equal(dst.get_layer("a_conv").kernel, before)  # nothing copied
    np.testing.assert_array_equal(dst.get_layer("a_bn").moving_mean, 0.0)
    with pytest.warns(UserWarning, match="left unchanged"):
        assert copy_weights_by_name(src, dst, strict=False) == 1  # the BN only
    np.testing.assert_array_equal(dst.get_layer("a_conv").kernel, before)
    np.testing.assert_array_equal(
        dst.get_layer("a_bn").moving_mean, src.get_layer("a_bn").moving_mean
    )
    # a bias in the target but not in the source is a plain shape mismatch
    with pytest.raises(ValueError, match="weight shapes"):
        copy_weights_by_name(dst, src)


def with_conv_biases(model):
    """The same backbone with a bias on every conv: dlnotes' resnet50/101/152 before."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D):
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def test_weights_file_saved_with_conv_biases_gets_a_clear_error(tmp_path):
    knobs = {"base_filters": 8, "blocks": (1, 1, 1, 1)}
    new = build_backbone("resnet50", **knobs)
    old = randomize(with_conv_biases(new), seed=14, bias_std=0.5)
    n_convs = sum(isinstance(layer, keras.layers.Conv2D) for layer in new.layers)
    assert len(old.weights) == len(new.weights) + n_convs
    path = tmp_path / "old.weights.h5"
    old.save_weights(path)
    with pytest.raises(ValueError, match="saved from a backbone with conv biases") as err:
        build_backbone("resnet50", weights=path, **knobs)
    assert "rebuilt with use_bias=True" in str(err.value)
    # for the published architectures the message names the keras.applications model that
    # loads such a file (checked by hand on a full-size resnet50 file: too big for a test)
    with pytest.raises(ValueError, match=r"keras\.applications\.ResNet50\(include_top=False"):
        load_weights_file(new, os.fspath(path), keras_app="ResNet50")
    # the way out the message gives: load into a biased model, copy (folding the biases)
    biased = with_conv_biases(new)
    biased.load_weights(path)
    assert copy_weights_by_name(biased, new) == sum(1 for layer in new.layers if layer.weights)
    x = np.random.default_rng(15).normal(0, 1, (2, 32, 32, 3)).astype("float32")
    assert_features_equal(new(x, training=False), old(x, training=False))


# ----------------------------------------------------------------------------- torchvision semantics
def np_conv(x, kernel, stride, pad, groups=1):
    """float64 NHWC convolution with torch semantics: symmetric zero padding ``pad``."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, cin_g, cout = kernel.shape
    b, h, w, _ = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((b, ho, wo, cout))
    k = kernel.reshape(kh, kw, cin_g, groups, cout // groups)
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ]
            patch = patch.reshape(b, ho, wo, groups, cin_g)
            out += np.einsum("bhwgc,cgo->bhwgo", patch, k[i, j]).reshape(b, ho, wo, cout)
    return out


def np_maxpool_3x3_s2_p1(x):
    """torch.nn.MaxPool2d(3, 2, padding=1): padding with -inf."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    h, w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    windows = [
        x[:, i : i + 2 * (h - 1) + 1 : 2, j : j + 2 * (w - 1) + 1 : 2]
        for i in range(3)
        for j in range(3)
    ]
    return np.max(windows, axis=0)


def torchvision_reference(model, x, block, blocks, groups=1, width_per_group=64):
    """float64 forward pass of torchvision's ResNet (eval mode), reading weights by layer name.

    Architecture facts encoded here, independent of dlnotes: stem conv 7x7/2 pad 3, maxpool
    3x3/2 pad 1; stride 2 on the first block of stages 2-4, on the first 3x3 conv of a basic
    block and on the (grouped) 3x3 conv of a bottleneck; every kxk conv pads k//2 on each side;
    BN eps 1e-5; no conv bias.
    """

    def weights(name):
        values = [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]
        assert len(values) == (1 if name.endswith("_conv") else 4), name  # no conv bias
        return values

    def conv(t, name, stride=1, groups=1):
        (k,) = weights(name)
        return np_conv(t, k, stride, k.shape[0] // 2, groups)

    def bn(t, name):
        g, b, m, v = weights(name)
        return (t - m) / np.sqrt(v + 1e-5) * g + b

    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    t = relu(bn(conv(x, "conv1_conv", 2), "conv1_bn"))
    t = np_maxpool_3x3_s2_p1(t)
    feats = []
    for s, n in enumerate(blocks):
        for i in range(n):
            p = f"conv{s + 2}_block{i + 1}"
            stride = 2 if (s > 0 and i == 0) else 1
            has_shortcut_conv = p + "_0_conv" in [layer.name for layer in model.layers]
            short = bn(conv(t, p + "_0_conv", stride), p + "_0_bn") if has_shortcut_conv else t
            if block == "basic":
                y = relu(bn(conv(t, p + "_1_conv", stride), p + "_1_bn"))
                y = bn(conv(y, p + "_2_conv"), p + "_2_bn")
            else:
                y = relu(bn(conv(t, p + "_1_conv"), p + "_1_bn"))
                y = relu(bn(conv(y, p + "_2_conv", stride, groups), p + "_2_bn"))
                y = bn(conv(y, p + "_3_conv"), p + "_3_bn")
            assert short.shape == y.shape, p
            t = relu(short + y)
        if s >= 1:
            feats.append(t)
    return feats


@pytest.mark.parametrize(
    "name, knobs, block, blocks, groups",
    [
        ("resnet_tiny", {}, "basic", (1, 1, 1, 1), 1),
        ("resnet18", {"base_filters": 8, "blocks": (2, 1, 1, 1)}, "basic", (2, 1, 1, 1), 1),
        (
            "resnext50_32x4d",
            {"base_filters": 16, "blocks": (1, 2, 1, 1)},
            "bottleneck",
            (1, 2, 1, 1),
            32,
        ),
    ],
)
@pytest.mark.parametrize("size", [(32, 32), (37, 29)])
def test_torchvision_layout_matches_numpy_reference(name, knobs, block, blocks, groups, size):
    # Even sizes are where Keras "same" (pads bottom/right only at stride 2) and torch differ.
    model = randomize(build_backbone(name, **knobs), seed=7)
    x = np.random.default_rng(2).normal(0, 1, (2, *size, 3))
    got = model(x.astype("float32"), training=False)
    want = torchvision_reference(model, x, block, blocks, groups)
    assert_features_equal(got, want)


# ----------------------------------------------------------------------------- knobs
def test_knobs_shrink_the_model():
    full = default_backbone("resnet50")
    shallow = build_backbone("resnet50", blocks=(1, 1, 1, 1))
    narrow = build_backbone("resnet50", base_filters=16)
    assert shallow.count_params() < full.count_params()
    assert narrow.count_params() < full.count_params() / 10
    names = {layer.name for layer in shallow.layers}
    assert "conv4_block1_3_conv" in names and "conv4_block2_1_conv" not in names
    assert [t.shape[-1] for t in narrow.outputs] == [128, 256, 512]
    tiny = build_backbone("resnet_tiny")
    assert trainable_count(tiny) < trainable_count(default_backbone("resnet18")) / 30
    small_x = build_backbone("resnext50_32x4d", base_filters=16, blocks=(1, 1, 1, 1), groups=8)
    assert small_x.get_layer("conv2_block1_2_conv").groups == 8
    assert small_x.get_layer("conv2_block1_2_conv").filters == 8  # int(16 * 4 / 64) * 8


def test_levels_knob_adds_c2_for_faster_rcnn_fpn():
    model = build_backbone("resnet_tiny", (96, 64, 3), levels=(2, 3, 4, 5))
    assert model.output_names == ["C2", "C3", "C4", "C5"]
    assert output_strides(model) == (4, 8, 16, 32)
    assert [tuple(t.shape[1:]) for t in model.outputs][0] == (24, 16, 16)
    c2 = keras.Model(model.inputs, model.get_layer("conv2_block1_out").output)  # end of conv2
    x = np.random.default_rng(0).uniform(-1, 1, (1, 96, 64, 3)).astype("float32")
    np.testing.assert_array_equal(model(x)[0], c2(x))
    only_c4 = build_backbone("resnet_tiny", levels=(4,))
    assert only_c4.output_names == ["C4"] and only_c4.count_params() < model.count_params()


def test_runs_on_real_images_with_strides():
    model = build_backbone("resnet_tiny")
    x = np.random.default_rng(3).uniform(0, 255, (2, 96, 64, 3)).astype("float32")
    feats = model(preprocess_for("resnet_tiny")(x))
    assert [tuple(f.shape) for f in feats] == [(2, 12, 8, 32), (2, 6, 4, 64), (2, 3, 2, 128)]
    assert all(np.isfinite(np.asarray(f)).all() for f in feats)


def test_xla_compiled_training_step_matches_eager():
    # One compiled function with what a train step needs: the features (BN in training mode),
    # a loss and the gradients of every trainable variable. ResNeXt: grouped convs, which Keras
    # itself routes through XLA on CPU.
    model = randomize(build_backbone("resnext50_32x4d", base_filters=16, blocks=(1,) * 4), 11)
    x = tf.constant(np.random.default_rng(4).normal(0, 1, (2, 32, 40, 3)), tf.float32)

    def step(images):
        with tf.GradientTape() as tape:
            feats = model(images, training=True)
            loss = tf.add_n([tf.reduce_mean(tf.square(f)) for f in feats])
        return feats, loss, tape.gradient(loss, model.trainable_variables)

    feats, loss, grads = step(x)
    feats_xla, loss_xla, grads_xla = tf.function(step, jit_compile=True)(x)
    assert_features_equal(feats_xla, feats)
    np.testing.assert_allclose(loss_xla, loss, rtol=1e-4)
    assert len(grads) == len(model.trainable_variables)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in grads)
    for g, g_xla, v in zip(grads, grads_xla, model.trainable_variables, strict=True):
        np.testing.assert_allclose(g_xla, g, rtol=1e-3, atol=1e-4 * scale, err_msg=v.path)
    assert np.abs(np.asarray(grads[0])).max() > 0  # the stem kernel learns


def test_xla_compiled_inference_matches_eager_keras_layout():
    model = randomize(build_backbone("resnet50", base_filters=8, blocks=(1, 2, 1, 1)), seed=12)
    x = tf.constant(np.random.default_rng(8).normal(0, 1, (2, 48, 32, 3)), tf.float32)
    got = tf.function(lambda t: model(t, training=False), jit_compile=True)(x)
    assert_features_equal(got, model(x, training=False))


# ----------------------------------------------------------------------------- saving
def test_save_and_load_keras_file_and_weights_file(tmp_path):
    model = randomize(
        build_backbone("resnext50_32x4d", base_filters=16, blocks=(1, 1, 1, 1)), seed=13
    )
    x = np.random.default_rng(5).normal(0, 1, (1, 40, 40, 3)).astype("float32")
    want = model(x)
    path = os.fspath(tmp_path / "bb.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.output_names == ["C3", "C4", "C5"] and output_strides(loaded) == (8, 16, 32)
    assert_features_equal(loaded(x), want)

    weights = tmp_path / "bb.weights.h5"
    model.save_weights(weights)
    again = build_backbone("resnext50_32x4d", weights=weights, base_filters=16, blocks=(1,) * 4)
    assert_features_equal(again(x), want)
    with pytest.raises(ValueError, match="variables"):
        build_backbone("resnext50_32x4d", weights=weights, base_filters=16)
    with pytest.raises(ValueError, match="could not load"):
        build_backbone("resnext50_32x4d", weights=weights, base_filters=32, blocks=(1,) * 4)


def test_preprocessing_layer_inside_a_saved_model(tmp_path):
    images = keras.Input((None, None, 3))
    backbone = build_backbone("resnet_tiny")
    model = keras.Model(images, backbone(preprocess_for("resnet_tiny")(images)))
    x = np.random.default_rng(6).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    path = os.fspath(tmp_path / "m.keras")
    model.save(path)
    assert_features_equal(keras.saving.load_model(path)(x), model(x))


# ----------------------------------------------------------------------------- preprocessing
def test_preprocessing_matches_keras_applications():
    x = np.random.default_rng(7).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    caffe = preprocess_for("resnet50", "imagenet")
    assert caffe.mode == "caffe"
    np.testing.assert_allclose(
        caffe(x), keras.applications.resnet.preprocess_input(x.copy()), atol=1e-4
    )
    torch_style = preprocess_for("resnext50_32x4d")
    assert torch_style.mode == "torch"
    want = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode="torch")
    np.testing.assert_allclose(torch_style(x), want, atol=1e-5)
    # hand-made pixel: pure red
    red = np.array([[[[255.0, 0.0, 0.0]]]], np.float32)
    np.testing.assert_allclose(caffe(red)[0, 0, 0], [-103.939, -116.779, 255 - 123.68], atol=1e-4)
    np.testing.assert_allclose(
        torch_style(red)[0, 0, 0],
        [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225],
        rtol=1e-5,
    )


def test_preprocessing_mode_per_family():
    for name in RESNETS:
        expected = "caffe" if name in IMAGENET_WEIGHTS else "torch"
        assert preprocess_for(name).mode == expected
    # a checkpoint fine-tuned from ImageNet keeps the caffe convention
    assert ImagePreprocessing.from_config(preprocess_for("resnet101").get_config()).mode == "caffe"


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "resnet19"}, ValueError, "Unknown backbone 'resnet19'"),
        ({"name": "resnet18", "weights": "imagenet"}, ValueError, "no ImageNet weights"),
        ({"name": "resnext50_32x4d", "weights": "imagenet"}, ValueError, "no ImageNet weights"),
        (
            {"name": "resnet50", "weights": "imagenet", "blocks": (1, 1, 1, 1)},
            ValueError,
            "published",
        ),
        ({"name": "resnet50", "weights": "coco"}, ValueError, "weights.h5"),
        ({"name": "resnet50", "weights": "missing.weights.h5"}, FileNotFoundError, "missing"),
        ({"name": "resnet50", "weights": 3}, ValueError, "weights must be"),
        ({"name": "resnet18", "groups": 32}, ValueError, "only applies to the ResNeXt"),
        ({"name": "resnet50", "width_per_group": 8}, ValueError, "only applies to the ResNeXt"),
        ({"name": "resnet18", "blocks": (2, 2, 2)}, ValueError, "blocks must be 4"),
        ({"name": "resnet18", "blocks": (2, 0, 2, 2)}, ValueError, "positive int"),
        ({"name": "resnet18", "base_filters": 0}, ValueError, "base_filters"),
        ({"name": "resnext50_32x4d", "base_filters": 8}, ValueError, "0 channels per group"),
        ({"name": "resnet18", "levels": (1, 2)}, ValueError, "levels must be"),
        ({"name": "resnet18", "levels": (4, 3)}, ValueError, "levels must be"),
        ({"name": "resnet18", "levels": ()}, ValueError, "levels must be"),
        ({"name": "resnet18", "input_shape": (64, 64)}, ValueError, "input_shape"),
        ({"name": "resnet18", "input_shape": (64, -1, 3)}, ValueError, "input_shape"),
        (
            {"name": "resnet50", "weights": "imagenet", "input_shape": (None, None, 1)},
            ValueError,
            "3 input channels",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_backbone(**kwargs)


def test_bad_preprocessing_and_weight_files(tmp_path):
    with pytest.raises(ValueError, match="no ImageNet weights"):
        preprocess_for("resnet34", "imagenet")
    with pytest.raises(ValueError, match="Unknown backbone"):
        preprocess_for("alexnet")
    with pytest.raises(ValueError, match="mode must be one of"):
        ImagePreprocessing("tf")
    with pytest.raises(ValueError, match=r"needs RGB images"):
        ImagePreprocessing("caffe")(np.zeros((1, 4, 4, 1), np.float32))
    bogus = tmp_path / "bogus.weights.h5"
    bogus.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        build_backbone("resnet_tiny", weights=bogus)
    with pytest.raises(ValueError, match="not named C<level>"):
        output_strides(keras.applications.ResNet50(include_top=False, weights=None))
