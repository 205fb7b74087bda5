"""Tests of dlnotes.models.retinanet: heads, in-graph targets, the loss against a float64 NumPy
reference, degenerate inputs, label validation (eager, graph, XLA), the Keras workflow,
save / load, parameter counts against published figures and two-replica training."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import (
    assert_same_detections,
    check_replicas_match_one_device,
    detector_replicas_script,
    np_iou,
    script_beside_tests,
    script_result,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dlnotes.models.retinanet import PRESETS, RetinaNet, RetinaNetHead, flatten_levels, prior_bias

SIZE = (64, 64)  # small images keep the tiny preset fast: 774 anchors on P3-P7
NUM_CLASSES = 3
STD = 0.2


# A slimmer variant of the tiny preset (P3-P5, one 16-channel conv per subnet) for the tests that
# compile whole training steps (XLA, MirroredStrategy): compile time grows quickly with the graph,
# and this variant still runs every part of the step.
SLIM = dict(
    head_depth=1, num_channels=16, anchor_sizes=(16, 32, 64), anchor_strides=(8, 16, 32),
    neck_kwargs={"max_level": 5},
)  # fmt: skip


def _tiny(**overrides):
    return RetinaNet.from_preset(
        "retinanet_tiny_256", num_classes=NUM_CLASSES, image_size=SIZE, **overrides
    )


def _images(n, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, *SIZE, 3)).astype(np.float32)


def _targets(boxes_per_image, labels_per_image, pad_to=4):
    """Padded {"boxes": (B, pad_to, 4), "labels": (B, pad_to)} from per-image lists."""
    batch = len(boxes_per_image)
    boxes = -np.ones((batch, pad_to, 4), np.float32)
    labels = -np.ones((batch, pad_to), np.int32)
    for b, (bx, lb) in enumerate(zip(boxes_per_image, labels_per_image, strict=True)):
        boxes[b, : len(bx)] = np.asarray(bx, np.float32).reshape(-1, 4)
        labels[b, : len(lb)] = lb
    return {"boxes": boxes, "labels": labels}


@pytest.fixture(scope="module")
def model():
    return _tiny()


# ----------------------------------------------------------------------------- NumPy references
def np_anchor_grid(image_size, sizes, strides, ratios, scales):
    """float64 anchors per level as ``(H_l, W_l, A, 4)`` arrays indexed by (row, column, anchor),
    written from the definition (centre ((j + 0.5) s, (i + 0.5) s), area (size * scale)^2,
    ratio = h / w, anchor index = ratio-major, scale-minor)."""
    height, width = image_size
    levels = []
    for size, stride in zip(sizes, strides, strict=True):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        wh = []
        for ratio in ratios:
            for scale in scales:
                w = math.sqrt((size * scale) ** 2 / ratio)
                wh.append((w, w * ratio))
        grid = np.zeros((rows, cols, len(wh), 4))
        for i in range(rows):
            for j in range(cols):
                cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
                for a, (w, h) in enumerate(wh):
                    grid[i, j, a] = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        levels.append(grid)
    return levels


def np_encode(anchors, boxes):
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
    t = np.stack([(bx - ax) / aw, (by - ay) / ah, np.log(bw / aw), np.log(bh / ah)], -1)
    return t / STD


def np_targets(anchors, boxes, labels, num_classes, image_size, pos=0.5, neg=0.4):
    """float64 targets of one image, from the rule: clip GT to the image; padding / zero-size GT
    out; argmax-IoU GT per anchor with thresholds; each valid GT forces its best anchor (if the
    IoU is > 0); an anchor forced by several GTs takes the one it overlaps most.

    Returns ``(states, class_targets, box_targets, ambiguous)``. ``ambiguous`` flags a case that
    float32 may legitimately decide otherwise: a decisive IoU within 1e-5 (relative) of a
    competitor or of a threshold. That includes exact ties (a box inside several same-size
    anchors), which float32 may or may not reproduce; test_tiny_gt_gets_exactly_one_forced_positive
    and test_matching check the tie-breaking itself.
    """
    anchors = np.asarray(anchors, np.float64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    labels = np.asarray(labels).reshape(-1)
    height, width = image_size
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    valid = (labels >= 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    n = len(anchors)
    states, matched = np.zeros(n, int), np.zeros(n, int)
    ambiguous = False

    def close(a, b):
        return abs(a - b) <= 1e-5 * max(abs(a), abs(b))

    if valid.any():
        iou = np_iou(anchors, boxes)
        iou[:, ~valid] = -1.0
        best, matched = iou.max(1), iou.argmax(1)
        states = np.where(best >= pos, 1, np.where(best < neg, 0, -1))
        ambiguous |= any(close(v, t) for v in best for t in (pos, neg))
        if valid.sum() > 1:
            second = np.sort(iou, axis=1)[:, -2]
            ambiguous |= any(close(a, b) for a, b in zip(best, second, strict=True) if a > 0)
        forced = {}
        for g in np.flatnonzero(valid):
            column = iou[:, g]
            if column.max() > 0:
                ambiguous |= close(np.sort(column)[-2], column.max())
                forced.setdefault(int(column.argmax()), []).append(g)
        for a, gts in forced.items():
            states[a], matched[a] = 1, max(gts, key=lambda g: (iou[a, g], -g))
    positive = states == 1
    class_targets = np.zeros((n, num_classes))
    class_targets[positive, labels[matched[positive]]] = 1.0
    box_targets = np.zeros((n, 4))
    if positive.any():
        box_targets[positive] = np_encode(anchors[positive], boxes[matched[positive]])
    return states, class_targets, box_targets, ambiguous


def np_focal(y, z, alpha=0.25, gamma=2.0):
    log_p, log_1mp = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    ce = -(y * log_p + (1 - y) * log_1mp)
    one_minus_pt = y * np.exp(log_1mp) + (1 - y) * np.exp(log_p)
    return (y * alpha + (1 - y) * (1 - alpha)) * one_minus_pt**gamma * ce


def np_smooth_l1(d, beta=1 / 9):
    d = np.abs(d)
    return np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)


def np_loss(targets, class_logits, box_deltas):
    """float64 ``(class_loss, box_loss)`` of a batch from per-anchor targets (``states``,
    ``class_targets``, ``box_targets``): focal loss summed over positive and negative anchors,
    smooth-L1 over positives, both divided by ``max(1, #positives in the batch)``."""
    states = np.asarray(targets["states"])
    counted, positive = states != -1, states == 1
    z = np.asarray(class_logits, np.float64)
    class_sum = np_focal(np.asarray(targets["class_targets"], np.float64), z)[counted].sum()
    d = np.asarray(box_deltas, np.float64) - np.asarray(targets["box_targets"], np.float64)
    box_sum = np_smooth_l1(d)[positive].sum()
    normalizer = max(1, positive.sum())
    return class_sum / normalizer, box_sum / normalizer


# ----------------------------------------------------------------------------- heads
@pytest.fixture(scope="module")
def paper_model():
    """The paper's model (ResNet-50 keras.applications layout, FPN P6 from C5, 80 classes)."""
    return RetinaNet.from_preset("retinanet_resnet50_fpn", num_classes=80)


def test_paper_heads_structure_and_initialisation(paper_model):
    heads = (paper_model.class_head, paper_model.box_head)
    for head, outputs in zip(heads, (80, 4), strict=True):
        assert [c.kernel.shape for c in head.convs] == [(3, 3, 256, 256)] * 4
        assert all(c.activation is keras.activations.relu for c in head.convs)
        assert head.output_conv.kernel.shape == (3, 3, 256, 9 * outputs)
        assert head.output_conv.activation is keras.activations.linear
        # Shared across levels: one set of weights (4 convs + output, kernel and bias) for P3-P7.
        assert len(head.trainable_weights) == 10
        kernels = np.concatenate([np.ravel(c.kernel) for c in [*head.convs, head.output_conv]])
        assert abs(kernels.mean()) < 1e-4 and kernels.std() == pytest.approx(0.01, rel=0.01)
        for conv in head.convs:
            np.testing.assert_array_equal(conv.bias.numpy(), 0.0)
    # Separate subnets: no variable in common.
    assert not {id(v) for v in heads[0].weights} & {id(v) for v in heads[1].weights}
    bias = -math.log((1 - 0.01) / 0.01)
    assert prior_bias(0.01) == pytest.approx(bias) == pytest.approx(-4.59512, abs=1e-5)
    np.testing.assert_allclose(paper_model.class_head.output_conv.bias.numpy(), bias, rtol=1e-6)
    np.testing.assert_array_equal(paper_model.box_head.output_conv.bias.numpy(), 0.0)
    with pytest.raises(ValueError, match="prior_probability"):
        prior_bias(1.0)


def test_initial_class_probabilities_are_the_prior(model):
    logits = model(_images(2))["class_logits"].numpy()
    # N(0, 0.01) kernels leave the output close to its bias: p ~ 0.01 for every anchor and class.
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), 0.01, atol=2e-3)


