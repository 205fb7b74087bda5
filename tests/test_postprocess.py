"""Tests of dlnotes.postprocess: batched NMS against hand cases and a NumPy greedy reference."""

import numpy as np
import pytest
import tensorflow as tf
from _reference import assert_same_detections, np_iou
from hypothesis import given, settings
from hypothesis import strategies as st

from dlnotes.boxes import BoxCoder
from dlnotes.postprocess import batched_nms, decode_detections

F = np.float32


def _nms(boxes, scores, **kwargs):
    out = batched_nms(np.asarray(boxes, F), np.asarray(scores, F), **kwargs)
    return {k: v.numpy() for k, v in out.items()}


def _greedy(boxes, scores, iou_threshold, score_threshold, limit):
    """Textbook greedy NMS on one set of boxes -> kept indices, best first."""
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    keep = []
    for i in order:
        if len(keep) == limit:
            break
        if not keep or np.all(np_iou(boxes[i], boxes[keep])[0] <= iou_threshold):
            keep.append(i)
    return keep


def _reference(
    boxes, scores, iou_threshold, score_threshold, max_det, agnostic, max_per_class=None
):
    """Per-image NumPy reference -> list of (boxes (K, 4), scores (K,), labels (K,)) per image."""
    results = []
    for b in range(scores.shape[0]):
        dets = []  # (score, label, box)
        if agnostic:
            labels = scores[b].argmax(-1)
            best = scores[b].max(-1)
            image_boxes = boxes[b] if boxes.ndim == 3 else boxes[b, np.arange(len(labels)), labels]
            for i in _greedy(image_boxes, best, iou_threshold, score_threshold, max_det):
                dets.append((best[i], labels[i], image_boxes[i]))
        else:
            for c in range(scores.shape[2]):
                class_boxes = boxes[b] if boxes.ndim == 3 else boxes[b, :, c]
                limit = max_per_class or max_det
                keep = _greedy(class_boxes, scores[b, :, c], iou_threshold, score_threshold, limit)
                dets.extend((scores[b, i, c], c, class_boxes[i]) for i in keep)
        dets.sort(key=lambda d: -d[0])
        dets = dets[:max_det]
        results.append(
            (
                np.array([d[2] for d in dets]).reshape(-1, 4),
                np.array([d[0] for d in dets]),
                np.array([d[1] for d in dets], np.int64),
            )
        )
    return results


def _check_against_reference(out, ref, max_det):
    """TF's padded detections equal the NumPy reference's, as sets (near-tied scores may come
    out in either order), at the padded size ``max_det``."""
    padded = {
        "boxes": -np.ones((len(ref), max_det, 4)),
        "scores": -np.ones((len(ref), max_det)),
        "labels": -np.ones((len(ref), max_det), np.int64),
        "num_detections": np.array([len(r[1]) for r in ref]),
    }
    for b, (ref_boxes, ref_scores, ref_labels) in enumerate(ref):
        n = len(ref_scores)
        padded["boxes"][b, :n], padded["scores"][b, :n], padded["labels"][b, :n] = (
            ref_boxes,
            ref_scores,
            ref_labels,
        )
    assert_same_detections(out, padded, atol=1e-6, rtol=1e-6)


# --- hand-made cases --------------------------------------------------------------------------

OVERLAPPING = [[0, 0, 10, 10], [1, 1, 11, 11]]  # IoU 81/119 = .68


def test_overlapping_same_class_keeps_one():
    out = _nms([OVERLAPPING], [[[0.9, 0.0], [0.8, 0.0]]], max_detections=4)
    assert out["num_detections"][0] == 1
    np.testing.assert_array_equal(out["boxes"][0, 0], [0, 0, 10, 10])
    np.testing.assert_allclose(out["scores"][0], [0.9, -1, -1, -1])
    np.testing.assert_array_equal(out["labels"][0], [0, -1, -1, -1])
    # Above the IoU threshold nothing is suppressed.
    out = _nms([OVERLAPPING], [[[0.9, 0.0], [0.8, 0.0]]], iou_threshold=0.7, max_detections=4)
    assert out["num_detections"][0] == 2


