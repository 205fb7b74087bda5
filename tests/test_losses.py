"""Tests of dlnotes.losses against float64 NumPy references, at extreme logits and degenerate boxes,
and of the cross-replica normaliser under a 2-replica MirroredStrategy."""

import importlib.util
import math
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import np_iou, script_result, start_script
from hypothesis import given, settings
from hypothesis import strategies as st

from dlnotes import losses as L
from dlnotes.anchors import YOLO_COCO_ANCHORS, YoloAnchors
from dlnotes.boxes import yolo_decode
from dlnotes.matching import assign_yolo_targets

EXTREME = np.array([-1e4, -1e3, -104.0, -100.0, -30.0, -3.0, 0.0, 3.0, 30.0, 100.0, 104.0, 1e4])
PARAMS = [(0.25, 2.0), (0.5, 0.0), (None, 1.5), (0.75, 0.5), (0.25, 5.0), (None, 0.0)]


# ----------------------------------------------------------------------------- references
def np_focal(y, z, alpha, gamma):
    """Focal loss from the paper's definition in probability space, float64 (soft labels too).

    ``p`` and ``1 - p`` are each computed from ``logaddexp`` (never as ``1 - p``, which loses all
    digits when ``p`` is close to 1), so the reference is accurate for the tested logits.
    """
    y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
    log_p, log_1mp = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    p, one_minus_p = np.exp(log_p), np.exp(log_1mp)
    p_t = y * p + (1 - y) * one_minus_p
    one_minus_pt = y * one_minus_p + (1 - y) * p
    ce = -(y * log_p + (1 - y) * log_1mp)
    alpha_t = 1.0 if alpha is None else y * alpha + (1 - y) * (1 - alpha)
    assert np.allclose(p_t + one_minus_pt, 1.0)
    return alpha_t * one_minus_pt**gamma * ce


def np_focal_logspace(y, z, alpha, gamma):
    """Hard labels, float64, in log space: log p = -logaddexp(0, -z), log(1-p) = -logaddexp(0, z)."""
    y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
    log_p, log_1mp = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    ce = np.where(y == 1, -log_p, -log_1mp)
    log_1mpt = np.where(y == 1, log_1mp, log_p)
    alpha_t = 1.0 if alpha is None else np.where(y == 1, alpha, 1 - alpha)
    return alpha_t * np.exp(gamma * log_1mpt) * ce


def np_focal_naive_float32(y, z, alpha, gamma):
    """The naive formula in float32: what the stable version must avoid."""
    y, z = np.float32(y), np.float32(z)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        p = np.float32(1) / (np.float32(1) + np.exp(-z))
        p_t = y * p + (1 - y) * (1 - p)
        return np.float32(alpha) * (1 - p_t) ** np.float32(gamma) * -np.log(p_t)


# ----------------------------------------------------------------------------- focal loss
@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_focal_matches_float64_reference(alpha, gamma):
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=(4, 50, 3)) < 0.2).astype(np.float32)
    z = rng.normal(0.0, 4.0, size=(4, 50, 3)).astype(np.float32)
    got = L.sigmoid_focal_loss(y, z, alpha=alpha, gamma=gamma)
    assert got.shape == y.shape and got.dtype == tf.float32
    np.testing.assert_allclose(got, np_focal(y, z, alpha, gamma), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_focal_extreme_logits(alpha, gamma):
    y = np.repeat([0.0, 1.0], len(EXTREME)).astype(np.float32)
    z = np.tile(EXTREME, 2).astype(np.float32)
    got = L.sigmoid_focal_loss(y, z, alpha=alpha, gamma=gamma).numpy()
    assert np.isfinite(got).all()
    # float32 logits: the exponent gamma * log(1 - p_t) carries float32 rounding (gamma = 5).
    np.testing.assert_allclose(got, np_focal_logspace(y, z, alpha, gamma), rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(got, np_focal(y, z, alpha, gamma), rtol=1e-5, atol=1e-30)
    # Hand values: a confident wrong prediction costs alpha_t * |z|, a confident right one 0.
    a_pos = 1.0 if alpha is None else alpha
    a_neg = 1.0 if alpha is None else 1 - alpha
    n, index = len(EXTREME), list(EXTREME).index
    assert got[n + index(-100.0)] == pytest.approx(a_pos * 100.0, rel=1e-6)  # y=1, z=-100
    assert got[index(100.0)] == pytest.approx(a_neg * 100.0, rel=1e-6)  # y=0, z=+100
    assert got[n + index(-1e4)] == pytest.approx(a_pos * 1e4, rel=1e-6)  # y=1, z=-1e4
    assert got[index(1e4)] == pytest.approx(a_neg * 1e4, rel=1e-6)  # y=0, z=+1e4
    assert got[-1] == 0.0 and got[0] == 0.0  # confident and right


def test_naive_float32_formula_fails_where_the_stable_one_does_not():
    y, z = np.float32([1.0, 0.0]), np.float32([-104.0, 104.0])
    naive = np_focal_naive_float32(y, z, 0.25, 2.0)
    assert not np.isfinite(naive).all()  # exp overflow / log(0): the reason for log space
    stable = L.sigmoid_focal_loss(y, z).numpy()
    np.testing.assert_allclose(stable, [0.25 * 104.0, 0.75 * 104.0], rtol=1e-6)


def test_gamma_0_alpha_none_is_cross_entropy():
    z = np.float32(np.concatenate([EXTREME, np.linspace(-5, 5, 11)]))
    for y in (np.zeros_like(z), np.ones_like(z), np.full_like(z, 0.3)):
        got = L.sigmoid_focal_loss(y, z, alpha=None, gamma=0.0)
        np.testing.assert_array_equal(got, tf.nn.sigmoid_cross_entropy_with_logits(y, z))
        ref = np.logaddexp(0.0, -np.float64(z)) * y + np.logaddexp(0.0, np.float64(z)) * (1 - y)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-30)


def test_focal_float64_in_float64_out():
    z = np.linspace(-20, 20, 41)
    y = (z > 3).astype(np.float64)
    got = L.sigmoid_focal_loss(y, z, alpha=0.25, gamma=2.0)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got, np_focal(y, z, 0.25, 2.0), rtol=1e-12, atol=1e-300)