def test_head_outputs_layout_and_flatten_order(model):
    images = _images(2)
    class_levels, box_levels = model.head_outputs(images)
    shapes = [(2, math.ceil(64 / s), math.ceil(64 / s), 9) for s in (8, 16, 32, 64, 128)]
    assert [tuple(o.shape) for o in class_levels] == [(*s, NUM_CLASSES) for s in shapes]
    assert [tuple(o.shape) for o in box_levels] == [(*s, 4) for s in shapes]
    out = model(images)
    np.testing.assert_allclose(out["class_logits"], flatten_levels(class_levels), atol=1e-6)
    np.testing.assert_allclose(out["box_deltas"], flatten_levels(box_levels), atol=1e-6)
    assert out["class_logits"].shape == (2, 774, NUM_CLASSES) and model.anchors.shape == (774, 4)

    # Level outputs holding, at (row, column, anchor), that anchor's box (built from the
    # definition) flatten to the generator's anchors: the loss pairs outputs with anchors right.
    g = model.anchor_generator
    grid = np_anchor_grid(SIZE, g.sizes, g.strides, g.ratios, g.scales)
    flat = flatten_levels([tf.constant(level[None], tf.float32) for level in grid])
    np.testing.assert_allclose(flat[0], model.anchors, atol=1e-3)

    # Only level l non-zero -> exactly the anchors of level l are non-zero after flattening.
    bounds = np.cumsum([0, *model.level_sizes])
    for level in range(5):
        levels = [tf.zeros((1, *grid[k].shape[:3], NUM_CLASSES)) for k in range(5)]
        levels[level] = tf.ones_like(levels[level])
        nonzero = np.flatnonzero(flatten_levels(levels).numpy()[0].any(-1))
        np.testing.assert_array_equal(nonzero, np.arange(bounds[level], bounds[level + 1]))


