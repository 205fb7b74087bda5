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

YOLOv3 assigns by anchor *shape* instead (:func:`assign_yolo_targets`): a GT goes to the cell
holding its centre and to its best-shaped anchor(s), and becomes a dense ``y_true`` per level.

Everything is graph code over padded batches: anchors ``(A, 4)`` (or ``(B, A, 4)``), GT boxes
``(B, G, 4)`` with labels ``(B, G)`` padded with -1. Static shapes, no Python loops over boxes or
images, so it runs inside ``tf.function(jit_compile=True)``. Boxes are absolute-pixel ``xyxy``.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from dlnotes.anchors import YoloAnchors
from dlnotes.boxes import clip_boxes, pairwise_iou
from dlnotes.checks import check_num_classes

__all__ = [
    "FORCE_BEST_MODES",
    "IGNORE",
    "NEGATIVE",
    "POSITIVE",
    "YOLO_ASSIGN_RULES",
    "AnchorLabelEncoder",
    "Matches",
    "assign_yolo_targets",
    "gather_matched",
    "match_anchors",
    "sample_balanced",
]

#: Anchor states (the notes' ``{-1: ignore, 0: negative, 1: positive}``).
IGNORE, NEGATIVE, POSITIVE = -1, 0, 1

#: Accepted values of ``match_anchors(force_best=...)``.
FORCE_BEST_MODES = (None, "global", "per_level")

#: Accepted values of ``assign_yolo_targets(rule=...)``.
YOLO_ASSIGN_RULES = ("per_level", "best_of_all")


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
            deterministic function of ``(states, seed)``: eager and graph mode agree; under
            ``jit_compile=True`` a seed given as a *tensor* draws other (still repeatable)
            numbers in TF 2.21, so an XLA step samples differently from a graph step with the
            same seed. Vary it per step in training (e.g. ``(step, 0)``).

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


