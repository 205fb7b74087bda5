"""YOLOv3: structure, parameter counts, targets and loss through the model, the Keras contract,
darknet weights round trip, XLA and tf.distribute."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import (
    assert_same_detections,
    check_replicas_match_one_device,
    detector_replicas_script,
    script_result,
    start_script,
)

from dlnotes.anchors import YOLO_COCO_ANCHORS
from dlnotes.darknet_io import (
    conv_specs,
    load_darknet_weights,
    save_darknet_weights,
    weights_file_size,
    yolov3_cfg,
    yolov3_config_from_cfg,
)
from dlnotes.models.yolov3 import PRESETS, YOLOv3

NUM_CLASSES = 3
SIZE = (64, 64)
SMALL = dict(image_size=SIZE, initial_filters=4, anchors=(YOLO_COCO_ANCHORS / 6.5).tolist())


def _small(**overrides):
    return YOLOv3(num_classes=NUM_CLASSES, **{**SMALL, **overrides})


def _images(n, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, *SIZE, 3)).astype(np.float32)


def _train_data():
    boxes = -np.ones((4, 3, 4), np.float32)
    labels = -np.ones((4, 3), np.int32)
    boxes[0, :2] = [[8, 8, 40, 40], [30, 20, 60, 50]]
    labels[0, :2] = [0, 1]
    boxes[2, 0] = [4, 30, 24, 62]
    labels[2, 0] = 2
    boxes[3, 0] = [10, 10, 50, 30]
    labels[3, 0] = 1
    return _images(4, seed=1), {"boxes": boxes, "labels": labels}


@pytest.fixture(scope="module")
def model():
    return _small()


def _randomise_bn(m, seed=0):
    rng = np.random.RandomState(seed)
    for w in m.non_trainable_weights:  # BN moving statistics away from their initial 0 / 1
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))


# ----------------------------------------------------------------------------- structure
def test_outputs_are_three_grids_stride_32_first(model):
    out = model(_images(2))
    assert [tuple(o.shape) for o in out] == [
        (2, 2, 2, 3, 5 + NUM_CLASSES),
        (2, 4, 4, 3, 5 + NUM_CLASSES),
        (2, 8, 8, 3, 5 + NUM_CLASSES),
    ]
    assert model.neck_filters == (64, 32, 16)


def test_paper_parameter_count_and_weights_file_size():
    m = YOLOv3.from_preset("yolov3_darknet53_416", num_classes=80)
    total = m.count_params()
    trainable = sum(int(np.prod(w.shape)) for w in m.trainable_weights)
    assert total == 62_001_757 and trainable == 61_949_149  # the published figures
    assert m.backbone.count_params() == 40_620_640
    units = m.darknet_units()
    specs = conv_specs(yolov3_cfg(80))
    assert len(units) == len(specs) == 75
    for (conv, norm), spec in zip(units, specs, strict=True):
        assert tuple(conv.kernel.shape) == spec.kernel_shape
        assert (norm is not None) == bool(spec.batch_normalize)
    assert weights_file_size(yolov3_cfg(80)) == 248_007_048 == 20 + 4 * total


def test_objectness_prior_initialisation():
    keras.utils.set_random_seed(3)
    model = _small(objectness_prior=0.01)
    for head in model.heads:  # the objectness bias of every anchor is the prior's logit
        bias = head.output_conv.bias.numpy().reshape(3, 5 + NUM_CLASSES)
        np.testing.assert_allclose(bias[:, 4], -np.log(99.0), rtol=1e-6)
        assert (bias[:, [0, 1, 2, 3, 5, 6, 7]] == 0).all()
    # training=True: batch statistics (an untrained model's moving statistics are 0 / 1). The
    # random output weights add symmetric noise to the logit: the median over all 504 cells and
    # anchors of the three levels stays the prior (a single level's 24 values would be noisy).
    out = model(_images(2), training=True)
    objectness = np.concatenate([tf.sigmoid(level[..., 4]).numpy().ravel() for level in out])
    assert objectness.size == 2 * 3 * (2 * 2 + 4 * 4 + 8 * 8)
    assert np.median(objectness) == pytest.approx(0.01, rel=0.5)
    out = _small()(_images(2), training=True)  # darknet: zero bias, objectness about 0.5
    objectness = np.concatenate([tf.sigmoid(level[..., 4]).numpy().ravel() for level in out])
    assert np.median(objectness) == pytest.approx(0.5, abs=0.2)


# ----------------------------------------------------------------------------- targets and loss
def test_targets_through_the_model_both_rules():
    boxes = np.array([[[10, 12, 30, 40], [-1, -1, -1, -1]]], np.float32)
    labels = np.array([[2, -1]], np.int32)
    per_level = _small().compute_targets(boxes, labels)
    best = _small(assign_rule="best_of_all").compute_targets(boxes, labels)
    n_per_level = [int(t[..., 4].numpy().sum()) for t in per_level]
    n_best = [int(t[..., 4].numpy().sum()) for t in best]
    assert n_per_level == [1, 1, 1] and sum(n_best) == 1
    for t, stride in zip(per_level, (32, 16, 8), strict=True):
        b, i, j, a = np.argwhere(t[..., 4].numpy() == 1)[0]
        assert (i, j) == (int(26 // stride), int(20 // stride))  # the cell of the centre (20, 26)
        np.testing.assert_allclose(t[b, i, j, a, :4], [20 / 64, 26 / 64, 20 / 64, 28 / 64])
        np.testing.assert_array_equal(t[b, i, j, a, 5:], [0, 0, 1])


def test_loss_terms_are_finite_for_empty_images_and_extreme_outputs(model):
    x, y = _train_data()
    out = model(x)
    with tf.GradientTape() as tape:
        extreme = [tf.Variable(tf.fill(o.shape, 100.0) * (-1) ** k) for k, o in enumerate(out)]
        terms = model.loss_terms(y, extreme)
        total = tf.add_n(list(terms.values()))
    assert set(terms) == {"xy_loss", "wh_loss", "objectness_loss", "class_loss"}
    assert np.isfinite(float(total))
    grads = tape.gradient(total, extreme)
    assert all(np.isfinite(g.numpy()).all() for g in grads)

    empty = {"boxes": -np.ones((2, 3, 4), np.float32), "labels": -np.ones((2, 3), np.int32)}
    terms = model.loss_terms(empty, model(x[:2]))
    assert float(terms["xy_loss"]) == float(terms["wh_loss"]) == float(terms["class_loss"]) == 0
    assert float(terms["objectness_loss"]) > 0  # every cell is a negative

    ciou = _small(box_loss="ciou")
    terms = ciou.loss_terms(y, ciou(x))
    assert set(terms) == {"box_loss", "objectness_loss", "class_loss"}
    assert all(np.isfinite(float(v)) for v in terms.values())


def test_wrong_labels_and_misuse_raise_clear_errors(model):
    x = _images(1)
    bad = {"boxes": np.array([[[8, 8, 40, 40]]], np.float32), "labels": np.array([[NUM_CLASSES]])}
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is >= num_classes"):
        model.compute_loss(x, bad, model(x))
    with pytest.raises(ValueError, match="divisible by 32"):
        YOLOv3(num_classes=3, image_size=(100, 64))
    with pytest.raises(ValueError, match="image_size=\\(64, 64\\)"):
        model(np.zeros((1, 32, 64, 3), np.float32))
    with pytest.raises(ValueError, match="box_loss"):
        _small(box_loss="giou")
    with pytest.raises(ValueError, match="assign_rule"):
        _small(assign_rule="nearest")
    with pytest.raises(ValueError, match="loss is built into the model"):
        _small().compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="targets must be a dict"):
        model.loss_terms(np.zeros((1, 4)), model(x))
    with pytest.raises(ValueError, match="Unknown preset"):
        YOLOv3.from_preset("yolov3_nope", num_classes=3)


# ----------------------------------------------------------------------------- Keras workflow
def test_fit_evaluate_predict():
    m = _small()
    m.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = _train_data()
    logs = m.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0).history
    assert set(logs) == {"loss", "xy_loss", "wh_loss", "objectness_loss", "class_loss"}
    parts = np.add.reduce([logs[k] for k in logs if k != "loss"])
    np.testing.assert_allclose(logs["loss"], parts, rtol=1e-5)
    assert np.isfinite(logs["loss"]).all()

    result = m.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    terms = m.loss_terms(y, m(x, training=False))
    for key, value in terms.items():
        assert result[key] == pytest.approx(float(value), rel=1e-5)

    out = m.predict(x, batch_size=3, verbose=0)
    expected = m.decode(m(x))
    assert out["boxes"].shape == (4, 100, 4) and out["scores"].shape == (4, 100)
    assert_same_detections(out, expected, atol=1e-4)
    n = out["num_detections"]
    assert (n > 0).all()
    assert (out["boxes"][..., :2] >= 0).all() and (out["boxes"][..., 2:] <= 64).all()


def test_decode_matches_a_numpy_decoding(model):
    # One confident (cell, anchor, class) on the stride-16 level, background elsewhere.
    outputs = [np.full((1, s, s, 3, 5 + NUM_CLASSES), -20.0, np.float32) for s in (2, 4, 8)]
    raw = outputs[1][0, 1, 2, 0]  # row 1, column 2, anchor 0 of the stride-16 level
    raw[:4] = [0.5, -0.3, 0.2, -0.1]
    raw[4], raw[5 + 1] = 3.0, 2.0
    det = model.decode(outputs)
    assert int(det["num_detections"][0]) == 1
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    aw, ah = model.yolo_anchors.level_anchors(1)[0]
    cx, cy = (sig(0.5) + 2) * 16, (sig(-0.3) + 1) * 16
    w, h = aw * np.exp(0.2), ah * np.exp(-0.1)
    expected = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 64)
    np.testing.assert_allclose(det["boxes"][0, 0], expected, rtol=1e-5)
    assert float(det["scores"][0, 0]) == pytest.approx(sig(3.0) * sig(2.0), rel=1e-6)
    assert int(det["labels"][0, 0]) == 1


def test_save_load_round_trip(tmp_path):
    path = str(tmp_path / "yolov3.keras")
    m = _small(box_loss="ciou", assign_rule="best_of_all", objectness_prior=0.01)
    m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    m.optimizer.build(m.trainable_variables)
    _randomise_bn(m)
    m.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, YOLOv3) and loaded.compiled
    assert loaded.get_config() == m.get_config()
    x = _images(2)
    for a, b in zip(m(x), loaded(x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_darknet_weights_round_trip(tmp_path):
    source = _small()
    _randomise_bn(source, seed=1)
    path = tmp_path / "yolov3-small.weights"
    written = save_darknet_weights(source, path)
    cfg = yolov3_cfg(
        NUM_CLASSES, anchors=source.yolo_anchors, input_shape=(*SIZE, 3), initial_filters=4
    )
    assert written == path.stat().st_size == weights_file_size(cfg)
    target = _small()
    header = load_darknet_weights(target, path, cfg=cfg)
    assert (header["major"], header["minor"]) == (0, 2)
    x = _images(2)
    for a, b in zip(source(x), target(x), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):  # another class count does not fit the file
        load_darknet_weights(YOLOv3(num_classes=5, **SMALL), path)


def test_model_from_a_darknet_cfg(tmp_path):
    # The official 80-class cfg gives the paper's configuration.
    config = yolov3_config_from_cfg(yolov3_cfg(80))
    assert config["num_classes"] == 80 and config["image_size"] == (416, 416)
    assert config["initial_filters"] == 32 and config["neck_filters"] == (512, 256, 128)
    np.testing.assert_array_equal(config["anchors"], YOLO_COCO_ANCHORS)
    assert config["masks"] == [[6, 7, 8], [3, 4, 5], [0, 1, 2]] and config["ignore_thresh"] == 0.5

    # A small cfg and its weights: the model built from them computes what the source did.
    source = _small(anchors=np.round(YOLO_COCO_ANCHORS / 6.5).tolist())  # a cfg stores 6 digits
    _randomise_bn(source, seed=2)
    cfg = yolov3_cfg(
        NUM_CLASSES, anchors=source.yolo_anchors, input_shape=(*SIZE, 3), initial_filters=4
    )
    (tmp_path / "small.cfg").write_text(cfg)
    save_darknet_weights(source, tmp_path / "small.weights")
    built = YOLOv3.from_darknet_cfg(tmp_path / "small.cfg", weights=tmp_path / "small.weights")
    assert built.get_config() == {**source.get_config(), "name": built.name}
    x = _images(2)
    for a, b in zip(source(x), built(x), strict=True):
        np.testing.assert_array_equal(a, b)

    # A cfg that is not YOLOv3 names the first conv that differs.
    broken = cfg.replace("filters=8\n", "filters=12\n", 1)
    with pytest.raises(ValueError, match="conv 1 .*YOLOv3 with these settings"):
        yolov3_config_from_cfg(broken)
    with pytest.raises(ValueError, match="3 \\[yolo\\] sections"):
        yolov3_config_from_cfg(cfg.split("[yolo]")[0])


def test_jit_compiled_training_matches_graph_training():
    x, y = _train_data()
    graph, xla = _small(), _small()
    xla.set_weights(graph.get_weights())
    graph.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=False)
    xla.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    h_graph = graph.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    h_xla = xla.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    for key in h_graph:
        assert h_xla[key] == pytest.approx(h_graph[key], rel=1e-4)
    h = xla.fit(x, y, batch_size=2, epochs=2, verbose=0).history
    assert np.isfinite(h["loss"]).all() and int(xla.optimizer.iterations) == 4
    bad = {"boxes": y["boxes"], "labels": np.where(y["labels"] >= 0, 7, -1).astype(np.int32)}
    before = [v.numpy() for v in xla.weights]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"^YOLOv3\(num_classes=3\): a target"):
        xla.fit(x, bad, batch_size=2, epochs=1, verbose=0)
    for a, v in zip(before, xla.weights, strict=True):  # the step changed nothing
        np.testing.assert_array_equal(a, v.numpy())
    out = xla.predict(x, batch_size=2, verbose=0)
    # XLA's convolutions round differently: pixels agree to 1e-3
    assert_same_detections(out, xla.decode(xla(x)), atol=1e-3, rtol=1e-4)


# ----------------------------------------------------------------------------- tf.distribute
def test_two_replicas_match_one_device():
    kwargs = {**SMALL, "num_classes": 3, "image_size": list(SIZE)}
    process = start_script(detector_replicas_script("dlnotes.models.yolov3:YOLOv3", kwargs))
    terms = ("xy_loss", "wh_loss", "objectness_loss", "class_loss")
    check_replicas_match_one_device(script_result(process), terms)


def test_presets():
    assert set(PRESETS) == {"yolov3_darknet53_416", "yolov3_mini_256"}
    mini = YOLOv3.from_preset("yolov3_mini_256", num_classes=6)
    assert mini.image_size == (256, 256) and mini.initial_filters == 8
    assert [tuple(o.shape[1:3]) for o in mini(np.zeros((1, 256, 256, 3), np.float32))] == [
        (8, 8),
        (16, 16),
        (32, 32),
    ]