def test_head_weights_are_shared_across_levels():
    head = RetinaNetHead(9, 3, channels=8, depth=2)
    x = tf.random.stateless_normal((1, 4, 4, 8), seed=(1, 2))
    outputs = head([x, tf.zeros((1, 2, 2, 8)), x])  # the same map as level 0 and level 2
    np.testing.assert_array_equal(outputs[0], outputs[2])
    assert [tuple(o.shape) for o in outputs] == [(1, 4, 4, 9, 3), (1, 2, 2, 9, 3), (1, 4, 4, 9, 3)]


# ----------------------------------------------------------------------------- targets
def _single_targets(model, boxes, labels, pad_to=4):
    t = model.compute_targets(**_targets([boxes], [labels], pad_to))
    return {k: v.numpy()[0] for k, v in t.items()}


def test_gt_equal_to_an_anchor_is_positive_with_zero_deltas(model):
    anchors = model.anchors.numpy()
    k = 576 + (1 * 4 + 2) * 9 + 4  # P4 (4x4 cells), row 1, column 2, anchor 4: inside
    t = _single_targets(model, [anchors[k]], [2])
    assert t["states"][k] == 1 and t["matched_iou"][k] == pytest.approx(1.0)
    np.testing.assert_array_equal(t["class_targets"][k], [0, 0, 1])
    np.testing.assert_allclose(t["box_targets"][k], 0.0, atol=1e-5)
    iou = np_iou(anchors, anchors[k : k + 1])[:, 0]
    expected = np.where(iou >= 0.5, 1, np.where(iou < 0.4, 0, -1))
    np.testing.assert_array_equal(t["states"], expected)
    assert (expected == 1).sum() > 1  # the same box also reaches other anchors >= 0.5
    positive = t["states"] == 1
    np.testing.assert_array_equal(t["class_targets"][positive].argmax(-1), 2)
    np.testing.assert_array_equal(t["class_targets"][~positive], 0.0)
    np.testing.assert_array_equal(t["box_targets"][~positive], 0.0)
    # Deltas normalised by std 0.2 (the notes' t / 0.2).
    np.testing.assert_allclose(
        t["box_targets"][positive],
        np_encode(
            anchors[positive].astype(np.float64), np.repeat(anchors[k : k + 1], positive.sum(), 0)
        ),
        atol=1e-4,
    )


def test_shifted_gt_has_deltas_over_std(model):
    anchors = model.anchors.numpy().astype(np.float64)
    k = 576 + (1 * 4 + 2) * 9 + 4
    box = anchors[k] + np.array([-4.0, -1.0, -2.0, 1.0])  # centre (-3, 0), size +2: inside
    t = _single_targets(model, [box], [0])
    assert t["states"][k] == 1
    aw, ah = anchors[k, 2] - anchors[k, 0], anchors[k, 3] - anchors[k, 1]
    t_raw = [-3 / aw, 0.0, math.log((aw + 2) / aw), math.log((ah + 2) / ah)]
    expected = np.array(t_raw) / STD
    np.testing.assert_allclose(t["box_targets"][k], expected, atol=1e-5)


def test_tiny_gt_gets_exactly_one_forced_positive(model):
    box = [30.0, 30.0, 32.0, 33.0]  # 2x3 px: IoU < 0.02 with every anchor
    t = _single_targets(model, [box], [1])
    iou = np_iou(model.anchors.numpy(), [box])[:, 0]
    assert iou.max() < 0.4
    np.testing.assert_array_equal(np.flatnonzero(t["states"] == 1), [iou.argmax()])
    np.testing.assert_array_equal(t["class_targets"][iou.argmax()], [0, 1, 0])
    assert (t["states"] == -1).sum() == 0  # nothing in the ignore band either


def test_padding_and_zero_size_gts_are_ignored(model):
    box = [10.0, 12.0, 40.0, 44.0]
    reference = _single_targets(model, [box], [1], pad_to=1)
    padded = _single_targets(model, [box], [1], pad_to=6)
    zero_size = _single_targets(model, [box, [20, 20, 20, 30], [5, 5, 9, 5]], [1, 0, 2], pad_to=6)
    for t in (padded, zero_size):
        for key in reference:
            np.testing.assert_array_equal(t[key], reference[key])
    for empty in (
        _single_targets(model, [], [], pad_to=3),
        _single_targets(model, [[20, 20, 20, 30]], [0], pad_to=3),  # zero width only
        _single_targets(model, [box], [-1], pad_to=3),  # a real box with the padding label
    ):
        assert (empty["states"] == 0).all()
        assert not empty["class_targets"].any() and not empty["box_targets"].any()
    no_gt = model.compute_targets(np.zeros((2, 0, 4), np.float32), np.zeros((2, 0), np.int32))
    assert (no_gt["states"].numpy() == 0).all()


