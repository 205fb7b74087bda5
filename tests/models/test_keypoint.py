"""Tests of dlnotes.models.keypoint: heads, in-graph targets and the losses against float64 NumPy
references (CenterNet's Gaussian, the cell-collision rule, every loss option), decoding and
grouping on hand-made maps, degenerate and bad inputs, the Keras workflow, a short training run,
save / load, XLA, two replicas and COCO keypoint evaluation."""

import json
import math

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
import test_centerness as centernet  # CenterNet's gaussian_radius / draw_umich_gaussian in NumPy
from _reference import (
    check_replicas_match_one_device,
    detector_replicas_script,
    script_beside_tests,
    script_result,
)

from dlnotes.data import CocoDataset
from dlnotes.evaluation import predictions_to_coco
from dlnotes.losses import penalty_reduced_focal_loss
from dlnotes.models.keypoint import (
    KEYPOINT_LOSSES,
    PRESETS,
    KeypointDetector,
    evaluate_keypoints,
    group_keypoints,
    heatmap_loss,
    keypoint_targets,
)

SIZE = (64, 64)
NUM_CLASSES = 2
K = 3
# The tiny preset slimmed for tests that compile whole training steps: P2-P5 of a 64 px input
# (grids 16, 8, 4, 2), one 8-channel conv per head.
SLIM = dict(num_channels=8, head_depth=1)
TERMS = ("xy_loss", "class_loss", "centerness_loss")


def _tiny(**overrides):
    return KeypointDetector.from_preset(
        "keypoint_tiny_256", num_classes=NUM_CLASSES, num_keypoints=K, image_size=SIZE,
        **{**SLIM, **overrides},
    )  # fmt: skip


def _images(n, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, *SIZE, 3)).astype(np.float32)


def _object(x1, y1, x2, y2, v=(2, 2, 2)):
    """Keypoints (centre, top middle, right middle) of a box, with visibilities ``v``."""
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return [[cx, cy, v[0]], [cx, y1, v[1]], [x2, cy, v[2]]]


def _targets(objects_per_image, labels_per_image, pad_to=3, with_boxes=True):
    """Padded {"keypoints": (B, pad_to, K, 3), "labels"[, "boxes"]} from per-image lists of
    ((x1, y1, x2, y2), visibilities)."""
    batch = len(objects_per_image)
    keypoints = -np.ones((batch, pad_to, K, 3), np.float32)
    boxes = -np.ones((batch, pad_to, 4), np.float32)
    labels = -np.ones((batch, pad_to), np.int32)
    for b, (objects, lb) in enumerate(zip(objects_per_image, labels_per_image, strict=True)):
        for n, (box, v) in enumerate(objects):
            keypoints[b, n] = _object(*box, v=v)
            boxes[b, n] = box
        labels[b, : len(lb)] = lb
    y = {"keypoints": keypoints, "labels": labels}
    if with_boxes:
        y["boxes"] = boxes
    return y


def _train_data():
    y = _targets(
        [
            [((8, 8, 40, 40), (2, 2, 2)), ((30, 20, 60, 50), (2, 1, 2))],
            [],
            [((4, 30, 24, 62), (2, 2, 0))],
            [((10, 10, 50, 30), (2, 2, 2))],
        ],
        [[0, 1], [], [1], [0]],
    )
    return _images(4, seed=1), y


@pytest.fixture(scope="module")
def model():
    return _tiny()


