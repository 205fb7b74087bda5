"""Tests of dlnotes.boxes against float64 NumPy references and hand-made cases."""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import np_iou_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from dlnotes import boxes as B

IMAGE = (120.0, 200.0)  # (height, width)
KINDS = ("iou", "giou", "diou", "ciou")


def random_boxes(rng, shape, size=100.0, min_wh=1.0):
    """Random xyxy boxes with positive size; float64."""
    xy = rng.uniform(0, size, shape + (2,))
    wh = rng.uniform(min_wh, size / 2, shape + (2,))
    return np.concatenate([xy, xy + wh], axis=-1)


# ----------------------------------------------------------------------------- NumPy references
def np_to_format(b, fmt, hw=IMAGE):
    """Hand-written xyxy -> ``fmt`` in float64."""
    x1, y1, x2, y2 = np.moveaxis(np.asarray(b, np.float64), -1, 0)
    h, w = hw
    table = {
        "xyxy": (x1, y1, x2, y2),
        "yxyx": (y1, x1, y2, x2),
        "xywh": (x1, y1, x2 - x1, y2 - y1),
        "center_xywh": ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1),
        "center_yxhw": ((y1 + y2) / 2, (x1 + x2) / 2, y2 - y1, x2 - x1),
        "rel_xyxy": (x1 / w, y1 / h, x2 / w, y2 / h),
        "rel_yxyx": (y1 / h, x1 / w, y2 / h, x2 / w),
        "rel_xywh": (x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h),
        "rel_center_xywh": ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h),
    }
    return np.stack(table[fmt], axis=-1)


def np_pairwise(b1, b2, kind):
    """(N, 4) x (M, 4) -> (N, M) by looping over pairs."""
    return np.array([[np_iou_pair(a, b, kind) for b in b2] for a in b1])


def np_encode(anchors, boxes, mean, std):
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
    t = np.stack([(bx - ax) / aw, (by - ay) / ah, np.log(bw / aw), np.log(bh / ah)], axis=-1)
    return (t - np.asarray(mean)) / np.asarray(std)


# ----------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("source,target", list(itertools.product(B.FORMATS, B.FORMATS)))
def test_every_conversion_pair_round_trips(source, target):
    boxes = random_boxes(np.random.default_rng(0), (3, 5))
    src = np_to_format(boxes, source)
    there = B.convert_format(src, source, target, image_shape=IMAGE)
    back = B.convert_format(there, target, source, image_shape=IMAGE)
    assert there.dtype == tf.float32 and there.shape == (3, 5, 4)
    np.testing.assert_allclose(there.numpy(), np_to_format(boxes, target), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(back.numpy(), src, rtol=1e-5, atol=1e-4)


def test_conversion_hand_values():
    box = [[10.0, 20.0, 50.0, 80.0]]  # xyxy in a 100 (h) x 200 (w) image
    hw = (100, 200)
    expected = {
        "yxyx": [20, 10, 80, 50],
        "xywh": [10, 20, 40, 60],
        "center_xywh": [30, 50, 40, 60],
        "center_yxhw": [50, 30, 60, 40],
        "rel_xyxy": [0.05, 0.2, 0.25, 0.8],
        "rel_yxyx": [0.2, 0.05, 0.8, 0.25],
        "rel_xywh": [0.05, 0.2, 0.2, 0.6],
        "rel_center_xywh": [0.15, 0.5, 0.2, 0.6],
    }
    for fmt, value in expected.items():
        got = B.convert_format(box, "xyxy", fmt, image_shape=hw).numpy()[0]
        np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=fmt)


