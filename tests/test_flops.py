"""Multiply-add counts against hand-computed figures and the published EfficientNet-B0 cost."""

import keras
import pytest

from dlnotes.backbones.efficientnet import build_efficientnet
from dlnotes.flops import count_macs, matmul_rate


def test_conv_depthwise_dense_counts_are_the_formulas():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(inputs)  # 16x16x16
    x = keras.layers.DepthwiseConv2D(5, padding="same")(x)  # 16x16x16
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    model = keras.Model(inputs, outputs)
    conv = 16 * 16 * 3 * 3 * 3 * 16
    depthwise = 16 * 16 * 5 * 5 * 16
    dense = 16 * 10
    assert count_macs(model, (1, 32, 32, 3)) == conv + depthwise + dense
    assert count_macs(model, (4, 32, 32, 3)) == 4 * (conv + depthwise + dense)


def test_plain_function_and_matmul():
    w = keras.ops.ones((64, 8))
    assert count_macs(lambda x: keras.ops.matmul(x, w), (3, 64)) == 3 * 64 * 8


def test_efficientnet_b0_is_the_published_cost():
    # Tan & Le 2019, table 2: 0.39 B FLOPs (multiply-adds) at 224 x 224, with the classifier.
    model = build_efficientnet("efficientnet_b0", top="classifier", input_shape=(224, 224, 3))
    macs = count_macs(model, (1, 224, 224, 3))
    assert 0.38e9 < macs < 0.40e9


@pytest.mark.parametrize("shape", [(None, 32, 32, 3), (1, 0, 32, 3), ()])
def test_unknown_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="static shape"):
        count_macs(lambda x: x, shape)


def test_matmul_rate_is_positive():
    assert matmul_rate(sizes=(64,), repeats=1) > 0
