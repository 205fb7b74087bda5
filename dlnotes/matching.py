"""Assigning anchors (or proposals) to ground-truth boxes: anchor states and balanced sampling.

The rule is the one of the RetinaNet notes ("match逻辑"), shared by every anchor-based model of the
book (RetinaNet, EfficientDet, the Faster R-CNN RPN and its box head):

1. every anchor takes the GT with which it has the highest IoU (each anchor matches at most one
   GT) and becomes *positive* (state 1) when that IoU is ``>= positive_threshold``, *negative*
   (state 0) when it is ``< negative_threshold`` and *ignored* (state -1) in between;
2. optionally every GT keeps its best anchor even when the IoU is low (``force_best``), either over
   all anchors or on every pyramid level;
3. Faster R-CNN additionally ignores anchors that cross the image border and samples a fixed
   budget of anchors per image with a positive fraction (:func:`sample_balanced`).

Everything is graph code over padded batches: anchors ``(A, 4)`` (or ``(B, A, 4)``), GT boxes
``(B, G, 4)`` with labels ``(B, G)`` padded with -1. Static shapes, no Python loops over boxes or
images, so it runs inside ``tf.function(jit_compile=True)``. Boxes are absolute-pixel ``xyxy``.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from dlnotes.boxes import pairwise_iou

__all__ = [
    "FORCE_BEST_MODES",
    "IGNORE",
    "NEGATIVE",
    "POSITIVE",
    "Matches",
    "gather_matched",
    "match_anchors",
    "sample_balanced",
]

#: Anchor states (the notes' ``{-1: ignore, 0: negative, 1: positive}``).
IGNORE, NEGATIVE, POSITIVE = -1, 0, 1

#: Accepted values of ``match_anchors(force_best=...)``.
FORCE_BEST_MODES = (None, "global", "per_level")


class Matches(NamedTuple):
    """Result of :func:`match_anchors`.

    Attributes:
        states: ``(B, A)`` int32 in ``{-1 ignore, 0 negative, 1 positive}``.
        matched_gt: ``(B, A)`` int32 index into the GT axis of the matched box. It is 0 where an
            image has no valid GT, so always read it together with ``states``.
        matched_iou: ``(B, A)`` float32 IoU with the matched GT (0 where there is none).
    """

    states: tf.Tensor
    matched_gt: tf.Tensor
    matched_iou: tf.Tensor


def _valid_gt_mask(gt_boxes, gt_labels):
    """``(B, G)`` bool: label >= 0 and a box with positive width and height."""
    x1, y1, x2, y2 = tf.unstack(gt_boxes, num=4, axis=-1)
    return tf.logical_and(gt_labels >= 0, tf.logical_and(x2 > x1, y2 > y1))


def _inside_image(anchors, image_shape, allowed_border):
    """``(A,)`` or ``(B, A)`` bool: anchor inside ``[-b, W + b] x [-b, H + b]``."""
    shape = tf.cast(tf.convert_to_tensor(image_shape), tf.float32)
    if shape.shape.rank == 0 or (shape.shape[-1] is not None and shape.shape[-1] < 2):
        raise ValueError(
            f"`image_shape` must be (height, width) or (B, 2), got shape {shape.shape}."
        )
    height, width = shape[..., 0], shape[..., 1]
    if shape.shape.rank == 2:  # per-image (B, 2) against anchors (..., A)
        height, width = height[:, None], width[:, None]
    border = tf.cast(allowed_border, tf.float32)
    x1, y1, x2, y2 = tf.unstack(anchors, num=4, axis=-1)
    return (x1 >= -border) & (y1 >= -border) & (x2 <= width + border) & (y2 <= height + border)


def _best_anchor_per_gt(iou, level_sizes=None):
    """The best anchor of every GT, over all anchors or on every level: ``(index, iou)``.

    ``iou`` is ``(B, A, G)``. Returns int32 anchor indices and their float32 IoUs, both ``(B, G)``
    (global) or ``(B, L * G)`` (one per level and GT, level-major) with ``level_sizes`` (Python
    ints summing to A). Ties go to the lowest anchor index: a small GT inside several anchors of
    one size, or a large GT containing many small anchors of a level, has exactly the same IoU
    with all of them, and forcing them all would flood the positives with poor anchors.
    """
    if level_sizes is None:
        # TF's argmax (CPU, GPU and XLA kernels) returns the first maximum.
        index = tf.argmax(iou, axis=1, output_type=tf.int32)  # (B, G)
        return index, tf.reduce_max(iou, axis=1)
    # Per level: two unsorted_segment reductions over (image, level) segments (the max, then the
    # lowest index reaching it) instead of a loop over levels.
    num_levels = len(level_sizes)
    batch, num_anchors = tf.shape(iou)[0], tf.shape(iou)[1]
    level_of_anchor = tf.repeat(tf.range(num_levels), level_sizes)  # (A,)
    segment_ids = tf.range(batch)[:, None] * num_levels + level_of_anchor[None, :]  # (B, A)
    num_segments = batch * num_levels
    level_max = tf.math.unsorted_segment_max(iou, segment_ids, num_segments)  # (B*L, G)
    level_max = tf.reshape(level_max, [batch, num_levels, -1])
    index = tf.broadcast_to(tf.range(num_anchors)[None, :, None], tf.shape(iou))
    reaching = iou >= tf.gather(level_max, level_of_anchor, axis=1)
    first = tf.math.unsorted_segment_min(
        tf.where(reaching, index, num_anchors), segment_ids, num_segments
    )
    first = tf.reshape(first, [batch, -1])  # (B, L*G), level-major like level_max
    return first, tf.reshape(level_max, [batch, -1])


def _forced_matches(iou, level_sizes=None):
    """Anchors forced by the "each GT keeps its best anchor" rule, as ``(B, A)`` tensors.

    Each valid GT forces its best anchor (see :func:`_best_anchor_per_gt`) if their IoU is > 0;
    an anchor forced by several GTs goes to the one it overlaps most (the lowest GT index on
    equal IoUs). Works on the ``(B, G)`` (or ``(B, L*G)``) candidates with two scatters into
    ``(B, A)``, instead of masks over the whole ``(B, A, G)`` IoU tensor.

    Returns:
        ``(forced, forced_gt, forced_iou)``: bool, int32 and float32 ``(B, A)``.
    """
    batch, num_anchors, num_gt = tf.shape(iou)[0], tf.shape(iou)[1], tf.shape(iou)[2]
    anchor, value = _best_anchor_per_gt(iou, level_sizes)  # (B, K)
    gt = tf.math.floormod(tf.range(tf.shape(anchor)[1]), num_gt)[None, :]  # (1, K)
    # IoU > 0 skips GTs that overlap no anchor, invalid GTs (IoU -1) and anchors outside the image.
    candidate = value > 0.0
    image = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(anchor))
    where = tf.stack([image, anchor], axis=-1)  # (B, K, 2)
    best_at_anchor = tf.tensor_scatter_nd_max(
        tf.fill([batch, num_anchors], -1.0), where, tf.where(candidate, value, -1.0)
    )
    winner = tf.logical_and(candidate, value >= tf.gather_nd(best_at_anchor, where))
    forced_gt = tf.tensor_scatter_nd_min(
        tf.fill([batch, num_anchors], num_gt), where, tf.where(winner, gt, num_gt)
    )
    forced = forced_gt < num_gt
    return forced, tf.where(forced, forced_gt, 0), best_at_anchor


def match_anchors(
    anchors,
    gt_boxes,
    gt_labels,
    positive_threshold=0.5,
    negative_threshold=0.4,
    force_best="global",
    level_sizes=None,
    image_shape=None,
    allowed_border=0.0,
):
    """Anchor states and matched GT for a padded batch, in one vectorised pass.

    Args:
        anchors: ``(A, 4)`` xyxy anchors shared by the batch, or ``(B, A, 4)`` per image
            (e.g. Faster R-CNN proposals).
        gt_boxes: ``(B, G, 4)`` xyxy GT boxes, padded.
        gt_labels: ``(B, G)`` integer labels, -1 for padding. A GT is valid when its label is
            ``>= 0`` and its box has positive width and height. ``G == 0`` is allowed.
        positive_threshold: an anchor whose best IoU is ``>= positive_threshold`` is positive.
        negative_threshold: an anchor whose best IoU is ``< negative_threshold`` is negative;
            anchors in between are ignored. Equal thresholds leave no ignore band.
        force_best: ``None``: no forced matches. ``"global"``: the best anchor of every valid
            GT over all anchors becomes positive, matched to that GT (the notes' step 1, "argmax
            k"; torchvision's ``allow_low_quality_matches`` instead forces every tied anchor and
            leaves it on its argmax GT, which can leave the forcing GT without any anchor).
            ``"per_level"``: the best anchor of every GT on *every* pyramid level becomes
            positive (the notes' step 3, first variant). One anchor per GT (per level): ties go
            to the lowest anchor index. A GT whose best IoU is 0 forces nothing; an anchor
            forced by several GTs goes to the one with the highest IoU.
        level_sizes: number of anchors per pyramid level, in anchor order (e.g.
            ``AnchorGenerator.level_sizes``); required by ``force_best="per_level"``.
        image_shape: optional ``(height, width)`` (or per-image ``(B, 2)``). Anchors not inside
            ``[-allowed_border, W + allowed_border] x [-allowed_border, H + allowed_border]``
            are ignored (state -1) and never forced: Faster R-CNN's cross-boundary rule.
        allowed_border: pixels an anchor may stick out of the image (see ``image_shape``).

    Returns:
        :class:`Matches` of ``(B, A)`` tensors: ``states`` int32, ``matched_gt`` int32,
        ``matched_iou`` float32.

    Raises:
        ValueError: thresholds out of order, unknown ``force_best``, missing or inconsistent
            ``level_sizes``, or tensors of the wrong rank / last dimension.
    """
    positive_threshold = float(positive_threshold)
    negative_threshold = float(negative_threshold)
    if positive_threshold < negative_threshold:
        raise ValueError(
            f"positive_threshold ({positive_threshold}) must be >= negative_threshold "
            f"({negative_threshold})."
        )
    if force_best not in FORCE_BEST_MODES:
        raise ValueError(f"force_best must be one of {FORCE_BEST_MODES}, got {force_best!r}.")

    anchors = tf.cast(tf.convert_to_tensor(anchors), tf.float32)
    gt_boxes = tf.cast(tf.convert_to_tensor(gt_boxes), tf.float32)
    gt_labels = tf.convert_to_tensor(gt_labels)
    if anchors.shape.rank not in (2, 3) or anchors.shape[-1] != 4:
        raise ValueError(f"`anchors` must have shape (A, 4) or (B, A, 4), got {anchors.shape}.")
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"`gt_boxes` must have shape (B, G, 4), got {gt_boxes.shape}.")
    if gt_labels.shape.rank != 2:
        raise ValueError(f"`gt_labels` must have shape (B, G), got {gt_labels.shape}.")
    if not gt_labels.shape.is_compatible_with(gt_boxes.shape[:2]):
        raise ValueError(
            f"`gt_labels` {gt_labels.shape} does not match `gt_boxes` {gt_boxes.shape}."
        )
    num_anchors = anchors.shape[-2]
    if force_best == "per_level":
        if level_sizes is None:
            raise ValueError('force_best="per_level" needs `level_sizes` (anchors per level).')
        level_sizes = [int(n) for n in level_sizes]
        if num_anchors is not None and sum(level_sizes) != num_anchors:
            raise ValueError(
                f"`level_sizes` {level_sizes} sum to {sum(level_sizes)}, but there are "
                f"{num_anchors} anchors."
            )

    # One dummy, always-invalid GT column at the end makes G == 0 an ordinary case: every max /
    # argmax below has at least one entry, and the dummy (IoU -1) never wins against a real GT.
    batch = tf.shape(gt_boxes)[0]
    gt_boxes = tf.concat([gt_boxes, tf.zeros([batch, 1, 4], tf.float32)], axis=1)
    gt_labels = tf.concat([gt_labels, -tf.ones([batch, 1], gt_labels.dtype)], axis=1)
    valid_gt = _valid_gt_mask(gt_boxes, gt_labels)  # (B, G+1)

    inside = None
    if image_shape is not None:
        inside = _inside_image(anchors, image_shape, allowed_border)  # (A,) or (B, A)
    # Invalid pairs (padding GT, anchors outside the image) get IoU -1 so that they can neither
    # be the best GT of an anchor nor the best anchor of a GT.
    iou = pairwise_iou(anchors, gt_boxes, mask1=inside, mask2=valid_gt, invalid_value=-1.0)

    # Step 2 of the notes: each anchor takes its highest-IoU GT (argmax -> one GT per anchor).
    best_iou = tf.reduce_max(iou, axis=-1)  # (B, A), -1 where no valid pair
    best_gt = tf.argmax(iou, axis=-1, output_type=tf.int32)
    states = tf.where(
        best_iou >= positive_threshold,
        POSITIVE,
        tf.where(best_iou < negative_threshold, NEGATIVE, IGNORE),
    )

    if force_best is not None:
        # Step 1: each GT keeps its best anchor (over all anchors, or per pyramid level).
        level_split = level_sizes if force_best == "per_level" else None
        forced, forced_gt, forced_iou = _forced_matches(iou, level_split)  # (B, A) each
        best_gt = tf.where(forced, forced_gt, best_gt)
        best_iou = tf.where(forced, forced_iou, best_iou)
        states = tf.where(forced, POSITIVE, states)

    if inside is not None:
        states = tf.where(inside, states, IGNORE)

    return Matches(
        states=tf.cast(states, tf.int32),
        matched_gt=best_gt,
        matched_iou=tf.maximum(best_iou, 0.0),
    )


def sample_balanced(states, num_samples=256, positive_fraction=0.5, seed=(0, 0)):
    """Faster R-CNN's balanced sampling of anchor states, per image.

    Keeps at most ``int(num_samples * positive_fraction)`` positives chosen at random, fills the
    rest of the ``num_samples`` budget with random negatives, and sets everything else to -1.
    Fully vectorised: one stateless uniform key per anchor and a rank per image.

    Args:
        states: ``(B, A)`` integer states in ``{-1, 0, 1}`` (from :func:`match_anchors`).
        num_samples: anchors sampled per image (256 for the RPN, 512 for the box head).
        positive_fraction: largest share of positives (0.5 for the RPN, 0.25 for the box head).
        seed: shape-``[2]`` integer seed of ``tf.random.stateless_uniform``. The result is a
            deterministic function of ``(states, seed)`` (Philox, so eager, graph and XLA
            agree); vary it per step in training (e.g. ``(step, 0)``).

    Returns:
        ``(B, A)`` int32 states: sampled positives 1, sampled negatives 0, the rest -1. Ignored
        anchors are never sampled; images with too few anchors simply sample fewer.

    Raises:
        ValueError: ``num_samples`` < 0, ``positive_fraction`` outside [0, 1] or ``states`` not
            of rank 2.
    """
    if int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}.")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}.")
    states = tf.cast(tf.convert_to_tensor(states), tf.int32)
    if states.shape.rank != 2:
        raise ValueError(f"`states` must have shape (B, A), got {states.shape}.")
    max_positives = int(num_samples * positive_fraction)

    positive = tf.equal(states, POSITIVE)
    negative = tf.equal(states, NEGATIVE)
    u = tf.random.stateless_uniform(tf.shape(states), seed=seed, alg="philox")  # [0, 1)
    # One sort per image orders positives first (keys in [2, 3)), then negatives ([1, 2)), then
    # ignored anchors (0), each group in random order. An anchor's rank in that order tells
    # whether it is among the first k of its group.
    key = tf.where(positive, 2.0 + u, tf.where(negative, 1.0 + u, 0.0))
    order = tf.argsort(key, axis=-1, direction="DESCENDING", stable=True)
    rank = tf.argsort(order, axis=-1, stable=True)  # inverse permutation: rank of each anchor

    num_positive = tf.reduce_sum(tf.cast(positive, tf.int32), axis=-1, keepdims=True)  # (B, 1)
    kept_positives = tf.minimum(num_positive, max_positives)
    negative_budget = num_samples - kept_positives
    sampled_positive = tf.logical_and(positive, rank < max_positives)
    # Negatives start at rank num_positive in the order.
    sampled_negative = tf.logical_and(negative, rank - num_positive < negative_budget)
    return tf.where(sampled_positive, POSITIVE, tf.where(sampled_negative, NEGATIVE, IGNORE))


def gather_matched(values, matched_gt):
    """Per-anchor copy of per-GT values: ``values[b, matched_gt[b, a]]``.

    Args:
        values: ``(B, G, ...)`` per-GT tensor (boxes ``(B, G, 4)``, labels ``(B, G)``, keypoints
            ``(B, G, K, 3)``...).
        matched_gt: ``(B, A)`` integer indices from :attr:`Matches.matched_gt`.

    Returns:
        ``(B, A, ...)`` tensor of ``values``' dtype. With ``G == 0`` it is all zeros (there is
        nothing to gather; the anchors are negative anyway).
    """
    values = tf.convert_to_tensor(values)
    matched_gt = tf.convert_to_tensor(matched_gt)
    if values.shape.rank is not None and values.shape.rank < 2:
        raise ValueError(f"`values` must have shape (B, G, ...), got {values.shape}.")
    # A zero row appended along G keeps index 0 valid when G == 0 (real indices are < G).
    shape = tf.shape(values)
    pad = tf.zeros(tf.concat([shape[:1], [1], shape[2:]], axis=0), values.dtype)
    values = tf.concat([values, pad], axis=1)
    return tf.gather(values, matched_gt, axis=1, batch_dims=1)