@settings(max_examples=30, deadline=None)
@given(
    y=st.floats(0.0, 1.0),
    z=st.floats(-30.0, 30.0),
    alpha=st.one_of(st.none(), st.floats(0.0, 1.0)),
    gamma=st.floats(0.0, 5.0),
)
def test_focal_soft_labels_property(y, z, alpha, gamma):
    got = L.sigmoid_focal_loss([y], np.float64([z]), alpha=alpha, gamma=gamma).numpy()
    want = np_focal([y], [z], alpha, gamma)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_soft_labels_extreme_logits_are_finite_and_continuous_at_hard_labels():
    z = np.float32(EXTREME)
    for y in (0.3, 1e-6, 1 - 1e-6, 0.5):
        got = L.sigmoid_focal_loss(np.full_like(z, y), z)
        assert np.isfinite(got).all()
    # y -> 1 approaches the hard-label value (float64 so that 1 - 1e-9 is representable).
    z = np.float64(EXTREME)
    near = L.sigmoid_focal_loss(np.full_like(z, 1 - 1e-9), z).numpy()
    hard = L.sigmoid_focal_loss(np.ones_like(z), z).numpy()
    np.testing.assert_allclose(near, hard, rtol=1e-5, atol=1e-6)


def _focal_grad(y, z, alpha, gamma):
    z = tf.Variable(z)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(L.sigmoid_focal_loss(y, z, alpha=alpha, gamma=gamma))
    return tape.gradient(loss, z).numpy()


@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_focal_gradients_finite_at_extreme_logits(alpha, gamma):
    for label in (0.0, 1.0, 0.3):
        y = np.full(len(EXTREME), label, np.float32)
        grad = _focal_grad(y, EXTREME.astype(np.float32), alpha, gamma)
        assert np.isfinite(grad).all(), (label, grad)
        # Far on the wrong side the gradient is the CE's: -alpha_t for positives, +alpha_t for
        # negatives; on the right side it vanishes.
        if label == 1.0:
            a = 1.0 if alpha is None else alpha
            assert grad[0] == pytest.approx(-a) and grad[-1] == pytest.approx(0.0, abs=1e-30)
        if label == 0.0:
            a = 1.0 if alpha is None else 1 - alpha
            assert grad[-1] == pytest.approx(a) and grad[0] == pytest.approx(0.0, abs=1e-30)


@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_focal_gradient_matches_finite_differences(alpha, gamma):
    z = np.linspace(-8.0, 8.0, 17)
    for y in (np.zeros_like(z), np.ones_like(z), np.full_like(z, 0.7)):
        grad = _focal_grad(y, z, alpha, gamma)
        h = 1e-6
        numeric = (np_focal(y, z + h, alpha, gamma) - np_focal(y, z - h, alpha, gamma)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_focal_hard_label_form_equals_general_form(alpha, gamma):
    rng = np.random.default_rng(2)
    y = (rng.uniform(size=(3, 40, 5)) < 0.3).astype(np.float32)
    z = np.float32(rng.normal(0.0, 6.0, size=y.shape))
    fast = L.sigmoid_focal_loss(y, z, alpha=alpha, gamma=gamma, hard_labels=True)
    np.testing.assert_allclose(fast, np_focal(y, z, alpha, gamma), rtol=1e-5, atol=1e-30)
    # Extreme logits: finite, equal to the float64 log-space reference, same gradients.
    y_ext = np.repeat([0.0, 1.0], len(EXTREME)).astype(np.float32)
    z_ext = tf.constant(np.tile(EXTREME, 2), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z_ext)
        fast = L.sigmoid_focal_loss(y_ext, z_ext, alpha=alpha, gamma=gamma, hard_labels=True)
        general = L.sigmoid_focal_loss(y_ext, z_ext, alpha=alpha, gamma=gamma)
    ref = np_focal_logspace(y_ext, z_ext, alpha, gamma)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-30)
    g_fast, g_general = tape.gradient(fast, z_ext), tape.gradient(general, z_ext)
    assert np.isfinite(g_fast).all()
    np.testing.assert_allclose(g_fast, g_general, rtol=1e-5, atol=1e-30)
    z64 = np.linspace(-30.0, 30.0, 61)
    for label in (0.0, 1.0):
        y64 = np.full_like(z64, label)
        got = L.sigmoid_focal_loss(y64, z64, alpha=alpha, gamma=gamma, hard_labels=True)
        assert got.dtype == tf.float64
        np.testing.assert_allclose(got, np_focal(y64, z64, alpha, gamma), rtol=1e-12)


