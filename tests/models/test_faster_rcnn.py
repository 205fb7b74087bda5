"""Tests of dlnotes.models.faster_rcnn: the published parameter counts (the paper's VGG16 model,
torchvision's fasterrcnn_resnet50_fpn), the two stages wired in one graph, the Detector contract
(fit / evaluate / predict, .keras, XLA, two replicas, empty images, bad input) and the 4-step
alternating training."""

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

from dlnotes.models.faster_rcnn import PRESETS, FasterRCNN, train_alternating

NUM_CLASSES = 3
SIZE = (64, 64)
# A small VGG-layout model: C4 at stride 16 (4 x 4 cells), 6 anchors of 16-45 px per cell.
SMALL = dict(
    image_size=SIZE, backbone="vgg16", backbone_kwargs={"base_filters": 4}, rpn_channels=16,
    anchor_sizes=(16,), anchor_scales=(1.0, 2.0), head_hidden=32, train_proposals=(60, 40),
    test_proposals=(60, 30), roi_num_samples=32, rpn_num_samples=64, max_detections=20,
)  # fmt: skip
# Every candidate sampled (no randomness): anchors and RoIs all fit in the sample budgets.
SATURATED = dict(
    rpn_num_samples=4096, rpn_positive_fraction=1.0, roi_num_samples=256, roi_positive_fraction=1.0
)


def _small(**overrides):
    return FasterRCNN(num_classes=NUM_CLASSES, **{**SMALL, **overrides})


def _train_data():
    rng = np.random.RandomState(1)
    x = rng.uniform(0, 255, (4, *SIZE, 3)).astype(np.float32)
    boxes = -np.ones((4, 3, 4), np.float32)
    labels = -np.ones((4, 3), np.int32)
    boxes[0, :2] = [[8, 8, 40, 40], [30, 20, 60, 50]]
    labels[0, :2] = [0, 1]
    boxes[2, 0], labels[2, 0] = [4, 30, 24, 62], 2  # image 1 is empty
    boxes[3, 0], labels[3, 0] = [10, 10, 50, 30], 1
    return x, {"boxes": boxes, "labels": labels}


def _terms(model, x, y, training=True, seed=(0, 0)):
    _, terms = model.forward_with_loss(
        tf.constant(x), y, training=training, seed=tf.constant(seed, tf.int64)
    )
    return {k: float(v) for k, v in terms.items()}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return _small()