def test_overlapping_different_classes_keeps_both_unless_agnostic():
    scores = [[[0.9, 0.0], [0.0, 0.8]]]
    out = _nms([OVERLAPPING], scores, max_detections=4)
    assert out["num_detections"][0] == 2
    np.testing.assert_array_equal(out["labels"][0, :2], [0, 1])
    np.testing.assert_allclose(out["scores"][0, :2], [0.9, 0.8])
    out = _nms([OVERLAPPING], scores, max_detections=4, class_agnostic=True)
    assert out["num_detections"][0] == 1
    np.testing.assert_array_equal(out["labels"][0], [0, -1, -1, -1])
    np.testing.assert_array_equal(out["boxes"][0, 0], [0, 0, 10, 10])
    # Class-agnostic: the lower box's best class decides its label.
    out = _nms([OVERLAPPING], [[[0.2, 0.1], [0.0, 0.8]]], max_detections=4, class_agnostic=True)
    np.testing.assert_array_equal(out["labels"][0, :1], [1])
    np.testing.assert_array_equal(out["boxes"][0, 0], [1, 1, 11, 11])


def test_score_threshold_padding_and_dtypes():
    boxes = [[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]] * 2
    scores = [[[0.9], [0.04], [0.3]], [[0.01], [0.02], [0.03]]]
    out = batched_nms(np.asarray(boxes, F), np.asarray(scores, F), max_detections=5)
    assert out["boxes"].dtype == tf.float32 and out["scores"].dtype == tf.float32
    assert out["labels"].dtype == tf.int32 and out["num_detections"].dtype == tf.int32
    assert out["boxes"].shape == (2, 5, 4) and out["scores"].shape == (2, 5)
    out = {k: v.numpy() for k, v in out.items()}
    np.testing.assert_array_equal(out["num_detections"], [2, 0])
    np.testing.assert_allclose(out["scores"], [[0.9, 0.3, -1, -1, -1], [-1] * 5])
    np.testing.assert_array_equal(out["boxes"][0, :2], [[0, 0, 10, 10], [40, 40, 50, 50]])
    np.testing.assert_array_equal(out["boxes"][0, 2:], -1)
    np.testing.assert_array_equal(out["boxes"][1], -1)
    np.testing.assert_array_equal(out["labels"], [[0, 0, -1, -1, -1], [-1] * 5])
    for agnostic in (False, True):
        out = _nms(boxes, scores, score_threshold=0.035, class_agnostic=agnostic, max_detections=5)
        np.testing.assert_array_equal(out["num_detections"], [3, 0])


def test_max_detections_and_max_per_class():
    boxes = [[[20 * i, 0, 20 * i + 10, 10] for i in range(6)]]  # disjoint
    scores = [[[0.9 - 0.1 * i, 0.05 + 0.1 * i] for i in range(6)]]
    out = _nms(boxes, scores, score_threshold=0.0, max_detections=4)
    np.testing.assert_allclose(out["scores"][0], [0.9, 0.8, 0.7, 0.6])
    assert out["num_detections"][0] == 4
    out = _nms(boxes, scores, score_threshold=0.0, max_detections=6, max_per_class=2)
    np.testing.assert_allclose(out["scores"][0, :4], [0.9, 0.8, 0.55, 0.45])
    np.testing.assert_array_equal(out["labels"][0], [0, 0, 1, 1, -1, -1])


def test_per_class_boxes():
    # One anchor, two classes with different boxes (Faster R-CNN's box head).
    boxes = np.array([[[[0, 0, 10, 10], [50, 50, 70, 70]], [[1, 1, 11, 11], [80, 80, 90, 90]]]], F)
    scores = np.array([[[0.9, 0.6], [0.7, 0.5]]], F)
    out = _nms(boxes, scores, max_detections=4)
    # Class 0: the second box overlaps the first (IoU .68) -> suppressed; class 1: both kept.
    np.testing.assert_allclose(out["scores"][0], [0.9, 0.6, 0.5, -1])
    np.testing.assert_array_equal(out["labels"][0], [0, 1, 1, -1])
    np.testing.assert_array_equal(
        out["boxes"][0, :3], [[0, 0, 10, 10], [50, 50, 70, 70], [80, 80, 90, 90]]
    )
    out = _nms(boxes, scores, max_detections=4, class_agnostic=True)
    np.testing.assert_array_equal(out["boxes"][0, :1], [[0, 0, 10, 10]])
    np.testing.assert_array_equal(out["num_detections"], [1])