# ----------------------------------------------------------------------------- NumPy references
def np_targets(model, keypoints, labels, boxes=None):
    """float64 targets of the rules in the module docstring, point by point."""
    keypoints = np.asarray(keypoints, np.float64)
    labels = np.asarray(labels)
    batch, num_objects, k_total = keypoints.shape[:3]
    types, slots = model.num_point_classes, model.points_per_cell
    height, width = model.image_size
    out = [
        {
            "centerness": np.zeros((batch, h, w)),
            "offsets": np.zeros((batch, h, w, slots, 2)),
            "classes": np.zeros((batch, h, w, slots, types)),
            "positive": np.zeros((batch, h, w, slots)),
        }
        for h, w in model.grid_shapes
    ]
    for b in range(batch):
        cells = {}  # (level, cx, cy) -> [(-value, index, dx, dy, type)]
        for n in range(num_objects):
            if labels[b, n] < 0:
                continue
            points = keypoints[b, n]
            labelled = (points[:, 2] > 0) & np.isfinite(points).all(1)
            if boxes is not None:
                x1, y1, x2, y2 = np.clip(boxes[b, n], 0, [width, height, width, height])
                w, h = max(x2 - x1, 0), max(y2 - y1, 0)
            elif labelled.any():
                w, h = np.ptp(points[labelled, 0]), np.ptp(points[labelled, 1])
            else:
                w = h = 0.0
            size = max(w, h, 1e-6)
            level = int(np.argmin([abs(math.log2(size / model.cells_per_object) - math.log2(s))
                                   for s in model.strides]))  # fmt: skip
            s = model.strides[level]
            grid_h, grid_w = model.grid_shapes[level]
            r = max(0, int(centernet.centernet_gaussian_radius(
                (math.ceil(h / s), math.ceil(w / s)), model.min_overlap)))  # fmt: skip
            sigma = (2 * r + 1) / 6
            for k in range(k_total):
                x, y, v = points[k]
                if not (labelled[k] and 0 <= x < width and 0 <= y < height):
                    continue
                cx, cy = min(int(x // s), grid_w - 1), min(int(y // s), grid_h - 1)
                centernet.centernet_draw_gaussian(out[level]["centerness"][b], (cx, cy), r)
                value = math.exp(
                    -((x / s - cx - 0.5) ** 2 + (y / s - cy - 0.5) ** 2) / (2 * sigma**2)
                )
                entry = (
                    -value,
                    n * k_total + k,
                    x / s - cx,
                    y / s - cy,
                    labels[b, n] * k_total + k,
                )
                cells.setdefault((level, cx, cy), []).append(entry)
        for (level, cx, cy), entries in cells.items():
            for slot, (_, _, dx, dy, t) in enumerate(sorted(entries)[:slots]):
                out[level]["offsets"][b, cy, cx, slot] = dx, dy
                out[level]["classes"][b, cy, cx, slot, t] = 1.0
                out[level]["positive"][b, cy, cx, slot] = 1.0
    return out


def np_sigmoid_logs(z):
    z = np.asarray(z, np.float64)
    return -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)  # log p, log(1 - p)


def np_heatmap_loss(y, z, kind, alpha=0.25, gamma=2.0, ca=2.0, cb=4.0, w=10.0):
    y = np.asarray(y, np.float64)
    log_p, log_q = np_sigmoid_logs(z)
    p = np.exp(log_p)
    if kind == "bce":
        return -(y * log_p + (1 - y) * log_q)
    if kind == "l2":
        return (p - y) ** 2
    if kind == "wce":
        return -(w * y * log_p + (1 - y) * log_q)
    if kind == "focal":
        ce = -(y * log_p + (1 - y) * log_q)
        one_minus_pt = y * (1 - p) + (1 - y) * p
        return (y * alpha + (1 - y) * (1 - alpha)) * one_minus_pt**gamma * ce
    return np.where(y >= 1, (1 - p) ** ca * -log_p, (1 - y) ** cb * p**ca * -log_q)


def np_loss_terms(model, targets, y_pred):
    xy = cls = cent = positives = 0.0
    for level, t in enumerate(targets):
        offsets = np.asarray(y_pred["offsets"][level], np.float64)
        xy += (np_heatmap_loss(t["offsets"], offsets, model.xy_loss).sum(-1) * t["positive"]).sum()
        kinds = ((model.class_loss, "classes", "class_logits"),
                 (model.centerness_loss, "centerness", "centerness_logits"))  # fmt: skip
        values = [
            np_heatmap_loss(t[key], np.asarray(y_pred[out][level], np.float64), kind,
                            model.focal_alpha, model.focal_gamma, model.centernet_alpha,
                            model.centernet_beta, model.positive_weight).sum()
            for kind, key, out in kinds
        ]  # fmt: skip
        cls += values[0]
        cent += values[1]
        positives += t["positive"].sum()
    n = max(1.0, positives)
    return {"xy_loss": xy / n, "class_loss": cls / n, "centerness_loss": cent / n}


def _random_outputs(model, batch, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    slots, types = model.points_per_cell, model.num_point_classes
    return {
        "offsets": [rng.normal(0, scale, (batch, h, w, slots, 2)).astype(np.float32)
                    for h, w in model.grid_shapes],
        "class_logits": [rng.normal(-2, scale, (batch, h, w, slots, types)).astype(np.float32)
                         for h, w in model.grid_shapes],
        "centerness_logits": [rng.normal(-1, scale, (batch, h, w)).astype(np.float32)
                              for h, w in model.grid_shapes],
    }  # fmt: skip


def _random_keypoints(rng, batch, num_objects, num_classes=NUM_CLASSES):
    """Objects of random sizes (4-60 px) and positions, keypoints scattered over their boxes,
    some unlabelled / hidden / outside the image, some padded objects."""
    keypoints = -np.ones((batch, num_objects, K, 3), np.float32)
    boxes = -np.ones((batch, num_objects, 4), np.float32)
    labels = -np.ones((batch, num_objects), np.int32)
    for b in range(batch):
        for n in range(rng.integers(0, num_objects + 1)):
            size = math.exp(rng.uniform(math.log(4), math.log(60)))
            x1, y1 = rng.uniform(-5, 64 - size / 2, 2)
            box = np.array([x1, y1, x1 + size * rng.uniform(0.5, 1), y1 + size])
            xy = box[:2] + rng.uniform(0, 1, (K, 2)) * (box[2:] - box[:2])
            v = rng.choice([0, 1, 2], K, p=[0.15, 0.25, 0.6])
            keypoints[b, n] = np.concatenate([xy, v[:, None]], 1)
            boxes[b, n] = box
            labels[b, n] = rng.integers(0, num_classes)
    return keypoints, labels, boxes


def _numpy_targets(targets):
    return [{k: v.numpy() for k, v in t.items() if k != "level_of_object"} for t in targets]


# ----------------------------------------------------------------------------- structure
def test_outputs_heads_and_initialisation(model):
    out = model(_images(2))
    grids = [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert model.strides == (4, 8, 16, 32) and list(model.grid_shapes) == grids
    assert [tuple(o.shape) for o in out["offsets"]] == [(2, *g, 1, 2) for g in grids]
    assert [tuple(o.shape) for o in out["class_logits"]] == [(2, *g, 1, 6) for g in grids]
    assert [tuple(o.shape) for o in out["centerness_logits"]] == [(2, *g) for g in grids]
    # Separate towers (RetinaNet's), shared across levels: one set of weights per head.
    assert [len(h.trainable_weights) for h in model.heads] == [4, 4]
    assert not {id(v) for v in model.heads[0].weights} & {id(v) for v in model.heads[1].weights}
    # The preset's priors: 0.01 for the point classes, CenterNet's 0.1 for the centerness.
    np.testing.assert_array_equal(model.offset_head.output_conv.bias.numpy(), 0.0)
    bias = model.class_head.output_conv.bias.numpy()
    np.testing.assert_allclose(bias[:-1], -math.log(99), rtol=1e-6)
    assert bias[-1] == pytest.approx(-math.log(9), rel=1e-6)
    # N(0, 0.01) kernels keep the outputs near their biases.
    np.testing.assert_allclose(tf.sigmoid(out["centerness_logits"][0]), 0.1, atol=0.02)
    np.testing.assert_allclose(tf.sigmoid(out["class_logits"][0]), 0.01, atol=3e-3)
    np.testing.assert_allclose(tf.sigmoid(out["offsets"][0]), 0.5, atol=0.02)

    # YOLO's shared head, 2 slots per cell and a lower class prior.
    shared = _tiny(head="shared", points_per_cell=2, class_prior_probability=1e-3)
    assert len(shared.heads) == 1

    def conv(c_in, c_out):  # 3x3 with bias
        return 9 * c_in * c_out + c_out

    tower = conv(8, 8)  # head_depth 1, 8 channels
    assert sum(h.count_params() for h in model.heads) == 2 * tower + conv(8, 2) + conv(8, 7)
    assert shared.shared_head.count_params() == tower + conv(8, 2 * (2 + 6) + 1)
    out = shared(_images(1))
    assert tuple(out["offsets"][1].shape) == (1, 8, 8, 2, 2)
    assert tuple(out["class_logits"][1].shape) == (1, 8, 8, 2, 6)
    bias = shared.shared_head.output_conv.bias.numpy()
    np.testing.assert_array_equal(bias[:4], 0.0)  # [offsets (2 x 2) | classes (2 x 6) | 1]
    np.testing.assert_allclose(bias[4:16], -math.log(999), rtol=1e-6)
    assert bias[16] == pytest.approx(-math.log(9), rel=1e-6)


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("slots", [1, 2])
def test_targets_match_numpy_reference(slots):
    m = _tiny(points_per_cell=slots)
    rng = np.random.default_rng(slots)
    for seed in range(3):
        keypoints, labels, boxes = _random_keypoints(rng, 3, 6)
        for with_boxes in (True, False):
            b = boxes if with_boxes else None
            got = _numpy_targets(m.compute_targets(keypoints, labels, b))
            want = np_targets(m, keypoints, labels, b)
            for level, (g, w) in enumerate(zip(got, want, strict=True)):
                for key in w:
                    np.testing.assert_allclose(g[key], w[key], atol=1e-5,
                                               err_msg=f"{seed} {with_boxes} {level} {key}")  # fmt: skip
    # The same targets from the module function compiled with XLA (static shapes, scatter).
    compiled = tf.function(
        lambda kp, lb, bx: keypoint_targets(
            kp, lb, m.image_size, m.strides, m.grid_shapes, NUM_CLASSES, bx, slots
        ),
        jit_compile=True,
    )
    got = _numpy_targets(compiled(keypoints, labels, boxes))
    for g, w in zip(got, np_targets(m, keypoints, labels, boxes), strict=True):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], atol=1e-5, err_msg=key)


def test_target_rules_by_hand(model):
    # A 12 px object: 12 / 8 cells_per_object = stride 1.5, closest to 4 (P2) in log scale.
    y = _targets([[((20, 20, 32, 32), (2, 2, 2))]], [[1]])
    (t0, t1, t2, t3) = _numpy_targets(
        model.compute_targets(y["keypoints"], y["labels"], y["boxes"])
    )
    assert t1["positive"].sum() == t2["positive"].sum() == t3["positive"].sum() == 0
    # centre (26, 26) -> cell (6, 6) offset (0.5, 0.5); top (26, 20) -> (6, 5) (0.5, 0);
    # right (32, 26) -> (8, 6) (0, 0.5). Point classes 1 * 3 + k.
    for (cx, cy), (dx, dy), t in (((6, 6), (0.5, 0.5), 3), ((6, 5), (0.5, 0.0), 4),
                                   ((8, 6), (0.0, 0.5), 5)):  # fmt: skip
        assert t0["centerness"][0, cy, cx] == 1.0
        np.testing.assert_allclose(t0["offsets"][0, cy, cx, 0], (dx, dy), atol=1e-6)
        assert np.flatnonzero(t0["classes"][0, cy, cx, 0]).tolist() == [t]
    assert t0["positive"].sum() == 3 and t0["classes"].sum() == 3
    # CenterNet's radius of a 3 x 3 cell object is 0: only the points' cells are non-zero.
    assert (t0["centerness"] > 0).sum() == 3

    # Hidden (v = 1) keypoints are targets, unlabelled ones (v = 0: an object with fewer
    # keypoints than K) and keypoints outside the image are not.
    y = _targets([[((20, 20, 32, 32), (2, 1, 0)), ((50, -10, 70, 20), (2, 2, 2))]], [[0, 1]])
    targets = _numpy_targets(model.compute_targets(y["keypoints"], y["labels"], y["boxes"]))
    kinds = {int(np.flatnonzero(t["classes"][idx])[0]) for t in targets
             for idx in zip(*np.nonzero(t["positive"]), strict=True)}  # fmt: skip
    # object 0: centre and top (types 0, 1); object 1 (centre (60, 5), top (60, -10) outside,
    # right (70, 5) outside): only its centre (type 3)
    assert kinds == {0, 1, 3}


def test_collision_rule_highest_centerness_wins(model):
    keypoints = -np.ones((1, 2, K, 3), np.float32)
    keypoints[0, :, :, 2] = 0  # only the centres are labelled
    keypoints[0, 0, 0] = [25.0, 25.0, 2]  # cell (6, 6) at (6.25, 6.25): 0.35 cells from (6.5, 6.5)
    keypoints[0, 1, 0] = [26.2, 26.3, 2]  # same cell, nearer to its centre: wins with p = 1
    labels = np.array([[0, 1]])
    boxes = np.array([[[20, 20, 30, 30], [20, 20, 30, 30]]], np.float32)
    (t0, *_) = _numpy_targets(model.compute_targets(keypoints, labels, boxes))
    assert t0["positive"].sum() == 1
    assert np.flatnonzero(t0["classes"][0, 6, 6, 0]).tolist() == [3]  # class 1, keypoint 0
    np.testing.assert_allclose(t0["offsets"][0, 6, 6, 0], (26.2 / 4 - 6, 26.3 / 4 - 6), atol=1e-6)
    # With two slots both points are kept, the winner first.
    (t0, *_) = _numpy_targets(_tiny(points_per_cell=2).compute_targets(keypoints, labels, boxes))
    assert t0["positive"][0, 6, 6].tolist() == [1.0, 1.0]
    assert [int(np.argmax(c)) for c in t0["classes"][0, 6, 6]] == [3, 0]
    # A bigger object's kernel is wider: at the same distance its point has the higher
    # centerness (its Gaussian at the cell centre), and an exact tie goes to the lower index.
    boxes[0, 0] = [0, 0, 40, 40]  # object 0: radius 2 at stride 4, object 1 (10 px): radius 0
    model_p3 = _tiny(cells_per_object=100.0)  # every object on P2
    keypoints[0, 1, 0] = [25.0, 25.0, 2]  # the same position as object 0's centre
    (t0, *_) = _numpy_targets(model_p3.compute_targets(keypoints, labels, boxes))
    assert np.flatnonzero(t0["classes"][0, 6, 6, 0]).tolist() == [0]
    boxes[0, 0] = boxes[0, 1]
    (t0, *_) = _numpy_targets(model_p3.compute_targets(keypoints, labels, boxes))
    assert np.flatnonzero(t0["classes"][0, 6, 6, 0]).tolist() == [0]  # tie: lower index


def test_overlapping_kernels_merge_by_maximum():
    m = _tiny(cells_per_object=100.0)  # everything on P2 (stride 4, 16 x 16 cells)
    keypoints = -np.ones((1, 2, K, 3), np.float32)
    keypoints[0, :, :, 2] = 0
    keypoints[0, 0, 0] = [30.0, 30.0, 2]
    keypoints[0, 1, 0] = [38.0, 30.0, 2]
    boxes = np.array([[[6, 6, 54, 54], [14, 6, 62, 54]]], np.float32)  # 12 x 12 cells
    (t0, *_) = _numpy_targets(m.compute_targets(keypoints, np.array([[0, 0]]), boxes))
    r = int(centernet.centernet_gaussian_radius((12, 12)))
    assert r == 3
    want = np.zeros((16, 16))
    for cell in ((7, 7), (9, 7)):
        centernet.centernet_draw_gaussian(want, cell, r)
    np.testing.assert_allclose(t0["centerness"][0], want, atol=1e-6)
    sigma = (2 * r + 1) / 6
    assert t0["centerness"][0, 7, 8] == pytest.approx(math.exp(-1 / (2 * sigma**2)), abs=1e-6)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", KEYPOINT_LOSSES)
def test_losses_match_numpy_reference(kind):
    xy = "l2" if kind in ("l2", "wce") else "bce"
    m = _tiny(class_loss=kind, centerness_loss=kind, xy_loss=xy, points_per_cell=2,
              focal_alpha=0.3, focal_gamma=1.5, positive_weight=5.0)  # fmt: skip
    keypoints, labels, boxes = _random_keypoints(np.random.default_rng(7), 2, 5)
    y = {"keypoints": keypoints, "labels": labels, "boxes": boxes}
    y_pred = _random_outputs(m, 2, seed=3)
    got = {k: float(v) for k, v in m.loss_terms(y, y_pred).items()}
    want = np_loss_terms(m, np_targets(m, keypoints, labels, boxes), y_pred)
    assert want["xy_loss"] > 0 and want["class_loss"] > 0
    for key in TERMS:
        assert got[key] == pytest.approx(want[key], rel=2e-5), key
    total = m.compute_loss(y=y, y_pred=y_pred)
    assert float(total) == pytest.approx(sum(want.values()), rel=2e-5)


def test_penalty_reduced_focal_loss_and_extreme_logits():
    y = np.array([1.0, 1.0, 0.0, 0.5, 0.9, 0.0])
    z = np.array([2.0, -3.0, -1.0, 0.5, 4.0, 3.0])
    want = np_heatmap_loss(y, z, "centernet_focal")
    np.testing.assert_allclose(penalty_reduced_focal_loss(y, z), want, rtol=1e-5)
    # (1 - y)^4 p^2 log(1 - p): a cell with target 0.9 costs 1e-4 of a true negative's.
    assert want[4] == pytest.approx(1e-4 * np_heatmap_loss(0.0, 4.0, "centernet_focal"), rel=1e-5)
    logits = tf.constant([-1e4, -100.0, 0.0, 100.0, 1e4] * 3)
    labels = tf.constant([0.0] * 5 + [1.0] * 5 + [0.6] * 5)
    for kind in KEYPOINT_LOSSES:
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = heatmap_loss(labels, logits, kind)
        grad = tape.gradient(loss, logits)
        assert np.isfinite(loss.numpy()).all() and np.isfinite(grad.numpy()).all(), kind
    with pytest.raises(ValueError, match="Unknown loss"):
        heatmap_loss(labels, logits, "hinge")


def test_empty_images_and_invisible_keypoints_give_finite_losses_and_gradients(model):
    images = _images(2, seed=5)
    invisible = _targets([[((8, 8, 40, 40), (0, 0, 0))], []], [[0], []])
    outside = _targets([[((70, 70, 90, 90), (2, 2, 2))], []], [[1], []])
    cases = {
        "all padding": _targets([[], []], [[], []]),
        "no object column": {"keypoints": np.zeros((2, 0, K, 3)), "labels": np.zeros((2, 0))},
        "all invisible": invisible,
        "outside the image": outside,
        "one empty image": _targets([[((8, 8, 40, 40), (2, 2, 2))], []], [[0], []]),
        "extreme logits": _targets([[((8, 8, 40, 40), (2, 2, 2))], []], [[0], []]),
    }
    for name, y in cases.items():
        with tf.GradientTape() as tape:
            y_pred = model(images, training=True)
            if name == "extreme logits":
                y_pred = {k: [o * 0.0 + 1e4 * tf.sign(o - tf.reduce_mean(o)) for o in v]
                          for k, v in y_pred.items()}  # fmt: skip
            terms = model.loss_terms(y, y_pred)
            loss = model.compute_loss(images, y, y_pred)
        grads = tape.gradient(loss, model.trainable_variables)
        assert np.isfinite(float(loss)) and float(loss) > 0, name
        assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads), name
        if name in ("one empty image", "extreme logits"):
            assert float(terms["xy_loss"]) > 0, name
        else:
            assert float(terms["xy_loss"]) == 0.0, name  # nothing to regress
            # No point: normaliser 1, the class term is the plain sum against 0.
            logits = np.concatenate([np.ravel(o) for o in y_pred["class_logits"]])
            ref = np_heatmap_loss(0.0, logits, model.class_loss).sum()
            assert float(terms["class_loss"]) == pytest.approx(ref, rel=1e-4), name