def test_conversion_accepts_channels_ints_and_per_image_shapes():
    boxes = np.array([[[0.5, 0.5, 1.0, 1.0]], [[0.5, 0.5, 1.0, 1.0]]])  # (2, 1, 4) rel_xyxy
    out = B.convert_format(boxes, "rel_xyxy", "xyxy", image_shape=(10, 20, 3)).numpy()
    np.testing.assert_allclose(out[0, 0], [10, 5, 20, 10])
    per_image = B.convert_format(boxes, "rel_xyxy", "xyxy", image_shape=[[10, 20], [40, 80]])
    np.testing.assert_allclose(per_image.numpy()[:, 0], [[10, 5, 20, 10], [40, 20, 80, 40]])
    ints = B.convert_format([[1, 2, 3, 4]], "xyxy", "xywh")
    assert ints.dtype == tf.float32
    np.testing.assert_allclose(ints.numpy(), [[1, 2, 2, 2]])


def test_conversion_errors():
    with pytest.raises(ValueError, match="Unknown box format 'xyz'.*center_xywh"):
        B.convert_format([[0, 0, 1, 1]], "xyz", "xyxy")
    with pytest.raises(ValueError, match="Unknown box format 'cxcywh'"):
        B.convert_format([[0, 0, 1, 1]], "xyxy", "cxcywh")
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        B.convert_format(np.zeros((3, 5)), "xyxy", "xywh")
    with pytest.raises(ValueError, match="image_shape"):
        B.convert_format([[0, 0, 1, 1]], "xyxy", "rel_xyxy")
    with pytest.raises(ValueError, match="image_shape"):
        B.convert_format([[0, 0, 1, 1]], "rel_xywh", "xyxy")
    with pytest.raises(ValueError, match="image_shape"):
        B.convert_format([[0, 0, 1, 1]], "rel_xywh", "xyxy", image_shape=(5,))


def test_box_area_counts_negative_sizes_as_zero():
    area = B.box_area([[0, 0, 2, 3], [5, 5, 4, 9], [1, 1, 1, 1]])
    np.testing.assert_allclose(area.numpy(), [6, 0, 0])