def test_pre_nms_top_k():
    boxes = [[[20 * i, 0, 20 * i + 10, 10] for i in range(5)]]
    scores = [[[s] for s in (0.3, 0.9, 0.5, 0.7, 0.1)]]
    for agnostic in (False, True):
        out = _nms(boxes, scores, pre_nms_top_k=2, max_detections=5, class_agnostic=agnostic)
        np.testing.assert_allclose(out["scores"][0], [0.9, 0.7, -1, -1, -1])
        np.testing.assert_array_equal(out["boxes"][0, 1], [60, 0, 70, 10])
    # k larger than N is fine.
    out = _nms(boxes, scores, pre_nms_top_k=100, max_detections=5)
    assert out["num_detections"][0] == 5


def test_invalid_arguments():
    boxes, scores = np.zeros((1, 3, 4), F), np.zeros((1, 3, 2), F)
    with pytest.raises(ValueError, match="scores"):
        batched_nms(boxes, scores[..., 0])
    with pytest.raises(ValueError, match="do not match"):
        batched_nms(np.zeros((1, 4, 4), F), scores)
    with pytest.raises(ValueError, match="do not match"):
        batched_nms(np.zeros((1, 3, 3, 4), F), scores)
    with pytest.raises(ValueError, match="max_per_class"):
        batched_nms(boxes, scores, class_agnostic=True, max_per_class=3)
    with pytest.raises(ValueError, match="iou_threshold"):
        batched_nms(boxes, scores, iou_threshold=1.5)
    with pytest.raises(ValueError, match="activation"):
        decode_detections(boxes[0], boxes, scores, BoxCoder(), activation="relu")


# --- NumPy reference on random boxes ----------------------------------------------------------