# ----------------------------------------------------------------------------- decoding
def _logit(p):
    return math.log(p / (1 - p))


def test_decode_points_peaks_top_k_offsets_and_threshold():
    m = _tiny(max_points=4, score_threshold=0.3, max_detections=3)
    outputs = {key: [np.full_like(o, -30.0) for o in v]
               for key, v in _random_outputs(m, 1).items()}  # fmt: skip
    peaks = [  # level, (cx, cy), offset, point class, centerness, class probability
        (0, (5, 6), (0.25, 0.75), 3, 0.9, 0.95),  # class 1 centre at (21, 27)
        (0, (8, 6), (0.5, 0.5), 4, 0.9, 0.9),  # class 1 keypoint 1 at (34, 26)
        (1, (1, 6), (0.2, 0.6), 0, 0.8, 0.9),  # class 0 centre at (9.6, 52.8), on P3
        (2, (3, 0), (0.5, 0.5), 2, 0.6, 0.9),  # class 0 keypoint 2 at (56, 8), on P4
        (0, (12, 12), (0.5, 0.5), 1, 0.7, 0.5),  # score 0.35: the 5th peak, beyond top-4
        (0, (1, 1), (0.5, 0.5), 0, 0.5, 0.5),  # score 0.25 <= threshold
    ]
    for level, (cx, cy), (ox, oy), t, c, p in peaks:
        outputs["centerness_logits"][level][0, cy, cx] = _logit(c)
        outputs["class_logits"][level][0, cy, cx, 0, t] = _logit(p)
        outputs["offsets"][level][0, cy, cx, 0] = (_logit(ox), _logit(oy))
    # A neighbour of the first peak with a lower score is no peak (3x3 max pool).
    outputs["centerness_logits"][0][0, 6, 6] = _logit(0.9)
    outputs["class_logits"][0][0, 6, 6, 0, 3] = _logit(0.5)
    points = {k: v.numpy() for k, v in m.decode_points(outputs).items()}
    assert points["num_points"].tolist() == [4]
    np.testing.assert_allclose(points["scores"][0], [0.855, 0.81, 0.72, 0.54], atol=1e-5)
    np.testing.assert_allclose(
        points["points"][0], [[21, 27], [34, 26], [9.6, 52.8], [56, 8]], atol=1e-4
    )
    assert points["labels"][0].tolist() == [1, 1, 0, 0]
    assert points["keypoint_ids"][0].tolist() == [0, 1, 0, 2]

    m2 = _tiny(max_points=10, score_threshold=0.3, max_detections=3)
    points = {k: v.numpy() for k, v in m2.decode_points(outputs).items()}
    assert points["num_points"].tolist() == [5]  # the 0.35 peak is in, the 0.25 one is not
    assert (points["scores"][0, 5:] == -1).all() and (points["labels"][0, 5:] == -1).all()
    assert (points["points"][0, 5:] == -1).all()

    objects = {k: v.numpy() for k, v in m.decode(outputs).items()}
    assert objects["num_detections"].tolist() == [2]
    assert objects["labels"][0].tolist() == [1, 0, -1]
    np.testing.assert_allclose(objects["scores"][0, :2], [0.855, 0.72], atol=1e-5)
    np.testing.assert_allclose(
        objects["keypoints"][0, 0], [[21, 27, 0.855], [34, 26, 0.81], [21, 27, 0]], atol=1e-4
    )
    np.testing.assert_allclose(
        objects["keypoints"][0, 1], [[9.6, 52.8, 0.72], [9.6, 52.8, 0], [56, 8, 0.54]], atol=1e-4
    )
    np.testing.assert_allclose(objects["boxes"][0, :2], [[21, 26, 34, 27], [9.6, 8, 56, 52.8]],
                               atol=1e-4)  # fmt: skip
    assert (objects["keypoints"][0, 2] == -1).all() and (objects["boxes"][0, 2] == -1).all()


