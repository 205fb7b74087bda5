"""Tests of dlnotes.backbones.registry: every family under one name, its preprocessing, strides."""

import keras
import numpy as np
import pytest

from dlnotes.backbones import (
    BACKBONES,
    RESNETS,
    Backbone,
    ImagePreprocessing,
    build_backbone,
    build_darknet53,
    output_strides,
    preprocess_for,
    register_backbone,
    registry,
)
from dlnotes.backbones.efficientnet import EFFICIENTNETS


def test_registry_lists_every_family():
    assert set(RESNETS) | set(EFFICIENTNETS) | {"darknet53", "vgg16"} == set(BACKBONES)
    assert {BACKBONES[name].family for name in RESNETS} == {"resnet"}
    assert {BACKBONES[name].family for name in EFFICIENTNETS} == {"efficientnet"}
    assert BACKBONES["darknet53"].family == "darknet"
    assert BACKBONES["vgg16"].family == "vgg"
    assert all(entry.description for entry in BACKBONES.values())


def test_darknet53_by_name_is_build_darknet53():
    by_name = build_backbone("darknet53", (64, 64, 3), initial_filters=4)
    direct = build_darknet53((64, 64, 3), initial_filters=4)
    assert by_name.count_params() == direct.count_params()
    assert [w.shape for w in by_name.weights] == [w.shape for w in direct.weights]
    assert output_strides(by_name) == (8, 16, 32)
    assert [o.shape[-1] for o in by_name.outputs] == [32, 64, 128]


def test_vgg16_by_name_is_the_stride_16_trunk():
    trunk = build_backbone("vgg16", (64, 64, 3), base_filters=4)
    assert trunk.output_names == ["C4"] and output_strides(trunk) == (16,)
    assert tuple(trunk.outputs[0].shape) == (None, 4, 4, 32)
    pyramid = build_backbone("vgg16", levels=(3, 4, 5), base_filters=4)
    assert output_strides(pyramid) == (8, 16, 32)


def test_preprocessing_by_family():
    assert preprocess_for("darknet53").mode == "unit"
    assert preprocess_for("resnet50").mode == "caffe"
    assert preprocess_for("resnet18").mode == "torch"
    assert preprocess_for("vgg16").mode == "caffe"
    x = np.array([[[[255.0, 127.5, 0.0]]]], np.float32)
    np.testing.assert_allclose(preprocess_for("darknet53")(x)[0, 0, 0], [1.0, 0.5, 0.0])
    restored = ImagePreprocessing.from_config(preprocess_for("darknet53").get_config())
    assert restored.mode == "unit"


def test_unknown_names_and_bad_weights_are_named():
    with pytest.raises(ValueError, match="Unknown backbone 'alexnet'.*darknet53.*vgg16"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="Unknown backbone"):
        preprocess_for("darknet19")
    with pytest.raises(FileNotFoundError, match="nope.weights"):
        preprocess_for("darknet53", "nope.weights")  # validated like build_backbone does
    with pytest.raises(ValueError, match="initial_filters must be a positive integer, got 0"):
        build_backbone("darknet53", initial_filters=0)
    with pytest.raises(TypeError):
        build_backbone("resnet18", initial_filters=8)  # a knob of another family


def test_register_backbone(monkeypatch):
    monkeypatch.setattr(registry, "BACKBONES", dict(BACKBONES))

    def build(shape, weights, width=4):
        images = keras.Input(shape)
        x = images
        outputs = []
        for level in (3, 4, 5):
            x = keras.layers.Conv2D(width, 3, strides=2 if level > 3 else 8, padding="same")(x)
            outputs.append(keras.layers.Identity(name=f"C{level}")(x))
        return keras.Model(images, outputs)

    register_backbone("toy", Backbone("toy", build, lambda weights: "unit", "a toy"))
    model = build_backbone("toy", (64, 64, 3), width=2)
    assert output_strides(model) == (8, 16, 32)
    assert preprocess_for("toy").mode == "unit"
    with pytest.raises(ValueError, match="already exists"):
        register_backbone("toy", registry.BACKBONES["toy"])