def test_focal_jit_compile_and_errors():
    rng = np.random.default_rng(1)
    y = (rng.uniform(size=(2, 30, 4)) < 0.3).astype(np.float32)
    z = np.float32(rng.normal(0, 50, size=(2, 30, 4)))
    compiled = tf.function(L.sigmoid_focal_loss, jit_compile=True)(y, z)
    np.testing.assert_allclose(compiled, L.sigmoid_focal_loss(y, z), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        L.sigmoid_focal_loss(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="alpha"):
        L.sigmoid_focal_loss([1.0], [0.0], alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        L.sigmoid_focal_loss([1.0], [0.0], gamma=-1.0)


# ----------------------------------------------------------------------------- smooth L1 / Huber
def np_smooth_l1(d, beta):
    d = np.abs(d)
    return np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)


def np_huber(d, delta):
    d = np.abs(d)
    return np.where(d <= delta, 0.5 * d**2, delta * (d - 0.5 * delta))


def _value_and_grad(fn, y_true, y_pred, **kwargs):
    y_pred = tf.Variable(np.asarray(y_pred, np.float64))
    with tf.GradientTape() as tape:
        loss = fn(np.asarray(y_true, np.float64), y_pred, **kwargs)
        total = tf.reduce_sum(loss)
    return loss.numpy(), tape.gradient(total, y_pred).numpy()


def test_smooth_l1_values_at_the_kink():
    beta = 1.0 / 9.0
    d = np.array([0.0, beta / 2, beta - 1e-9, beta, beta + 1e-9, 2 * beta, 1.0, -beta, -3.0])
    value, grad = _value_and_grad(L.smooth_l1, np.zeros_like(d), d)
    np.testing.assert_allclose(value, np_smooth_l1(d, beta), rtol=1e-12, atol=1e-15)
    # Value beta/2 and slope 1 on both sides of the kink; keras-retinanet's sigma=3 form.
    assert value[3] == pytest.approx(beta / 2) and value[2] == pytest.approx(beta / 2)
    np.testing.assert_allclose(grad[2:5], 1.0, rtol=1e-7)
    np.testing.assert_allclose(grad, np.clip(d / beta, -1, 1), rtol=1e-7)
    sigma2 = 9.0
    retinanet = np.where(np.abs(d) < 1 / sigma2, 0.5 * sigma2 * d**2, np.abs(d) - 0.5 / sigma2)
    np.testing.assert_allclose(value, retinanet, rtol=1e-12, atol=1e-15)
    # beta = 0 is L1; the default is beta = 1/9; shapes are kept.
    np.testing.assert_allclose(L.smooth_l1(np.zeros(3), [-2.0, 0.5, 0.0], beta=0.0), [2, 0.5, 0])
    assert L.smooth_l1(np.zeros((2, 5, 4)), np.ones((2, 5, 4))).shape == (2, 5, 4)
    np.testing.assert_allclose(L.smooth_l1(0.0, 1.0), 1.0 - 0.5 / 9.0, rtol=1e-6)


def test_huber_values_at_the_kink_and_keras():
    delta = 0.1
    d = np.array([0.0, 0.05, delta - 1e-9, delta, delta + 1e-9, 0.3, -0.1, -2.0])
    value, grad = _value_and_grad(L.huber, np.zeros_like(d), d)
    np.testing.assert_allclose(value, np_huber(d, delta), rtol=1e-12, atol=1e-15)
    assert value[3] == pytest.approx(0.5 * delta**2)
    np.testing.assert_allclose(grad, np.clip(d, -delta, delta), rtol=1e-7, atol=1e-15)
    # keras.losses.Huber averages its last axis: with a last axis of 1 it is elementwise.
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.normal(size=(6, 4, 1)), rng.normal(0, 0.2, size=(6, 4, 1))
    want = keras.losses.Huber(delta=delta, reduction=None)(y_true, y_pred)
    np.testing.assert_allclose(L.huber(y_true, y_pred)[..., 0], want, rtol=1e-6)
    # Huber(delta) = delta * smooth_l1(beta=delta).
    np.testing.assert_allclose(
        L.huber(y_true, y_pred, delta=0.3), 0.3 * L.smooth_l1(y_true, y_pred, beta=0.3), rtol=1e-12
    )
    with pytest.raises(ValueError, match="delta"):
        L.huber([0.0], [1.0], delta=0.0)
    with pytest.raises(ValueError, match="beta"):
        L.smooth_l1([0.0], [1.0], beta=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        L.huber(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------- IoU losses
KINDS = ("iou", "giou", "diou", "ciou")


def test_iou_loss_hand_values():
    a = [0.0, 0.0, 2.0, 2.0]
    b = [1.0, 1.0, 3.0, 3.0]  # inter 1, union 7, enclosing 3x3, centre distance^2 2, diagonal^2 18
    want = {
        "iou": 1 - 1 / 7,
        "giou": 1 - (1 / 7 - 2 / 9),
        "diou": 1 - (1 / 7 - 2 / 18),
        "ciou": 1 - (1 / 7 - 2 / 18),  # same aspect ratio: no CIoU penalty
    }
    for kind in KINDS:
        assert float(L.iou_loss(a, b, kind=kind)) == pytest.approx(want[kind], rel=1e-5)
        assert float(L.iou_loss(a, a, kind=kind)) == pytest.approx(0.0, abs=1e-6)
    # Disjoint boxes: IoU loss 1, GIoU / DIoU penalise the distance.
    far = [10.0, 0.0, 12.0, 2.0]
    assert float(L.iou_loss(a, far, "iou")) == pytest.approx(1.0)
    assert float(L.iou_loss(a, far, "giou")) == pytest.approx(1 + (24 - 8) / 24, rel=1e-5)
    assert float(L.iou_loss(a, far, "diou")) == pytest.approx(1 + 100 / (144 + 4), rel=1e-5)
    # CIoU: a 2x1 prediction against a 2x2 truth pays the aspect term.
    pred = [0.0, 0.0, 2.0, 1.0]
    iou = 0.5
    rho2, c2 = 0.25, 8.0
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    ciou = iou - rho2 / c2 - v / (1 - iou + v) * v
    assert float(L.iou_loss(a, pred, "ciou")) == pytest.approx(1 - ciou, rel=1e-5)
    # Batched shapes.
    assert L.iou_loss(np.zeros((2, 7, 4)), np.ones((2, 7, 4)), "giou").shape == (2, 7)
    with pytest.raises(ValueError, match="kind"):
        L.iou_loss(a, b, kind="eiou")


DEGENERATE = [
    # (truth, prediction)
    ([5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]),  # both points, same place
    ([5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0]),  # point truth inside a box
    ([0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]),  # point prediction inside
    ([0.0, 0.0, 10.0, 10.0], [3.0, 2.0, 3.0, 8.0]),  # zero-width prediction
    ([0.0, 4.0, 10.0, 4.0], [0.0, 4.0, 10.0, 4.0]),  # identical zero-height boxes
    ([0.0, 0.0, 0.0, 0.0], [20.0, 20.0, 20.0, 20.0]),  # two distant points
    ([0.0, 0.0, 10.0, 10.0], [8.0, 8.0, 2.0, 2.0]),  # inverted (negative size) prediction
    ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0 + 1e-6, 1.0 + 1e-6]),  # tiny box on a point
]


@pytest.mark.parametrize("kind", KINDS)
def test_iou_loss_degenerate_boxes_finite_values_and_gradients(kind):
    truth = tf.Variable(np.float32([t for t, _ in DEGENERATE]))
    pred = tf.Variable(np.float32([p for _, p in DEGENERATE]))
    with tf.GradientTape() as tape:
        loss = L.iou_loss(truth, pred, kind=kind)
        total = tf.reduce_sum(loss)
    grads = tape.gradient(total, [truth, pred])
    assert np.isfinite(loss).all()
    assert all(np.isfinite(g).all() for g in grads)
    upper = {"iou": 1.0, "giou": 2.0, "diou": 2.0, "ciou": 2.5}[kind]
    assert np.all(loss >= -1e-6) and np.all(loss <= upper + 1e-6)
    compiled = tf.function(lambda t, p: L.iou_loss(t, p, kind=kind), jit_compile=True)
    np.testing.assert_allclose(compiled(truth, pred), loss, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- normaliser
def test_global_normalizer_without_strategy():
    assert float(L.global_normalizer(0)) == 1.0
    assert float(L.global_normalizer(5)) == 5.0
    assert float(L.global_normalizer(0.0, minimum=0.5)) == 0.5
    mask = tf.constant([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert float(L.global_normalizer(mask)) == 3.0  # a mask is summed
    assert float(tf.function(L.global_normalizer, jit_compile=True)(tf.constant(7.0))) == 7.0


MIRRORED_SCRIPT = textwrap.dedent(
    """
    from dlnotes.losses import global_normalizer

    # Replica r holds a share of the batch: per-anchor "losses" and a positive mask.
    x = [tf.constant([1.0, 2.0, 3.0, 4.0]), tf.constant([5.0, -1.0, 0.5, 2.0])]
    pos = [tf.constant([1.0, 0.0, 1.0, 1.0]), tf.constant([0.0, 1.0, 0.0, 0.0])]
    zero = [tf.zeros(4), tf.zeros(4)]

    def per_replica(values):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: values[ctx.replica_id_in_sync_group]
        )

    with strategy.scope():
        w = tf.Variable(0.7)

    def replica_fn(x, pos, global_norm):
        ctx = tf.distribute.get_replica_context()
        norm = global_normalizer(pos) if global_norm else tf.maximum(tf.reduce_sum(pos), 1.0)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(w * x) * pos) / norm
        grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tape.gradient(loss, w))
        return norm, grad, global_normalizer(tf.zeros_like(pos)), ctx.num_replicas_in_sync

    @tf.function
    def run(global_norm):
        return strategy.run(replica_fn, args=(per_replica(x), per_replica(pos), global_norm))

    def local(values):
        return [float(v) for v in strategy.experimental_local_results(values)]

    norm, grad, empty, replicas = run(True)
    _, naive_grad, _, _ = run(False)
    # One device, whole batch: d/dw sum(w^2 x^2 pos) / sum(pos).
    xs, ps = tf.concat(x, 0), tf.concat(pos, 0)
    single = float(tf.reduce_sum(2 * 0.7 * tf.square(xs) * ps) / tf.reduce_sum(ps))
    print(json.dumps({
        "norm": local(norm), "grad": local(grad), "naive_grad": local(naive_grad),
        "empty": local(empty), "replicas": local(replicas), "single": single,
    }))
    """
)


def test_global_normalizer_sums_across_two_replicas():
    out = script_result(start_script(MIRRORED_SCRIPT), timeout=120)
    assert out["replicas"] == [2]
    assert out["norm"] == [4.0, 4.0]  # 3 positives on replica 0, 1 on replica 1
    assert out["empty"] == [1.0, 1.0]  # no positives anywhere: the minimum
    # Summed gradients equal the single-device gradient with the global normaliser...
    assert out["grad"] == pytest.approx([out["single"]] * 2, rel=1e-6)
    # ... and not with per-replica normalisers (the bug the global normaliser prevents).
    assert out["naive_grad"][0] != pytest.approx(out["single"], rel=1e-3)


# ----------------------------------------------------------------------------- YOLO loss
YOLO_ANCHORS = YoloAnchors(anchors=YOLO_COCO_ANCHORS / 6.5)  # 64 x 96 input: grids 2x3, 4x6, 8x12
YOLO_HW = (64, 96)
YOLO_C = 3
LOG_1000 = math.log(1000.0)


def np_sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, np.float64)))


def np_bce_logits(y, z):
    """Binary cross entropy of sigmoid(z) against y, float64, stable for any z."""
    y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
    return y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)