def test_group_keypoints_assigns_points_to_the_nearest_centre_of_their_class():
    points = np.array([[10, 10], [40, 10], [12, 12], [15, 10], [35, 10], [13, 13], [10, 5],
                       [10, 8], [80, 80], [-1, -1]], np.float32)  # fmt: skip
    scores = np.array([0.9, 0.8, 0.7, 0.9, 0.8, 0.6, 0.7, 0.3, 0.5, -1], np.float32)
    labels = np.array([0, 0, 1, 0, 0, 1, 0, 0, 0, -1])
    kids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, -1])
    peaks = {"points": points[None], "scores": scores[None], "labels": labels[None],
             "keypoint_ids": kids[None]}  # fmt: skip
    out = {k: v.numpy() for k, v in group_keypoints(peaks, K, 0, max_detections=4).items()}
    assert out["num_detections"].tolist() == [3]
    assert out["labels"][0].tolist() == [0, 0, 1, -1]
    np.testing.assert_allclose(out["scores"][0], [0.9, 0.8, 0.7, -1], atol=1e-6)
    kps = out["keypoints"][0]
    # A: its own top (15, 10); keypoint 2: the best-scoring of its own (10, 5) beats the nearer
    # (10, 8) and the far (80, 80), which is nearer to B.
    np.testing.assert_allclose(kps[0], [[10, 10, 0.9], [15, 10, 0.9], [10, 5, 0.7]], atol=1e-6)
    # B: its own top (35, 10) and (80, 80) (owned: B is its nearest centre of class 0).
    np.testing.assert_allclose(kps[1], [[40, 10, 0.8], [35, 10, 0.8], [80, 80, 0.5]], atol=1e-6)
    # C (class 1): its top (13, 13); no keypoint 2 of class 1: its centre with score 0.
    np.testing.assert_allclose(kps[2], [[12, 12, 0.7], [13, 13, 0.6], [12, 12, 0.0]], atol=1e-6)
    np.testing.assert_allclose(out["boxes"][0, :3], [[10, 5, 15, 10], [35, 10, 80, 80],
                                                     [12, 12, 13, 13]], atol=1e-6)  # fmt: skip
    assert (kps[3] == -1).all() and (out["boxes"][0, 3] == -1).all()

    # Without (80, 80), B owns no keypoint 2: the nearest one of its class, A's (10, 8).
    scores[8] = -1
    labels[8] = kids[8] = -1
    out = group_keypoints(peaks, K, 0, max_detections=2)  # fewer slots than centres: the best
    np.testing.assert_allclose(out["keypoints"][0, 1, 2], [10, 8, 0.3], atol=1e-6)
    assert out["num_detections"].numpy().tolist() == [2]