def _random_detections(seed, batch=2, num_boxes=60, num_classes=3, per_class_boxes=False):
    rng = np.random.default_rng(seed)
    shape = (batch, num_boxes, num_classes) if per_class_boxes else (batch, num_boxes)
    xy = rng.uniform(0, 80, size=(*shape, 2))
    wh = rng.uniform(5, 40, size=(*shape, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(F)
    scores = rng.uniform(0, 1, size=(batch, num_boxes, num_classes)).astype(F)
    return boxes, scores


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    agnostic=st.booleans(),
    per_class_boxes=st.booleans(),
    iou_threshold=st.sampled_from([0.3, 0.5, 0.7]),
)
def test_matches_numpy_greedy_reference(seed, agnostic, per_class_boxes, iou_threshold):
    boxes, scores = _random_detections(seed, per_class_boxes=per_class_boxes)
    out = _nms(
        boxes,
        scores,
        iou_threshold=iou_threshold,
        score_threshold=0.2,
        max_detections=50,
        class_agnostic=agnostic,
    )
    ref = _reference(boxes, scores, iou_threshold, 0.2, 50, agnostic)
    _check_against_reference(out, ref, 50)


def test_matches_reference_with_max_per_class_and_graph_mode():
    boxes, scores = _random_detections(3, num_boxes=80)
    fn = tf.function(lambda b, s: batched_nms(b, s, max_detections=20, max_per_class=5))
    out = {k: v.numpy() for k, v in fn(boxes, scores).items()}
    _check_against_reference(out, _reference(boxes, scores, 0.5, 0.05, 20, False, 5), 20)
    fn = tf.function(lambda b, s: batched_nms(b, s, max_detections=20, class_agnostic=True))
    out = {k: v.numpy() for k, v in fn(boxes, scores).items()}
    _check_against_reference(out, _reference(boxes, scores, 0.5, 0.05, 20, True), 20)


# --- decode_detections ------------------------------------------------------------------------


def _round_trip_case():
    anchors = np.array(
        [[x, y, x + 32, y + 32] for y in range(0, 128, 32) for x in range(0, 128, 32)], F
    )
    gt = np.array(
        [
            [[4, 6, 40, 30], [64, 64, 120, 100], [90, 10, 140, 50]],
            [[10, 70, 30, 90], [0] * 4, [0] * 4],
        ],
        F,
    )
    gt_anchor = np.array([[0, 10, 3], [8, 0, 0]])  # anchor index of every GT
    gt_class = np.array([[2, 0, 1], [1, -1, -1]])
    return anchors, gt, gt_anchor, gt_class


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_decode_detections_round_trip(activation):
    anchors, gt, gt_anchor, gt_class = _round_trip_case()
    coder = BoxCoder(std=(0.2, 0.2, 0.2, 0.2))
    batch, num_anchors, num_classes = 2, len(anchors), 3
    deltas = np.zeros((batch, num_anchors, 4), F)
    logits = np.full((batch, num_anchors, num_classes), -10.0, F)
    if activation == "softmax":
        logits[..., :] = 0.0  # uniform 1/3 < threshold below
    num_gt = [3, 1]
    for b in range(batch):
        for g in range(num_gt[b]):
            a = gt_anchor[b, g]
            deltas[b, a] = coder.encode(anchors[a], gt[b, g]).numpy()
            logits[b, a, gt_class[b, g]] = 10.0
    out = decode_detections(
        anchors,
        deltas,
        logits,
        coder,
        image_shape=(128, 128),
        activation=activation,
        score_threshold=0.5,
        max_detections=5,
    )
    out = {k: v.numpy() for k, v in out.items()}
    np.testing.assert_array_equal(out["num_detections"], num_gt)
    for b in range(batch):
        n = num_gt[b]
        order = np.argsort(out["boxes"][b, :n, 0])
        expected = np.argsort(gt[b, :n, 0])
        clipped = np.clip(gt[b, :n], 0, 128)  # the third GT sticks out of the image
        np.testing.assert_allclose(out["boxes"][b, :n][order], clipped[expected], atol=1e-3)
        np.testing.assert_array_equal(out["labels"][b, :n][order], gt_class[b, :n][expected])
    assert np.all(out["scores"][out["scores"] >= 0] > 0.99)


def test_decode_detections_per_class_deltas_and_min_size():
    anchors = np.array([[0, 0, 32, 32], [64, 64, 96, 96]], F)
    coder = BoxCoder.from_weights((10, 10, 5, 5))
    target = np.array([[[4, 4, 20, 28], [60, 60, 100, 90]]], F)  # class 1 box of each anchor
    deltas = np.zeros((1, 2, 2, 4), F)
    deltas[0, :, 1] = coder.encode(anchors, target[0]).numpy()
    deltas[0, :, 0] = coder.encode(anchors, [[0, 0, 0.001, 0.001], [64, 64, 96, 96]]).numpy()
    logits = np.array([[[-9.0, 9.0], [-9.0, 9.0]]], F)
    probs = tf.nn.softmax(logits).numpy()
    out = decode_detections(anchors, deltas, probs, coder, activation=None, max_detections=3)
    np.testing.assert_allclose(out["boxes"].numpy()[0, :2], target[0], atol=1e-3)
    np.testing.assert_array_equal(out["labels"].numpy()[0, :2], [1, 1])
    # A tiny class-0 box with a high score is dropped by min_size only.
    logits[0, 0] = [9.0, -9.0]
    out = decode_detections(anchors, deltas, logits, coder, max_detections=3)
    assert out["num_detections"].numpy()[0] == 2
    out = decode_detections(anchors, deltas, logits, coder, max_detections=3, min_size=0.01)
    assert out["num_detections"].numpy()[0] == 1
    np.testing.assert_array_equal(out["labels"].numpy()[0, :1], [1])


def test_class_agnostic_nms_keeps_boxes_with_no_positive_coordinate():
    # TF's padded NMS treats such boxes as removed; batched_nms shifts them first.
    boxes = [[[-30.0, -30.0, -10.0, -10.0], [0.0, 0.0, 10.0, 10.0], [-29.0, -29.0, -10.0, -10.0]]]
    scores = [[[0.9], [0.8], [0.7]]]  # the third overlaps the first (IoU 0.9): suppressed
    for agnostic in (True, False):
        out = _nms(boxes, scores, max_detections=3, class_agnostic=agnostic)
        assert int(out["num_detections"][0]) == 2, agnostic
        np.testing.assert_allclose(out["boxes"][0, :2], np.asarray(boxes[0][:2]))