def np_ciou(p, g, eps=1e-7):
    """CIoU of two xyxy boxes from the paper (float64; alpha as a constant, eps as the package)."""
    pw, ph = max(p[2] - p[0], 0.0), max(p[3] - p[1], 0.0)
    gw, gh = max(g[2] - g[0], 0.0), max(g[3] - g[1], 0.0)
    iw = max(min(p[2], g[2]) - max(p[0], g[0]), 0.0)
    ih = max(min(p[3], g[3]) - max(p[1], g[1]), 0.0)
    iou = iw * ih / (pw * ph + gw * gh - iw * ih + eps)
    cw, ch = max(p[2], g[2]) - min(p[0], g[0]), max(p[3], g[3]) - min(p[1], g[1])
    rho2 = ((p[0] + p[2] - g[0] - g[2]) ** 2 + (p[1] + p[3] - g[1] - g[3]) ** 2) / 4
    v = 4 / math.pi**2 * (math.atan(gw / (gh + eps)) - math.atan(pw / (ph + eps))) ** 2
    alpha = v / (1 - iou + v + eps)
    return iou - rho2 / (cw**2 + ch**2 + eps) - alpha * v


def np_ignore_mask(pred_boxes, gt_boxes, gt_valid, thresh):
    """Per-image loop: best IoU with the image's own valid GTs > thresh."""
    out = np.zeros(pred_boxes.shape[:2], bool)
    for b in range(len(pred_boxes)):
        gts = gt_boxes[b][gt_valid[b]]
        if len(gts):
            out[b] = np_iou(pred_boxes[b], gts).max(axis=1) > thresh
    return out