# ----------------------------------------------------------------------------- Keras workflow
def _shapes_data(n, seed):
    """``n`` 64 px images of bright squares on a dark noisy background, with their keypoints."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 40, (n, *SIZE, 3)).astype(np.float32)
    objects, labels = [], []
    for b in range(n):
        size = rng.uniform(14, 26)
        x1, y1 = rng.uniform(2, 62 - size, 2)
        label = int(rng.integers(0, NUM_CLASSES))
        colour = (230, 60, 60) if label == 0 else (60, 230, 60)
        images[b, int(y1) : int(y1 + size), int(x1) : int(x1 + size)] = colour
        objects.append([((x1, y1, x1 + size, y1 + size), (2, 2, 2))])
        labels.append([label])
    return images, _targets(objects, labels, pad_to=2)


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for 80 steps on four images (4 epochs of the images x 20)."""
    keras.utils.set_random_seed(0)
    m = _tiny(num_channels=16)
    m.compile(optimizer=keras.optimizers.Adam(5e-3))
    x, y = _shapes_data(4, seed=0)
    repeated = (np.concatenate([x] * 20), {k: np.concatenate([v] * 20) for k, v in y.items()})
    history = m.fit(*repeated, batch_size=4, epochs=4, shuffle=False, verbose=0).history
    return m, x, y, history


