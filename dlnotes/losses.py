"""Elementwise detection losses and the cross-replica loss normaliser.

* :func:`sigmoid_focal_loss` — RetinaNet's focal loss, computed from logits so that it stays
  finite (values and gradients) for any logit, soft labels allowed;
* :func:`smooth_l1` (keras-retinanet, Faster R-CNN) and :func:`huber` (EfficientDet) box losses;
* :func:`iou_loss` — ``1 - IoU / GIoU / DIoU / CIoU`` of ``xyxy`` boxes, from
  :func:`dlnotes.boxes.aligned_iou`;
* :func:`global_normalizer` — ``max(minimum, count)`` with the count summed over the replicas of a
  ``tf.distribute`` strategy;
* :func:`penalty_reduced_focal_loss` — CenterNet's focal loss on Gaussian heatmaps (chapter 7);
* :func:`yolo_loss` and :func:`yolo_ignore_mask` — YOLOv3's loss (reduced, a dict of terms).

The losses are elementwise (no reduction): a model masks them with its anchor states (ignored
anchors out, box losses on positives only), sums them and divides by :func:`global_normalizer`
of its positive count. They are TensorFlow graph code and work inside
``tf.function(jit_compile=True)``. Float inputs keep their dtype (float64 in, float64 out);
anything else is computed in float32.
"""

from __future__ import annotations

import tensorflow as tf

from dlnotes.anchors import YoloAnchors
from dlnotes.boxes import (
    IOU_KINDS,
    aligned_iou,
    clip_boxes,
    convert_format,
    pairwise_iou,
    yolo_decode,
    yolo_encode,
)

__all__ = [
    "YOLO_BOX_LOSSES",
    "global_normalizer",
    "huber",
    "iou_loss",
    "penalty_reduced_focal_loss",
    "sigmoid_focal_loss",
    "smooth_l1",
    "yolo_ignore_mask",
    "yolo_loss",
]

#: Box terms of :func:`yolo_loss`: the notes' offsets (xy BCE + wh L2) or the CIoU loss.
YOLO_BOX_LOSSES = ("offset", "ciou")


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
    with ``sigma = 3``: ``beta = 1 / sigma^2 = 1/9``; Faster R-CNN uses ``beta = 1/9`` for the RPN
    and, in torchvision, for the box head too (py-faster-rcnn used ``sigma = 1``, ``beta = 1``,
    there). ``beta = 0`` is the L1 loss.

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


def yolo_ignore_mask(pred_boxes, gt_boxes, gt_valid, ignore_thresh=0.5):
    """YOLOv3's ignore mask: predictions that overlap a GT of their image too well to be negatives.

    A prediction whose best IoU with any valid GT box of the **same** image is
    ``> ignore_thresh`` is not trained as a negative ("没有目标的格子中，如果预测目标与某gt box的
    IOU>ignore_thresh, 则视为忽略样本"; darknet's strict ``>``; keras-yolo3 also ignores an IoU
    equal to the threshold, a difference of measure zero). One batched pairwise IoU ``(B, M, N)`` with the padding masked
    out replaces keras-yolo3's ``tf.while_loop`` over the images; an image without valid GT
    ignores nothing. The result carries no gradient (the predicted boxes are behind
    ``stop_gradient``): it only selects terms of the objectness loss.

    Args:
        pred_boxes: ``(B, M, 4)`` decoded predicted ``xyxy`` boxes (e.g. one level's
            :func:`dlnotes.boxes.yolo_decode` output reshaped to ``(B, H * W * A, 4)``).
        gt_boxes: ``(B, N, 4)`` ``xyxy`` GT boxes in the same units, padded.
        gt_valid: ``(B, N)`` bool, False for padding (and whatever else should not count).
        ignore_thresh: IoU threshold in [0, 1] (0.5 in YOLOv3; 1 ignores nothing).

    Returns:
        ``(B, M)`` bool, True where the prediction is ignored.
    """
    if not 0.0 <= float(ignore_thresh) <= 1.0:
        raise ValueError(
            f"yolo_ignore_mask: `ignore_thresh` must be in [0, 1], got {ignore_thresh!r}."
        )
    pred_boxes = tf.stop_gradient(tf.cast(tf.convert_to_tensor(pred_boxes), tf.float32))
    gt_boxes = tf.cast(tf.convert_to_tensor(gt_boxes), tf.float32)
    gt_valid = tf.cast(tf.convert_to_tensor(gt_valid), tf.bool)
    if pred_boxes.shape.rank != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(f"`pred_boxes` must have shape (B, M, 4), got {pred_boxes.shape}.")
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"`gt_boxes` must have shape (B, N, 4), got {gt_boxes.shape}.")
    if gt_valid.shape.rank != 2 or not gt_valid.shape.is_compatible_with(gt_boxes.shape[:2]):
        raise ValueError(
            f"`gt_valid` must have shape (B, N) matching `gt_boxes` {gt_boxes.shape}, got "
            f"{gt_valid.shape}."
        )
    # (B, M, 1, 4) against (B, 1, N, 4) -> (B, M, N): each image only meets its own GTs.
    iou = pairwise_iou(pred_boxes, gt_boxes, mask2=gt_valid, invalid_value=-1.0)
    return tf.reduce_any(iou > float(ignore_thresh), axis=-1)


