"""Tests of dlnotes.matching: anchor states, forced matches, border rule, balanced sampling."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import np_iou
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dlnotes.anchors import YOLO_COCO_ANCHORS, YoloAnchors, wh_iou
from dlnotes.matching import (
    Matches,
    assign_yolo_targets,
    gather_matched,
    match_anchors,
    sample_balanced,
)

F = np.float32


def _match(anchors, gt_boxes, gt_labels, *args, **kwargs):
    """match_anchors on NumPy inputs -> NumPy (states, matched_gt, matched_iou)."""
    m = match_anchors(
        np.asarray(anchors, F), np.asarray(gt_boxes, F), np.asarray(gt_labels), *args, **kwargs
    )
    return m.states.numpy(), m.matched_gt.numpy(), m.matched_iou.numpy()


def _reference_match(
    anchors, gt_boxes, gt_labels, pos, neg, force_best, level_sizes=None, image_shape=None, border=0
):
    """Loop-based float64 reference of the matching rule, written from the docstring."""
    batch, num_anchors = gt_boxes.shape[0], anchors.shape[0]
    states = np.zeros((batch, num_anchors), np.int64)
    matched = np.zeros((batch, num_anchors), np.int64)
    matched_iou = np.zeros((batch, num_anchors))
    if level_sizes is None:
        level_sizes = [num_anchors]
    bounds = np.cumsum([0, *level_sizes])
    inside = np.ones(num_anchors, bool)
    if image_shape is not None:
        h, w = image_shape
        inside = (
            (anchors[:, 0] >= -border)
            & (anchors[:, 1] >= -border)
            & (anchors[:, 2] <= w + border)
            & (anchors[:, 3] <= h + border)
        )
    for b in range(batch):
        boxes, labels = gt_boxes[b], gt_labels[b]
        valid = (labels >= 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        iou = np_iou(anchors, boxes) if len(boxes) else np.zeros((num_anchors, 0))
        iou[:, ~valid] = -1.0
        iou[~inside, :] = -1.0
        for a in range(num_anchors):
            row = iou[a]
            best = row.max() if len(row) else -1.0
            arg = int(np.argmax(row)) if len(row) else 0
            states[b, a] = 1 if best >= pos else (0 if best < neg else -1)
            matched[b, a], matched_iou[b, a] = arg, max(best, 0.0)
        if force_best is not None:
            forced_by = {}
            for g in range(len(boxes)):
                levels = (
                    [(0, num_anchors)]
                    if force_best == "global"
                    else list(zip(bounds[:-1], bounds[1:], strict=True))
                )
                for lo, hi in levels:
                    column = iou[lo:hi, g]
                    if column.size == 0 or column.max() <= 0:
                        continue
                    a = int(np.argmax(column)) + lo  # one anchor per GT (and level): first on ties
                    forced_by.setdefault(a, []).append(g)
            for a, gts in forced_by.items():
                g = max(gts, key=lambda g, a=a: (iou[a, g], -g))  # highest IoU, first on ties
                states[b, a], matched[b, a], matched_iou[b, a] = 1, g, iou[a, g]
        states[b, ~inside] = -1
    return states, matched, matched_iou


# --- hand-made cases --------------------------------------------------------------------------


def test_thresholds_and_ignore_band():
    gt = [[[0, 0, 10, 10]]]
    anchors = [
        [0, 0, 10, 10],  # IoU 1        -> positive
        [0, 0, 10, 15],  # 100/150      -> positive
        [0, 0, 10, 22],  # 100/220=.45  -> ignore
        [0, 0, 10, 30],  # 100/300=.33  -> negative
        [50, 50, 60, 60],  # 0          -> negative
    ]
    states, matched, iou = _match(anchors, gt, [[3]], force_best=None)
    np.testing.assert_array_equal(states, [[1, 1, -1, 0, 0]])
    np.testing.assert_array_equal(matched, [[0, 0, 0, 0, 0]])
    np.testing.assert_allclose(iou, [[1.0, 100 / 150, 100 / 220, 100 / 300, 0.0]], rtol=1e-5)
    # Equal thresholds: no ignore band; 0.45 >= 0.45 is positive, 0.33 negative.
    states, _, _ = _match(anchors, gt, [[3]], 0.45, 0.45, force_best=None)
    np.testing.assert_array_equal(states, [[1, 1, 1, 0, 0]])


def test_all_ignore_band():
    gt = [[[0, 0, 10, 10]]]
    anchors = [[0, 0, 10, 22], [0, 0, 22, 10]]  # both IoU 0.4545
    states, _, _ = _match(anchors, gt, [[0]], force_best=None)
    np.testing.assert_array_equal(states, [[-1, -1]])


def test_tie_between_two_anchors_forces_only_the_first():
    gt = [[[0, 0, 10, 10]]]
    anchors = [[-5, 0, 5, 10], [5, 0, 15, 10], [40, 40, 50, 50]]  # 1/3, 1/3, 0
    states, matched, iou = _match(anchors, gt, [[1]], force_best="global")
    np.testing.assert_array_equal(states, [[1, 0, 0]])
    np.testing.assert_array_equal(matched[:, :1], [[0]])
    np.testing.assert_allclose(iou, [[1 / 3, 1 / 3, 0]], rtol=1e-5)
    # Reversed anchor order: still one forced anchor, again the first of the tie.
    states, _, _ = _match(anchors[1::-1] + anchors[2:], gt, [[1]], force_best="global")
    np.testing.assert_array_equal(states, [[1, 0, 0]])
    # The GT is below the negative threshold everywhere: without forcing it has no anchor.
    states, _, _ = _match(anchors, gt, [[1]], force_best=None)
    np.testing.assert_array_equal(states, [[0, 0, 0]])


def test_anchor_best_for_two_gts_goes_to_higher_iou():
    anchors = [[0, 0, 10, 10], [100, 100, 110, 110]]
    gt = [[[0, 0, 10, 15], [0, 0, 10, 12]]]  # IoU 0.667 and 0.833 with anchor 0
    states, matched, iou = _match(anchors, gt, [[0, 1]], force_best="global")
    np.testing.assert_array_equal(states, [[1, 0]])
    assert matched[0, 0] == 1
    np.testing.assert_allclose(iou[0, 0], 100 / 120, rtol=1e-5)


def test_forced_match_goes_to_the_gt_that_forces_it():
    # Anchor X is the best anchor of GT j (IoU .25) but overlaps GT k more (.526); k's best
    # anchor is Y (.95). X is forced for j, so it is matched to j, not to its argmax k.
    anchors = [[0, 0, 10, 10], [0, 0, 20, 10]]  # X, Y
    gt = [[[-10, 0, 5, 10], [0, 0, 19, 10]]]  # j, k
    states, matched, iou = _match(anchors, gt, [[0, 1]], force_best="global")
    np.testing.assert_array_equal(states, [[1, 1]])
    np.testing.assert_array_equal(matched, [[0, 1]])
    np.testing.assert_allclose(iou, [[0.25, 0.95]], rtol=1e-5)
    # Without forcing X takes its argmax k (0.526 >= 0.5).
    states, matched, _ = _match(anchors, gt, [[0, 1]], force_best=None)
    np.testing.assert_array_equal(states, [[1, 1]])
    np.testing.assert_array_equal(matched, [[1, 1]])


def test_per_level_forcing_gives_one_anchor_per_level():
    anchors = [
        [0, 0, 10, 10],  # level 0: GT0 .694
        [30, 30, 40, 40],  # level 0: no overlap
        [0, 0, 40, 40],  # level 1: GT0 144/1600 = .09
        [100, 100, 140, 140],  # level 1: GT1 900/2300 = .39
    ]
    gt = [[[0, 0, 12, 12], [90, 90, 130, 130]]]
    states, matched, iou = _match(anchors, gt, [[0, 1]], force_best="per_level", level_sizes=[2, 2])
    # GT1 overlaps nothing on level 0 (best IoU 0) and forces nothing there.
    np.testing.assert_array_equal(states, [[1, 0, 1, 1]])
    np.testing.assert_array_equal(matched[0, [0, 2, 3]], [0, 0, 1])
    np.testing.assert_allclose(iou, [[100 / 144, 0, 144 / 1600, 900 / 2300]], rtol=1e-5)
    states, _, _ = _match(anchors, gt, [[0, 1]], force_best="global")
    np.testing.assert_array_equal(states, [[1, 0, 0, 1]])


def test_empty_gt_all_negative():
    anchors = [[0, 0, 10, 10], [5, 5, 20, 20]]
    padded = [[[0, 0, 10, 10], [-1, -1, -1, -1]]]  # a real-looking box, but label -1
    for gt, labels in ((padded, [[-1, -1]]), (np.zeros((1, 0, 4)), np.zeros((1, 0), np.int32))):
        for force in (None, "global", "per_level"):
            states, matched, iou = _match(anchors, gt, labels, force_best=force, level_sizes=[1, 1])
            np.testing.assert_array_equal(states, [[0, 0]])
            np.testing.assert_array_equal(matched, [[0, 0]])
            np.testing.assert_array_equal(iou, [[0, 0]])


def test_degenerate_gt_is_padding():
    anchors = [[0, 0, 10, 10]]
    gt = [[[0, 0, 0, 10], [0, 0, 10, 10]]]  # zero width (label 2) and a real box
    states, matched, _ = _match(anchors, gt, [[2, 5]])
    np.testing.assert_array_equal(states, [[1]])
    np.testing.assert_array_equal(matched, [[1]])
    states, _, iou = _match(anchors, [[[0, 0, 0, 10]]], [[2]])
    np.testing.assert_array_equal(states, [[0]])
    np.testing.assert_array_equal(iou, [[0]])


def test_image_border_anchors_ignored_and_never_forced():
    anchors = [
        [0, 0, 10, 10],  # inside
        [-5, 0, 5, 10],  # crosses the left border: ignored although it equals the GT
        [15, 15, 25, 25],  # crosses the bottom-right border
        [-2, 0, 8, 10],  # inside with allowed_border=2 only
    ]
    gt = [[[-5, 0, 5, 10]]]
    states, matched, iou = _match(anchors, gt, [[0]], image_shape=(20, 20))
    # The GT's best anchor inside the image is anchor 0 (IoU 1/3): forced, positive.
    np.testing.assert_array_equal(states, [[1, -1, -1, -1]])
    np.testing.assert_allclose(iou[0, 0], 1 / 3, rtol=1e-5)
    states, _, iou = _match(anchors, gt, [[0]], image_shape=(20, 20), allowed_border=2.0)
    # Anchor 3 (IoU 70/130 = .54) is now inside, positive, and the GT's best.
    np.testing.assert_array_equal(states, [[0, -1, -1, 1]])
    np.testing.assert_allclose(iou[0, 3], 70 / 130, rtol=1e-5)
    # All anchors outside -> all ignored.
    states, _, _ = _match(anchors, gt, [[0]], image_shape=(5, 5))
    np.testing.assert_array_equal(states, [[-1, -1, -1, -1]])
    # Per-image shapes (B, 2).
    states, _, _ = _match(anchors, [gt[0], gt[0]], [[0], [0]], image_shape=[[20, 20], [5, 5]])
    np.testing.assert_array_equal(states, [[1, -1, -1, -1], [-1, -1, -1, -1]])


def test_batch_with_different_numbers_of_gts():
    anchors = [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]
    gt = [
        [[0, 0, 10, 11], [20, 20, 30, 31], [-1, -1, -1, -1]],  # 2 GTs
        [[50, 50, 60, 62], [-1, -1, -1, -1], [-1, -1, -1, -1]],  # 1 GT
    ]
    labels = [[4, 7, -1], [2, -1, -1]]
    states, matched, iou = _match(anchors, gt, labels)
    np.testing.assert_array_equal(states, [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(matched[0, :2], [0, 1])
    assert matched[1, 2] == 0
    np.testing.assert_allclose(iou, [[100 / 110, 100 / 110, 0], [0, 0, 100 / 120]], rtol=1e-5)
    m = match_anchors(np.asarray(anchors, F), np.asarray(gt, F), np.asarray(labels))
    got = gather_matched(np.asarray(labels), m.matched_gt).numpy()
    np.testing.assert_array_equal(np.where(states == 1, got, -9), [[4, 7, -9], [-9, -9, 2]])


def test_per_image_anchors():
    anchors = np.array([[[0, 0, 10, 10]], [[50, 50, 60, 60]]], F)  # (B, A=1, 4)
    gt = np.array([[[0, 0, 10, 10]], [[0, 0, 10, 10]]], F)
    states, _, _ = _match(anchors, gt, [[0], [0]], force_best=None)
    np.testing.assert_array_equal(states, [[1], [0]])


def test_invalid_arguments():
    anchors, gt, labels = np.zeros((3, 4), F), np.zeros((1, 2, 4), F), -np.ones((1, 2), np.int32)
    with pytest.raises(ValueError, match="positive_threshold"):
        match_anchors(anchors, gt, labels, 0.3, 0.4)
    with pytest.raises(ValueError, match="level_sizes"):
        match_anchors(anchors, gt, labels, force_best="per_level")
    with pytest.raises(ValueError, match="sum to 2"):
        match_anchors(anchors, gt, labels, force_best="per_level", level_sizes=[1, 1])
    with pytest.raises(ValueError, match="force_best"):
        match_anchors(anchors, gt, labels, force_best="local")
    with pytest.raises(ValueError, match="gt_boxes"):
        match_anchors(anchors, gt[0], labels)
    with pytest.raises(ValueError, match="anchors"):
        match_anchors(np.zeros((3, 5), F), gt, labels)


# --- reference comparison and compilation -----------------------------------------------------


def _random_case(seed, batch=2, num_anchors=24, num_gt=4):
    rng = np.random.default_rng(seed)
    xy = rng.integers(-4, 36, size=(num_anchors, 2))
    wh = rng.integers(1, 16, size=(num_anchors, 2))
    anchors = np.concatenate([xy, xy + wh], -1).astype(F)
    anchors[: num_anchors // 4] = anchors[num_anchors // 4 : num_anchors // 2]  # exact ties
    gxy = rng.integers(0, 30, size=(batch, num_gt, 2))
    gwh = rng.integers(0, 14, size=(batch, num_gt, 2))  # some zero-size (invalid) GTs
    gt = np.concatenate([gxy, gxy + gwh], -1).astype(F)
    labels = rng.integers(-1, 3, size=(batch, num_gt))
    return anchors, gt, labels


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    force=st.sampled_from([None, "global", "per_level"]),
    thresholds=st.sampled_from([(0.5, 0.4), (0.7, 0.3), (0.5, 0.5)]),
    border=st.sampled_from([None, 0.0, 3.0]),
)
def test_matches_loop_reference(seed, force, thresholds, border):
    anchors, gt, labels = _random_case(seed)
    level_sizes = [10, 8, 6]
    image_shape = None if border is None else (32, 36)
    kwargs = dict(force_best=force, level_sizes=level_sizes, image_shape=image_shape)
    states, matched, iou = _match(
        anchors, gt, labels, *thresholds, **kwargs, allowed_border=border or 0.0
    )
    ref = _reference_match(
        anchors, gt, labels, *thresholds, force, level_sizes, image_shape, border or 0.0
    )
    np.testing.assert_array_equal(states, ref[0])
    np.testing.assert_array_equal(matched, ref[1])
    np.testing.assert_allclose(iou, ref[2], rtol=1e-5, atol=1e-6)


def test_jit_compile_matches_eager():
    anchors, gt, labels = _random_case(7, batch=3, num_anchors=24, num_gt=5)

    def run(a, g, lab):
        m = match_anchors(
            a, g, lab, force_best="per_level", level_sizes=[10, 8, 6], image_shape=(32, 36)
        )
        return m.states, m.matched_gt, m.matched_iou

    eager = run(anchors, gt, labels)
    compiled = tf.function(run, jit_compile=True)(anchors, gt, labels)
    for e, c in zip(eager, compiled, strict=True):
        np.testing.assert_allclose(e.numpy(), c.numpy(), rtol=1e-6)
    # G == 0 compiles too: inside anchors negative, the others ignored.
    empty = np.zeros((3, 0, 4), F), np.zeros((3, 0), np.int32)
    out = tf.function(run, jit_compile=True)(anchors, *empty)
    ref = _reference_match(anchors, *empty, 0.5, 0.4, "per_level", [10, 8, 6], (32, 36))
    np.testing.assert_array_equal(out[0].numpy(), ref[0])
    assert set(np.unique(ref[0])) == {-1, 0}


def test_matches_is_a_namedtuple():
    m = match_anchors(np.zeros((2, 4), F) + [0, 0, 1, 1], np.zeros((1, 1, 4), F), [[-1]])
    assert isinstance(m, Matches)
    assert m.states.dtype == tf.int32 and m.matched_gt.dtype == tf.int32
    assert m.matched_iou.dtype == tf.float32
    assert m.states.shape == (1, 2)


# --- gather_matched --------------------------------------------------------------------------


def test_gather_matched_values_and_empty():
    values = np.arange(2 * 3 * 4, dtype=F).reshape(2, 3, 4)
    idx = np.array([[2, 0, 1, 1], [0, 0, 2, 1]], np.int32)
    got = gather_matched(values, idx).numpy()
    np.testing.assert_array_equal(got, np.stack([values[0][idx[0]], values[1][idx[1]]]))
    empty = gather_matched(np.zeros((2, 0, 4), F), np.zeros((2, 5), np.int32))
    assert empty.shape == (2, 5, 4)
    np.testing.assert_array_equal(empty.numpy(), 0)
    labels = gather_matched(np.zeros((2, 0), np.int32), np.zeros((2, 5), np.int32))
    assert labels.shape == (2, 5) and labels.dtype == tf.int32


# --- sample_balanced -------------------------------------------------------------------------


def _states(num_pos, num_neg, num_ignore, seed=0, batch=1):
    rng = np.random.default_rng(seed)
    row = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignore, np.int32)
    return np.stack([rng.permutation(row) for _ in range(batch)])


@pytest.mark.parametrize(
    ("num_pos", "num_neg", "expected_pos", "expected_neg"),
    [(300, 1000, 128, 128), (10, 1000, 10, 246), (10, 20, 10, 20), (0, 1000, 0, 256)],
)
def test_sample_balanced_budget(num_pos, num_neg, expected_pos, expected_neg):
    states = _states(num_pos, num_neg, 100, batch=2)
    out = sample_balanced(states, 256, 0.5, seed=(1, 2)).numpy()
    np.testing.assert_array_equal((out == 1).sum(-1), [expected_pos] * 2)
    np.testing.assert_array_equal((out == 0).sum(-1), [expected_neg] * 2)
    # Only relabels to -1: sampled anchors keep their state; ignored ones are never sampled.
    sampled = out != -1
    np.testing.assert_array_equal(out[sampled], states[sampled])
    assert not np.any(sampled & (states == -1))


def test_sample_balanced_fraction_and_determinism():
    states = _states(400, 2000, 50, batch=3)
    out = sample_balanced(states, 512, 0.25, seed=(3, 4)).numpy()
    np.testing.assert_array_equal((out == 1).sum(-1), [128] * 3)
    np.testing.assert_array_equal((out == 0).sum(-1), [384] * 3)
    again = sample_balanced(states, 512, 0.25, seed=(3, 4)).numpy()
    np.testing.assert_array_equal(out, again)
    other = sample_balanced(states, 512, 0.25, seed=(3, 5)).numpy()
    assert np.any(out != other)
    compiled = tf.function(sample_balanced, jit_compile=True)(states, 512, 0.25, (3, 4))
    np.testing.assert_array_equal(compiled.numpy(), out)


def test_sample_balanced_is_unbiased_over_positions():
    # The same states in 64 images: the sample must not favour the first positives in order.
    row = np.array([1] * 300 + [0] * 300, np.int32)
    out = sample_balanced(np.tile(row, (64, 1)), 256, 0.5, seed=(5, 6)).numpy()
    first_half = (out[:, :150] == 1).sum() / (out[:, :300] == 1).sum()
    assert abs(first_half - 0.5) < 0.05
    # Every positive is picked in some image.
    assert np.all((out[:, :300] == 1).any(0))


def test_sample_balanced_invalid_arguments():
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_balanced(np.zeros((1, 4), np.int32), 4, 1.5)
    with pytest.raises(ValueError, match="num_samples"):
        sample_balanced(np.zeros((1, 4), np.int32), -1)
    with pytest.raises(ValueError, match="states"):
        sample_balanced(np.zeros((4,), np.int32), 4)


def test_per_level_forcing_takes_one_anchor_when_many_small_anchors_tie_inside_a_large_gt():
    # Level 0: four 2x2 anchors all inside the 20x20 GT (identical IoU 4/400); level 1: two
    # anchors, one overlapping better. Forcing every tie would make all four positive.
    anchors = [
        [0, 0, 2, 2],
        [4, 4, 6, 6],
        [8, 8, 10, 10],
        [12, 12, 14, 14],
        [0, 0, 16, 16],
        [30, 30, 46, 46],
    ]
    gt = [[[0, 0, 20, 20]]]
    states, matched, _ = _match(anchors, gt, [[0]], force_best="per_level", level_sizes=[4, 2])
    np.testing.assert_array_equal(states, [[1, 0, 0, 0, 1, 0]])
    states, _, _ = _match(anchors, gt, [[0]], force_best="global")
    np.testing.assert_array_equal(states, [[0, 0, 0, 0, 1, 0]])


# ----------------------------------------------------------------------------- YOLO targets
COCO = YoloAnchors()
SMALL = YoloAnchors(anchors=YOLO_COCO_ANCHORS / 6.5)  # for a 64 x 96 input: grids 2x3, 4x6, 8x12
SMALL_HW = (64, 96)


def _yolo(gt_boxes, gt_labels, anchors=COCO, image_hw=(416, 416), num_classes=3, **kwargs):
    out = assign_yolo_targets(
        np.asarray(gt_boxes, F),
        np.asarray(gt_labels, np.int32),
        anchors,
        image_hw,
        num_classes,
        **kwargs,
    )
    return [y.numpy() for y in out]


def _reference_yolo(gt_boxes, gt_labels, anchors, image_hw, num_classes, rule):
    """Loop-based float64 reference written from the docstring (keras-yolo3's loop plus the
    documented clipping, clamping and "per_level" rule). Returns (y_true list, ambiguous) where
    ambiguous flags a near-tie between anchors (float32 and float64 may then pick differently)."""
    height, width = image_hw
    gt_boxes = np.asarray(gt_boxes, np.float64)
    batch, num_gt = gt_labels.shape
    a_per_level = len(anchors.masks[0])
    grids = [(height // s, width // s) for s in anchors.strides]
    out = [np.zeros((batch, gh, gw, a_per_level, 5 + num_classes)) for gh, gw in grids]
    ambiguous = False
    for b in range(batch):
        for n in range(num_gt):  # in order: a later GT overwrites an earlier one
            x1, y1, x2, y2 = gt_boxes[b, n]
            x1, x2 = np.clip([x1, x2], 0, width)
            y1, y2 = np.clip([y1, y2], 0, height)
            w, h, label = x2 - x1, y2 - y1, gt_labels[b, n]
            if label < 0 or w <= 0 or h <= 0:
                continue
            iou = wh_iou([[w, h]], anchors.anchors)[0]  # (K,)
            for level, mask in enumerate(anchors.masks):
                candidates = iou[list(mask)] if rule == "per_level" else iou
                top = np.sort(candidates)[::-1]
                ambiguous |= len(top) > 1 and top[0] - top[1] < 1e-5
                if rule == "per_level":
                    a = int(np.argmax(candidates))
                else:
                    k = int(np.argmax(iou))
                    if k not in mask:
                        continue
                    a = mask.index(k)
                stride = anchors.strides[level]
                gh, gw = grids[level]
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                col, row = min(int(cx // stride), gw - 1), min(int(cy // stride), gh - 1)
                cell = np.zeros(5 + num_classes)
                cell[:5] = [cx / width, cy / height, w / width, h / height, 1.0]
                cell[5 + label] = 1.0
                out[level][b, row, col, a] = cell
    return out, ambiguous


def _positives(y_true):
    return [np.argwhere(y[..., 4] > 0).tolist() for y in y_true]


def test_assign_yolo_hand_made_both_rules():
    # GT 0: 40x70 at centre (30, 45). Shape IoUs: (30, 61) 0.654 is the best of all 9 (level 1,
    # index 0); level 0's best is (116, 90) (index 0), level 2's (33, 23) (index 2).
    # GT 1: 200x200 at (200, 200): (156, 198) 0.772 is the best of all (level 0, index 1);
    # level 1: (59, 119) (index 2); level 2: (33, 23) (index 2).
    gt = [[[10, 10, 50, 80], [100, 100, 300, 300], [0, 0, 0, 0]]]
    labels = [[0, 2, -1]]
    per_level = _yolo(gt, labels)
    assert [y.shape for y in per_level] == [(1, 13, 13, 3, 8), (1, 26, 26, 3, 8), (1, 52, 52, 3, 8)]
    assert _positives(per_level) == [
        [[0, 1, 0, 0], [0, 6, 6, 1]],
        [[0, 2, 1, 0], [0, 12, 12, 2]],
        [[0, 5, 3, 2], [0, 25, 25, 2]],
    ]
    best = _yolo(gt, labels, rule="best_of_all")
    assert _positives(best) == [[[0, 6, 6, 1]], [[0, 2, 1, 0]], []]
    s = 416.0
    np.testing.assert_allclose(best[0][0, 6, 6, 1], [200 / s] * 4 + [1, 0, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(best[1][0, 2, 1, 0], [30 / s, 45 / s, 40 / s, 70 / s, 1, 1, 0, 0])
    # The same values on every level under "per_level"; zeros everywhere else.
    for y, (row, col, a) in zip(per_level, [(6, 6, 1), (12, 12, 2), (25, 25, 2)], strict=True):
        np.testing.assert_allclose(y[0, row, col, a], [200 / s] * 4 + [1, 0, 0, 1], rtol=1e-6)
    total = sum(float(np.abs(y).sum()) for y in per_level)
    expected = 3 * (4 * 200 / s + 2) + 3 * ((30 + 45 + 40 + 70) / s + 2)
    assert total == pytest.approx(expected, rel=1e-6)


def test_assign_yolo_one_positive_per_gt_or_per_level():
    rng = np.random.default_rng(0)
    # 12 GTs of varied shapes, each in its own 64-pixel block: no collisions on any level.
    corners = np.array([(x, y) for y in range(0, 384, 128) for x in range(0, 512, 128)])[:12]
    wh = rng.uniform(4, 60, (12, 2))
    gt = np.concatenate([corners + 2, corners + 2 + wh], -1)[None]
    labels = rng.integers(0, 3, (1, 12))
    best = _yolo(gt, labels, image_hw=(384, 512), rule="best_of_all")
    per_level = _yolo(gt, labels, image_hw=(384, 512))
    assert sum(int(y[..., 4].sum()) for y in best) == 12
    assert [int(y[..., 4].sum()) for y in per_level] == [12, 12, 12]
    # best_of_all puts each GT on the level whose mask holds its best anchor of all 9.
    best_k = wh_iou(wh, COCO.anchors).argmax(axis=1)
    expected_counts = [int(np.isin(best_k, m).sum()) for m in COCO.masks]
    assert [int(y[..., 4].sum()) for y in best] == expected_counts
    # Class sums: every positive carries its own one-hot label.
    for y in per_level:
        np.testing.assert_array_equal(
            y[..., 5:].sum(axis=(0, 1, 2, 3)), np.bincount(labels[0], minlength=3)
        )


def test_assign_yolo_collisions_later_gt_wins():
    box = [100, 100, 140, 150]
    other = [101, 101, 139, 149]  # same cells and best anchors on every level, other size
    for labels, winner in (([[0, 1, 2]], 2), ([[2, 1, 0]], 0)):
        y = _yolo([[box, box, box]], labels)
        for level in y:
            assert int(level[..., 4].sum()) == 1
            assert level[..., 5:].sum(axis=(0, 1, 2, 3)).argmax() == winner
    y = _yolo([[other, box, box]], [[0, 1, -1]])  # the padding after them claims nothing
    for level in y:
        (pos,) = np.argwhere(level[..., 4] > 0)
        np.testing.assert_allclose(
            level[tuple(pos)][:4], [120 / 416, 125 / 416, 40 / 416, 50 / 416]
        )
        np.testing.assert_array_equal(level[tuple(pos)][5:], [0, 1, 0])
    y = _yolo([[box, other]], [[0, 1]])
    for level in y:
        (pos,) = np.argwhere(level[..., 4] > 0)
        np.testing.assert_allclose(
            level[tuple(pos)][:4], [120 / 416, 125 / 416, 38 / 416, 48 / 416]
        )
    # Collisions are resolved per image: the same box in another image is kept.
    y = _yolo([[box, box], [box, [0, 0, 0, 0]]], [[0, 1], [2, -1]])
    for level in y:
        assert level[0, ..., 4].sum() == 1 and level[1, ..., 4].sum() == 1
        assert level[0, ..., 6].sum() == 1 and level[1, ..., 7].sum() == 1


def test_assign_yolo_border_padding_and_degenerate_boxes():
    gt = [
        [
            [384, 384, 448, 448],  # centre (416, 416) on the corner: clipped to 32x32 at (400, 400)
            [420, 10, 460, 50],  # entirely outside: zero width after clipping
            [50, 50, 90, 90],  # padding label
            [60, 60, 60, 90],  # zero width
            [70, 70, 65, 90],  # negative width
            [80, 80, 120, 75],  # negative height
        ]
    ]
    labels = [[1, 0, -1, 0, 2, 1]]
    for rule in ("per_level", "best_of_all"):
        y = _yolo(gt, labels, rule=rule)
        positives = _positives(y)
        flat = [p for level in positives for p in level]
        assert len(flat) == (3 if rule == "per_level" else 1)
        for level, cells in enumerate(positives):
            stride = 32 // 2**level
            for _, row, col, a in cells:
                assert (row, col) == (400 // stride, 400 // stride)
                np.testing.assert_allclose(
                    y[level][0, row, col, a], [400 / 416, 400 / 416, 32 / 416, 32 / 416, 1, 0, 1, 0]
                )
    # A box on the bottom-right border lands in the last cell of every level.
    y = _yolo([[[408, 404, 420, 416]]], [[0]])  # clipped to x2 = 416: centre (412, 410)
    assert _positives(y) == [[[0, 12, 12, 0]], [[0, 25, 25, 0]], [[0, 51, 51, 0]]]
    np.testing.assert_allclose(y[2][0, 51, 51, 0, :4], np.array([412, 410, 8, 12]) / 416)
    # Nothing valid at all, or no GT column: all zeros of the right shapes.
    for boxes, labs in (([[[0, 0, 10, 10]]], [[-1]]), (np.zeros((2, 0, 4)), np.zeros((2, 0)))):
        y = _yolo(boxes, labs)
        assert [t.shape[:4] for t in y] == [
            (len(labs), 13, 13, 3),
            (len(labs), 26, 26, 3),
            (len(labs), 52, 52, 3),
        ]
        assert all(not t.any() for t in y)


def test_assign_yolo_anchor_outside_every_mask():
    # Two levels using only the 6 largest anchors: a small GT's best of all 9 anchors is on no
    # level, so best_of_all assigns nothing while per_level still assigns one per level.
    anchors = YoloAnchors(masks=((6, 7, 8), (3, 4, 5)), strides=(32, 16))
    gt, labels = [[[100, 100, 110, 113]]], [[0]]
    assert sum(int(y[..., 4].sum()) for y in _yolo(gt, labels, anchors, rule="best_of_all")) == 0
    assert [int(y[..., 4].sum()) for y in _yolo(gt, labels, anchors)] == [1, 1]


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 2),
    num_gt=st.integers(0, 7),
    rule=st.sampled_from(["per_level", "best_of_all"]),
)
def test_assign_yolo_matches_reference(data, batch, num_gt, rule):
    coords = st.integers(-12, 100)
    boxes = np.array(
        data.draw(
            st.lists(
                st.tuples(coords, coords, st.integers(-2, 50), st.integers(-2, 50)),
                min_size=batch * num_gt,
                max_size=batch * num_gt,
            )
        ),
        np.float64,
    ).reshape(batch, num_gt, 4)
    boxes[..., 2:] += boxes[..., :2]  # x1, y1, w, h -> xyxy
    labels = np.array(
        data.draw(st.lists(st.integers(-1, 2), min_size=batch * num_gt, max_size=batch * num_gt)),
        np.int32,
    ).reshape(batch, num_gt)
    expected, ambiguous = _reference_yolo(boxes, labels, SMALL, SMALL_HW, 3, rule)
    assume(not ambiguous)
    got = _yolo(boxes, labels, SMALL, SMALL_HW, rule=rule)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, e, atol=1e-6)


def test_assign_yolo_under_xla_matches_eager():
    rng = np.random.default_rng(3)
    xy = rng.uniform(-10, 90, (3, 9, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (3, 9, 2))], -1).astype(F)
    labels = rng.integers(-1, 4, (3, 9)).astype(np.int32)
    for rule in ("per_level", "best_of_all"):
        fn = tf.function(
            lambda b, lab, r=rule: assign_yolo_targets(b, lab, SMALL, SMALL_HW, 4, rule=r),
            jit_compile=True,
        )
        expected, _ = _reference_yolo(boxes, labels, SMALL, SMALL_HW, 4, rule)
        for g, e in zip(fn(boxes, labels), expected, strict=True):
            np.testing.assert_allclose(g.numpy(), e, atol=1e-6)


def test_assign_yolo_errors():
    gt, labels = np.zeros((1, 1, 4), F), np.zeros((1, 1), np.int32)
    with pytest.raises(ValueError, match="rule"):
        assign_yolo_targets(gt, labels, COCO, (416, 416), 3, rule="global")
    with pytest.raises(ValueError, match="YoloAnchors"):
        assign_yolo_targets(gt, labels, COCO.anchors, (416, 416), 3)
    with pytest.raises(ValueError, match="divisible"):
        assign_yolo_targets(gt, labels, COCO, (400, 416), 3)
    with pytest.raises(ValueError, match="num_classes"):
        assign_yolo_targets(gt, labels, COCO, (416, 416), 0)
    with pytest.raises(ValueError, match="gt_boxes"):
        assign_yolo_targets(np.zeros((1, 4), F), labels, COCO, (416, 416), 3)
    with pytest.raises(ValueError, match="gt_labels"):
        assign_yolo_targets(gt, np.zeros((1, 2), np.int32), COCO, (416, 416), 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes=3"):
        assign_yolo_targets([[[0, 0, 10, 10]]], [[3]], COCO, (416, 416), 3)


# ----------------------------------------------------------------------------- label encoder
def test_anchor_label_encoder_targets_and_config():
    from dlnotes.anchors import AnchorGenerator
    from dlnotes.boxes import BoxCoder
    from dlnotes.matching import AnchorLabelEncoder

    generator = AnchorGenerator((16, 32), (8, 16))
    anchors = generator((64, 64))
    level_sizes = generator.level_sizes((64, 64))
    boxes = np.array([[[8, 8, 40, 40], [30, 20, 70, 50], [-1, -1, -1, -1]]], F)  # 2nd crosses
    labels = np.array([[2, 0, -1]], np.int32)
    coder = BoxCoder(std=(0.2,) * 4)
    retina = AnchorLabelEncoder(0.5, 0.4)
    out = {
        k: v.numpy()
        for k, v in retina(anchors, boxes, labels, 3, coder, (64, 64), level_sizes).items()
    }
    clipped = np.minimum(boxes, 64.0)  # the second box is matched on its visible part
    states, matched, _ = _match(anchors, clipped, labels, 0.5, 0.4)
    np.testing.assert_array_equal(out["states"], states)
    positive = states == 1
    np.testing.assert_array_equal(
        out["class_targets"][positive].argmax(-1), labels[0][matched[positive]]
    )
    assert (out["class_targets"][~positive] == 0).all() and (
        out["box_targets"][~positive] == 0
    ).all()
    expected = coder.encode(anchors, clipped[0][matched[0]]).numpy()[positive[0]]
    np.testing.assert_allclose(out["box_targets"][positive], expected, atol=1e-5)
    # EfficientDet's fg / bg rule: no ignore band
    fg_bg = AnchorLabelEncoder(0.5, 0.5)(anchors, boxes, labels, 3, coder, (64, 64), level_sizes)
    assert set(np.unique(fg_bg["states"].numpy())) <= {0, 1}
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(retina))
    assert (
        clone.get_config()
        == retina.get_config()
        == {"positive_threshold": 0.5, "negative_threshold": 0.4, "force_best": "global"}
    )
    with pytest.raises(ValueError, match="negative_threshold <= positive_threshold"):
        AnchorLabelEncoder(0.4, 0.5)
    with pytest.raises(ValueError, match="force_best"):
        AnchorLabelEncoder(force_best="always")