def test_training_loss_falls(trained):
    m, x, y, history = trained
    losses = history["loss"]
    assert set(history) == {"loss", *TERMS}
    np.testing.assert_allclose(
        losses, np.sum([history[k] for k in TERMS], axis=0), rtol=1e-5
    )  # loss = xy + class + centerness with unit weights
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    for key in TERMS:
        assert history[key][-1] < history[key][0], key
    # The network has learnt the four objects: in training mode (the BN statistics of the batch
    # it trained on; 80 steps leave the moving averages short of them) the best detection of every
    # image is its object with its class, the centre keypoint within 2 px (of 64).
    out = {k: v.numpy() for k, v in m.decode(m(x, training=True)).items()}
    assert out["labels"][:, 0].tolist() == y["labels"][:, 0].tolist()
    errors = np.linalg.norm(out["keypoints"][:, 0, :, :2] - y["keypoints"][:, 0, :, :2], axis=-1)
    assert (errors[:, 0] < 2.0).all(), errors


def test_fit_evaluate_predict(trained):
    m, x, y, _ = trained
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    result = m.evaluate(dataset, verbose=0, return_dict=True)
    terms = m.loss_terms(y, m(x, training=False))
    for key in TERMS:
        assert result[key] == pytest.approx(float(terms[key]), rel=1e-5)
    assert result["loss"] == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-5)

    out = m.predict(x, batch_size=3, verbose=0)
    expected = {k: v.numpy() for k, v in m.decode(m(x)).items()}
    assert set(out) == {"boxes", "keypoints", "scores", "labels", "num_detections"}
    assert out["keypoints"].shape == (4, 100, K, 3) and out["boxes"].shape == (4, 100, 4)
    # The same objects (another batching may order near-tied scores otherwise).
    np.testing.assert_array_equal(out["num_detections"], expected["num_detections"])
    np.testing.assert_allclose(np.sort(out["scores"]), np.sort(expected["scores"]), atol=1e-5)
    np.testing.assert_allclose(out["keypoints"][:, 0], expected["keypoints"][:, 0], atol=1e-3)
    # COCO results (keypoints carried) and the raw peaks.
    coco = predictions_to_coco(out, [1, 2, 3, 4], [1, 2])
    assert len(coco) == int(out["num_detections"].sum())
    assert all(len(c["keypoints"]) == 3 * K for c in coco)
    points = m.decode_points(m(x))
    assert points["points"].shape == (4, m.max_points, 2)