def np_yolo_loss(y_true, y_pred, anchors, image_hw, gt_boxes, gt_labels, thresh, box_loss):
    """The YOLOv3 loss written cell by cell in float64 from the notes / keras-yolo3."""
    height, width = image_hw
    gt = np.asarray(gt_boxes, np.float64).copy()
    gt[..., 0::2] = gt[..., 0::2].clip(0, width)
    gt[..., 1::2] = gt[..., 1::2].clip(0, height)
    valid = (gt_labels >= 0) & (gt[..., 2] > gt[..., 0]) & (gt[..., 3] > gt[..., 1])
    sums = dict.fromkeys(("xy", "wh", "ciou", "objectness", "class"), 0.0)
    num_ignored = 0
    for level, (yt, yp) in enumerate(zip(y_true, y_pred, strict=True)):
        yt, yp = np.asarray(yt, np.float64), np.asarray(yp, np.float64)
        stride, awh = anchors.strides[level], anchors.level_anchors(level).astype(np.float64)
        batch, grid_h, grid_w, num_a, _ = yt.shape
        for b, i, j, a in np.ndindex(batch, grid_h, grid_w, num_a):
            t, g = yp[b, i, j, a], yt[b, i, j, a]
            x = (np_sigmoid(t[0]) + j) * stride
            y = (np_sigmoid(t[1]) + i) * stride
            w = awh[a, 0] * np.exp(min(t[2], LOG_1000))
            h = awh[a, 1] * np.exp(min(t[3], LOG_1000))
            pred = np.array([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
            gts = gt[b][valid[b]]
            ignored = len(gts) > 0 and np_iou(pred[None], gts).max() > thresh
            obj = g[4]
            bce = np_bce_logits(obj, t[4])
            sums["objectness"] += obj * bce + (1 - obj) * (not ignored) * bce
            num_ignored += int(obj == 0 and ignored)
            if obj == 0:
                continue
            scale = 2 - g[2] * g[3]
            gx, gy, gw, gh = g[0] * width, g[1] * height, g[2] * width, g[3] * height
            sums["xy"] += scale * (
                np_bce_logits(gx / stride - j, t[0]) + np_bce_logits(gy / stride - i, t[1])
            )
            sums["wh"] += (
                scale
                * 0.5
                * ((math.log(gw / awh[a, 0]) - t[2]) ** 2 + (math.log(gh / awh[a, 1]) - t[3]) ** 2)
            )
            true_box = [gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2]
            sums["ciou"] += scale * (1 - np_ciou(pred, true_box))
            sums["class"] += np_bce_logits(g[5:], t[5:]).sum()
    batch = len(gt_boxes)
    box = sums["xy"] + sums["wh"] if box_loss == "offset" else sums["ciou"]
    out = {k: sums[k] / batch for k in ("xy", "wh", "objectness", "class")}
    out["box"] = box / batch
    out["total"] = out["box"] + out["objectness"] + out["class"]
    return out, num_ignored


def _yolo_case(seed=0, batch=2, num_gt=4):
    """Random GTs (with padding), their targets, and predictions that put several anchors of
    each positive cell close to the GT (so that negatives get ignored)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 80, (batch, num_gt, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (batch, num_gt, 2))], -1).astype(np.float32)
    labels = rng.integers(0, YOLO_C, (batch, num_gt)).astype(np.int32)
    labels[-1, -1] = -1  # padding
    y_true = [t.numpy() for t in assign_yolo_targets(boxes, labels, YOLO_ANCHORS, YOLO_HW, YOLO_C)]
    y_pred = []
    for level, yt in enumerate(y_true):
        yp = rng.normal(0, 1.5, yt.shape)
        stride, awh = YOLO_ANCHORS.strides[level], YOLO_ANCHORS.level_anchors(level)
        for b, i, j, a in np.argwhere(yt[..., 4] > 0):
            cx, cy, w, h = yt[b, i, j, a, :4] * np.array([YOLO_HW[1], YOLO_HW[0]] * 2)
            sx = np.clip([cx / stride - j, cy / stride - i], 0.02, 0.98)
            # Every anchor of the cell predicts (nearly) the GT box.
            yp[b, i, j, :, :2] = np.log(sx / (1 - sx)) + rng.normal(0, 0.1, (len(awh), 2))
            yp[b, i, j, :, 2:4] = np.log([w, h] / awh) + rng.normal(0, 0.1, (len(awh), 2))
        y_pred.append(yp.astype(np.float32))
    return boxes, labels, y_true, y_pred


def _load_benchmark(name):
    """A module of benchmarks/ (not a package), e.g. its reference implementations."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# keras-yolo3's per-image tf.while_loop, the comparison of benchmarks/yolo_ignore_mask.py.
ignore_mask_while_loop = _load_benchmark("yolo_ignore_mask").ignore_mask_while_loop


def test_yolo_ignore_mask_hand_made_and_other_images():
    pred = np.array(
        [
            [[0, 0, 10, 10], [0, 0, 10, 12], [20, 20, 30, 30], [0, 0, 20, 10]],
            [[0, 0, 10, 10], [0, 0, 10, 12], [20, 20, 30, 30], [0, 0, 20, 10]],
        ],
        np.float32,
    )
    # Image 0: one GT equal to box 0 and a padded GT equal to box 2. Image 1: no valid GT at all.
    gt = np.array(
        [[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10], [20, 20, 30, 30]]], np.float32
    )
    valid = np.array([[True, False], [False, False]])
    mask = L.yolo_ignore_mask(pred, gt, valid).numpy()
    # IoUs with the GT: 1, 100/120 = 0.83, 0, 100/200 = 0.5 (not > 0.5).
    np.testing.assert_array_equal(mask, [[True, True, False, False], [False] * 4])
    np.testing.assert_array_equal(
        L.yolo_ignore_mask(pred, gt, valid, ignore_thresh=0.49).numpy()[0],
        [True, True, False, True],
    )
    np.testing.assert_array_equal(
        L.yolo_ignore_mask(pred, gt, valid, 1.0).numpy(), np.zeros((2, 4))
    )
    # The GTs of image 0 never make image 1 ignore, even when they are its own predictions.
    mask = L.yolo_ignore_mask(pred, gt, [[True, True], [False, False]]).numpy()
    np.testing.assert_array_equal(mask, [[True, True, True, False], [False] * 4])
    # No GT column at all.
    np.testing.assert_array_equal(
        L.yolo_ignore_mask(pred, np.zeros((2, 0, 4)), np.zeros((2, 0), bool)).numpy(),
        np.zeros((2, 4)),
    )
    with pytest.raises(ValueError, match="ignore_thresh"):
        L.yolo_ignore_mask(pred, gt, valid, 1.5)
    with pytest.raises(ValueError, match="gt_valid"):
        L.yolo_ignore_mask(pred, gt, valid[0])


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    num_pred=st.integers(1, 8),
    num_gt=st.integers(0, 4),
    thresh=st.sampled_from([0.0, 0.3, 0.5, 0.7]),
)
def test_yolo_ignore_mask_matches_per_image_loops(data, batch, num_pred, num_gt, thresh):
    def boxes(n):
        flat = data.draw(
            st.lists(st.integers(0, 12), min_size=4 * batch * n, max_size=4 * batch * n)
        )
        b = np.array(flat, np.float64).reshape(batch, n, 4)
        b[..., 2:] += b[..., :2]  # corner + size (zero sizes included)
        return b

    pred, gt = boxes(num_pred), boxes(num_gt)
    flat = data.draw(st.lists(st.booleans(), min_size=batch * num_gt, max_size=batch * num_gt))
    valid = np.array(flat, bool).reshape(batch, num_gt)
    expected = np_ignore_mask(pred, gt, valid, thresh)
    # IoUs within float32 rounding of the threshold may fall either way.
    near = np.zeros_like(expected)
    for b in range(batch):
        if num_gt:
            near[b] = (np.abs(np_iou(pred[b], gt[b]) - thresh) < 1e-5)[:, valid[b]].any(1)
    got = L.yolo_ignore_mask(pred, gt, valid, thresh).numpy()
    loop = ignore_mask_while_loop(pred, gt, valid, thresh).numpy()
    assert got.shape == loop.shape == (batch, num_pred) and got.dtype == bool
    np.testing.assert_array_equal(got[~near], expected[~near])
    np.testing.assert_array_equal(got, loop)  # same IoU function: identical, ties included