def assign_yolo_targets(gt_boxes, gt_labels, anchors, image_shape, num_classes, rule="per_level"):
    """YOLOv3 training targets ``y_true``, one dense tensor per output level.

    A GT box is assigned on a level to the cell containing its centre (column
    ``floor(x / stride)``, row ``floor(y / stride)``) and to one anchor of that cell, chosen by
    *shape*: the IoU of the GT and anchor sizes with their centres aligned
    (:func:`dlnotes.anchors.wh_iou`). Two rules:

    * ``"per_level"`` (the notes, "9选3"): on **every** level the best of that level's ``A``
      anchors, so each valid GT has exactly one positive per level (3 for YOLOv3);
    * ``"best_of_all"`` (the original YOLOv3 / keras-yolo3): the best of all ``K`` anchors, so
      each valid GT has one positive, on the level whose mask holds that anchor (none if no mask
      uses it; the first position if a mask repeats it).

    Ties between anchors go to the lowest anchor index (``argmax``'s first maximum, as
    ``np.argmax`` in keras-yolo3).

    Details:

    * GT boxes are first clipped to the image. Padding (label ``< 0``) and boxes of zero or
      negative width or height after clipping are not assigned: they leave no trace in
      ``y_true``.
    * A centre on the right or bottom image border (``x == W``) falls in the last column / row
      (keras-yolo3 would index one past the grid).
    * **Collisions**: when several GTs of an image claim the same (level, cell, anchor), the GT
      with the highest index in ``gt_boxes`` wins -- keras-yolo3 loops over the boxes in order, so
      the later one overwrites. Implemented by a ``tensor_scatter_nd_max`` of the GT index
      followed by a gather, so the result is deterministic on every device.
    * Labels ``>= num_classes`` would silently give an all-zero class vector; a graph assertion
      raises ``InvalidArgumentError`` instead (XLA drops assertions: check labels upstream there).

    Graph code: static shapes, no Python loop over boxes or images (only over the static levels);
    runs inside ``tf.function(jit_compile=True)``. ``N == 0`` is allowed.

    Args:
        gt_boxes: ``(B, N, 4)`` ``xyxy`` GT boxes in input pixels, padded.
        gt_labels: ``(B, N)`` integer labels in ``[0, num_classes)``, -1 for padding.
        anchors: a :class:`dlnotes.anchors.YoloAnchors` (anchors, masks and strides; output
            order, stride 32 first for YOLOv3).
        image_shape: static ``(height, width)`` of the input, divisible by every stride.
        num_classes: number of classes ``C``.
        rule: ``"per_level"`` or ``"best_of_all"`` (see above).

    Returns:
        List over levels (``anchors`` order) of float32 ``(B, H_l, W_l, A, 4 + 1 + C)`` with
        ``H_l = height / stride``: at an assigned (cell, anchor) the GT box as normalised
        ``rel_center_xywh`` (centre and size divided by the input width / height, as keras-yolo3
        stores it), objectness 1 and the one-hot class; zeros everywhere else.

    Raises:
        ValueError: unknown ``rule``, ``anchors`` not a ``YoloAnchors``, bad ``num_classes``,
            image size not divisible by the strides, or tensors of the wrong shape.
    """
    if rule not in YOLO_ASSIGN_RULES:
        raise ValueError(f"rule must be one of {YOLO_ASSIGN_RULES}, got {rule!r}.")
    if not isinstance(anchors, YoloAnchors):
        raise ValueError(f"`anchors` must be a dlnotes.anchors.YoloAnchors, got {anchors!r}.")
    num_classes = check_num_classes(num_classes)
    grids = anchors.level_shapes(image_shape)  # validates divisibility
    height, width = grids[0][0] * anchors.strides[0], grids[0][1] * anchors.strides[0]

    gt_boxes = tf.cast(tf.convert_to_tensor(gt_boxes), tf.float32)
    gt_labels = tf.cast(tf.convert_to_tensor(gt_labels), tf.int32)
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"`gt_boxes` must have shape (B, N, 4), got {gt_boxes.shape}.")
    if gt_labels.shape.rank != 2 or not gt_labels.shape.is_compatible_with(gt_boxes.shape[:2]):
        raise ValueError(
            f"`gt_labels` must have shape (B, N) matching `gt_boxes` {gt_boxes.shape}, got "
            f"{gt_labels.shape}."
        )
    check = tf.debugging.assert_less(
        gt_labels,
        num_classes,
        message=f"assign_yolo_targets: a GT label is >= num_classes={num_classes} "
        "(labels must be 0..num_classes-1, padding -1)",
    )
    with tf.control_dependencies([check]):
        gt_labels = tf.identity(gt_labels)

    gt_boxes = clip_boxes(gt_boxes, (height, width))
    valid = _valid_gt_mask(gt_boxes, gt_labels)  # (B, N)
    x1, y1, x2, y2 = tf.unstack(gt_boxes, num=4, axis=-1)
    cx, cy, w, h = 0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1

    # Shape IoU with all K anchors, centres aligned: (B, N, K). Anchors are positive, so the
    # union never vanishes.
    anchor_w = tf.constant(anchors.anchors[:, 0], tf.float32)
    anchor_h = tf.constant(anchors.anchors[:, 1], tf.float32)
    inter = tf.minimum(w[..., None], anchor_w) * tf.minimum(h[..., None], anchor_h)
    shape_iou = inter / (w[..., None] * h[..., None] + anchor_w * anchor_h - inter)
    best_of_all = tf.argmax(shape_iou, axis=-1, output_type=tf.int32)  # (B, N), first max

    # The value stored for every GT, plus a zero row at index N for "no GT" (also makes N == 0
    # an ordinary case for the gather below).
    features = tf.concat(
        [
            tf.stack([cx / width, cy / height, w / width, h / height], axis=-1),
            tf.ones_like(cx)[..., None],
            tf.one_hot(tf.maximum(gt_labels, 0), num_classes, dtype=tf.float32),
        ],
        axis=-1,
    )  # (B, N, 5 + C)
    batch, num_gt = tf.shape(gt_boxes)[0], tf.shape(gt_boxes)[1]
    features = tf.concat([features, tf.zeros([batch, 1, 5 + num_classes], tf.float32)], axis=1)
    image_index = tf.broadcast_to(tf.range(batch)[:, None], [batch, num_gt])
    gt_index = tf.broadcast_to(tf.range(num_gt)[None, :], [batch, num_gt])

    y_true = []
    for level, ((grid_h, grid_w), stride) in enumerate(zip(grids, anchors.strides, strict=True)):
        mask = tf.constant(anchors.masks[level], tf.int32)  # (A,) indices into the K anchors
        if rule == "per_level":
            anchor = tf.argmax(tf.gather(shape_iou, mask, axis=-1), axis=-1, output_type=tf.int32)
            assigned = valid
        else:
            hit = tf.equal(best_of_all[..., None], mask)  # (B, N, A)
            anchor = tf.argmax(tf.cast(hit, tf.int32), axis=-1, output_type=tf.int32)
            assigned = tf.logical_and(valid, tf.reduce_any(hit, axis=-1))
        # Clamping puts centres on the right / bottom border into the last cell.
        col = tf.clip_by_value(tf.cast(tf.floor(cx / stride), tf.int32), 0, grid_w - 1)
        row = tf.clip_by_value(tf.cast(tf.floor(cy / stride), tf.int32), 0, grid_h - 1)
        where = tf.stack([image_index, row, col, anchor], axis=-1)  # (B, N, 4)
        # Unassigned GTs scatter -1 (a no-op for max) at a harmless in-range index.
        where = tf.where(assigned[..., None], where, 0)
        owner = tf.tensor_scatter_nd_max(
            tf.fill([batch, grid_h, grid_w, mask.shape[0]], -1),
            where,
            tf.where(assigned, gt_index, -1),
        )  # (B, H_l, W_l, A): the highest claiming GT index (the later GT wins), -1 if none
        owner = tf.where(owner < 0, num_gt, owner)  # -> the zero row
        level_true = tf.gather(features, tf.reshape(owner, [batch, -1]), axis=1, batch_dims=1)
        y_true.append(
            tf.reshape(level_true, [batch, grid_h, grid_w, mask.shape[0], 5 + num_classes])
        )
    return y_true