def test_save_load_round_trip(tmp_path):
    path = str(tmp_path / "keypoint.keras")
    m = _tiny(head="shared", points_per_cell=2, class_loss="centernet_focal", score_threshold=0.1)
    m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    m.optimizer.build(m.trainable_variables)
    rng = np.random.RandomState(0)
    for w in m.non_trainable_weights:  # BN moving statistics away from their initial 0 / 1
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
    m.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, KeypointDetector) and loaded.compiled
    assert loaded.get_config() == m.get_config()
    x = _images(2)
    for training in (False, True):
        a, b = m(x, training=training), loaded(x, training=training)
        for key in a:
            for u, v in zip(a[key], b[key], strict=True):
                np.testing.assert_array_equal(u, v)


def test_jit_compiled_training_matches_graph_training():
    x, y = _train_data()
    x, y = x[:2], {k: v[:2] for k, v in y.items()}
    graph, xla = _tiny(), _tiny()
    xla.set_weights(graph.get_weights())
    graph.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
    xla.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=True)
    h_graph = graph.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    h_xla = xla.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    assert xla.xla_parts_compiled == {"train_core"}
    for key in ("loss", *TERMS):
        assert h_xla[key][0] == pytest.approx(h_graph[key][0], rel=1e-4), key
    moved = [
        np.abs(a - b).max() for a, b in zip(graph.get_weights(), xla.get_weights(), strict=True)
    ]
    assert max(moved) < 1e-4  # the same SGD update

    # The keypoint checks run before the compiled core: NaN coordinates stop the step.
    before = [v.numpy() for v in xla.weights]
    bad = {**y, "keypoints": y["keypoints"].copy()}
    bad["keypoints"][0, 1, 2, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"^KeypointDetector: target keypoints with NaN .* 0 1 2 .*"
                       r"\[training batch 0"):  # fmt: skip
        xla.fit(x, bad, batch_size=2, epochs=1, verbose=0)
    for a, v in zip(before, xla.weights, strict=True):
        np.testing.assert_array_equal(a, v.numpy())
    out = xla.predict(x, batch_size=2, verbose=0)
    np.testing.assert_allclose(out["scores"], xla.decode(xla(x))["scores"], atol=1e-5)


# ----------------------------------------------------------------------------- distribution
@pytest.fixture(scope="module", autouse=True)
def mirrored_run(request):
    """Starts the two-replica script at module setup (when its test is selected)."""
    kwargs = {**PRESETS["keypoint_tiny_256"], **SLIM, "num_classes": 3, "num_keypoints": K,
              "image_size": [64, 64]}  # fmt: skip
    script = detector_replicas_script("dlnotes.models.keypoint:KeypointDetector", kwargs)
    # The script's targets are boxes; give every object the keypoints of _object (centre, top
    # middle, right middle), visible.
    line = 'y = {"boxes": boxes, "labels": labels}'
    assert script.count(line) == 1
    script = script.replace(
        line,
        line + "\n    c = (boxes[..., :2] + boxes[..., 2:]) / 2"
        "\n    kp = np.stack([c, np.stack([c[..., 0], boxes[..., 1]], -1),"
        " np.stack([boxes[..., 2], c[..., 1]], -1)], 2)"
        "\n    kp = np.concatenate([kp, np.full(kp.shape[:-1] + (1,), 2.0)], -1).astype('float32')"
        "\n    kp[labels < 0] = -1"
        '\n    y["keypoints"] = kp',
    )
    yield from script_beside_tests(request, "test_two_replicas_match_one_device", script)


def test_two_replicas_match_one_device(mirrored_run):
    check_replicas_match_one_device(script_result(mirrored_run), TERMS)


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_clear_errors():
    for kwargs, match in (
        ({"head": "tower"}, "head must be one of"),
        ({"xy_loss": "focal"}, "xy_loss must be one of"),
        ({"class_loss": "hinge"}, "class_loss must be one of"),
        ({"centerness_loss": "mse"}, "centerness_loss must be one of"),
        ({"num_keypoints": 0}, "num_keypoints must be a positive integer"),
        ({"center_keypoint": 3}, r"center_keypoint must be in \[0, num_keypoints=3\)"),
        ({"points_per_cell": 0}, "points_per_cell"),
        ({"cells_per_object": 0}, "cells_per_object"),
        ({"neck_kwargs": {"min_level": 3, "max_level": 5}}, "set the neck's min_level"),
        ({"num_classes": 0}, "num_classes"),
    ):
        args = {"num_classes": NUM_CLASSES, "num_keypoints": K, **kwargs}
        with pytest.raises(ValueError, match=match):
            KeypointDetector.from_preset("keypoint_tiny_256", image_size=SIZE, **SLIM, **args)
    with pytest.raises(ValueError, match="Unknown preset"):
        KeypointDetector.from_preset("keypoint_nope", num_classes=2, num_keypoints=K)
    with pytest.raises(ValueError, match="loss is built into the model"):
        _tiny().compile(optimizer="sgd", loss="mse")