def _bce_logits(labels, logits):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)


def yolo_loss(
    y_true,
    y_pred,
    anchors,
    image_shape,
    gt_boxes,
    gt_labels,
    ignore_thresh=0.5,
    box_loss="offset",
    batch_normalizer=None,
    ignore_mask_fn=None,
):
    """The YOLOv3 loss (keras-yolo3 / the notes), summed over levels, per image.

    Per level, with ``obj`` the objectness of ``y_true`` (1 at positives) and
    ``box_loss_scale = 2 - w * h`` (GT size normalised by the input size: small boxes weigh up to
    2, a box covering the image 1):

    * ``xy``: ``obj * box_loss_scale * BCE(x / stride - cx, logits=tx)`` (and y): the GT's offset in
      its cell against ``sigmoid(tx)``, computed from the logits (stable for any ``tx``);
    * ``wh``: ``obj * box_loss_scale * 0.5 * (log(w / aw) - tw)^2`` (and h), on the raw offsets;
    * ``objectness``: ``BCE(obj, logits=to)`` on positives, and on negatives that are not ignored
      (:func:`yolo_ignore_mask` of this level's decoded boxes against all valid GT boxes of the
      image, i.e. clipped, label >= 0, positive size, as darknet does; keras-yolo3 uses only the
      GTs assigned on that level);
    * ``class``: ``obj * BCE(one_hot, logits=class_logits)`` summed over the classes;
    * CIoU variant: ``obj * box_loss_scale * (1 - CIoU(decoded box, GT box))``
      (:func:`dlnotes.boxes.aligned_iou` with ``kind="ciou"``, boxes from
      :func:`dlnotes.boxes.yolo_decode`).

    Every term is summed over cells, anchors and levels and divided by ``batch_normalizer``
    (default: :func:`global_normalizer` of the batch size, so that under ``tf.distribute`` it is
    the global batch and the summed replica gradients equal the one-device gradient). Only the
    ignore mask is behind ``stop_gradient``, and CIoU's trade-off weight ``alpha`` (as in the
    paper); keras-yolo3 stops nothing else. Values and gradients are finite for any raw output
    (``tw`` is clamped before ``exp`` only in the decoded boxes, the offset losses are
    polynomials and stable cross entropies), for zero-size GT boxes (not assigned), images
    without GT (only the negative objectness term remains) and all-padding batches.

    Args:
        y_true: list over levels (``anchors`` order) of ``(B, H_l, W_l, A, 4 + 1 + C)`` from
            :func:`dlnotes.matching.assign_yolo_targets` (normalised ``rel_center_xywh``,
            objectness, one-hot class).
        y_pred: list over levels of the raw outputs, same shapes: ``tx, ty, tw, th``, the
            objectness logit and ``C`` class logits (any float dtype; computed in float32).
        anchors: the :class:`dlnotes.anchors.YoloAnchors` of the targets.
        image_shape: static ``(height, width)`` of the input.
        gt_boxes: ``(B, N, 4)`` ``xyxy`` GT boxes in input pixels (the ones the targets came from),
            for the ignore mask.
        gt_labels: ``(B, N)`` labels, -1 for padding.
        ignore_thresh: IoU above which a negative prediction is ignored (0.5; 1 ignores none).
        box_loss: ``"offset"`` (the xy + wh losses) or ``"ciou"`` (the CIoU loss).
        batch_normalizer: optional divisor (scalar); default the global batch size.
        ignore_mask_fn: optional replacement of :func:`yolo_ignore_mask` (same signature), e.g.
            keras-yolo3's per-image loop in ``benchmarks/yolo_ignore_mask.py``.

    Returns:
        Dict of float32 scalars ``{"xy", "wh", "box", "objectness", "class", "total"}``. ``box``
        is the box term that enters the total: ``xy + wh`` for ``"offset"``, the CIoU loss for
        ``"ciou"`` (``xy`` and ``wh`` are then still reported for monitoring). ``total = box +
        objectness + class``.

    Raises:
        ValueError: unknown ``box_loss``, ``anchors`` not a ``YoloAnchors``, wrong number of
            levels or shapes that do not match the anchors and ``image_shape``.
    """
    if box_loss not in YOLO_BOX_LOSSES:
        raise ValueError(f"yolo_loss: box_loss must be one of {YOLO_BOX_LOSSES}, got {box_loss!r}.")
    if not isinstance(anchors, YoloAnchors):
        raise ValueError(
            f"yolo_loss: `anchors` must be a dlnotes.anchors.YoloAnchors, got {anchors!r}."
        )
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != anchors.num_levels or len(y_pred) != anchors.num_levels:
        raise ValueError(
            f"yolo_loss: expected {anchors.num_levels} levels (stride {anchors.strides}), got "
            f"{len(y_true)} y_true and {len(y_pred)} y_pred tensors."
        )
    grids = anchors.level_shapes(image_shape)
    height, width = grids[0][0] * anchors.strides[0], grids[0][1] * anchors.strides[0]
    num_anchors = anchors.num_anchors_per_location

    gt_boxes = clip_boxes(gt_boxes, (height, width))  # as assign_yolo_targets sees them
    gt_labels = tf.convert_to_tensor(gt_labels)
    x1, y1, x2, y2 = tf.unstack(gt_boxes, num=4, axis=-1)
    gt_valid = (gt_labels >= 0) & (x2 > x1) & (y2 > y1)

    terms = {name: tf.constant(0.0) for name in ("xy", "wh", "ciou", "objectness", "class")}
    for level, (grid_h, grid_w) in enumerate(grids):
        true = tf.cast(tf.convert_to_tensor(y_true[level]), tf.float32)
        pred = tf.cast(tf.convert_to_tensor(y_pred[level]), tf.float32)
        expected = (grid_h, grid_w, num_anchors)
        for name, t in (("y_true", true), ("y_pred", pred)):
            if t.shape.rank != 5 or not t.shape[1:4].is_compatible_with(expected):
                raise ValueError(
                    f"yolo_loss: {name}[{level}] must have shape (B, {grid_h}, {grid_w}, "
                    f"{num_anchors}, 5 + C) for a {height}x{width} input at stride "
                    f"{anchors.strides[level]}, got {t.shape}."
                )
        if not true.shape.is_compatible_with(pred.shape) or (true.shape[-1] or 6) < 6:
            raise ValueError(
                f"yolo_loss: y_true[{level}] {true.shape} and y_pred[{level}] {pred.shape} must "
                "have the same shape (B, H, W, A, 4 + 1 + C) with C >= 1."
            )
        stride = anchors.strides[level]
        anchors_wh = anchors.level_anchors(level)  # (A, 2)
        obj = true[..., 4]  # (B, H, W, A)
        true_xyxy = convert_format(true[..., :4], "rel_center_xywh", "xyxy", (height, width))
        scale = 2.0 - true[..., 2] * true[..., 3]

        # Offset targets of every cell/anchor in its own cell (only positives are used).
        col, row = tf.meshgrid(
            tf.range(grid_w, dtype=tf.float32), tf.range(grid_h, dtype=tf.float32)
        )
        cells = tf.stack([col, row], axis=-1)[:, :, None, :]  # (H, W, 1, 2)
        target = yolo_encode(true_xyxy, anchors_wh, stride, cells)
        xy = tf.reduce_sum(_bce_logits(target[..., :2], pred[..., :2]), axis=-1)
        # Zero targets off the positives, as keras-yolo3, so the masked products stay small.
        target_wh = tf.where(obj[..., None] > 0, target[..., 2:4], 0.0)
        wh = 0.5 * tf.reduce_sum(tf.square(target_wh - pred[..., 2:4]), axis=-1)
        terms["xy"] += tf.reduce_sum(obj * scale * xy)
        terms["wh"] += tf.reduce_sum(obj * scale * wh)

        pred_xyxy = yolo_decode(pred[..., :4], anchors_wh, stride)  # (B, H, W, A, 4)
        if box_loss == "ciou":
            ciou = aligned_iou(pred_xyxy, true_xyxy, kind="ciou")
            terms["ciou"] += tf.reduce_sum(obj * scale * (1.0 - ciou))

        batch = tf.shape(pred)[0]
        ignore = (ignore_mask_fn or yolo_ignore_mask)(
            tf.reshape(pred_xyxy, [batch, -1, 4]), gt_boxes, gt_valid, ignore_thresh
        )
        keep_negative = 1.0 - tf.cast(tf.reshape(ignore, tf.shape(obj)), tf.float32)
        obj_bce = _bce_logits(obj, pred[..., 4])
        terms["objectness"] += tf.reduce_sum(obj * obj_bce + (1.0 - obj) * keep_negative * obj_bce)
        class_bce = tf.reduce_sum(_bce_logits(true[..., 5:], pred[..., 5:]), axis=-1)
        terms["class"] += tf.reduce_sum(obj * class_bce)

    if batch_normalizer is None:
        batch_normalizer = global_normalizer(tf.shape(y_pred[0])[0])
    normalizer = tf.cast(batch_normalizer, tf.float32)
    box = terms["xy"] + terms["wh"] if box_loss == "offset" else terms["ciou"]
    out = {
        "xy": terms["xy"] / normalizer,
        "wh": terms["wh"] / normalizer,
        "box": box / normalizer,
        "objectness": terms["objectness"] / normalizer,
        "class": terms["class"] / normalizer,
    }
    out["total"] = out["box"] + out["objectness"] + out["class"]
    return out