# ----------------------------------------------------------------------------- IoU family
@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_against_numpy_reference(kind):
    rng = np.random.default_rng(1)
    b1 = random_boxes(rng, (7,))
    b2 = random_boxes(rng, (5,))
    b2[0] = b1[3]  # an identical pair
    b2[1] = b1[2] + [5, 5, 5, 5]  # a shifted copy: partial overlap
    b2[2] = [300, 300, 320, 340]  # disjoint from everything
    got = B.pairwise_iou(b1, b2, kind=kind)
    assert got.shape == (7, 5) and got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), np_pairwise(b1, b2, kind), atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_batched_broadcast_and_masks(kind):
    rng = np.random.default_rng(2)
    anchors = random_boxes(rng, (6,))
    gt = random_boxes(rng, (3, 4))
    labels = np.array([[0, 1, -1, -1], [2, -1, -1, -1], [-1, -1, -1, -1]])
    got = B.pairwise_iou(anchors, gt, kind=kind, mask2=labels >= 0, invalid_value=-2.0).numpy()
    assert got.shape == (3, 6, 4)
    for b in range(3):
        ref = np_pairwise(anchors, gt[b], kind)
        ref[:, labels[b] < 0] = -2.0
        np.testing.assert_allclose(got[b], ref, atol=2e-5)
    # Batched on both sides with a mask on boxes1 as well.
    preds = random_boxes(rng, (3, 6))
    mask1 = rng.random((3, 6)) > 0.3
    got = B.pairwise_iou(preds, gt, kind=kind, mask1=mask1, mask2=labels >= 0).numpy()
    for b in range(3):
        ref = np_pairwise(preds[b], gt[b], kind)
        ref[~mask1[b]] = -1.0
        ref[:, labels[b] < 0] = -1.0
        np.testing.assert_allclose(got[b], ref, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_aligned_is_diagonal_of_pairwise(kind):
    rng = np.random.default_rng(3)
    b1, b2 = random_boxes(rng, (2, 5)), random_boxes(rng, (2, 5))
    aligned = B.aligned_iou(b1, b2, kind=kind).numpy()
    pairwise = B.pairwise_iou(b1, b2, kind=kind).numpy()
    assert aligned.shape == (2, 5)
    np.testing.assert_allclose(aligned, np.diagonal(pairwise, axis1=1, axis2=2), atol=1e-6)
    ref = np.array(
        [
            [np_iou_pair(a, b, kind) for a, b in zip(r1, r2, strict=True)]
            for r1, r2 in zip(b1, b2, strict=True)
        ]
    )
    np.testing.assert_allclose(aligned, ref, atol=2e-5)


def test_iou_hand_values():
    a = [0.0, 0.0, 2.0, 2.0]
    b = [1.0, 1.0, 3.0, 3.0]  # inter 1, union 7, enclosing 9, centres sqrt(2) apart, diag^2 18
    np.testing.assert_allclose(B.aligned_iou(a, b).numpy(), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(B.aligned_iou(a, b, "giou").numpy(), 1 / 7 - 2 / 9, rtol=1e-6)
    np.testing.assert_allclose(B.aligned_iou(a, b, "diou").numpy(), 1 / 7 - 2 / 18, rtol=1e-6)
    # Same aspect ratio: v = 0, so CIoU = DIoU.
    np.testing.assert_allclose(B.aligned_iou(a, b, "ciou").numpy(), 1 / 7 - 2 / 18, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_boxes_score_one(kind):
    boxes = random_boxes(np.random.default_rng(4), (6,))
    np.testing.assert_allclose(B.aligned_iou(boxes, boxes, kind).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_area_boxes_are_finite_with_finite_gradients(kind):
    boxes1 = tf.constant([[5, 5, 5, 5], [0, 0, 0, 10], [0, 0, 10, 10], [3, 3, 3, 3.0]])
    boxes2 = tf.constant([[5, 5, 5, 5], [0, 0, 10, 10], [2, 2, 2, 8], [7, 7, 7, 7.0]])
    with tf.GradientTape() as tape:
        tape.watch(boxes1)
        values = B.aligned_iou(boxes1, boxes2, kind)
        pairwise = B.pairwise_iou(boxes1, boxes2, kind)
        total = tf.reduce_sum(values) + tf.reduce_sum(pairwise)
    grad = tape.gradient(total, boxes1)
    assert np.all(np.isfinite(values.numpy())) and np.all(np.isfinite(pairwise.numpy()))
    assert np.all(np.isfinite(grad.numpy()))
    if kind == "iou":
        np.testing.assert_allclose(values.numpy(), 0.0)  # zero-area boxes overlap nothing


box_strategy = st.tuples(
    st.floats(0, 100), st.floats(0, 100), st.floats(0, 60), st.floats(0, 60)
).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(box_strategy, min_size=1, max_size=5), st.lists(box_strategy, min_size=1, max_size=5)
)
def test_iou_ranges_and_symmetry(b1, b2):
    iou = B.pairwise_iou(b1, b2).numpy()
    assert np.all((iou >= 0) & (iou <= 1 + 1e-6))
    np.testing.assert_allclose(iou, B.pairwise_iou(b2, b1).numpy().T, atol=1e-6)
    # GIoU and DIoU lie in [-1, 1]; CIoU subtracts alpha * v = v^2 / (1 - IoU + v) <= 1/2 more.
    for kind, low in (("giou", -1.0), ("diou", -1.0), ("ciou", -1.5)):
        value = B.pairwise_iou(b1, b2, kind=kind).numpy()
        assert np.all(np.isfinite(value))
        assert np.all((value >= low - 1e-6) & (value <= 1 + 1e-6)), kind
        # Every penalty only lowers the score.
        assert np.all(value <= iou + 1e-6), kind


def test_ciou_alpha_is_held_constant_in_the_gradient():
    """Gradient = d/dbox [DIoU - alpha0 * v] with alpha0 frozen (finite differences, float64)."""
    pred = np.array([2.0, 3.0, 14.0, 9.0])
    gt = np.array([4.0, 1.0, 10.0, 13.0])
    iou0 = np_iou_pair(pred, gt, "iou")
    v0 = 4 / math.pi**2 * (math.atan(6 / 12) - math.atan(12 / 6)) ** 2
    alpha0 = v0 / (1 - iou0 + v0)

    def frozen(p):
        v = 4 / math.pi**2 * (math.atan(6 / 12) - math.atan((p[2] - p[0]) / (p[3] - p[1]))) ** 2
        return np_iou_pair(p, gt, "diou") - alpha0 * v

    h = 1e-6
    numeric = np.array([(frozen(pred + h * e) - frozen(pred - h * e)) / (2 * h) for e in np.eye(4)])
    x = tf.constant(pred, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = B.aligned_iou(x, gt, "ciou")
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), numeric, rtol=1e-3, atol=1e-5)


def test_pairwise_under_xla_matches_eager():
    rng = np.random.default_rng(5)
    anchors = tf.constant(random_boxes(rng, (8,)), tf.float32)
    gt = tf.constant(random_boxes(rng, (2, 3)), tf.float32)
    mask = tf.constant([[True, True, False], [True, False, False]])
    fn = tf.function(lambda a, g, m: B.pairwise_iou(a, g, kind="ciou", mask2=m), jit_compile=True)
    np.testing.assert_allclose(
        fn(anchors, gt, mask).numpy(),
        B.pairwise_iou(anchors, gt, kind="ciou", mask2=mask).numpy(),
        atol=1e-5,
    )


def test_iou_errors():
    with pytest.raises(ValueError, match="Unknown IoU kind 'eiou'"):
        B.pairwise_iou([[0, 0, 1, 1]], [[0, 0, 1, 1]], kind="eiou")
    with pytest.raises(ValueError, match="boxes2.*\\(2, 3\\)"):
        B.pairwise_iou([[0, 0, 1, 1]], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="num_boxes"):
        B.pairwise_iou([0, 0, 1, 1], [[0, 0, 1, 1]])


# ----------------------------------------------------------------------------- clip / small boxes
def test_clip_boxes_values():
    boxes = [[-5, -3, 50, 70], [10, 20, 300, 150], [250, 130, 260, 140]]
    got = B.clip_boxes(boxes, (100, 200)).numpy()
    np.testing.assert_allclose(got, [[0, 0, 50, 70], [10, 20, 200, 100], [200, 100, 200, 100]])
    # Per-image shapes for a batch (B, N, 4).
    batch = np.array([[[-1, -1, 500, 500]], [[-1, -1, 500, 500]]])
    got = B.clip_boxes(batch, [[100, 200, 3], [50, 60, 3]]).numpy()
    np.testing.assert_allclose(got[:, 0], [[0, 0, 200, 100], [0, 0, 60, 50]])


def test_remove_small_boxes_values():
    boxes = [[[0, 0, 10, 10], [0, 0, 1.9, 10], [0, 0, 10, 1.9], [5, 5, 7, 7], [3, 3, 1, 9]]]
    keep = B.remove_small_boxes(boxes, 2.0).numpy()
    assert keep.dtype == bool and keep.shape == (1, 5)
    np.testing.assert_array_equal(keep, [[True, False, False, True, False]])


# ----------------------------------------------------------------------------- BoxCoder
def test_box_coder_matches_numpy_reference_with_std_02():
    rng = np.random.default_rng(6)
    anchors, boxes = random_boxes(rng, (20,)), random_boxes(rng, (20,))
    coder = B.BoxCoder(std=(0.2, 0.2, 0.2, 0.2))
    ref = np_encode(anchors, boxes, (0, 0, 0, 0), (0.2,) * 4)
    np.testing.assert_allclose(coder.encode(anchors, boxes).numpy(), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(coder.decode(anchors, ref).numpy(), boxes, rtol=1e-5, atol=1e-3)
    # A non-zero mean, keras-retinanet style std.
    coder = B.BoxCoder(mean=(0.1, -0.1, 0.05, 0.0), std=(0.1, 0.1, 0.2, 0.2))
    ref = np_encode(anchors, boxes, (0.1, -0.1, 0.05, 0.0), (0.1, 0.1, 0.2, 0.2))
    np.testing.assert_allclose(coder.encode(anchors, boxes).numpy(), ref, rtol=1e-4, atol=1e-4)


def test_box_coder_hand_values():
    coder = B.BoxCoder()
    anchors = [[0.0, 0.0, 10.0, 20.0]]  # centre (5, 10), size 10 x 20
    boxes = [[5.0, 0.0, 25.0, 20.0]]  # centre (15, 10), size 20 x 20
    np.testing.assert_allclose(
        coder.encode(anchors, boxes).numpy(), [[1.0, 0.0, math.log(2), 0.0]], atol=1e-6
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        box_strategy.filter(lambda b: b[2] - b[0] > 1 and b[3] - b[1] > 1), min_size=1, max_size=4
    ),
    st.floats(2, 200),
    st.floats(2, 200),
)
def test_box_coder_round_trip(boxes, aw, ah):
    anchors = [[50 - aw / 2, 50 - ah / 2, 50 + aw / 2, 50 + ah / 2]] * len(boxes)
    for coder in (B.BoxCoder(std=(0.2,) * 4), B.BoxCoder.from_weights((10, 10, 5, 5))):
        deltas = coder.encode(anchors, boxes)
        np.testing.assert_allclose(coder.decode(anchors, deltas).numpy(), boxes, atol=2e-3)


def test_from_weights_equals_inverse_std_and_torchvision_formula():
    rng = np.random.default_rng(7)
    anchors, boxes = random_boxes(rng, (10,)), random_boxes(rng, (10,))
    weighted = B.BoxCoder.from_weights((10, 10, 5, 5))
    assert weighted.std == (0.1, 0.1, 0.2, 0.2) and weighted.mean == (0.0,) * 4
    np.testing.assert_allclose(
        weighted.encode(anchors, boxes).numpy(),
        B.BoxCoder(std=(0.1, 0.1, 0.2, 0.2)).encode(anchors, boxes).numpy(),
        rtol=1e-6,
    )
    # torchvision: dx = wx * (gx - ax) / aw, ..., dw = ww * log(gw / aw).
    ref = np_encode(anchors, boxes, (0,) * 4, (1,) * 4) * np.array([10, 10, 5, 5])
    np.testing.assert_allclose(weighted.encode(anchors, boxes).numpy(), ref, rtol=1e-4, atol=1e-4)


def test_encode_broadcasts_anchors_against_a_batch():
    rng = np.random.default_rng(8)
    anchors, boxes = random_boxes(rng, (5,)), random_boxes(rng, (3, 5))
    coder = B.BoxCoder(std=(0.2,) * 4)
    deltas = coder.encode(anchors, boxes).numpy()
    assert deltas.shape == (3, 5, 4)
    for b in range(3):
        ref = np_encode(anchors, boxes[b], (0,) * 4, (0.2,) * 4)
        np.testing.assert_allclose(deltas[b], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(coder.decode(anchors, deltas).numpy(), boxes, atol=1e-3)


def test_degenerate_boxes_encode_finite_and_decode_clip_prevents_inf():
    coder = B.BoxCoder(std=(0.2,) * 4)
    anchors = [[0.0, 0.0, 32.0, 32.0]] * 2
    deltas = coder.encode(anchors, [[10.0, 10.0, 10.0, 30.0], [5.0, 5.0, 5.0, 5.0]]).numpy()
    assert np.all(np.isfinite(deltas))
    decoded = coder.decode(anchors, [[0.0, 0.0, 1e4, 1e4], [0.0, 0.0, 1e30, -1e30]]).numpy()
    assert np.all(np.isfinite(decoded))
    # Width is capped at exp(scale_clip) * anchor width = 1000 / 16 * 32 = 2000.
    np.testing.assert_allclose(decoded[0, 2] - decoded[0, 0], 2000.0, rtol=1e-5)
    np.testing.assert_allclose(decoded[1, 2] - decoded[1, 0], 2000.0, rtol=1e-5)
    assert decoded[1, 3] - decoded[1, 1] < 1e-3  # very negative th shrinks to ~0, no NaN


def test_box_coder_config_round_trip_and_errors():
    coder = B.BoxCoder(mean=(0, 0, 0, 0), std=np.array([0.1, 0.1, 0.2, 0.2]), scale_clip=3.0)
    config = coder.get_config()
    assert config == {"mean": [0.0] * 4, "std": [0.1, 0.1, 0.2, 0.2], "scale_clip": 3.0}
    assert all(type(v) is float for v in config["std"] + config["mean"])
    clone = B.BoxCoder.from_config(config)
    assert clone.std == coder.std and clone.mean == coder.mean and clone.scale_clip == 3.0
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(coder))
    assert isinstance(restored, B.BoxCoder) and restored.get_config() == config
    assert B.BoxCoder().scale_clip == pytest.approx(math.log(1000 / 16))
    with pytest.raises(ValueError, match="std"):
        B.BoxCoder(std=(0.1, 0.0, 0.2, 0.2))
    with pytest.raises(ValueError, match="4 entries"):
        B.BoxCoder(mean=(0, 0, 0))
    with pytest.raises(ValueError, match="weights"):
        B.BoxCoder.from_weights((10, 10, -5, 5))


def test_box_coder_yx_order_is_automls_permutation():
    anchors = np.array([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 16.0, 64.0]], np.float32)
    boxes = np.array([[12.0, 18.0, 60.0, 44.0], [4.0, 2.0, 10.0, 50.0]], np.float32)
    std = (0.1, 0.2, 0.3, 0.4)
    xy = B.BoxCoder(std=std).encode(anchors, boxes).numpy() * std  # (tx, ty, tw, th)
    yx_coder = B.BoxCoder(std=std, order="yx")
    yx = yx_coder.encode(anchors, boxes).numpy() * std  # std applies in (ty, tx, th, tw) order
    np.testing.assert_allclose(yx, xy[:, [1, 0, 3, 2]], rtol=1e-6)
    np.testing.assert_allclose(yx_coder.decode(anchors, yx / std), boxes, atol=1e-4)
    assert yx_coder.get_config()["order"] == "yx" and "order" not in B.BoxCoder().get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(yx_coder))
    assert restored.order == "yx"
    with pytest.raises(ValueError, match="order"):
        B.BoxCoder(order="yxyx")


