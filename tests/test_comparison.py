"""Tests of dlnotes.comparison: the line-up of chapter 8, built at any input size, and its anatomy."""

from types import SimpleNamespace

import keras
import numpy as np
import pytest

from dlnotes import models
from dlnotes.comparison import LINEUP, anatomy, build_detector, first_reaching, inference_time

DATA = SimpleNamespace(num_classes=6, num_keypoints=5)
KEYS = {"stages", "backbone", "neck", "heads", "last layer", "class loss", "box loss"}


@pytest.mark.parametrize("name", list(LINEUP))
def test_every_detector_builds_with_its_chapter_profile(name):
    family, preset, overrides = LINEUP[name]
    detector = build_detector(name, DATA, 128)
    assert type(detector) is getattr(models, family)
    assert detector.num_classes == 6 and tuple(detector.image_size) == (128, 128)
    config = detector.get_config()
    for key, value in overrides.items():
        got = config.get(key, getattr(detector, key, None))
        assert got == value or list(np.ravel(got)) == list(np.ravel(value)), key
    parts = anatomy(detector)
    assert set(parts) == KEYS and all(isinstance(v, str) and v for v in parts.values())


def test_anchor_sizes_in_pixels_follow_the_input_size():
    half = build_detector("RetinaNet", DATA, 128).anchor_generator.sizes
    full = build_detector("RetinaNet", DATA, 256).anchor_generator.sizes
    np.testing.assert_allclose(np.array(half) * 2, full)
    np.testing.assert_allclose(full, (16, 32, 64, 128, 256))  # the preset's, at its own size
    rcnn = build_detector("Faster R-CNN", DATA, 128).anchor_generator.sizes
    np.testing.assert_allclose(rcnn, [8.0])
    yolo_half = np.array(build_detector("YOLOv3", DATA, 128).get_config()["anchors"])
    yolo_full = np.array(models.YOLOV3_PRESETS["yolov3_mini_256"]["anchors"])
    np.testing.assert_allclose(yolo_half * 2, yolo_full, rtol=1e-6)


def test_overrides_reach_the_model_and_its_anatomy():
    keras.utils.set_random_seed(0)
    detector = build_detector("RetinaNet", DATA, 128, focal_gamma=1.5, box_loss="huber")
    parts = anatomy(detector)
    assert parts["class loss"] == "focal (alpha 0.25, gamma 1.5)"
    assert parts["box loss"] == "huber"


def test_anatomy_reads_the_parts_of_each_family():
    parts = {name: anatomy(build_detector(name, DATA, 128)) for name in LINEUP}
    assert parts["RetinaNet"]["heads"] == "class + box subnets, shared by 5 levels, depth 2, 64 ch"
    assert parts["RetinaNet"]["last layer"] == "3x3 conv: 9 anchors x 6 sigmoids + 4 deltas"
    assert parts["EfficientDet"]["neck"] == "bifpn"
    assert parts["EfficientDet"]["heads"].endswith("BN per level")
    assert parts["YOLOv3"]["heads"] == "one per level (3), not shared"
    assert parts["YOLOv3"]["backbone"] == "darknet53 (width 4)"
    assert parts["Faster R-CNN"]["stages"] == "two"
    assert parts["Faster R-CNN"]["heads"] == "RPN (one level) + RoI head (pool, 2 fc of 512)"
    assert parts["Keypoint"]["stages"] == "one, anchor-free"
    assert parts["Keypoint"]["last layer"].startswith("3x3 conv: 30 point-class heatmaps")


def test_bad_names_and_objects_are_refused():
    with pytest.raises(ValueError, match="unknown detector 'SSD'.*RetinaNet"):
        build_detector("SSD", DATA)
    with pytest.raises(ValueError, match="not a dlnotes detector: Dense"):
        anatomy(keras.layers.Dense(2))


def test_inference_time_times_predict_on_batch():
    detector = build_detector("RetinaNet", DATA, 64)
    calls = []
    real = detector.predict_on_batch

    def counted(images):
        calls.append(images.shape)
        return real(images)

    detector.predict_on_batch = counted
    seconds = inference_time(detector, batch_size=2, repeats=3)
    assert seconds > 0 and calls == [(2, 64, 64, 3)] * 4  # one trace + three timed
    with pytest.raises(ValueError, match="repeats"):
        inference_time(detector, repeats=0)


def test_first_reaching_finds_the_first_row_at_the_level():
    rows = [{"step": s, "AP50": v} for s, v in ((100, 0.05), (200, 0.3), (300, 0.2), (400, 0.6))]
    assert first_reaching(rows, 0.3)["step"] == 200  # at the level counts
    assert first_reaching(rows, 0.5)["step"] == 400
    assert first_reaching(rows, 0.7) is None