def test_gt_boxes_outside_the_image_are_clipped(model):
    partly = _single_targets(model, [[-20.0, 40.0, 30.0, 90.0]], [0])
    clipped = _single_targets(model, [[0.0, 40.0, 30.0, 64.0]], [0])
    for key in partly:
        np.testing.assert_array_equal(partly[key], clipped[key])
    assert (partly["states"] == 1).any()
    outside = _single_targets(model, [[70.0, 10.0, 90.0, 30.0], [-30, -30, -1, -2]], [0, 1])
    assert (outside["states"] == 0).all()  # no visible part: not a GT


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_gt=st.integers(0, 5))
def test_targets_match_numpy_reference(model, seed, num_gt):
    rng = np.random.RandomState(seed)
    xy = rng.uniform(-10, 60, (num_gt, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (num_gt, 2))], -1)
    labels = rng.randint(-1, NUM_CLASSES, num_gt)
    t = _single_targets(model, boxes, labels, pad_to=6)
    states, class_t, box_t, ambiguous = np_targets(
        model.anchors.numpy(), boxes, labels, NUM_CLASSES, SIZE
    )
    assume(not ambiguous)
    np.testing.assert_array_equal(t["states"], states)
    np.testing.assert_array_equal(t["class_targets"], class_t)
    np.testing.assert_allclose(t["box_targets"], box_t, rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------- losses
def _random_targets(rng, batch, max_gt=4):
    boxes, labels = [], []
    for _ in range(batch):
        n = rng.randint(0, max_gt + 1)
        xy = rng.uniform(-5, 55, (n, 2))
        boxes.append(np.concatenate([xy, xy + rng.uniform(4, 40, (n, 2))], -1))
        labels.append(rng.randint(0, NUM_CLASSES, n))
    return _targets(boxes, labels, pad_to=max_gt + 1)


@pytest.fixture(scope="module")
def outputs(model):
    """The model's real outputs on 3 images (logits near the prior bias), as float64 NumPy."""
    return {k: v.numpy().astype(np.float64) for k, v in model(_images(3, seed=7)).items()}


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.0, 1.0, 4.0]))
def test_loss_matches_float64_reference(model, outputs, seed, scale):
    rng = np.random.RandomState(seed)
    y = _random_targets(rng, 3)
    # Optionally spread the outputs out, to reach every regime of the focal and smooth-L1 terms.
    y_pred = {
        k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in outputs.items()
    }
    class_loss, box_loss = model.detection_losses(y, y_pred)
    # The targets are compute_targets' (checked against np_targets above); the whole loss is
    # recomputed from them and the outputs.
    targets = {k: v.numpy() for k, v in model.compute_targets(y["boxes"], y["labels"]).items()}
    ref_class, ref_box = np_loss(targets, y_pred["class_logits"], y_pred["box_deltas"])
    assert (targets["states"] == 1).sum() > 0 or not (y["labels"] >= 0).any()
    assert float(class_loss) == pytest.approx(ref_class, rel=1e-5)
    assert float(box_loss) == pytest.approx(ref_box, rel=1e-5, abs=1e-7)
    total = model.compute_loss(y=y, y_pred=y_pred)
    assert float(total) == pytest.approx(ref_class + ref_box, rel=1e-5)