# ----------------------------------------------------------------------------- YOLO offsets
YOLO_WH = np.array([[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]])
LOG_1000 = math.log(1000.0)


def np_yolo_decode(raw, anchors_wh, stride, clip=LOG_1000):
    """float64 reference of the notes' decoding: (sigmoid(t) + c) * stride, a * exp(t)."""
    raw = np.asarray(raw, np.float64)
    h, w = raw.shape[-4], raw.shape[-3]
    col, row = np.meshgrid(np.arange(w), np.arange(h))
    sig = 1.0 / (1.0 + np.exp(-raw[..., :2]))
    x = (sig[..., 0] + col[:, :, None]) * stride
    y = (sig[..., 1] + row[:, :, None]) * stride
    bw = anchors_wh[:, 0] * np.exp(np.minimum(raw[..., 2], clip))
    bh = anchors_wh[:, 1] * np.exp(np.minimum(raw[..., 3], clip))
    return np.stack([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2], axis=-1)


def _cells(h, w):
    col, row = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([col, row], axis=-1)[:, :, None, :].astype(np.float32)  # (H, W, 1, 2)


def test_yolo_decode_matches_numpy_reference():
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 2, (2, 3, 5, 3, 4)).astype(np.float32)
    got = B.yolo_decode(raw, YOLO_WH, 8).numpy()
    assert got.shape == (2, 3, 5, 3, 4)
    np.testing.assert_allclose(got, np_yolo_decode(raw, YOLO_WH, 8), rtol=1e-5, atol=1e-4)