def penalty_reduced_focal_loss(labels, logits, alpha=2.0, beta=4.0):
    """CenterNet's penalty-reduced pixel-wise focal loss (Law & Deng 2018), elementwise.

    With ``p = sigmoid(z)`` and a Gaussian target ``y`` (1 at a point's cell)::

        loss = (1 - p)^alpha * -log(p)                  where y = 1
               (1 - y)^beta * p^alpha * -log(1 - p)     elsewhere

    so a cell near a point (``y`` close to 1) is barely pushed towards 0. CenterNet divides the
    sum by the number of points. Computed from the logits (``log p = log_sigmoid(z)``,
    ``p^alpha = exp(alpha log_sigmoid(z))``): finite values and gradients for any logit.

    Args:
        labels: ``(...)`` targets in [0, 1], exactly 1 at the points.
        logits: ``(...)`` raw outputs, same shape.
        alpha, beta: the paper's 2 and 4.

    Returns:
        ``(...)`` float32 elementwise loss.
    """
    labels = tf.cast(labels, tf.float32)
    logits = tf.cast(logits, tf.float32)
    log_p, log_q = tf.math.log_sigmoid(logits), tf.math.log_sigmoid(-logits)
    positive = tf.exp(float(alpha) * log_q) * -log_p
    weight = tf.pow(tf.nn.relu(1.0 - labels), float(beta))
    negative = weight * tf.exp(float(alpha) * log_p) * -log_q
    return tf.where(labels >= 1.0, positive, negative)
