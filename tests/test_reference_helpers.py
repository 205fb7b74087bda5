"""Tests of the shared test helpers in tests/_reference.py: a helper that cannot fail would make
every test that uses it one that cannot fail."""

import numpy as np
import pytest
from _reference import assert_same_detections, np_iou, np_iou_pair


def _padded(rows, size=5):
    """Padded detections of one image from (score, label, box) rows."""
    det = {
        "boxes": -np.ones((1, size, 4)),
        "scores": -np.ones((1, size)),
        "labels": -np.ones((1, size), np.int64),
        "num_detections": np.array([len(rows)]),
    }
    for i, (score, label, box) in enumerate(rows):
        det["scores"][0, i], det["labels"][0, i], det["boxes"][0, i] = score, label, box
    return det


A = (0.9, 0, [0, 0, 10, 10])
B = (0.6, 1, [5, 5, 20, 20])
C = (0.6 + 1e-7, 1, [30, 30, 40, 40])  # ties B's score


def test_same_detections_in_another_order_of_near_tied_scores_pass():
    assert_same_detections(_padded([A, B, C]), _padded([A, C, B]))
    assert_same_detections(_padded([A, B]), _padded([A, (0.6 + 5e-5, 1, [5, 5, 20, 20.00005])]))


def test_real_differences_fail():
    with pytest.raises(AssertionError, match="no counterpart"):  # the box moved
        assert_same_detections(_padded([A, B]), _padded([(0.9, 0, [20, 0, 30, 10]), B]))
    with pytest.raises(AssertionError, match="no counterpart"):  # the box grew, the score too
        assert_same_detections(_padded([A, B]), _padded([(0.91, 0, [0, 0, 10, 12]), B]))
    with pytest.raises(AssertionError, match="no counterpart"):  # a label changed
        assert_same_detections(_padded([A, B]), _padded([(0.9, 2, A[2]), B]))
    with pytest.raises(AssertionError, match="no counterpart"):  # a confident detection missing
        assert_same_detections(_padded([A, B]), _padded([B]))
    with pytest.raises(AssertionError, match="unsorted"):
        assert_same_detections(_padded([B, A]), _padded([B, A]))
    bad = _padded([A])
    bad["scores"][0, 3] = 0.5  # padding must be -1
    with pytest.raises(AssertionError, match="past 1 is not -1"):
        assert_same_detections(bad, _padded([A]))


def test_nms_may_keep_the_other_of_two_tied_overlapping_boxes():
    twin = (0.9 + 1e-6, 0, [0, 0, 10, 12])  # IoU 0.83 with A: one suppresses the other
    assert_same_detections(_padded([A, B]), _padded([twin, B]))
    apart = (0.9 + 1e-6, 0, [0, 0, 10, 25])  # IoU 0.4: NMS (0.45) keeps both, so not a tie
    with pytest.raises(AssertionError, match="no counterpart"):
        assert_same_detections(_padded([A, B]), _padded([apart, B]))


def test_near_ties_at_the_cut_may_differ():
    # The lowest scores tie: the max_detections cut (or the score threshold) kept another one.
    low = (0.3, 2, [50, 50, 60, 60])
    other_low = (0.3 + 1e-6, 1, [0, 50, 9, 60])
    assert_same_detections(_padded([A, B, low]), _padded([A, B, other_low]))
    assert_same_detections(_padded([A, B, low]), _padded([A, B]))
    with pytest.raises(AssertionError, match="no counterpart"):
        assert_same_detections(_padded([A, B, low]), _padded([A, low]))  # B is not at the cut


def test_iou_references_agree():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (20, 2))], 1)
    matrix = np_iou(boxes[:7], boxes)
    pairs = np.array([[np_iou_pair(a, b) for b in boxes] for a in boxes[:7]])
    np.testing.assert_allclose(matrix, pairs, atol=1e-12)
    np.testing.assert_allclose(np.diag(matrix[:, :7]), 1.0)
    assert np_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 0.0  # empty union
    assert np_iou([[10, 10, 0, 0]], [[0, 0, 10, 10]])[0, 0] == 0.0  # inverted box: zero area
