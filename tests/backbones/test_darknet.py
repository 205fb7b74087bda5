"""Tests of dlnotes.backbones.darknet (Darknet-53).

* parameter counts against the published figures (DESIGN.md, the notes) and a formula;
* the layer structure (52 conv-BN-leaky units, top-left padding on the 5 stride-2 convs, names
  in darknet order);
* C3-C5 against a float64 NumPy re-implementation of darknet's forward pass (darknet's
  symmetric padding on even sizes, keras-yolo3's top-left padding on odd sizes);
* output shapes for odd sizes, weights files (.weights.h5 and darknet), save / load_model.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import randomize
from hypothesis import given, settings
from hypothesis import strategies as st

from dlnotes.backbones import (
    DARKNET53_BLOCKS,
    DARKNET53_OUTPUT_LAYERS,
    build_darknet53,
    output_strides,
)
from dlnotes.darknet_io import save_darknet_weights

F = 8  # initial_filters of the small test models
STRIDE2_CONVS = (1, 4, 9, 26, 43)  # darknet conv indices (layers 1, 5, 12, 37, 62)


def darknet53_params(f, bias, channels=3):
    """Darknet-53's parameter count spelled out: per conv k*k*in*out + 4*out BN (+ out bias)."""

    def conv(cin, cout, k):
        return k * k * cin * cout + 4 * cout + (cout if bias else 0)

    total = conv(channels, f, 3)
    cin = f
    for stage, n in enumerate((1, 2, 8, 8, 4)):
        cout = f * 2 ** (stage + 1)
        total += conv(cin, cout, 3) + n * (conv(cout, cout // 2, 1) + conv(cout // 2, cout, 3))
        cin = cout
    return total


@pytest.fixture(scope="module")
def small():
    """f=8 body with non-trivial BN statistics and biases (read-only in the tests)."""
    model = build_darknet53((None, None, 3), initial_filters=F, use_bias=True)
    randomize(model, seed=0)
    return model


# ----------------------------------------------------------------------------- NumPy reference
def np_conv(x, kernel, bias, stride, mode):
    """float64 conv of (B, H, W, C) with a (k, k, C, O) kernel.

    mode "darknet": k // 2 zeros on every side, output (n + 2p - k) // s + 1 (darknet's im2col);
    mode "top_left": for stride 2, one zero row / column on top / left then "valid" (keras-yolo3).
    """
    k = kernel.shape[0]
    p = k // 2
    if mode == "top_left" and stride == 2:
        pads = ((0, 0), (1, 0), (1, 0), (0, 0))
    else:
        pads = ((0, 0), (p, p), (p, p), (0, 0))
    xp = np.pad(x, pads)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (B, Ho, Wo, C, k, k)
    if mode == "darknet":
        ho = (x.shape[1] + 2 * p - k) // stride + 1
        wo = (x.shape[2] + 2 * p - k) // stride + 1
        windows = windows[:, :ho, :wo]
    out = np.einsum("bhwcij,ijco->bhwo", windows, kernel)
    return out if bias is None else out + bias


def np_darknet53(model, images, mode):
    """Darknet-53's forward pass (inference BN) in float64 from the model's weights."""
    eps = model.get_layer("bn0").epsilon
    slope = model.get_layer("leaky0").negative_slope

    def unit(x, i, stride):
        conv, bn = model.get_layer(f"conv{i}"), model.get_layer(f"bn{i}")
        kernel = np.asarray(conv.kernel, np.float64)
        bias = None if conv.bias is None else np.asarray(conv.bias, np.float64)
        y = np_conv(x, kernel, bias, stride, mode)
        gamma, beta, mean, var = (np.asarray(v, np.float64) for v in bn.get_weights())
        y = gamma * (y - mean) / np.sqrt(var + eps) + beta
        return np.where(y > 0, y, slope * y)

    x = np.asarray(images, np.float64)
    x = unit(x, 0, 1)
    i, outputs = 1, []
    for stage, n in enumerate(DARKNET53_BLOCKS):
        x = unit(x, i, 2)
        i += 1
        for _ in range(n):
            y = unit(unit(x, i, 1), i + 1, 1)
            x, i = x + y, i + 2
        if stage >= 2:
            outputs.append(x)
    return outputs


def assert_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        a = np.asarray(a, np.float64)
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    "f, bias, published",
    [(32, False, 40_620_640), (32, True, 40_638_496), (8, True, 2_556_808)],
)
def test_published_parameter_counts(f, bias, published):
    assert darknet53_params(f, bias) == published
    model = build_darknet53(initial_filters=f, use_bias=bias)
    assert model.count_params() == published
    # BN moving mean and variance are the non-trainable part: 2 per conv output channel.
    channels = sum(model.get_layer(f"conv{i}").filters for i in range(52))
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert non_trainable == 2 * channels


@pytest.mark.parametrize("channels", [3, 1])
def test_parameter_count_formula_without_bias(channels):
    model = build_darknet53((64, 64, channels), initial_filters=F)
    assert model.count_params() == darknet53_params(F, False, channels)
    assert darknet53_params(F, False) == 2_552_344  # 2,556,808 minus the 4,464 conv biases


# ----------------------------------------------------------------------------- structure
def test_layers_in_darknet_order():
    model = build_darknet53((64, 64, 3), initial_filters=F)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.name for c in convs] == [f"conv{i}" for i in range(52)]
    assert len(model.layers) == 188  # keras-yolo3's 185 + 3 identity outputs
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 23
    for i, conv in enumerate(convs):
        stride = 2 if i in STRIDE2_CONVS else 1
        assert conv.strides == (stride, stride)
        assert conv.padding == ("valid" if stride == 2 else "same")
        assert not conv.use_bias
        # Kernels: 3x3 for the stem, the downsampling convs and the second conv of each block.
        in_block = i not in STRIDE2_CONVS and i > 0
        odd_in_stage = (i - max(s for s in STRIDE2_CONVS if s <= i)) % 2 if in_block else 0
        assert conv.kernel_size == ((1, 1) if odd_in_stage else (3, 3))
        bn = model.get_layer(f"bn{i}")
        assert (bn.momentum, bn.epsilon) == (0.99, 1e-3)
        assert model.get_layer(f"leaky{i}").negative_slope == pytest.approx(0.1)
    pads = [layer for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
    assert [p.name for p in pads] == [f"pad{i}" for i in STRIDE2_CONVS]
    assert all(tuple(map(tuple, p.padding)) == ((1, 0), (1, 0)) for p in pads)
    assert [model.get_layer(f"conv{i}").filters for i in STRIDE2_CONVS] == [16, 32, 64, 128, 256]
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)][-1] == (
        "shortcut74"
    )