def test_yolo_decode_hand_made():
    raw = np.zeros((2, 3, 1, 4), np.float32)  # H=2, W=3, one anchor
    raw[1, 2, 0] = [100.0, -100.0, math.log(2.0), 0.0]  # x to the right edge, y to the top edge
    boxes = B.yolo_decode(raw, [[10.0, 20.0]], 32).numpy()
    # tx = 0: centre of the cell, anchor size.
    np.testing.assert_allclose(boxes[0, 0, 0], [16 - 5, 16 - 10, 16 + 5, 16 + 10])
    # Cell (row 1, col 2): x = (1 + 2) * 32 = 96, y = (0 + 1) * 32 = 32, w = 20, h = 20.
    np.testing.assert_allclose(boxes[1, 2, 0], [86, 22, 106, 42], atol=1e-4)


def test_yolo_decode_encode_round_trip():
    rng = np.random.default_rng(1)
    raw = rng.normal(0, 2, (2, 4, 6, 3, 4)).astype(np.float32)
    # log-size targets of tiny boxes lose digits to the cancellation x2 - x1 in float32.
    raw[..., 2:] = np.clip(raw[..., 2:], -3, 3)
    boxes = B.yolo_decode(raw, YOLO_WH, 16)
    expected = np.concatenate(
        [1 / (1 + np.exp(-raw[..., :2].astype(np.float64))), raw[..., 2:]], -1
    )
    targets = B.yolo_encode(boxes, YOLO_WH, 16, _cells(4, 6)).numpy()
    assert targets.shape == raw.shape
    np.testing.assert_allclose(targets, expected, atol=2e-5)
    # Without explicit cells, the cell containing the centre is the one it was decoded in
    # (|t| < 8 keeps sigmoid away from exactly 0 or 1 in float32).
    np.testing.assert_allclose(B.yolo_encode(boxes, YOLO_WH, 16).numpy(), expected, atol=2e-5)
    # The other way: targets -> raw (logit of the in-cell offset) -> the same boxes.
    sx = rng.uniform(0.05, 0.95, (4, 6, 3, 2))
    twh = rng.normal(0, 1, (4, 6, 3, 2))
    raw2 = np.concatenate([np.log(sx / (1 - sx)), twh], -1).astype(np.float32)
    boxes2 = B.yolo_decode(raw2, YOLO_WH, 16)
    np.testing.assert_allclose(
        B.yolo_encode(boxes2, YOLO_WH, 16).numpy(), np.concatenate([sx, twh], -1), atol=2e-5
    )


