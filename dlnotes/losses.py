"""Elementwise detection losses and the cross-replica loss normaliser.

* :func:`sigmoid_focal_loss` — RetinaNet's focal loss, computed from logits so that it stays
  finite (values and gradients) for any logit, soft labels allowed;
* :func:`smooth_l1` (keras-retinanet, Faster R-CNN) and :func:`huber` (EfficientDet) box losses;
* :func:`iou_loss` — ``1 - IoU / GIoU / DIoU / CIoU`` of ``xyxy`` boxes, from
  :func:`dlnotes.boxes.aligned_iou`;
* :func:`global_normalizer` — ``max(minimum, count)`` with the count summed over the replicas of a
  ``tf.distribute`` strategy.

The losses are elementwise (no reduction): a model masks them with its anchor states (ignored
anchors out, box losses on positives only), sums them and divides by :func:`global_normalizer`
of its positive count. They are TensorFlow graph code and work inside
``tf.function(jit_compile=True)``. Float inputs keep their dtype (float64 in, float64 out);
anything else is computed in float32.
"""

from __future__ import annotations

import tensorflow as tf

from dlnotes.boxes import IOU_KINDS, aligned_iou

__all__ = [
    "global_normalizer",
    "huber",
    "iou_loss",
    "sigmoid_focal_loss",
    "smooth_l1",
]


def _float_pair(a, b, names):
    """Converts ``a`` and ``b`` to one float dtype (``b``'s if floating, else float32)."""
    b = tf.convert_to_tensor(b, name=names[1])
    if not b.dtype.is_floating:
        b = tf.cast(b, tf.float32)
    a = tf.cast(tf.convert_to_tensor(a, dtype_hint=b.dtype, name=names[0]), b.dtype)
    if not a.shape.is_compatible_with(b.shape):
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same shape, got {a.shape} and {b.shape}."
        )
    return a, b


def _log_add_exp(a, b):
    """``log(exp(a) + exp(b))`` without overflow, with finite gradients."""
    big = tf.maximum(a, b)
    return big + tf.math.log1p(tf.exp(-tf.abs(a - b)))