def test_loss_is_finite_for_extreme_logits(model):
    rng = np.random.RandomState(3)
    y = _targets([[[8, 8, 40, 40], [30, 20, 60, 50]], [[20, 4, 60, 30]]], [[0, 1], [2]])
    signs = rng.choice([-1.0, 1.0], (2, 774, NUM_CLASSES))
    logits = tf.constant(100.0 * signs, tf.float32)
    deltas = tf.constant(rng.uniform(-100, 100, (2, 774, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([logits, deltas])
        class_loss, box_loss = model.detection_losses(
            y, {"class_logits": logits, "box_deltas": deltas}
        )
        total = class_loss + box_loss
    grads = tape.gradient(total, [logits, deltas])
    assert np.isfinite([float(class_loss), float(box_loss)]).all()
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    targets = {k: v.numpy() for k, v in model.compute_targets(y["boxes"], y["labels"]).items()}
    ref_class, ref_box = np_loss(targets, logits.numpy(), deltas.numpy())
    assert ref_class > 1e3  # wrong-signed +-100 logits: a large but finite loss
    assert float(class_loss) == pytest.approx(ref_class, rel=1e-5)
    assert float(box_loss) == pytest.approx(ref_box, rel=1e-5)


def test_empty_images_give_finite_loss_and_gradients(model):
    images = _images(2, seed=5)
    cases = {
        "all padding": _targets([[], []], [[], []], pad_to=3),
        "no GT column": {"boxes": np.zeros((2, 0, 4), np.float32), "labels": np.zeros((2, 0))},
        "zero-size and outside": _targets([[[5, 5, 5, 9]], [[70, 70, 80, 80]]], [[0], [1]]),
        "one empty image": _targets([[], [[8, 8, 40, 40]]], [[], [1]]),
    }
    for name, y in cases.items():
        with tf.GradientTape() as tape:
            y_pred = model(images, training=True)
            loss = model.compute_loss(images, y, y_pred)
        grads = tape.gradient(loss, model.trainable_variables)
        class_loss, box_loss = model.detection_losses(y, y_pred)
        assert np.isfinite(float(loss)) and float(loss) > 0, name
        assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads), name
        if name == "one empty image":
            assert float(box_loss) > 0
        else:
            assert float(box_loss) == 0.0, name  # nothing to regress
            # Only negatives, divided by max(1, 0) = 1: the plain focal sum.
            ref = np_focal(0.0, y_pred["class_logits"].numpy().astype(np.float64)).sum()
            assert float(class_loss) == pytest.approx(ref, rel=1e-4), name


# ----------------------------------------------------------------------------- bad inputs
def test_wrong_labels_raise_in_eager_mode(model):
    images = _images(1)
    y_pred = model(images)
    bad = _targets([[[8, 8, 40, 40]]], [[NUM_CLASSES]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is >= num_classes"):
        model.compute_loss(images, bad, y_pred)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is < -1"):
        model.compute_targets(**_targets([[[8, 8, 40, 40]]], [[-2]]))


def test_misuse_raises_clear_errors(model):
    with pytest.raises(ValueError, match="loss is built into the model"):
        _tiny().compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="dlnotes.evaluation"):
        _tiny().compile(optimizer="sgd", metrics=["accuracy"])
    with pytest.raises(ValueError, match="image_size=\\(64, 64\\)"):
        model(np.zeros((1, 32, 64, 3), np.float32))
    with pytest.raises(ValueError, match="sample_weight"):
        model.compute_loss(y=_targets([[]], [[]]), y_pred=model(_images(1)), sample_weight=[1.0])
    with pytest.raises(ValueError, match="targets must be a dict"):
        model.detection_losses(np.zeros((1, 4)), model(_images(1)))
    with pytest.raises(ValueError, match="Unknown preset"):
        RetinaNet.from_preset("retinanet_nope", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNet(num_classes=0)


# ----------------------------------------------------------------------------- Keras workflow
def _train_data():
    y = _targets(
        [[[8, 8, 40, 40], [30, 20, 60, 50]], [], [[4, 30, 24, 62]], [[10, 10, 50, 30]]],
        [[0, 1], [], [2], [1]],
    )
    return _images(4, seed=1), y


def test_fit_evaluate_predict():
    m = _tiny()
    m.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    x, y = _train_data()
    history = m.fit(x, y, batch_size=2, epochs=2, verbose=0)
    assert set(history.history) == {"loss", "class_loss", "box_loss"}
    logs = history.history
    np.testing.assert_allclose(
        logs["loss"], np.add(logs["class_loss"], logs["box_loss"]), rtol=1e-5
    )
    assert np.isfinite(logs["loss"]).all()

    # A label >= num_classes stops the (graph, non-XLA) step before its update.
    # (weights, BN statistics and the optimizer's state all wait for the label check).
    before = [v.numpy() for v in m.weights + m.optimizer.variables]
    bad = {"boxes": y["boxes"], "labels": np.where(y["labels"] == 0, 5, y["labels"])}  # image 0
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is >= num_classes"):
        m.fit(x, bad, batch_size=2, epochs=1, shuffle=False, verbose=0)
    for b, v in zip(before, m.weights + m.optimizer.variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    result = m.evaluate(dataset, verbose=0, return_dict=True)
    assert set(result) == {"loss", "class_loss", "box_loss"}
    class_loss, box_loss = m.detection_losses(y, m(x, training=False))
    assert result["class_loss"] == pytest.approx(float(class_loss), rel=1e-5)
    assert result["box_loss"] == pytest.approx(float(box_loss), rel=1e-5)
    assert result["loss"] == pytest.approx(float(class_loss + box_loss), rel=1e-5)

    # Give every anchor a score of sigmoid(0) = 0.5 so that predict has work to do.
    bias = m.class_head.output_conv.bias
    bias.assign(tf.zeros_like(bias))
    from_dataset = m.predict(dataset, verbose=0)
    from_array = m.predict(x, batch_size=3, verbose=0)
    expected = m.decode(m(x))

    for out in (from_dataset, from_array):
        assert set(out) == {"boxes", "scores", "labels", "num_detections"}
        assert out["boxes"].shape == (4, 300, 4) and out["scores"].shape == (4, 300)
        assert_same_detections(out, expected, atol=1e-4)
    n = from_array["num_detections"]
    assert (n > 0).all() and (n <= 300).all()
    for b in range(4):
        scores = from_array["scores"][b]
        assert (scores[: n[b]] > 0.05).all() and (scores[n[b] :] == -1).all()
        assert (from_array["labels"][b, n[b] :] == -1).all()
        assert (np.diff(scores[: n[b]]) <= 1e-6).all()  # sorted by score


def test_decode_keeps_top_k_per_level(model):
    # Background everywhere; one confident anchor per level (cell (0, 0), anchor 0) with classes
    # chosen so that per-class NMS suppresses nothing, and a second, weaker one on P3.
    bounds = np.cumsum([0, *model.level_sizes])
    logits = np.full((1, 774, NUM_CLASSES), -20.0, np.float32)
    for level in range(5):
        logits[0, bounds[level], level % NUM_CLASSES] = 5.0
    logits[0, bounds[1] - 1, 0] = 4.0  # P3's last anchor, far from the first
    outputs = {"class_logits": logits, "box_deltas": np.zeros((1, 774, 4), np.float32)}
    top_one = _tiny(pre_nms_top_k=1).decode(outputs)
    everything = _tiny(pre_nms_top_k=None).decode(outputs)
    assert int(everything["num_detections"][0]) == 6
    assert int(top_one["num_detections"][0]) == 5  # P3 keeps only its best anchor
    np.testing.assert_allclose(top_one["scores"][0, :5], 1 / (1 + np.exp(-5.0)), rtol=1e-6)
    anchors = np.clip(model.anchors.numpy()[bounds[:-1]], 0, 64)  # zero deltas: clipped anchors
    got = top_one["boxes"][0, :5].numpy()
    assert sorted(map(tuple, got.round(3))) == sorted(map(tuple, anchors.round(3)))


def test_save_load_round_trip(tmp_path):
    path = str(tmp_path / "retinanet.keras")
    m = _tiny(pre_nms_top_k=500, score_threshold=0.1)
    m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    m.optimizer.build(m.trainable_variables)  # as after training: its state is saved too
    rng = np.random.RandomState(0)
    for w in m.non_trainable_weights:  # BN moving statistics away from their initial 0 / 1
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
    m.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RetinaNet) and loaded.compiled
    assert loaded.get_config() == m.get_config()
    assert loaded.optimizer.get_config()["momentum"] == 0.9
    x = _images(2)
    for training in (False, True):
        a, b = m(x, training=training), loaded(x, training=training)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(m.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ----------------------------------------------------------------------------- XLA
def test_jit_compiled_training_matches_graph_training():
    x, y = _train_data()
    x, y = x[:2], {k: v[:2] for k, v in y.items()}
    graph, xla = _tiny(**SLIM), _tiny(**SLIM)
    xla.set_weights(graph.get_weights())
    graph.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
    xla.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=True)
    assert xla.jit_compile
    h_graph = graph.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    h_xla = xla.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    for key in ("loss", "class_loss", "box_loss"):
        assert h_xla[key][0] == pytest.approx(h_graph[key][0], rel=1e-4)
    moved = [
        np.abs(a - b).max() for a, b in zip(graph.get_weights(), xla.get_weights(), strict=True)
    ]
    assert max(moved) < 1e-4  # the same SGD update
    h = xla.fit(x, y, batch_size=2, epochs=2, verbose=0).history  # the compiled step, again
    assert np.isfinite(h["loss"]).all()

    # XLA drops assertions: the checks run as graph ops before the compiled core, so a bad label
    # stops the step before it changes anything, with the dlnotes message first.
    before = [v.numpy() for v in xla.weights + xla.optimizer.variables]
    bad = {"boxes": y["boxes"], "labels": np.where(y["labels"] >= 0, 7, -1).astype(np.int32)}
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"^RetinaNet\(num_classes=3\): a "
        r"target label is >= num_classes .* Largest label 7 \[training batch 0",
    ):
        xla.fit(x, bad, batch_size=2, epochs=1, verbose=0)
    for a, v in zip(before, xla.weights + xla.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())
    xla.fit(x, y, batch_size=2, epochs=1, verbose=0)  # good data trains again

    # predict: NMS has no XLA kernel, so only the network is compiled.
    bias = xla.class_head.output_conv.bias
    bias.assign(tf.zeros_like(bias))
    out = xla.predict(x, batch_size=2, verbose=0)
    assert_same_detections(out, xla.decode(xla(x)), atol=1e-4)


def test_jit_compiled_fit_of_the_full_preset_with_adam():
    # Adam creates slot variables: they must exist before the (XLA, label-checked) step is traced.
    x, y = _train_data()
    m = _tiny()
    m.compile(optimizer=keras.optimizers.AdamW(1e-3, clipnorm=5.0), jit_compile=True)
    h = m.fit(x[:2], {k: v[:2] for k, v in y.items()}, batch_size=2, epochs=2, verbose=0).history
    assert np.isfinite(h["loss"]).all() and int(m.optimizer.iterations) == 2


# ----------------------------------------------------------------------------- parameter counts
def _conv_params(k, c_in, c_out, bias=True):
    return k * k * c_in * c_out + (c_out if bias else 0)


def _subnets_params(num_classes, anchors=9, channels=256, depth=4):
    tower = depth * _conv_params(3, channels, channels)
    return (
        2 * tower
        + _conv_params(3, channels, anchors * num_classes)
        + _conv_params(3, channels, anchors * 4)
    )


def _resnet50_params(blocks=(3, 4, 6, 3), base=64):
    """ResNet-50 (either stride placement) as Keras counts it: (conv kernels, BN channels).

    No conv has a bias; each conv feeds a BatchNorm of its output width, which Keras counts as
    4 variables per channel (gamma, beta, moving mean and variance). Stem 7x7 conv 3 -> base;
    bottleneck 1x1 in -> planes, 3x3 planes -> planes, 1x1 planes -> 4 planes, and a 1x1
    in -> 4 planes shortcut on each stage's first block.
    """
    kernels = _conv_params(7, 3, base, bias=False)
    channels = base
    c_in = base
    for s, n in enumerate(blocks):
        planes = base * 2**s
        for i in range(n):
            kernels += _conv_params(1, c_in, planes, bias=False)
            kernels += _conv_params(3, planes, planes, bias=False)
            kernels += _conv_params(1, planes, 4 * planes, bias=False)
            channels += 6 * planes
            if i == 0:
                kernels += _conv_params(1, c_in, 4 * planes, bias=False)
                channels += 4 * planes
            c_in = 4 * planes
    return kernels, channels


def _fpn_params(c3, c4, c5, channels=256, p6_from_c5=True):
    laterals = sum(_conv_params(1, c, channels) for c in (c3, c4, c5))
    outputs = 3 * _conv_params(3, channels, channels)
    p6 = _conv_params(3, c5 if p6_from_c5 else channels, channels)
    return laterals + outputs + p6 + _conv_params(3, channels, channels)


def test_parameter_count_of_the_paper_model(paper_model):
    # ResNet-50 without conv biases, BN with 4 values per channel: keras-hub's ResNet-50 count.
    # keras.applications' include_top=False ResNet-50 (the source of the ImageNet weights) has
    # one conv bias per BN channel more: 23,587,712.
    kernels, bn_channels = _resnet50_params()
    # torchvision's ResNet-50 without fc, 23,508,032 parameters, is kernels + 2 per BN channel
    assert (kernels, bn_channels) == (23_454_912, 26_560)
    assert kernels + 2 * bn_channels == 25_557_032 - (2048 * 1000 + 1000)
    resnet50 = kernels + 4 * bn_channels
    assert resnet50 == 23_561_152 and resnet50 + bn_channels == 23_587_712
    fpn = _fpn_params(512, 1024, 2048)  # P6 from C5 (paper, keras-retinanet)
    assert fpn == 7_997_440
    heads = _subnets_params(80)
    assert heads == 6_463_220
    assert paper_model.backbone.count_params() == resnet50
    assert paper_model.neck.count_params() == fpn
    assert paper_model.class_head.count_params() + paper_model.box_head.count_params() == heads
    # = keras-hub's RetinaNet with a ResNet-50 (benchmarks/README.md): the same network
    assert paper_model.count_params() == resnet50 + fpn + heads == 38_021_812


def test_parameter_count_matches_torchvision():
    """torchvision's ``retinanet_resnet50_fpn`` (COCO_V1 weights meta): ``num_params`` 34,014,999.

    Its configuration in our terms: torchvision's ResNet-50 layout (no conv bias; our
    ``resnext50_32x4d`` with groups=1, width_per_group=64), FPN with biases and no BN whose P6 is
    computed from P5 (``LastLevelP6P7(256, 256)``: ``extra_from="p5"``), paper heads without
    GroupNorm (v1, not v2), 91 classes (COCO's 90 ids + background index 0) and 9 anchors.
    The one remaining difference is how BatchNorm is counted: torchvision's detection backbones
    use ``FrozenBatchNorm2d``, whose weight, bias, running mean and variance are buffers, not
    parameters, while Keras counts all four variables of each BatchNormalization channel. So
    torchvision's figure is our count minus the backbone's BN variables.
    """
    tv = RetinaNet(
        num_classes=91,
        image_size=(128, 128),  # parameters do not depend on the image size
        backbone="resnext50_32x4d",
        backbone_kwargs={"groups": 1, "width_per_group": 64},
        neck="fpn",
        neck_kwargs={"extra_from": "p5"},
    )
    bn = sum(
        layer.count_params()
        for layer in tv.backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    kernels, bn_channels = _resnet50_params()
    assert bn == 4 * bn_channels == 4 * 26_560  # 26,560 BN channels in ResNet-50
    assert tv.neck.count_params() == _fpn_params(512, 1024, 2048, p6_from_c5=False) == 3_868_672
    assert tv.class_head.count_params() + tv.box_head.count_params() == _subnets_params(91)
    conv_weights = tv.backbone.count_params() - bn  # 23,454,912: torchvision ResNet-50 w/o fc
    assert conv_weights == kernels == 25_557_032 - (2048 * 1000 + 1000) - 2 * 26_560
    # the v1.5 layout has the count of our (v1, keras.applications-named) resnet50: 23,561,152
    assert tv.backbone.count_params() == kernels + 4 * bn_channels == 23_561_152
    assert tv.count_params() - bn == 34_014_999


# ----------------------------------------------------------------------------- distribution
@pytest.fixture(scope="module", autouse=True)
def mirrored_run(request):
    """Starts the two-replica script at module setup (when its test is selected), so that it runs
    beside the other tests."""
    kwargs = {**PRESETS["retinanet_tiny_256"], "num_classes": 3, "image_size": [64, 64], **SLIM}
    yield from script_beside_tests(
        request,
        "test_two_replicas_match_one_device",
        detector_replicas_script("dlnotes.models.retinanet:RetinaNet", kwargs),
    )


def test_two_replicas_match_one_device(mirrored_run):
    check_replicas_match_one_device(script_result(mirrored_run), ("class_loss", "box_loss"))


def test_presets_build_with_their_documented_settings():
    assert set(PRESETS) >= {"retinanet_resnet50_fpn", "retinanet_tiny_256"}
    tiny = RetinaNet.from_preset("retinanet_tiny_256", num_classes=2)
    assert tiny.image_size == (256, 256) and tiny.anchors.shape == (12_276, 4)
    assert tiny.get_config()["neck"] == "fpn_bn"


# ----------------------------------------------------------------------------- parts as objects
def test_parts_given_as_objects_serialise_and_compute_the_same_model(tmp_path):
    from dlnotes.anchors import AnchorGenerator
    from dlnotes.backbones import build_backbone
    from dlnotes.boxes import BoxCoder
    from dlnotes.matching import AnchorLabelEncoder
    from dlnotes.necks import FPN

    flat = _tiny(**SLIM)
    parts = dict(
        backbone=build_backbone("resnet_tiny", (*SIZE, 3)),
        preprocessing="torch",
        neck=FPN.notes_variant(num_channels=16, max_level=5),
        class_head=RetinaNetHead(9, NUM_CLASSES, 16, 1, prior_probability=0.01, name="cls"),
        box_head=RetinaNetHead(9, 4, 16, 1, name="box"),
        anchor_generator=AnchorGenerator((16, 32, 64), (8, 16, 32)),
        box_coder=BoxCoder(std=(0.2,) * 4),
        label_encoder=AnchorLabelEncoder(0.5, 0.4, "global"),
    )
    composed = RetinaNet(num_classes=NUM_CLASSES, image_size=SIZE, **parts)
    assert composed.count_params() == flat.count_params()
    composed.set_weights(flat.get_weights())
    x, y = _train_data()
    for key, value in flat(x).items():
        np.testing.assert_allclose(composed(x)[key], value, atol=1e-5)
    for key, value in flat.loss_terms(y, flat(x)).items():
        assert float(composed.loss_terms(y, composed(x))[key]) == pytest.approx(float(value))
    config = composed.get_config()
    assert config["backbone"]["class_name"] == "Functional" and config["neck"]["class_name"]
    assert config["label_encoder"]["config"] == parts["label_encoder"].get_config()
    path = str(tmp_path / "composed.keras")
    composed.save(path)
    loaded = keras.saving.load_model(path)
    for key, value in composed(x).items():
        np.testing.assert_array_equal(loaded(x)[key], value)
    with pytest.raises(ValueError, match="preprocessing="):
        RetinaNet(num_classes=3, image_size=SIZE, backbone=build_backbone("resnet_tiny"))
    with pytest.raises(ValueError, match="per-cell outputs"):  # 3 classes for a 5-class model
        RetinaNet(
            num_classes=5, image_size=SIZE, backbone="resnet_tiny", neck="fpn_bn",
            num_channels=16, anchor_sizes=(16, 32, 64), anchor_strides=(8, 16, 32),
            neck_kwargs={"max_level": 5}, class_head=RetinaNetHead(9, 3, 16, 1),
        )  # fmt: skip


def test_huber_box_loss_and_iou_loss_against_numpy():
    m = _tiny(**SLIM, box_loss="huber", huber_delta=0.1, box_loss_weight=50.0, iou_loss="giou")
    assert m.get_config()["box_loss"] == "huber" and m.get_config()["iou_loss"] == "giou"
    assert "box_loss" not in _tiny(**SLIM).get_config()  # a plain RetinaNet's config as before
    x, y = _train_data()
    out = m(x)
    terms = {k: float(v) for k, v in m.loss_terms(y, out).items()}
    targets = {k: v.numpy() for k, v in m.compute_targets(y["boxes"], y["labels"]).items()}
    positive = targets["states"] == 1
    n = max(1, positive.sum())
    d = np.abs(out["box_deltas"].numpy().astype(np.float64) - targets["box_targets"])
    huber64 = np.where(d <= 0.1, 0.5 * d**2, 0.1 * (d - 0.05))
    # automl: Huber summed over the positives' 4 coordinates, divided by 4 x positives
    assert terms["box_loss"] == pytest.approx(huber64[positive].sum() / (4 * n), rel=1e-5)
    from _reference import np_iou_pair

    boxes = m.box_coder.decode(m.anchors, out["box_deltas"]).numpy()
    gt = m.box_coder.decode(m.anchors, targets["box_targets"]).numpy()
    giou = [np_iou_pair(g, p, "giou") for g, p in zip(gt[positive], boxes[positive], strict=True)]
    assert terms["iou_loss"] == pytest.approx(np.sum(1 - np.array(giou)) / n, rel=1e-4)
    total = m.compute_loss(x, y, out)
    expected = terms["class_loss"] + 50 * terms["box_loss"] + terms["iou_loss"]
    assert float(total) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="box_loss must be one of"):
        _tiny(box_loss="l2")
    with pytest.raises(ValueError, match="iou_loss must be None or one of"):
        _tiny(iou_loss="eiou")