def test_yolo_encode_hand_made_and_degenerate():
    # Centre (40, 20), size (20, 26) against anchor (10, 13), stride 16: cell (2, 1).
    t = B.yolo_encode([[30.0, 7.0, 50.0, 33.0]], [[10.0, 13.0]], 16).numpy()
    np.testing.assert_allclose(t, [[40 / 16 - 2, 20 / 16 - 1, math.log(2), math.log(2)]], atol=1e-6)
    # An explicit (last) cell for a centre on the border gives the offset 1.
    t = B.yolo_encode([[0.0, 0.0, 64.0, 64.0]], [[64.0, 64.0]], 32, [[1, 1]]).numpy()
    np.testing.assert_allclose(t, [[0.0, 0.0, 0.0, 0.0]], atol=1e-6)
    t = B.yolo_encode([[32.0, 32.0, 64.0, 64.0]], [[32.0, 32.0]], 32, [[1, 1]]).numpy()
    np.testing.assert_allclose(t, [[0.5, 0.5, 0.0, 0.0]], atol=1e-6)
    # Zero-size boxes: finite (log of the size epsilon).
    t = B.yolo_encode([[5.0, 5.0, 5.0, 5.0]], [[10.0, 13.0]], 8).numpy()
    assert np.all(np.isfinite(t))
    np.testing.assert_allclose(t[0, 2], math.log(1e-6 / 10), rtol=1e-5)