# ----------------------------------------------------------------------------- parameter counts
def _bn_variables(model):
    return sum(
        layer.count_params()
        for layer in model.backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_vgg16_paper_model_parameter_count():
    """The paper's VGG16 Faster R-CNN for PASCAL VOC (20 classes): the 13 convs, the RPN's 3x3
    conv and two 1x1 convs (k = 9), fc6 / fc7 of 4096 and the N + 1 classifier with per-class
    boxes. The image size does not change the count (RoIs are pooled to 7 x 7)."""
    m = FasterRCNN.from_preset("faster_rcnn_vgg16", num_classes=20, image_size=(128, 128))
    trunk = 14_714_688
    rpn = (9 * 512 * 512 + 512) + (512 * 9 + 9) + (512 * 36 + 36)
    fc = (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096)
    predictor = (4096 + 1) * 21 + (4096 + 1) * 20 * 4
    assert m.backbone.count_params() == trunk and m.rpn_head.count_params() == rpn == 2_382_893
    assert m.box_head.count_params() == fc + predictor
    assert m.count_params() == trunk + rpn + fc + predictor == 137_057_234
    # conv1_1 .. conv2_2 frozen, as in the paper
    frozen = 38_720 + 221_440
    assert sum(int(np.prod(w.shape)) for w in m.trainable_weights) == m.count_params() - frozen


def test_resnet50_fpn_matches_torchvisions_parameter_count():
    """torchvision's ``fasterrcnn_resnet50_fpn`` (91 classes: COCO's 90 ids + background):
    ``num_params`` 41,755,286 = ResNet-50 convs 23,454,912 + FPN 3,344,384 + RPN head 593,935 +
    TwoMLPHead 13,895,680 + FastRCNNPredictor 466,375. In our terms: torchvision's ResNet-50 layout
    with C2-C5, the FPN with a pooled P6, 3 anchors per location, a 1024-wide head with a box
    for the background too. torchvision's backbone uses FrozenBatchNorm2d, whose four vectors are
    buffers, not parameters: its figure is our count minus the backbone's BN variables."""
    m = FasterRCNN(
        num_classes=90, image_size=(128, 128), backbone="resnext50_32x4d",
        backbone_kwargs={"groups": 1, "width_per_group": 64, "levels": (2, 3, 4, 5)},
        **{k: v for k, v in PRESETS["faster_rcnn_resnet50_fpn"].items() if k not in (
            "image_size", "backbone", "backbone_kwargs")},
    )  # fmt: skip
    assert m.backbone.count_params() - _bn_variables(m) == 23_454_912
    assert m.neck.count_params() == 3_344_384
    assert m.rpn_head.count_params() == 593_935
    assert m.box_head.count_params() == 13_895_680 + 466_375
    assert m.count_params() - _bn_variables(m) == 41_755_286
    assert m.level_strides == (4, 8, 16, 32, 64) and m.anchors.shape == (3 * sum(
        (128 // s) ** 2 for s in (4, 8, 16, 32, 64)), 4)  # fmt: skip


# ----------------------------------------------------------------------------- the two stages
def test_outputs_and_loss_terms(model):
    x, y = _train_data()
    out = model(x)
    p = SMALL["test_proposals"][1]
    assert out["rois"].shape == (4, p, 4) and out["roi_mask"].shape == (4, p)
    assert out["class_logits"].shape == (4, p, NUM_CLASSES + 1)
    assert out["box_deltas"].shape == (4, p, NUM_CLASSES, 4)
    rois = out["rois"].numpy()
    assert (rois >= 0).all() and (rois[..., 2] <= SIZE[1]).all() and (rois[..., 3] <= SIZE[0]).all()
    terms = _terms(model, x, y)
    assert set(terms) == {"rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss"}
    assert all(np.isfinite(v) for v in terms.values())
    # untrained: the RPN is at chance (log 2) and the classifier near log(N + 1)
    assert terms["rpn_objectness_loss"] == pytest.approx(np.log(2), abs=0.05)
    assert terms["class_loss"] == pytest.approx(np.log(NUM_CLASSES + 1), abs=0.3)
    # the proposals carry no gradient to the RPN's deltas: the detector terms' gradient
    # reaches the trunk (through the pooled features) but not the RPN head
    with tf.GradientTape() as tape:
        _, t = model.forward_with_loss(x, y, True, tf.constant([0, 0], tf.int64))
        detector_loss = t["class_loss"] + t["box_loss"]
    grads = tape.gradient(detector_loss, model.rpn_head.trainable_weights)
    assert all(g is None or not np.any(g.numpy()) for g in grads)


def test_sampling_changes_with_the_seed_and_repeats_with_it(model):
    x, y = _train_data()
    a, b, c = (_terms(model, x, y, seed=s) for s in ((0, 0), (0, 0), (0, 7)))
    assert a == b and a != c


def test_empty_images_and_all_padding_give_finite_losses_and_gradients(model):
    x, y = _train_data()
    empty = {"boxes": -np.ones((4, 3, 4), np.float32), "labels": -np.ones((4, 3), np.int32)}
    for targets in (y, empty):
        with tf.GradientTape() as tape:
            _, terms = model.forward_with_loss(x, targets, True, tf.constant([0, 1], tf.int64))
            loss = tf.add_n(list(terms.values()))
        grads = tape.gradient(loss, model.trainable_weights)
        assert np.isfinite(float(loss))
        assert all(g is None or np.isfinite(g.numpy()).all() for g in grads)
    terms = _terms(model, x, empty)
    assert terms["rpn_box_loss"] == 0.0 and terms["box_loss"] == 0.0  # no positives anywhere


# ----------------------------------------------------------------------------- the contract
def test_fit_evaluate_predict_and_learning():
    keras.utils.set_random_seed(0)
    m = _small()
    x, y = _train_data()
    m.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = m.fit(x, y, batch_size=4, epochs=25, shuffle=False, verbose=0).history
    assert set(history) == {"loss", "rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss"}
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    assert history["rpn_objectness_loss"][-1] < 0.6 * history["rpn_objectness_loss"][0]
    evaluated = m.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert np.isfinite(evaluated["loss"])
    det = m.predict(x, batch_size=4, verbose=0)
    assert det["boxes"].shape == (4, 20, 4) and det["labels"].shape == (4, 20)
    n = det["num_detections"]
    for b in range(4):
        assert (det["labels"][b, : n[b]] >= 0).all() and (det["labels"][b, : n[b]] < 3).all()
        assert (det["scores"][b, : n[b]] > 0.05).all() and (det["labels"][b, n[b] :] == -1).all()
    assert_same_detections(det, m.decode(m(x)), atol=1e-4)
    # the overfitted image 0 has its two objects among the best detections
    best = det["boxes"][0, : max(1, n[0])]
    ious = [
        max(_iou(best[i], g) for i in range(len(best))) for g in y["boxes"][0, :2]
    ]  # fmt: skip
    assert min(ious) > 0.3


def _iou(a, b):
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


@pytest.mark.parametrize(
    "variant",
    [dict(objectness="softmax"), dict(roi_pooling="align"), dict(rpn_loss_normalization="paper")],
    ids=["softmax_objectness", "roi_align", "paper_rpn_loss"],
)
def test_variants_train(variant):
    keras.utils.set_random_seed(0)
    m = _small(**variant)
    x, y = _train_data()
    m.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = m.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0).history
    assert all(np.isfinite(v).all() for v in history.values())
    if variant.get("objectness") == "softmax":
        assert m.rpn_head.objectness_conv.kernel.shape[-1] == 2 * 6


def test_fpn_configuration_trains():
    keras.utils.set_random_seed(0)
    m = FasterRCNN(
        num_classes=NUM_CLASSES, image_size=SIZE, backbone="resnet_tiny",
        backbone_kwargs={"levels": (2, 3, 4, 5)}, neck="fpn", num_channels=16, rpn_channels=16,
        anchor_sizes=(8, 16, 32, 64, 128), anchor_strides=(4, 8, 16, 32, 64), anchor_scales=(1.0,),
        roi_pooling="multiscale_align", head_hidden=32, train_proposals=(50, 40),
        test_proposals=(50, 30), roi_num_samples=32, rpn_num_samples=64, max_detections=20,
    )  # fmt: skip
    x, y = _train_data()
    out = m(x)
    assert out["class_logits"].shape == (4, 30, NUM_CLASSES + 1)
    m.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = m.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history
    assert all(np.isfinite(v).all() for v in history.values())


def test_save_load_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    m = _small(objectness="softmax")
    m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    path = str(tmp_path / "faster_rcnn.keras")
    m.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FasterRCNN) and loaded.get_config() == m.get_config()
    x, y = _train_data()
    a, b = m(x), loaded(x)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert _terms(m, x, y) == _terms(loaded, x, y)


def test_jit_compiled_training_matches_graph_training():
    x, y = _train_data()
    keras.utils.set_random_seed(0)
    graph = _small(**SATURATED)
    xla = _small(**SATURATED)
    xla.set_weights(graph.get_weights())
    graph.compile(optimizer=keras.optimizers.SGD(0.01))
    xla.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=True)
    h_graph = graph.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    h_xla = xla.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    assert xla.xla_parts_compiled == {"trunk_rpn", "roi_head"}
    for key in h_graph:
        assert h_xla[key][0] == pytest.approx(h_graph[key][0], rel=1e-3, abs=1e-6), key
    for a, b in zip(graph.get_weights(), xla.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    det = xla.predict(x, batch_size=4, verbose=0)
    assert "trunk_rpn_head" in xla.xla_parts_compiled
    assert_same_detections(det, graph.predict(x, batch_size=4, verbose=0), atol=1e-3)


def test_two_replicas_match_one_device():
    kwargs = {**SMALL, **SATURATED, "num_classes": 3, "image_size": list(SIZE)}
    process = start_script(
        detector_replicas_script("dlnotes.models.faster_rcnn:FasterRCNN", kwargs)
    )
    terms = ("rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss")
    check_replicas_match_one_device(script_result(process), terms)


# ----------------------------------------------------------------------------- 4-step training
def test_alternating_training_freezes_what_each_step_must():
    keras.utils.set_random_seed(0)
    m = _small(backbone_kwargs={"base_filters": 4, "frozen_blocks": 1})
    x, y = _train_data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(2).repeat()
    parts = {"trunk": m.backbone, "rpn": m.rpn_head, "head": m.box_head}
    frozen_conv = m.backbone.get_layer("block1_conv1")
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            snapshots.append({k: [w.numpy().copy() for w in p.weights] for k, p in parts.items()})

    before = {k: [w.numpy().copy() for w in p.weights] for k, p in parts.items()}
    histories = train_alternating(
        m, data, steps=(2, 2, 2, 2), optimizer=lambda: keras.optimizers.SGD(0.05),
        callbacks=[Snapshot()],
    )  # fmt: skip
    assert len(histories) == 4
    expected = [
        {"trunk", "rpn"},  # 1. RPN with the trunk
        {"head"},  # 2. the detector on fixed proposals
        {"rpn"},  # 3. the RPN head alone
        {"head"},  # 4. the detector alone
    ]
    previous = before
    for snapshot, changed in zip(snapshots, expected, strict=True):
        moved = {
            k for k in parts
            if any(not np.array_equal(a, b) for a, b in zip(previous[k], snapshot[k], strict=True))
        }  # fmt: skip
        assert moved == changed
        previous = snapshot
    for history, stage in zip(histories, ("rpn", "detector", "rpn", "detector"), strict=True):
        zero = ("class_loss", "box_loss") if stage == "rpn" else ("rpn_objectness_loss",)
        assert all(history[k][0] == 0.0 for k in zero)
    # the first block never moved; every flag and the stage are restored
    np.testing.assert_array_equal(frozen_conv.kernel.numpy(), before["trunk"][0])
    assert not frozen_conv.trainable and m.backbone.get_layer("block2_conv1").trainable
    assert m.rpn_head.trainable and m.box_head.trainable and m.training_stage == "joint"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(image_size=(72, 64)), "divisible by 16"),
        (dict(neck="panet"), "neck must be"),
        (dict(roi_pooling="multiscale_align"), "needs neck='fpn'"),
        (dict(roi_pooling="crop"), "roi_pooling must be"),
        (dict(anchor_strides=(8,)), "strides"),
        (dict(train_proposals=(10,)), "train_proposals"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_arguments(overrides, match):
    kwargs = {**SMALL, "num_classes": NUM_CLASSES, **overrides}
    with pytest.raises(ValueError, match=match):
        FasterRCNN(**kwargs)


def test_bad_batches_are_refused(model):
    x, y = _train_data()
    with pytest.raises(ValueError, match="image_size"):
        model(np.zeros((1, 32, 32, 3), np.float32))
    m = _small()
    m.compile(optimizer=keras.optimizers.SGD(0.01))
    bad = {"boxes": y["boxes"], "labels": np.where(y["labels"] >= 0, 5, -1).astype(np.int32)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="label"):
        m.fit(x, bad, batch_size=4, epochs=1, verbose=0)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="finite"):
        m.predict(nan, batch_size=4, verbose=0)
    with pytest.raises(NotImplementedError, match="forward_with_loss"):
        m.loss_terms(y, m(x))


def test_presets():
    assert set(PRESETS) == {"faster_rcnn_vgg16", "faster_rcnn_resnet50_fpn", "faster_rcnn_tiny_256"}
    tiny = FasterRCNN.from_preset("faster_rcnn_tiny_256", num_classes=6)
    assert tiny.image_size == (256, 256) and tiny.anchors.shape == (16 * 16 * 12, 4)