def test_yolo_ignore_mask_while_loop_equals_vectorised_on_a_level():
    boxes, labels, _, y_pred = _yolo_case(seed=5)
    pred = tf.reshape(yolo_decode(y_pred[2][..., :4], YOLO_ANCHORS.level_anchors(2), 8), [2, -1, 4])
    valid = labels >= 0
    got = L.yolo_ignore_mask(pred, boxes, valid).numpy()
    assert 0 < got.sum() < got.size
    np.testing.assert_array_equal(
        got, tf.function(ignore_mask_while_loop)(pred, boxes, valid).numpy()
    )


@pytest.mark.parametrize("box_loss", ["offset", "ciou"])
def test_yolo_loss_matches_float64_reference(box_loss):
    boxes, labels, y_true, y_pred = _yolo_case(seed=0)
    expected, num_ignored = np_yolo_loss(
        y_true, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels, 0.5, box_loss
    )
    assert num_ignored > 0  # the ignore mask matters in this case
    got = L.yolo_loss(y_true, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels, box_loss=box_loss)
    assert set(got) == {"xy", "wh", "box", "objectness", "class", "total"}
    for key, value in expected.items():
        assert got[key].shape == () and got[key].dtype == tf.float32
        assert float(got[key]) == pytest.approx(value, rel=2e-5, abs=1e-5), key
    # Without ignoring, the objectness loss is larger by the ignored negatives' terms.
    no_ignore, _ = np_yolo_loss(y_true, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels, 1.0, box_loss)
    got1 = L.yolo_loss(y_true, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels, 1.0, box_loss)
    assert float(got1["objectness"]) == pytest.approx(no_ignore["objectness"], rel=2e-5)
    assert no_ignore["objectness"] > expected["objectness"] + 0.1