def test_yolo_decode_clamps_tw_and_stays_finite():
    raw = tf.constant(
        [[[[[0.0, 0.0, 100.0, -100.0], [1e4, -1e4, 1e4, -1e4], [0.0, 0.0, 6.0, 7.5]]]]]
    )  # (1, H=1, W=1, A=3, 4)
    with tf.GradientTape() as tape:
        tape.watch(raw)
        boxes = B.yolo_decode(raw, YOLO_WH, 32)
        loss = tf.reduce_sum(B.aligned_iou(boxes, [[0.0, 0.0, 32.0, 32.0]], kind="ciou"))
    grad = tape.gradient(loss, raw).numpy()
    boxes = boxes.numpy()[0, 0, 0]
    assert np.all(np.isfinite(boxes)) and np.isfinite(loss.numpy()) and np.all(np.isfinite(grad))
    # tw = 100 and 1e4 are clamped at log(1000): the box is 1000 anchors wide; th = -100 -> 0.
    np.testing.assert_allclose(boxes[0, 2] - boxes[0, 0], 10.0 * 1000, rtol=1e-5)
    np.testing.assert_allclose(boxes[1, 2] - boxes[1, 0], 16.0 * 1000, rtol=1e-5)
    assert boxes[0, 3] - boxes[0, 1] == pytest.approx(0.0, abs=1e-30)
    # Below the clamp exp is untouched (6 < log 1000 = 6.91 < 7.5).
    np.testing.assert_allclose(boxes[2, 2] - boxes[2, 0], 33.0 * math.exp(6.0), rtol=1e-5)
    np.testing.assert_allclose(boxes[2, 3] - boxes[2, 1], 23.0 * 1000, rtol=1e-5)
    assert B.YOLO_SCALE_CLIP == pytest.approx(math.log(1000.0))
    # A clamped tw gets no gradient, an unclamped one does.
    assert grad[0, 0, 0, 0, 2] == 0.0 and grad[0, 0, 0, 2, 2] != 0.0