def sigmoid_focal_loss(labels, logits, alpha=0.25, gamma=2.0, hard_labels=False):
    """Focal loss (Lin et al. 2017) of independent sigmoid classifiers, elementwise.

    With ``p = sigmoid(z)`` and, for a hard label ``y`` in {0, 1}, ``p_t = p`` if ``y = 1``
    else ``1 - p``::

        FL = alpha_t * (1 - p_t)^gamma * CE,   CE = -log(p_t),
        alpha_t = alpha for positives, 1 - alpha for negatives.

    Computed stably from the logits: ``CE`` by ``tf.nn.sigmoid_cross_entropy_with_logits`` and
    the modulating factor in log space, ``(1 - p_t)^gamma = exp(gamma * log_sigmoid(-z_t))`` with
    ``z_t = z`` for positives and ``-z`` for negatives (``1 - p_t = sigmoid(-z_t)``). Nothing
    overflows or takes ``log(0)``, so values and gradients are finite for logits of +-1e4 (the
    naive ``-log(sigmoid(z))`` is ``inf`` at ``z = -104`` in float32).

    **Soft labels** ``y`` in [0, 1] (e.g. IoU-aware targets) use the same interpolation as
    torchvision::

        p_t = y p + (1 - y)(1 - p),   1 - p_t = y sigmoid(-z) + (1 - y) sigmoid(z),
        alpha_t = y alpha + (1 - y)(1 - alpha),   CE = -y log p - (1 - y) log(1 - p)

    with ``log(1 - p_t) = logaddexp(log y + log_sigmoid(-z), log(1 - y) + log_sigmoid(z))``;
    labels of exactly 0 or 1 take the hard-label expressions above, so no ``log(0)`` appears.

    **Hard labels only** (``hard_labels=True``, what detectors with one-hot targets use) allow a
    form with two ``softplus`` and one ``exp`` per element and no branches:
    ``log(1 - p_t) = -softplus(z_t)`` and ``CE = softplus(-z_t)``, so
    ``FL = alpha_t * exp(-gamma * softplus(z_t)) * softplus(-z_t)``. Loss and gradient together
    are about 2.5 times faster than the general form (``benchmarks/retinanet_keras_hub.py``).

    Args:
        labels: ``(...)`` targets in [0, 1] (one-hot for hard labels; a background anchor has
            all-zero labels).
        logits: ``(...)`` raw classifier outputs, same shape as ``labels``.
        alpha: weight of the positives in [0, 1], or ``None`` for no class weighting.
        gamma: focusing parameter ``>= 0``; ``gamma = 0, alpha = None`` is the plain sigmoid
            cross entropy.
        hard_labels: promise that every label is exactly 0 or 1 and take the fast form (a
            label in between would be treated as 1 if ``> 0.5``; it is not checked, to keep the
            training step free of assertions).

    Returns:
        ``(...)`` elementwise loss, the dtype of ``logits`` (float32 for non-float logits).

    Raises:
        ValueError: shape mismatch, ``alpha`` outside [0, 1] or negative ``gamma``.
    """
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"sigmoid_focal_loss: `alpha` must be in [0, 1] or None, got {alpha!r}.")
    if float(gamma) < 0.0:
        raise ValueError(f"sigmoid_focal_loss: `gamma` must be >= 0, got {gamma!r}.")
    labels, logits = _float_pair(labels, logits, ("labels", "logits"))
    if hard_labels:
        positive = labels > 0.5
        z_t = tf.where(positive, logits, -logits)
        # CE = -log(p_t) = softplus(-z_t); softplus(z_t) - z_t would be equal but loses all
        # precision for large z_t.
        loss = tf.math.softplus(-z_t)
        if float(gamma) != 0.0:
            log_one_minus_pt = -tf.math.softplus(z_t)
            loss = tf.exp(tf.constant(float(gamma), logits.dtype) * log_one_minus_pt) * loss
        if alpha is not None:
            a = float(alpha)
            loss = tf.where(positive, tf.constant(a, logits.dtype), 1.0 - a) * loss
        return loss
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    loss = ce
    if float(gamma) != 0.0:
        log_sig_neg = tf.math.log_sigmoid(-logits)  # log(1 - p)
        log_sig_pos = tf.math.log_sigmoid(logits)  # log(p)
        # Soft labels: interpolate in probability space, in log space. The label is kept away from
        # 0 and 1 inside the unused branch so that no log(0) reaches the gradient.
        is_soft = tf.logical_and(labels > 0.0, labels < 1.0)
        safe = tf.where(is_soft, labels, tf.constant(0.5, labels.dtype))
        log_one_minus_pt_soft = _log_add_exp(
            tf.math.log(safe) + log_sig_neg, tf.math.log1p(-safe) + log_sig_pos
        )
        log_one_minus_pt = tf.where(
            labels >= 1.0,
            log_sig_neg,  # positive: 1 - p_t = sigmoid(-z)
            tf.where(labels <= 0.0, log_sig_pos, log_one_minus_pt_soft),  # negative: sigmoid(z)
        )
        loss = tf.exp(tf.constant(float(gamma), logits.dtype) * log_one_minus_pt) * loss
    if alpha is not None:
        alpha = tf.constant(float(alpha), logits.dtype)
        loss = (labels * alpha + (1.0 - labels) * (1.0 - alpha)) * loss
    return loss


def smooth_l1(y_true, y_pred, beta=1.0 / 9.0):
    """Smooth-L1 loss, elementwise: quadratic below ``beta``, linear above.

    With ``d = |y_pred - y_true|``::

        loss = 0.5 d^2 / beta   if d < beta
               d - 0.5 beta     otherwise

    Both pieces meet with value ``beta / 2`` and slope 1 at ``d = beta``. keras-retinanet writes it
    with ``sigma = 3``: ``beta = 1 / sigma^2 = 1/9``; Faster R-CNN (torchvision) uses
    ``beta = 1/9`` for the RPN and 1 for the box head. ``beta = 0`` is the L1 loss.

    Args:
        y_true: ``(...)`` targets (e.g. encoded box deltas ``(B, N, 4)``).
        y_pred: ``(...)`` predictions, same shape.
        beta: positive transition point (or 0).

    Returns:
        ``(...)`` elementwise loss.
    """
    if float(beta) < 0.0:
        raise ValueError(f"smooth_l1: `beta` must be >= 0, got {beta!r}.")
    y_true, y_pred = _float_pair(y_true, y_pred, ("y_true", "y_pred"))
    diff = tf.abs(y_pred - y_true)
    if float(beta) == 0.0:
        return diff
    beta = tf.constant(float(beta), diff.dtype)
    return tf.where(diff < beta, 0.5 * tf.square(diff) / beta, diff - 0.5 * beta)