def test_yolo_loss_per_image_sum_and_normalizer():
    boxes, labels, y_true, y_pred = _yolo_case(seed=1, batch=3)
    total = L.yolo_loss(y_true, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels)
    singles = [
        L.yolo_loss(
            [t[b : b + 1] for t in y_true],
            [p[b : b + 1] for p in y_pred],
            YOLO_ANCHORS,
            YOLO_HW,
            boxes[b : b + 1],
            labels[b : b + 1],
        )
        for b in range(3)
    ]
    # Images are independent (ignore masks use only their own GTs); default divisor = batch.
    for key in total:
        assert float(total[key]) == pytest.approx(sum(float(s[key]) for s in singles) / 3, rel=1e-5)
    custom = L.yolo_loss(
        y_true, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels, batch_normalizer=12.0
    )
    assert float(custom["total"]) == pytest.approx(float(total["total"]) * 3 / 12, rel=1e-6)


def test_yolo_loss_gradients_offset_analytic_and_stop_gradient():
    boxes, labels, y_true, y_pred = _yolo_case(seed=2)
    preds = [tf.Variable(p) for p in y_pred]
    with tf.GradientTape() as tape:
        loss = L.yolo_loss(y_true, preds, YOLO_ANCHORS, YOLO_HW, boxes, labels)["total"]
    grads = tape.gradient(loss, preds)
    for level, (yt, yp, g) in enumerate(zip(y_true, y_pred, grads, strict=True)):
        g = g.numpy()
        obj = yt[..., 4] > 0
        # Box offsets get gradients from the xy / wh terms at positives only: the ignore mask
        # (the only place where negatives meet decoded boxes) is not differentiated.
        np.testing.assert_array_equal(g[~obj][:, :4], 0.0)
        stride, awh = YOLO_ANCHORS.strides[level], YOLO_ANCHORS.level_anchors(level)
        for b, i, j, a in np.argwhere(obj):
            t, tr = yp[b, i, j, a].astype(np.float64), yt[b, i, j, a].astype(np.float64)
            scale = 2 - tr[2] * tr[3]
            sx = tr[0] * YOLO_HW[1] / stride - j
            tw = math.log(tr[2] * YOLO_HW[1] / awh[a, 0])
            np.testing.assert_allclose(
                g[b, i, j, a, 0], scale * (np_sigmoid(t[0]) - sx) / 2, rtol=1e-4, atol=1e-6
            )
            np.testing.assert_allclose(
                g[b, i, j, a, 2], scale * (t[2] - tw) / 2, rtol=1e-4, atol=1e-6
            )
            # Class logits: (sigmoid(z) - y) / batch.
            np.testing.assert_allclose(
                g[b, i, j, a, 5:], (np_sigmoid(t[5:]) - tr[5:]) / 2, rtol=1e-4, atol=1e-6
            )