def test_yolo_decode_encode_errors():
    with pytest.raises(ValueError, match="raw_offsets"):
        B.yolo_decode(np.zeros((3, 3, 4), np.float32), YOLO_WH, 8)
    with pytest.raises(ValueError, match="last dimension 4"):
        B.yolo_decode(np.zeros((1, 3, 3, 3, 5), np.float32), YOLO_WH, 8)
    with pytest.raises(ValueError, match="anchors_wh"):
        B.yolo_decode(np.zeros((1, 3, 3, 3, 4), np.float32), np.ones((3, 3)), 8)
    with pytest.raises(ValueError, match="stride"):
        B.yolo_encode(np.zeros((2, 4), np.float32), YOLO_WH[:1], 0)
    with pytest.raises(ValueError, match="cell_xy"):
        B.yolo_encode(np.zeros((2, 4), np.float32), YOLO_WH[:1], 8, np.zeros((2, 3)))


def test_yolo_decode_encode_under_xla():
    rng = np.random.default_rng(2)
    raw = rng.normal(0, 2, (2, 4, 4, 3, 4)).astype(np.float32)
    raw[..., 2:] = np.clip(raw[..., 2:], -3, 3)

    @tf.function(jit_compile=True)
    def both(r):
        boxes = B.yolo_decode(r, YOLO_WH, 8)
        return boxes, B.yolo_encode(boxes, YOLO_WH, 8, _cells(4, 4))

    boxes, targets = both(raw)
    np.testing.assert_allclose(boxes.numpy(), np_yolo_decode(raw, YOLO_WH, 8), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(targets.numpy()[..., 2:], raw[..., 2:], atol=2e-5)