def huber(y_true, y_pred, delta=0.1):
    """Huber loss, elementwise, as ``keras.losses.Huber`` before its reduction (EfficientDet).

    With ``d = |y_pred - y_true|``::

        loss = 0.5 d^2                 if d <= delta
               delta (d - 0.5 delta)   otherwise

    i.e. ``delta * smooth_l1(beta=delta)``: the slope of the linear part is ``delta`` instead of
    1. EfficientDet uses ``delta = 0.1`` on its (unnormalised) box deltas.

    Args:
        y_true: ``(...)`` targets.
        y_pred: ``(...)`` predictions, same shape.
        delta: positive transition point.

    Returns:
        ``(...)`` elementwise loss.
    """
    if float(delta) <= 0.0:
        raise ValueError(f"huber: `delta` must be > 0, got {delta!r}.")
    y_true, y_pred = _float_pair(y_true, y_pred, ("y_true", "y_pred"))
    diff = tf.abs(y_pred - y_true)
    delta = tf.constant(float(delta), diff.dtype)
    return tf.where(diff <= delta, 0.5 * tf.square(diff), delta * (diff - 0.5 * delta))


def iou_loss(boxes_true, boxes_pred, kind="giou"):
    """``1 - overlap`` of aligned ``xyxy`` boxes, for ``kind`` in iou / giou / diou / ciou.

    The overlap is :func:`dlnotes.boxes.aligned_iou` (the one IoU of the package), with
    ``boxes_true`` as the ground truth of CIoU's aspect term. Ranges: IoU loss in [0, 1], GIoU and
    DIoU losses in [0, 2], CIoU loss in [0, 2.5]. Zero-size boxes (predicted or true) give finite
    losses with finite gradients.

    Args:
        boxes_true: ``(..., 4)`` xyxy ground-truth boxes.
        boxes_pred: ``(..., 4)`` xyxy predicted (decoded) boxes, broadcastable to ``boxes_true``.
        kind: ``"iou"``, ``"giou"``, ``"diou"`` or ``"ciou"``.

    Returns:
        ``(...)`` float32 elementwise loss.
    """
    if kind not in IOU_KINDS:
        raise ValueError(f"iou_loss: unknown kind {kind!r}; expected one of {IOU_KINDS}.")
    return 1.0 - aligned_iou(boxes_pred, boxes_true, kind=kind)


def global_normalizer(count, minimum=1.0):
    """``max(minimum, count summed over all replicas)``: the divisor of a per-replica loss sum.

    RetinaNet divides its summed focal loss by the number of positive anchors *of the whole
    batch*. Under ``tf.distribute`` each replica sees only its share of the batch, and the
    gradients of the replicas are **summed** (all-reduce SUM). If every replica divided by its
    own count, the summed gradient would be about ``num_replicas`` times the single-device one
    (and images in a replica with few positives would weigh more). Dividing each replica's sum
    by the global count makes the summed gradient exactly the gradient of
    ``total loss / total count`` on one device, whatever the number of replicas.

    Inside a replica context with more than one replica (``strategy.run``), the count is
    all-reduced with SUM through ``tf.distribute.get_replica_context().all_reduce``; every replica
    gets the same normaliser. Outside a strategy (or in cross-replica context) it is
    ``max(minimum, count)``. Keras' own ``"sum_over_batch_size"`` losses already scale by
    ``1 / num_replicas``; a loss divided by this normaliser must not be scaled again (return it
    from ``Model.compute_loss`` or use ``reduction="sum"``).

    Args:
        count: the replica's count, e.g. its number of positive anchors; a scalar, or a tensor
            that is summed first (e.g. a float mask of positives).
        minimum: lower bound (1.0: an image without objects keeps the loss finite).

    Returns:
        float32 scalar.
    """
    count = tf.convert_to_tensor(count)
    count = tf.reduce_sum(tf.cast(count, tf.float32))
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return tf.maximum(count, tf.cast(minimum, tf.float32))