def test_outputs_are_the_routed_darknet_layers(small):
    assert small.output_names == ["C3", "C4", "C5"]
    assert output_strides(small) == (8, 16, 32)
    assert [t.shape[-1] for t in small.outputs] == [8 * F, 16 * F, 32 * F]
    taps = keras.Model(small.input, [small.get_layer(f"shortcut{k}").output for k in (36, 61, 74)])
    x = np.random.default_rng(1).uniform(size=(1, 64, 64, 3)).astype("float32")
    for a, b in zip(small(x, training=False), taps(x, training=False), strict=True):
        np.testing.assert_array_equal(a, b)
    assert DARKNET53_OUTPUT_LAYERS == {"C3": 36, "C4": 61, "C5": 74}


# ----------------------------------------------------------------------------- values
def test_matches_numpy_darknet_on_even_sizes(small):
    images = np.random.default_rng(2).uniform(size=(2, 64, 96, 3)).astype("float32")
    expected = np_darknet53(small, images, mode="darknet")
    assert [e.shape[1:3] for e in expected] == [(8, 12), (4, 6), (2, 3)]
    assert_close(small(images, training=False), expected)


def test_odd_sizes_use_top_left_padding_and_round_down(small):
    images = np.random.default_rng(3).uniform(size=(1, 45, 71, 3)).astype("float32")
    outputs = small(images, training=False)
    assert [tuple(o.shape[1:3]) for o in outputs] == [(5, 8), (2, 4), (1, 2)]
    assert_close(outputs, np_darknet53(small, images, mode="top_left"))
    # darknet's symmetric padding would round up instead (45 -> 23 -> 12 -> 6 ...).
    darknet = np_darknet53(small, images, mode="darknet")
    assert [d.shape[1:3] for d in darknet] == [(6, 9), (3, 5), (2, 3)]


