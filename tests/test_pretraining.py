"""Tests of dlnotes.pretraining (object crops, the classifier, pre-training) and of the shipped
``weights="shapes"`` backbone."""

import json

import cv2
import h5py
import keras
import numpy as np
import pytest

from dlnotes import pretraining
from dlnotes.backbones import SHAPES_WEIGHTS, build_backbone, preprocess_for
from dlnotes.data import CocoDataset
from dlnotes.models import RetinaNet
from dlnotes.pretraining import build_classifier, object_crops, pretrain_backbone
from dlnotes.training import Recipe


@pytest.fixture
def coco_set(tmp_path):
    """One 64 x 48 (h x w) image of random pixels with two objects (labels 1 and 0)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "1.png"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    data = {
        "images": [{"id": 1, "file_name": "1.png", "height": 64, "width": 48}],
        "annotations": [
            # centre (25, 27): a 16 px window covers columns 17..32 and rows 19..34
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [20, 22, 10, 10]},
            # 40 px tall at the top-left corner: a 50 px window, partly outside the image
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 40]},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    (tmp_path / "set.json").write_text(json.dumps(data))
    return CocoDataset(tmp_path / "set.json", image_dir=tmp_path / "img"), pixels


def test_object_crops_keep_the_scale_of_objects_that_fit(coco_set):
    dataset, pixels = coco_set
    images, labels = object_crops(dataset, size=16, jitter=0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, [1, 0])
    # at its own scale the crop is the image's pixels, exactly
    np.testing.assert_allclose(images[0], pixels[19:35, 17:33], atol=1e-3)
    # the large object is scaled down into the window; mirrored borders keep values in range
    assert 0 <= images[1].min() and images[1].max() <= 255


def test_object_crops_shift_with_the_seed_and_check_arguments(coco_set):
    dataset, _ = coco_set
    a, _ = object_crops(dataset, size=16, seed=0)
    b, _ = object_crops(dataset, size=16, seed=0)
    c, _ = object_crops(dataset, size=16, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="size >= 8"):
        object_crops(dataset, size=4)
    with pytest.raises(ValueError, match="context >= 1"):
        object_crops(dataset, context=0.5)


def test_pretrain_backbone_learns_a_separable_toy_problem():
    # class 0 dark, class 1 bright: a few steps must beat chance clearly
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256).astype(np.int32)
    images = (rng.uniform(0, 60, (256, 32, 32, 3)) + 150 * labels[:, None, None, None]).astype(
        np.float32
    )
    keras.utils.set_random_seed(0)
    recipe = Recipe(steps=40, batch_size=32, learning_rate=3e-3, warmup_steps=5, log_every=20)
    backbone, rows = pretrain_backbone(
        "resnet_tiny", (images, labels), (images[:64], labels[:64]), recipe, print_fn=None
    )
    assert [r["step"] for r in rows] == [20, 40]
    assert set(rows[-1]) == {"step", "seconds", "loss", "accuracy", "val_accuracy"}
    assert rows[-1]["val_accuracy"] > 0.9
    assert backbone.input_shape == (None, 32, 32, 3)
    with pytest.raises(ValueError, match="256 crops.*10 labels"):
        pretrain_backbone("resnet_tiny", (images, labels[:10]), recipe=recipe)


def test_build_classifier_pools_every_level():
    backbone = build_backbone("resnet_tiny", (32, 32, 3))
    model = build_classifier(backbone, preprocess_for("resnet_tiny"), 6)
    assert model.output_shape == (None, 6)
    # C3 + C4 + C5 channels of resnet_tiny: 32 + 64 + 128
    assert model.get_layer("classes").kernel.shape == (224, 6)


def test_shapes_weights_are_shipped_and_load_into_backbones_and_detectors(tmp_path):
    assert set(SHAPES_WEIGHTS) == {"resnet_tiny"}
    backbone = build_backbone("resnet_tiny", (64, 64, 3), weights="shapes")
    reference = build_backbone("resnet_tiny", (64, 64, 3))
    path = tmp_path / "b.weights.h5"
    backbone.save_weights(path)
    reference.load_weights(path)
    for a, b in zip(backbone.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # trained: not the initialisation (BatchNorm statistics moved away from 0 / 1)
    fresh = build_backbone("resnet_tiny", (64, 64, 3))
    moved = [
        not np.allclose(a.numpy(), b.numpy())
        for a, b in zip(backbone.weights, fresh.weights, strict=True)
    ]
    assert all(moved)
    detector = RetinaNet.from_preset("retinanet_tiny_256", num_classes=6, backbone_weights="shapes")
    for a, b in zip(detector.backbone.weights, backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert preprocess_for("resnet_tiny", "shapes").mode == preprocess_for("resnet_tiny").mode


def test_shapes_weights_errors():
    with pytest.raises(ValueError, match=r"darknet53: no shapes weights.*\['resnet_tiny'\]"):
        build_backbone("darknet53", (64, 64, 3), weights="shapes")
    with pytest.raises(ValueError, match="no shapes weights"):
        preprocess_for("resnet50", "shapes")
    # other knobs, other layers: the shipped file does not fit and says so
    with pytest.raises(ValueError, match="resnet_tiny"):
        build_backbone("resnet_tiny", (64, 64, 3), weights="shapes", base_filters=8)


def test_shipped_file_is_a_complete_weights_file():
    from pathlib import Path

    import dlnotes.backbones.registry as registry

    for file in SHAPES_WEIGHTS.values():
        path = Path(registry.__file__).parent / "shapes_weights" / file
        with h5py.File(path, "r") as f:
            assert "layers" in f


def test_command_line_keeps_an_existing_file(tmp_path, capsys):
    out = tmp_path / "kept.weights.h5"
    out.write_bytes(b"mine")
    with pytest.raises(SystemExit):
        pretraining.main(["--out", str(out), "--data", str(tmp_path / "none")])
    assert "exists and is kept" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize(
    "knob, message",
    [("initial_filters", "expected NAME=VALUE"), ("initial_filters=four", "not a Python literal")],
)
def test_command_line_refuses_malformed_knobs(tmp_path, capsys, knob, message):
    out = tmp_path / "new.weights.h5"
    with pytest.raises(SystemExit):
        pretraining.main(["--out", str(out), "--data", str(tmp_path / "none"), "--knob", knob])
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "none").exists()


@pytest.mark.parametrize("levels", [(4,), (2, 3, 4, 5)])
def test_shapes_weights_load_into_backbones_with_other_levels(levels):
    # Faster R-CNN reads C4 only (the top stage is not built), the keypoint model C2-C5
    full = build_backbone("resnet_tiny", (64, 64, 3), weights="shapes")
    partial = build_backbone("resnet_tiny", (64, 64, 3), weights="shapes", levels=levels)
    images = np.random.default_rng(0).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    c4 = partial(images)[levels.index(4)] if len(levels) > 1 else partial(images)
    np.testing.assert_array_equal(c4.numpy(), full(images)[1].numpy())