def test_bad_targets_raise_clear_errors(model):
    x, y = _train_data()
    y_pred = model(x)
    wrong_k = {**y, "keypoints": y["keypoints"][:, :, :2]}
    with pytest.raises(ValueError, match=r"num_keypoints=3\): target \"keypoints\" have K=2"):
        model.loss_terms(wrong_k, y_pred)
    with pytest.raises(ValueError, match="targets must be a dict"):
        model.loss_terms({"boxes": y["boxes"], "labels": y["labels"]}, y_pred)
    with pytest.raises(ValueError, match="predictions must be the dict of call"):
        model.loss_terms(y, [y_pred["offsets"]])
    # A data set with more classes than the model: labels >= num_classes.
    bad = {**y, "labels": np.where(y["labels"] >= 0, 2, -1).astype(np.int32)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is >= num_classes"):
        model.loss_terms(bad, y_pred)
    # Graph checks of the step (eager here): NaN coordinates, normalised keypoints.
    nan = {**y, "keypoints": y["keypoints"].copy()}
    nan["keypoints"][2, 0, 1, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf coordinates"):
        model.input_assertions(x, nan)
    unit = {"keypoints": np.clip(y["keypoints"] / 64, -1, 1), "labels": y["labels"]}
    with pytest.raises(tf.errors.InvalidArgumentError, match="keypoints look normalised"):
        model.input_assertions(x, unit)
    # NaN in an unlabelled keypoint (v = 0) of a labelled object is tolerated; NaN visibility not.
    ok = {**y, "keypoints": y["keypoints"].copy()}
    ok["keypoints"][2, 0, 2, :2] = np.nan  # v = 0 there
    model.input_assertions(x, ok)
    ok["keypoints"][2, 0, 2, 2] = np.nan
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="NaN or inf coordinates or visibility"
    ):
        model.input_assertions(x, ok)


def test_presets_build_with_their_documented_settings():
    assert set(PRESETS) >= {"keypoint_tiny_256", "keypoint_resnet50_fpn"}
    tiny = KeypointDetector.from_preset("keypoint_tiny_256", num_classes=6, num_keypoints=5)
    assert tiny.image_size == (256, 256) and tiny.strides == (4, 8, 16, 32)
    assert tiny.grid_shapes[0] == (64, 64) and tiny.num_point_classes == 30
    big = KeypointDetector.from_preset("keypoint_resnet50_fpn", num_classes=1, num_keypoints=17)
    assert big.strides == (8, 16, 32) and big.grid_shapes[0] == (64, 64)
    assert big.backbone.count_params() == 23_561_152  # ResNet-50 (test_retinanet's count)


# ----------------------------------------------------------------------------- COCO data
def _write_coco(root, keypoints_per_ann, image_size=64):
    """A one-category COCO file with K = 3 keypoints, one 64 px image per annotation."""
    (root / "images").mkdir()
    images, annotations = [], []
    for i, kps in enumerate(keypoints_per_ann, start=1):
        cv2.imwrite(
            str(root / "images" / f"{i}.png"), np.zeros((image_size, image_size, 3), "uint8")
        )
        images.append({"id": i, "file_name": f"{i}.png", "height": image_size,
                       "width": image_size})  # fmt: skip
        xs, ys = np.array(kps[0::3]), np.array(kps[1::3])
        x1, y1, x2, y2 = np.nanmin(xs), np.nanmin(ys), np.nanmax(xs), np.nanmax(ys)
        bbox = [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)]
        annotations.append({"id": 10 + i, "image_id": i, "category_id": 1, "bbox": bbox,
                            "keypoints": kps, "area": bbox[2] * bbox[3]})  # fmt: skip
    categories = [{"id": 1, "name": "thing", "keypoints": ["center", "top", "right"]},
                  {"id": 2, "name": "other", "keypoints": ["center", "top", "right"]}]  # fmt: skip
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))  # fmt: skip
    return path


def test_nan_keypoints_in_the_json_name_the_annotation(tmp_path):
    path = _write_coco(tmp_path, [[30, 30, 2, 30, 20, 2, 40, 30, 2], [20, 20, 2, float("nan"), 10,
                                                                        2, 30, 20, 1]])  # fmt: skip
    assert "NaN" in path.read_text()
    with pytest.raises(ValueError, match=r"annotation id 12 .*keypoints must be 9 finite"):
        CocoDataset(path, tmp_path / "images")


class _PerfectModel:
    """Predicts the data set's ground truth (in letterboxed pixels), for the evaluation path."""

    num_classes, num_keypoints, image_size = 2, K, (32, 32)

    def __init__(self, dataset):
        self.targets = dataset.padded_targets(with_keypoints=True)
        self.done = 0

    def predict_on_batch(self, images):
        n = len(images)
        kps = self.targets["keypoints"][self.done : self.done + n] / 2  # 64 px -> 32 px input
        kps[..., 2] = 1.0
        labels = self.targets["labels"][self.done : self.done + n]
        self.done += n
        boxes = np.concatenate([kps[..., :2].min(2), kps[..., :2].max(2)], -1)
        scores = np.where(labels >= 0, 0.9, -1.0)
        return {"boxes": boxes, "keypoints": kps, "scores": scores, "labels": labels,
                "num_detections": (labels >= 0).sum(1)}  # fmt: skip


def test_evaluate_keypoints_maps_back_and_scores_perfect_keypoints(tmp_path):
    path = _write_coco(tmp_path, [[30, 30, 2, 30, 20, 2, 40, 30, 2], [20, 20, 2, 20, 10, 1,
                                                                        30, 20, 2]])  # fmt: skip
    dataset = CocoDataset(path, tmp_path / "images")
    evaluation = evaluate_keypoints(_PerfectModel(dataset), dataset, batch_size=1)
    assert evaluation.result.iou_type == "keypoints"
    assert evaluation.result["AP"] == pytest.approx(1.0)
    assert len(evaluation.detections) == 2
    np.testing.assert_allclose(evaluation.detections[0]["keypoints"][:3], [30, 30, 1.0], atol=1e-6)
    assert evaluation.box_result.iou_type == "bbox"
    wrong = _PerfectModel(dataset)
    wrong.num_keypoints = 5
    with pytest.raises(ValueError, match="predicts 5 keypoints per object"):
        evaluate_keypoints(wrong, dataset)
