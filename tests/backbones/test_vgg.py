"""Tests of dlnotes.backbones.vgg (the VGG16 trunk of Faster R-CNN).

* against keras.applications itself: the parameter count (14,714,688), the same layers (names,
  settings, initialisers) and identical features after a copy by layer name, at an odd size;
  the ImageNet path (the download replaced by random weights);
* the level mapping (C4 = block5_conv3 at stride 16, pool5 left out), floor rounding of odd
  sizes, freezing blocks 1-2, saving, XLA, the registry and preprocessing, errors.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import randomize

from dlnotes.backbones import (
    BACKBONES,
    VGG16_BLOCKS,
    VGG16_LEVEL_LAYERS,
    ImagePreprocessing,
    build_backbone,
    build_vgg16,
    copy_weights_by_name,
    output_strides,
    preprocess_for,
    vgg,
)

VGG16_PARAMS = 14_714_688  # keras.applications.VGG16(include_top=False).count_params()
BLOCK_PARAMS = (38_720, 221_440, 1_475_328, 5_899_776, 7_079_424)
CHANNELS = {1: 128, 2: 256, 3: 512, 4: 512, 5: 512}


def vgg_params(base=64, channels=3, blocks=5):
    """Parameters of the first ``blocks`` blocks spelled out: 9 * in * out + out per conv."""
    total, cin = 0, channels
    for b in range(blocks):
        cout = base * (1, 2, 4, 8, 8)[b]
        for _ in range(VGG16_BLOCKS[b]):
            total += 9 * cin * cout + cout
            cin = cout
    return total


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def caffe_images(shape, seed):
    """Values of a caffe-preprocessed image (BGR minus the mean: about +-128)."""
    return np.random.default_rng(seed).uniform(-120, 130, shape).astype("float32")


def he_randomize(model, seed):
    """He-scaled kernels (activations stay O(100) through 13 ReLU convs) and biases of a size
    that matters, so that a wrong or missing copy shows."""
    return randomize(model, seed, bias_spread=10.0, kernel_gain=np.sqrt(2.0))


def assert_features_equal(got, want):
    for g, w in zip(keras.tree.flatten(got), keras.tree.flatten(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))


def keras_features(app, names):
    return keras.Model(app.input, [app.get_layer(n).output for n in names])


# ----------------------------------------------------------------------------- parameter counts
def test_parameter_counts_equal_keras_applications():
    app = keras.applications.VGG16(include_top=False, weights=None)
    trunk = build_vgg16()
    assert trunk.count_params() == VGG16_PARAMS == app.count_params() == vgg_params()
    assert sum(BLOCK_PARAMS) == VGG16_PARAMS
    assert [vgg_params(blocks=b + 1) - vgg_params(blocks=b) for b in range(5)] == list(BLOCK_PARAMS)
    convs = [layer for layer in trunk.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 13 == sum(VGG16_BLOCKS)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trunk.layers)
    # only the blocks up to the last level are built; pool5 and C5 add no parameters
    assert build_vgg16(levels=(3,)).count_params() == VGG16_PARAMS - BLOCK_PARAMS[4] == 7_635_264
    assert build_vgg16(levels=(3, 4, 5)).count_params() == VGG16_PARAMS
    assert build_vgg16(base_filters=16).count_params() == vgg_params(16) == 920_784
    assert build_vgg16((None, None, 1)).count_params() == VGG16_PARAMS - 2 * 9 * 64


def test_layer_for_layer_keras_applications():
    app = keras.applications.VGG16(include_top=False, weights=None)
    full = build_vgg16(levels=(5,))  # keras.applications' include_top=False network
    mine = {layer.name: layer for layer in full.layers}
    for layer in app.layers[1:]:
        other = mine[layer.name]
        assert type(other) is type(layer), layer.name
        assert [w.shape for w in other.weights] == [w.shape for w in layer.weights], layer.name
        if isinstance(layer, keras.layers.Conv2D):
            for attr in ("filters", "kernel_size", "strides", "padding", "use_bias", "activation"):
                assert getattr(other, attr) == getattr(layer, attr), (layer.name, attr)
            for attr in ("kernel_initializer", "bias_initializer"):
                assert getattr(other, attr).get_config() == getattr(layer, attr).get_config()
        else:
            for attr in ("pool_size", "strides", "padding"):
                assert getattr(other, attr) == getattr(layer, attr), (layer.name, attr)
    assert set(mine) - {layer.name for layer in app.layers} == {"images", "C5"}
    conv = full.get_layer("block1_conv1")
    assert conv.activation is keras.activations.relu and conv.padding == "same"
    assert type(conv.kernel_initializer) is keras.initializers.GlorotUniform
    assert type(conv.bias_initializer) is keras.initializers.Zeros
    # the Faster R-CNN trunk: no pool5, C4 is block5_conv3 itself
    trunk = build_vgg16()
    names = [layer.name for layer in trunk.layers]
    assert "block5_pool" not in names and names[-2:] == ["block5_conv3", "C4"]
    assert [f"block{b}_pool" in names for b in range(1, 5)] == [True] * 4


# ----------------------------------------------------------------------------- keras.applications
def test_weights_copied_from_keras_applications_give_identical_features():
    size = (67, 90)  # odd: every pool rounds down, in both models
    app = he_randomize(
        keras.applications.VGG16(include_top=False, weights=None, input_shape=(*size, 3)), seed=1
    )
    x = caffe_images((2, *size, 3), seed=0)
    names = [VGG16_LEVEL_LAYERS[level] for level in (3, 4, 5)]
    want = keras_features(app, names)(x)
    ours = build_vgg16(levels=(3, 4, 5))  # input size None
    fresh = [np.asarray(f) for f in ours(x)]
    assert copy_weights_by_name(app, ours) == 13  # strict: the same 13 convs on both sides
    got = ours(x)
    assert [tuple(g.shape) for g in got] == [(2, 8, 11, 512), (2, 4, 5, 512), (2, 2, 2, 512)]
    assert all(np.asarray(w).std() > 1.0 for w in want)  # features, not dead ReLUs
    assert_features_equal(got, want)
    assert not np.allclose(fresh[1], np.asarray(want[1]), atol=1e-2)  # the copy changed them
    # the default trunk gives block5_conv3 alone
    trunk = build_vgg16()
    copy_weights_by_name(app, trunk)
    assert_features_equal(trunk(x), keras_features(app, ["block5_conv3"])(x))


@pytest.mark.parametrize("levels", [None, (2, 3)])
def test_imagenet_weights_are_copied_from_keras_applications(monkeypatch, levels):
    # Stand-in for the download: the same constructor with random weights; the trunk must ask
    # for imagenet weights without a top and copy every conv it builds.
    calls = []
    real = keras.applications.VGG16

    def fake_vgg16(**kwargs):
        calls.append(kwargs)
        calls.append(he_randomize(real(**{**kwargs, "weights": None}), seed=3))
        return calls[-1]

    monkeypatch.setattr(keras.applications, "VGG16", fake_vgg16)
    ours = build_backbone("vgg16", input_shape=(48, 64, 3), weights="imagenet", levels=levels)
    assert calls[0]["weights"] == "imagenet" and calls[0]["include_top"] is False
    x = caffe_images((1, 48, 64, 3), seed=4)
    names = [VGG16_LEVEL_LAYERS[level] for level in levels or (4,)]
    assert_features_equal(ours(x), keras_features(calls[1], names)(x))


def test_copy_from_keras_applications_errors_name_the_mismatch():
    narrow = build_vgg16(base_filters=8)
    with pytest.raises(ValueError, match="'block1_conv1' has weight shapes"):
        vgg._copy_from_keras_applications(build_vgg16(levels=(5,)), narrow)
    with pytest.raises(ValueError, match=r"missing in the source \['block4_conv1'"):
        vgg._copy_from_keras_applications(build_vgg16(levels=(2,)), narrow)


# ----------------------------------------------------------------------------- levels and sizes
def test_levels_strides_and_floor_rounding_of_odd_sizes():
    trunk = build_backbone("vgg16")
    assert trunk.output_names == ["C4"] and output_strides(trunk) == (16,)
    assert tuple(trunk.outputs[0].shape) == (None, None, None, 512)
    every = build_vgg16(levels=(1, 2, 3, 4, 5))
    assert every.output_names == ["C1", "C2", "C3", "C4", "C5"]
    assert output_strides(every) == (2, 4, 8, 16, 32)
    for level, layer in VGG16_LEVEL_LAYERS.items():
        producer = every.get_layer(f"C{level}").input._keras_history.operation
        assert producer.name == layer
    # a 2x2 "valid" pool floors: 100x150 -> C4 6x9 (6.25, 9.375), C5 3x4
    shapes = [tuple(s) for s in every.compute_output_shape((None, 100, 150, 3))]
    assert shapes == [
        (None, 100 // 2**level, 150 // 2**level, CHANNELS[level]) for level in range(1, 6)
    ]
    assert shapes[3] == (None, 6, 9, 512)
    small = build_vgg16(levels=(3, 4), base_filters=4)
    got = small(caffe_images((2, 33, 47, 3), seed=5))
    assert [tuple(g.shape) for g in got] == [(2, 4, 5, 32), (2, 2, 2, 32)]
    # the smallest static size: one C4 cell
    assert tuple(build_vgg16((16, 31, 3)).outputs[0].shape) == (None, 1, 1, 512)


# ----------------------------------------------------------------------------- freezing
def test_frozen_blocks_fix_conv1_and_conv2():
    frozen = build_backbone("vgg16", frozen_blocks=2)
    assert frozen.count_params() == VGG16_PARAMS
    assert trainable_count(frozen) == VGG16_PARAMS - 38_720 - 221_440 == 14_454_528
    convs = [layer for layer in frozen.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.name for layer in convs if not layer.trainable] == [
        "block1_conv1",
        "block1_conv2",
        "block2_conv1",
        "block2_conv2",
    ]
    assert trainable_count(build_vgg16()) == VGG16_PARAMS  # default: every conv trains
    assert trainable_count(build_vgg16(frozen_blocks=5)) == 0
    assert trainable_count(build_vgg16(levels=(2,), frozen_blocks=3)) == 0

    # a train step leaves the frozen convs unchanged and moves the others
    small = randomize(build_vgg16(levels=(3,), base_filters=4, frozen_blocks=2), seed=6)
    before = {w.path: np.asarray(w).copy() for w in small.weights}
    x = caffe_images((2, 32, 32, 3), seed=7)
    optimizer = keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(small(x, training=True)))
    optimizer.apply(tape.gradient(loss, small.trainable_weights), small.trainable_weights)
    for w in small.weights:
        unchanged = np.array_equal(np.asarray(w), before[w.path])
        assert unchanged == w.path.startswith(("block1_", "block2_")), w.path


# ----------------------------------------------------------------------------- saving and XLA
def test_save_and_load_keras_file_and_weights_file(tmp_path):
    model = he_randomize(build_vgg16(levels=(3, 4, 5), base_filters=8, frozen_blocks=2), seed=8)
    x = caffe_images((1, 40, 56, 3), seed=9)
    want = model(x)
    path = os.fspath(tmp_path / "vgg.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.output_names == ["C3", "C4", "C5"] and output_strides(loaded) == (8, 16, 32)
    assert trainable_count(loaded) == trainable_count(model) == vgg_params(8) - vgg_params(8, 3, 2)
    assert_features_equal(loaded(x), want)

    weights = tmp_path / "vgg.weights.h5"
    model.save_weights(weights)
    again = build_backbone("vgg16", weights=weights, levels=(3, 4, 5), base_filters=8)
    assert_features_equal(again(x), want)
    with pytest.raises(ValueError, match="variables"):
        build_backbone("vgg16", weights=weights, levels=(3,), base_filters=8)
    with pytest.raises(ValueError, match="base_filters=16"):
        build_backbone("vgg16", weights=weights, levels=(3, 4, 5), base_filters=16)


def test_xla_inference_matches_eager():
    model = he_randomize(build_vgg16(levels=(3, 4), base_filters=8), seed=10)
    x = tf.constant(caffe_images((2, 48, 40, 3), seed=11))
    got = tf.function(lambda t: model(t, training=False), jit_compile=True)(x)
    assert_features_equal(got, model(x, training=False))


# ----------------------------------------------------------------------------- registry
def test_registry_entry_and_caffe_preprocessing():
    entry = BACKBONES["vgg16"]
    assert entry.family == "vgg" and "stride 16" in entry.description
    caffe = preprocess_for("vgg16")
    assert caffe.mode == "caffe" and caffe.name == "vgg16_preprocessing"
    assert preprocess_for("vgg16", "imagenet").mode == "caffe"
    x = np.random.default_rng(12).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    want = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(caffe(x), want, atol=1e-4)
    red = np.array([[[[255.0, 0.0, 0.0]]]], np.float32)  # RGB -> BGR, minus the BGR mean
    np.testing.assert_allclose(caffe(red)[0, 0, 0], [-103.939, -116.779, 255 - 123.68], atol=1e-4)
    assert ImagePreprocessing.from_config(caffe.get_config()).mode == "caffe"
    with pytest.raises(ValueError, match="neither None, 'imagenet' nor"):
        preprocess_for("vgg16", "coco")


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weights": "coco"}, ValueError, "neither None, 'imagenet' nor a '.weights.h5'"),
        ({"weights": "gone.weights.h5"}, FileNotFoundError, "gone.weights.h5"),
        ({"weights": 3}, ValueError, "weights must be None"),
        (
            {"weights": "imagenet", "input_shape": (None, None, 1)},
            ValueError,
            "needs 3 input channels",
        ),
        ({"weights": "imagenet", "base_filters": 32}, ValueError, "base_filters=64"),
        ({"input_shape": (64, 64)}, ValueError, r"input_shape must be \(H, W, C\)"),
        ({"input_shape": (64, 64, None)}, ValueError, "known channel count"),
        ({"input_shape": (64, 0, 3)}, ValueError, "input_shape"),
        ({"input_shape": (15, 64, 3)}, ValueError, "height 15 is below 16"),
        ({"input_shape": (64, 20, 3), "levels": (5,)}, ValueError, "width 20 is below 32"),
        ({"levels": (4, 3)}, ValueError, "increasing order"),
        ({"levels": (4, 6)}, ValueError, "levels in 1..5"),
        ({"levels": (0, 4)}, ValueError, "positive integer, got 0"),
        ({"levels": ()}, ValueError, "levels"),
        ({"levels": 4}, ValueError, "sequence of levels"),
        ({"frozen_blocks": -1}, ValueError, "frozen_blocks must be an integer >= 0"),
        ({"frozen_blocks": 6}, ValueError, r"frozen_blocks must be in 0..5"),
        ({"frozen_blocks": 4, "levels": (2,)}, ValueError, r"in 0..3 .*levels \(2,\)"),
        ({"frozen_blocks": True}, ValueError, "frozen_blocks"),
        ({"base_filters": 0}, ValueError, "base_filters must be a positive integer"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_backbone("vgg16", **kwargs)


def test_a_weights_file_of_another_channel_count_is_named(tmp_path):
    weights = tmp_path / "gray.weights.h5"
    build_vgg16((None, None, 1), levels=(1,), base_filters=4).save_weights(weights)
    with pytest.raises(ValueError, match=r"3 input channels\): could not load .*\(3, 3, 1, 4\)"):
        build_vgg16(weights=weights, levels=(1,), base_filters=4)