@keras.saving.register_keras_serializable(package="dlnotes")
class AnchorLabelEncoder:
    """Dense training targets of an anchor-based one-stage detector (RetinaNet, EfficientDet)
    from padded ground truth, inside the training graph.

    GT boxes are clipped to the image first (a box partly outside is matched on its visible part;
    one fully outside, of zero size or with label -1 is no GT), then :func:`match_anchors` gives
    every anchor a state and a GT, and the positives get one-hot class targets and the box deltas
    of ``box_coder``:

    * RetinaNet: ``positive_threshold=0.5, negative_threshold=0.4`` (IoU in between ignored),
      each GT's best anchor forced;
    * EfficientDet (automl's ``ArgMaxMatcher(0.5, 0.5, force_match_for_each_row=True)``):
      ``0.5, 0.5`` — foreground / background only, no ignore band.

    Args:
        positive_threshold, negative_threshold, force_best: of :func:`match_anchors`.
    """

    def __init__(self, positive_threshold=0.5, negative_threshold=0.4, force_best="global"):
        if force_best not in FORCE_BEST_MODES:
            raise ValueError(f"force_best must be one of {FORCE_BEST_MODES}, got {force_best!r}.")
        self.positive_threshold = float(positive_threshold)
        self.negative_threshold = float(negative_threshold)
        if not 0.0 <= self.negative_threshold <= self.positive_threshold <= 1.0:
            raise ValueError(
                "need 0 <= negative_threshold <= positive_threshold <= 1, got "
                f"{negative_threshold!r} and {positive_threshold!r}."
            )
        self.force_best = force_best

    def __call__(self, anchors, boxes, labels, num_classes, box_coder, image_size, level_sizes):
        """Targets for padded GT.

        Args:
            anchors: ``(N, 4)`` xyxy anchors; ``level_sizes``: anchors per level (for
                ``force_best="per_level"``).
            boxes: ``(B, M, 4)`` xyxy GT boxes padded with -1; labels ``(B, M)`` int32 (checked
                by the model), padding -1.
            num_classes: ``C``; box_coder: a :class:`~dlnotes.boxes.BoxCoder`; image_size:
                ``(height, width)`` to clip the GT boxes to.

        Returns:
            dict of ``states`` ``(B, N)`` int32 {-1, 0, 1}, ``class_targets`` ``(B, N, C)``
            one-hot (zero rows for negatives and ignored anchors), ``box_targets`` ``(B, N, 4)``
            encoded deltas (zero except on positives) and ``matched_iou`` ``(B, N)``.
        """
        boxes = clip_boxes(tf.cast(boxes, tf.float32), image_size)
        matches = match_anchors(
            anchors, boxes, labels,
            positive_threshold=self.positive_threshold,
            negative_threshold=self.negative_threshold,
            force_best=self.force_best,
            level_sizes=level_sizes if self.force_best == "per_level" else None,
        )  # fmt: skip
        positive = tf.equal(matches.states, POSITIVE)
        matched_labels = gather_matched(labels, matches.matched_gt)
        class_targets = tf.one_hot(tf.where(positive, matched_labels, -1), num_classes)
        box_targets = box_coder.encode(anchors, gather_matched(boxes, matches.matched_gt))
        return {
            "states": matches.states,
            "class_targets": class_targets,
            "box_targets": tf.where(positive[..., None], box_targets, 0.0),
            "matched_iou": matches.matched_iou,
        }

    def get_config(self):
        """Constructor arguments as plain Python values."""
        return {
            "positive_threshold": self.positive_threshold,
            "negative_threshold": self.negative_threshold,
            "force_best": self.force_best,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"AnchorLabelEncoder(positive_threshold={self.positive_threshold}, "
            f"negative_threshold={self.negative_threshold}, force_best={self.force_best!r})"
        )