EXTREME_CASES = [
    "logits+100",
    "logits-100",
    "tw+-100",
    "zero_size_gt",
    "image_without_gt",
    "all_padding",
]


@pytest.mark.parametrize("case", EXTREME_CASES)
@pytest.mark.parametrize("box_loss", ["offset", "ciou"])
def test_yolo_loss_finite_values_and_gradients(case, box_loss):
    boxes, labels, y_true, y_pred = _yolo_case(seed=3)
    if case in ("logits+100", "logits-100"):
        value = 100.0 if case == "logits+100" else -100.0
        y_pred = [np.full_like(p, value) for p in y_pred]
    elif case == "tw+-100":
        for p in y_pred:
            p[..., 2] = 100.0
            p[..., 3] = -100.0
    elif case == "zero_size_gt":
        boxes[0, :, 2] = boxes[0, :, 0]  # zero width, valid labels: not assigned
        boxes[1, :, 3] = boxes[1, :, 1] - 5  # negative height
    elif case == "image_without_gt":
        labels[1] = -1
    else:
        labels[:] = -1
    if case in ("zero_size_gt", "image_without_gt", "all_padding"):
        y_true = [
            t.numpy() for t in assign_yolo_targets(boxes, labels, YOLO_ANCHORS, YOLO_HW, YOLO_C)
        ]
    preds = [tf.Variable(p) for p in y_pred]
    with tf.GradientTape() as tape:
        out = L.yolo_loss(y_true, preds, YOLO_ANCHORS, YOLO_HW, boxes, labels, box_loss=box_loss)
    grads = tape.gradient(out["total"], preds)
    assert all(np.isfinite(float(v)) for v in out.values())
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    expected, _ = np_yolo_loss(y_true, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels, 0.5, box_loss)
    for key, value in expected.items():
        assert float(out[key]) == pytest.approx(value, rel=1e-4, abs=1e-4), key
    if case in ("zero_size_gt", "all_padding"):
        # Nothing assigned: only the negative objectness term, log(1 + e^z) summed over cells.
        assert all(not t[..., 4].any() for t in y_true)
        for key in ("xy", "wh", "box", "class"):
            assert float(out[key]) == 0.0
        negatives = sum(np.logaddexp(0.0, p[..., 4].astype(np.float64)).sum() for p in y_pred) / 2
        assert float(out["objectness"]) == pytest.approx(negatives, rel=1e-5)
    if case == "image_without_gt":
        assert all(not t[1, ..., 4].any() for t in y_true)
        # The empty image gets gradients only on its objectness logits.
        for g in grads:
            g = g.numpy()[1]
            np.testing.assert_array_equal(g[..., :4], 0.0)
            np.testing.assert_array_equal(g[..., 5:], 0.0)
            assert np.abs(g[..., 4]).sum() > 0


def test_yolo_assign_and_loss_under_xla():
    boxes, labels, y_true, y_pred = _yolo_case(seed=4)
    for rule, box_loss in (("per_level", "offset"), ("best_of_all", "ciou")):

        @tf.function(jit_compile=True)
        def step(b, lab, preds, rule=rule, box_loss=box_loss):
            targets = assign_yolo_targets(b, lab, YOLO_ANCHORS, YOLO_HW, YOLO_C, rule=rule)
            with tf.GradientTape() as tape:
                tape.watch(preds)
                out = L.yolo_loss(targets, preds, YOLO_ANCHORS, YOLO_HW, b, lab, box_loss=box_loss)
            return out, tape.gradient(out["total"], preds)

        out, grads = step(boxes, labels, [tf.constant(p) for p in y_pred])
        targets = assign_yolo_targets(boxes, labels, YOLO_ANCHORS, YOLO_HW, YOLO_C, rule=rule)
        eager = L.yolo_loss(
            targets, y_pred, YOLO_ANCHORS, YOLO_HW, boxes, labels, box_loss=box_loss
        )
        expected, _ = np_yolo_loss(
            [t.numpy() for t in targets],
            y_pred,
            YOLO_ANCHORS,
            YOLO_HW,
            boxes,
            labels,
            0.5,
            box_loss,
        )
        for key in eager:
            assert float(out[key]) == pytest.approx(float(eager[key]), rel=1e-5, abs=1e-6), key
            assert float(out[key]) == pytest.approx(expected[key], rel=2e-5, abs=1e-5), key
        assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_yolo_loss_errors():
    boxes, labels, y_true, y_pred = _yolo_case(seed=0)
    args = (YOLO_ANCHORS, YOLO_HW, boxes, labels)
    with pytest.raises(ValueError, match="box_loss"):
        L.yolo_loss(y_true, y_pred, *args, box_loss="giou")
    with pytest.raises(ValueError, match="3 levels"):
        L.yolo_loss(y_true[:2], y_pred[:2], *args)
    with pytest.raises(ValueError, match=r"y_pred\[1\]"):
        L.yolo_loss(y_true, [y_pred[0], y_pred[2], y_pred[1]], *args)
    with pytest.raises(ValueError, match="same shape"):
        L.yolo_loss(y_true, [p[..., :-1] for p in y_pred], *args)
    with pytest.raises(ValueError, match="YoloAnchors"):
        L.yolo_loss(y_true, y_pred, YOLO_ANCHORS.anchors, YOLO_HW, boxes, labels)