@settings(max_examples=8, deadline=None)
@given(height=st.integers(32, 90), width=st.integers(32, 90))
def test_output_shapes_floor(small, height, width):
    outputs = small(np.zeros((1, height, width, 3), np.float32), training=False)
    for level, out in zip((3, 4, 5), outputs, strict=True):
        assert tuple(out.shape) == (1, height // 2**level, width // 2**level, 2**level * F)


def test_jit_compile_matches_eager(small):
    x = np.random.default_rng(4).uniform(size=(1, 64, 64, 3)).astype("float32")
    compiled = tf.function(lambda t: small(t, training=False), jit_compile=True)
    for a, b in zip(compiled(x), small(x, training=False), strict=True):
        # XLA and oneDNN sum in different orders: compare at the scale of the features (here
        # thousands, with cancellations down to single digits).
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial_filters": 0}, "initial_filters"),
        ({"initial_filters": True}, "initial_filters"),
        ({"initial_filters": 2.5}, "initial_filters"),
        ({"input_shape": (16, 64, 3)}, "height 16 is below 32"),
        ({"input_shape": (64, 31, 3)}, "width 31 is below 32"),
        ({"input_shape": (64, 64)}, r"\(H, W, C\)"),
        ({"input_shape": (64, 64, None)}, "channel"),
        ({"negative_slope": float("nan")}, "negative_slope"),
        ({"weights": 3}, "weights must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_darknet53(**kwargs)


def test_weights_file_errors(tmp_path):
    missing = tmp_path / "nope.weights"
    with pytest.raises(FileNotFoundError, match="nope.weights"):
        build_darknet53(weights=missing)
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        build_darknet53(weights=h5)
    zipped = tmp_path / "model.keras"
    zipped.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="load_model"):
        build_darknet53(weights=zipped)


# ----------------------------------------------------------------------------- weights files
def test_keras_weights_file_round_trip_and_mismatch(small, tmp_path):
    path = str(tmp_path / "body.weights.h5")
    small.save_weights(path)
    loaded = build_darknet53((64, 64, 3), initial_filters=F, use_bias=True, weights=path)
    for a, b in zip(small.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="initial_filters=16"):
        build_darknet53(initial_filters=16, use_bias=True, weights=path)
    with pytest.raises(ValueError, match="use_bias=False"):
        build_darknet53(initial_filters=F, weights=path)


def test_darknet_weights_file(small, tmp_path):
    path = str(tmp_path / "body.weights")
    save_darknet_weights(small, path)
    loaded = build_darknet53((64, 64, 3), initial_filters=F, use_bias=True, weights=path)
    x = np.random.default_rng(5).uniform(size=(1, 64, 64, 3)).astype("float32")
    assert_close(loaded(x, training=False), [np.asarray(o) for o in small(x, training=False)])
    # The conv bias is folded into the BN moving mean: darknet has no slot for it.
    np.testing.assert_array_equal(loaded.get_layer("conv7").bias, 0.0)
    with pytest.raises(ValueError, match="ends inside conv"):
        build_darknet53(initial_filters=16, weights=path)


def test_save_and_load_model(small, tmp_path):
    path = str(tmp_path / "darknet.keras")
    small.save(path)
    restored = keras.saving.load_model(path)
    assert restored.output_names == ["C3", "C4", "C5"]
    x = np.random.default_rng(6).uniform(size=(1, 64, 64, 3)).astype("float32")
    for a, b in zip(small(x, training=False), restored(x, training=False), strict=True):
        np.testing.assert_array_equal(a, b)
    assert os.path.getsize(path) > 0
