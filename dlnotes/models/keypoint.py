"""The anchor-free keypoint model with a Gaussian centerness (chapter 7).

The notes' design (seed ``001``, "kp model", and seed ``002``, "kp version"), end to end:

* **No anchors.** A point has no width or height, so there is nothing to match anchors to: a
  backbone (:mod:`dlnotes.backbones`, by name) and a neck (:mod:`dlnotes.necks`, by name), then per
  pyramid level two heads: a regression head ``[B, H, W, 2]`` (the point's offset inside its cell,
  sigmoid, in [0, 1]: the notes' "normed-rela-grid-xy") and a classification head
  ``[B, H, W, T + 1]``: ``T`` point classes and **one centerness channel** that replaces YOLO's
  objectness.
* **Point classes.** A point class is the pair (object class, keypoint index): ``T = C K``, type
  ``t = label * K + k`` (``num_classes`` ``C``, ``num_keypoints`` ``K``, both explicit
  constructor arguments, checked against the targets). With the book's data set that is 6 shapes
  x 5 keypoints (centre, top, right, bottom, left) = 30 point classes. Predicting the object class
  with the point makes every detected point an (object class, keypoint) pair, so a whole object
  (``K`` keypoints and a category, what COCO's keypoint evaluation asks for) is grouped around its
  centre keypoint among points of its own class only (see *Grouping*). COCO people are ``C = 1``,
  ``K = 17``; a plain point detector is ``K = 1``.
* **Heads**, shared across levels (the notes' contrast): ``head="separate"`` is RetinaNet's, two
  towers of ``head_depth`` 3x3 conv-ReLU (:class:`~dlnotes.models.retinanet.RetinaNetHead`), one
  for the offsets and one for the point classes and the centerness; ``head="shared"`` is YOLO's,
  one tower and one output conv giving ``[offsets | classes | centerness]`` together. The class and
  centerness outputs start at prior probabilities (:func:`~dlnotes.models.retinanet.prior_bias`;
  ``prior_probability`` 0.01 by default, ``class_prior_probability`` for the classes if given),
  the offsets at 0.5 (the cell centre).
* **Several points per cell** (the notes' ``(B, H, W, (2 + cls) p)``): ``points_per_cell = p``
  slots per cell, each with its own offsets and point classes (``[B, H, W, p, 2]`` and
  ``[B, H, W, p, T]``), one centerness per cell. ``p = 1`` is the basic model.
* **Targets**, inside the training graph, from padded ``{"keypoints": (B, N, K, 3), "labels":
  (B, N)}`` (``"boxes"`` optional) with static shapes (:func:`keypoint_targets`):

  - a keypoint is a target when its object has a label ``>= 0``, its visibility is ``> 0``
    (COCO: 1 labelled but hidden, 2 visible; ``v = 0`` and the padding -1 give no target) and it
    lies inside the image, ``[0, W) x [0, H)`` (points outside give no target);
  - each object goes to one pyramid level, the one whose stride makes its size (the longer side
    of its box: the ``"boxes"`` target clipped to the image if given, else the extent of its
    labelled keypoints) closest to ``cells_per_object`` cells (in log scale; FPN / FCOS assign
    objects to levels by size the same way); all its keypoints are targets there;
  - **centerness** target: a Gaussian around each point's cell, CenterNet's: radius
    ``r = max(0, floor(gaussian_radius(ceil(h / s), ceil(w / s), 0.7)))`` from the object's box
    in cells of stride ``s``, ``sigma = (2 r + 1) / 6``, a ``(2 r + 1)^2`` window, the maximum
    where kernels overlap (:func:`dlnotes.centerness.gaussian_heatmap`); exactly 1 at every
    point's cell;
  - **offset and class** targets: the point's position in its cell ``(x / s - cx, y / s - cy)``
    and the one-hot point class, in its cell. **When several points fall in one cell the one with
    the highest centerness wins** (the notes: 选centerness最大的点作为标签): a point's centerness in
    its cell is its (untruncated) Gaussian at the cell centre, so the point nearest the centre in
    units of its ``sigma`` wins, ties going to the lower index (object-major, keypoint-minor).
    With ``p`` slots the ``p`` best points of a cell fill the slots in that order; points beyond
    the ``p``-th still shape the centerness map.
* **Losses** (the notes: xy, cls and centerness are all in [0, 1], base loss BCE; further L2,
  weighted CE, focal): ``xy_loss`` on the slots that hold a point (BCE or L2 of
  ``sigmoid(offset)``); ``class_loss`` and ``centerness_loss`` over the **whole map** (every cell,
  slot and class; no ignore band: 落进/没落进格子没那么ambiguous) with ``"bce"``, ``"l2"``,
  ``"wce"`` (positive weight ``positive_weight``), ``"focal"``
  (:func:`~dlnotes.losses.sigmoid_focal_loss`, soft labels) or ``"centernet_focal"`` (CenterNet's
  penalty-reduced focal loss, :func:`~dlnotes.losses.penalty_reduced_focal_loss`); every term summed and divided by
  the **number of target points of the global batch** (:func:`~dlnotes.losses.global_normalizer`,
  at least 1). BCE is the default; the presets use CenterNet's loss, which learns much faster
  (see :data:`PRESETS`).
* **Decoding** (:meth:`KeypointDetector.decode_points`): score = sigmoid(centerness) x
  sigmoid(class) per cell, slot and point class; peaks are the cells equal to the 3x3 max pool
  of their map (CenterNet's "NMS"); the ``max_points`` best peaks of all levels, offsets added:
  ``x = (cx + sigmoid(tx)) s``.
* **Grouping** (:func:`group_keypoints`): every centre peak (keypoint ``center_keypoint``, 0 in
  the book's data set) above ``score_threshold`` is an object (its score and class are the
  centre's). Every other peak belongs to the nearest centre of its object class; a centre takes,
  for each keypoint, the best-scoring peak of that keypoint that belongs to it, else the nearest
  peak of that keypoint and class, else its own position with score 0. ``predict`` returns padded
  ``{"boxes": (B, D, 4) xyxy, "keypoints": (B, D, K, 3), "scores": (B, D), "labels": (B, D),
  "num_detections": (B,)}``: the keypoints' third column is the point's score, the box is the
  extent of the object's keypoints (for the book's shapes, whose keypoints include the extreme
  points, this is the object's box), so :func:`~dlnotes.evaluation.predictions_to_coco` and
  :func:`~dlnotes.evaluation.evaluate_detector` work unchanged; :func:`evaluate_keypoints` gives
  COCO keypoint AP (OKS).

Everything has static shapes (fixed ``image_size``, padded targets, top-k), so the training step
compiles with XLA (``compile(jit_compile=True)``); the Keras contract (no ``loss`` in
``compile``, label checks, global-batch logs) is :class:`~dlnotes.models.detector.Detector`'s.
Target keypoints are checked in the step too (:func:`keypoint_assertions`: NaN / inf coordinates
of labelled keypoints, keypoints normalised to [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from dlnotes.backbones import ImagePreprocessing, build_backbone, output_strides, preprocess_for
from dlnotes.boxes import clip_boxes
from dlnotes.centerness import gaussian_heatmap, gaussian_radius, gaussian_sigma
from dlnotes.checks import positive_int
from dlnotes.losses import global_normalizer, penalty_reduced_focal_loss, sigmoid_focal_loss
from dlnotes.models.detector import Detector
from dlnotes.models.retinanet import RetinaNetHead, prior_bias
from dlnotes.necks import build_neck

__all__ = [
    "HEADS",
    "KEYPOINT_LOSSES",
    "PRESETS",
    "XY_LOSSES",
    "KeypointDetector",
    "KeypointEvaluation",
    "evaluate_keypoints",
    "group_keypoints",
    "heatmap_loss",
    "keypoint_assertions",
    "keypoint_targets",
]

#: Losses of the class and centerness maps (``class_loss=``, ``centerness_loss=``).
KEYPOINT_LOSSES = ("bce", "l2", "wce", "focal", "centernet_focal")
#: Losses of the offsets (``xy_loss=``).
XY_LOSSES = ("bce", "l2")
#: Head layouts: RetinaNet's separate towers or YOLO's shared one.
HEADS = ("separate", "shared")

_BIG = 1e30


# ----------------------------------------------------------------------------- losses
def heatmap_loss(
    labels,
    logits,
    kind="bce",
    focal_alpha=0.25,
    focal_gamma=2.0,
    centernet_alpha=2.0,
    centernet_beta=4.0,
    positive_weight=10.0,
):
    """Elementwise loss of sigmoid outputs against targets in [0, 1], by name.

    * ``"bce"``: binary cross entropy ``-y log p - (1 - y) log(1 - p)`` (the notes' base loss);
    * ``"l2"``: ``(p - y)^2``;
    * ``"wce"``: weighted cross entropy ``-w y log p - (1 - y) log(1 - p)``,
      ``w = positive_weight`` (``tf.nn.weighted_cross_entropy_with_logits``);
    * ``"focal"``: :func:`~dlnotes.losses.sigmoid_focal_loss` (``focal_alpha``, ``focal_gamma``;
      soft labels as torchvision interpolates them);
    * ``"centernet_focal"``: :func:`~dlnotes.losses.penalty_reduced_focal_loss` (``centernet_alpha``,
      ``centernet_beta``).

    Args:
        labels, logits: same-shape tensors; ``p = sigmoid(logits)``.

    Returns:
        ``(...)`` float32.
    """
    if kind not in KEYPOINT_LOSSES:
        raise ValueError(f"Unknown loss {kind!r}; expected one of {KEYPOINT_LOSSES}.")
    labels = tf.cast(labels, tf.float32)
    logits = tf.cast(logits, tf.float32)
    if kind == "bce":
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    if kind == "l2":
        return tf.square(tf.sigmoid(logits) - labels)
    if kind == "wce":
        return tf.nn.weighted_cross_entropy_with_logits(
            labels=labels, logits=logits, pos_weight=float(positive_weight)
        )
    if kind == "focal":
        return sigmoid_focal_loss(labels, logits, focal_alpha, focal_gamma)
    return penalty_reduced_focal_loss(labels, logits, centernet_alpha, centernet_beta)


# ----------------------------------------------------------------------------- checks
def _check_keypoint_count(keypoints, num_keypoints, owner):
    shape = tuple(keypoints.shape)
    if len(shape) != 4 or shape[-1] not in (None, 3):
        raise ValueError(f'{owner} targets: "keypoints" must have shape (B, N, K, 3), got {shape}.')
    if shape[2] is not None and shape[2] != num_keypoints:
        raise ValueError(
            f'{owner}(num_keypoints={num_keypoints}): target "keypoints" have K={shape[2]} '
            f"keypoints per object, got shape {shape}; the model was built for {num_keypoints} "
            "(an object with fewer keypoints pads the rest with (0, 0, 0): visibility 0)."
        )


def keypoint_assertions(keypoints, labels, owner):
    """Graph assertions on target keypoints ``(B, N, K, 3)`` of objects with a label ``>= 0``:
    finite visibilities, finite coordinates where the visibility is ``> 0``, and not every
    labelled keypoint of the batch inside the unit square (normalised coordinates, where absolute
    pixels are expected). Padded objects (label -1) are not checked."""
    keypoints = tf.cast(keypoints, tf.float32)
    objects = tf.cast(labels, tf.int32) >= 0  # (B, N)
    visibility = keypoints[..., 2]
    finite_v = tf.math.is_finite(visibility)
    labelled = objects[..., None] & finite_v & (visibility > 0.0)
    finite_xy = tf.reduce_all(tf.math.is_finite(keypoints[..., :2]), axis=-1)
    bad = (objects[..., None] & ~finite_v) | (labelled & ~finite_xy)
    largest = tf.reduce_max(
        tf.where(labelled[..., None] & finite_xy[..., None], tf.abs(keypoints[..., :2]), 0.0)
    )
    normalised = tf.reduce_any(labelled & finite_xy) & (largest <= 1.0)
    return [
        tf.debugging.Assert(
            ~tf.reduce_any(bad),
            [
                f"{owner}: target keypoints with NaN or inf coordinates or visibility at "
                "(image, object, keypoint)",
                tf.reshape(tf.where(bad), [-1]),
                "of objects with label >= 0; keypoints must be finite pixel (x, y, v), "
                "unlabelled ones (0, 0, 0), padded objects -1",
            ],
            summarize=24,
        ),
        tf.debugging.Assert(
            ~normalised,
            [
                f"{owner}: every labelled target keypoint of the batch lies inside the unit square "
                "0..1: keypoints look normalised, but absolute pixel coordinates are expected "
                "(multiply x by the width and y by the height); largest coordinate",
                largest,
            ],
        ),
    ]


# ----------------------------------------------------------------------------- targets
def _object_sizes(keypoints, labelled, boxes, image_size):
    """``(width, height)`` per object ``(B, N)``: of the clipped box, or of the extent of the
    labelled keypoints (0 without any)."""
    if boxes is not None:
        x1, y1, x2, y2 = tf.unstack(clip_boxes(boxes, image_size), num=4, axis=-1)
        return tf.nn.relu(x2 - x1), tf.nn.relu(y2 - y1)
    sizes = []
    for axis in (0, 1):
        values = keypoints[..., axis]
        high = tf.reduce_max(tf.where(labelled, values, -_BIG), axis=-1)
        low = tf.reduce_min(tf.where(labelled, values, _BIG), axis=-1)
        sizes.append(tf.where(tf.reduce_any(labelled, -1), tf.nn.relu(high - low), 0.0))
    return sizes[0], sizes[1]


def keypoint_targets(
    keypoints,
    labels,
    image_size,
    strides,
    grid_shapes,
    num_classes,
    boxes=None,
    points_per_cell=1,
    cells_per_object=8.0,
    min_overlap=0.7,
):
    """Per-level training targets of the keypoint model (see the module docstring for the rules).

    Args:
        keypoints: ``(B, N, K, 3)`` ``(x, y, v)`` in input pixels, padded objects -1.
        labels: ``(B, N)`` int object classes, padding -1 (validate them first: a label
            ``>= num_classes`` gives an all-zero class target).
        image_size: static ``(height, width)`` of the input.
        strides: the levels' strides (Python ints), e.g. ``(8, 16, 32)``.
        grid_shapes: the levels' static ``(H_l, W_l)``.
        num_classes: ``C``; the point classes are ``T = C K``, ``t = label K + k``.
        boxes: optional ``(B, N, 4)`` xyxy boxes of the objects, for their sizes (default: the
            extent of their labelled keypoints).
        points_per_cell: ``p`` slots per cell.
        cells_per_object: an object goes to the level where its longer side is closest to this
            many cells (log scale).
        min_overlap: of :func:`~dlnotes.centerness.gaussian_radius`.

    Returns:
        A list over levels of dicts: ``"centerness"`` ``(B, H, W)`` (Gaussian, 1 at the points),
        ``"offsets"`` ``(B, H, W, p, 2)`` in [0, 1), ``"classes"`` ``(B, H, W, p, T)`` one-hot,
        ``"positive"`` ``(B, H, W, p)`` 1 where a slot holds a point, ``"level_of_object"``
        ``(B, N)`` int32 (the same in every entry).
    """
    keypoints = tf.cast(keypoints, tf.float32)
    labels = tf.cast(labels, tf.int32)
    num_keypoints = keypoints.shape[2]
    if num_keypoints is None:
        raise ValueError(f"keypoint_targets: K must be static, got shape {keypoints.shape}.")
    height, width = (float(v) for v in image_size)
    num_types = int(num_classes) * num_keypoints
    slots = int(points_per_cell)
    x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    finite = tf.math.is_finite(x) & tf.math.is_finite(y) & tf.math.is_finite(v)
    labelled = (labels >= 0)[..., None] & finite & (v > 0.0)  # (B, N, K)
    inside = labelled & (x >= 0.0) & (x < width) & (y >= 0.0) & (y < height)
    x, y = tf.where(finite, x, 0.0), tf.where(finite, y, 0.0)
    box_w, box_h = _object_sizes(keypoints, labelled, boxes, image_size)  # (B, N)

    # One level per object: its longer side closest to cells_per_object cells (log2 scale).
    ideal = tf.math.log(tf.maximum(tf.maximum(box_w, box_h), 1e-6) / cells_per_object)
    ideal = ideal / math.log(2.0)
    log_strides = tf.constant([math.log2(s) for s in strides], tf.float32)
    level_of_object = tf.cast(tf.argmin(tf.abs(ideal[..., None] - log_strides), -1), tf.int32)

    batch = tf.shape(keypoints)[0]
    types = labels[..., None] * num_keypoints + tf.range(num_keypoints)[None, None]
    num_objects = keypoints.shape[1]
    flat_shape = [batch, -1 if num_objects is None else num_objects * num_keypoints]
    flat = lambda t: tf.reshape(t, flat_shape)  # noqa: E731  (B, N, K) -> (B, P)
    types = flat(types)
    num_points = tf.shape(types)[1]
    order = tf.range(num_points)
    out = []
    for level, (stride, (grid_h, grid_w)) in enumerate(zip(strides, grid_shapes, strict=True)):
        s = float(stride)
        valid = flat(inside & (level_of_object == level)[..., None])  # (B, P)
        gx, gy = flat(x) / s, flat(y) / s
        cx = tf.clip_by_value(tf.floor(gx), 0.0, grid_w - 1.0)
        cy = tf.clip_by_value(tf.floor(gy), 0.0, grid_h - 1.0)
        radius = tf.floor(gaussian_radius(tf.math.ceil(box_h / s), tf.math.ceil(box_w / s),
                                          min_overlap))  # fmt: skip
        radius = flat(tf.broadcast_to(tf.nn.relu(radius)[..., None], tf.shape(x)))
        heat = gaussian_heatmap(tf.stack([cx, cy], -1), radius, valid, (grid_h, grid_w))

        # The cell-collision rule: rank the points of a cell by their centerness at its centre.
        sigma = gaussian_sigma(radius)
        value = tf.exp(-((gx - cx - 0.5) ** 2 + (gy - cy - 0.5) ** 2) / (2.0 * sigma**2))
        cell = tf.cast(cy, tf.int32) * grid_w + tf.cast(cx, tf.int32)
        same = (cell[:, :, None] == cell[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        better = (value[:, None, :] > value[:, :, None]) | (
            (value[:, None, :] == value[:, :, None]) & (order[None, :] < order[:, None])[None]
        )  # [b, p, q]: q beats p
        rank = tf.reduce_sum(tf.cast(same & better, tf.int32), axis=-1)
        keep = valid & (rank < slots)
        updates = (
            tf.concat(
                [
                    tf.stack([gx - cx, gy - cy], -1),
                    tf.one_hot(types, num_types, dtype=tf.float32),
                    tf.ones_like(gx)[..., None],
                ],
                axis=-1,
            )
            * tf.cast(keep, tf.float32)[..., None]
        )
        images = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(cell))
        indices = tf.stack([images, cell, tf.minimum(rank, slots - 1)], axis=-1)
        table = tf.tensor_scatter_nd_add(
            tf.zeros([batch, grid_h * grid_w, slots, 3 + num_types]), indices, updates
        )
        table = tf.reshape(table, [batch, grid_h, grid_w, slots, 3 + num_types])
        out.append(
            {
                "centerness": heat,
                "offsets": table[..., :2],
                "classes": table[..., 2:-1],
                "positive": table[..., -1],
                "level_of_object": level_of_object,
            }
        )
    return out


# ----------------------------------------------------------------------------- grouping
def group_keypoints(points, num_keypoints, center_keypoint=0, max_detections=100):
    """Peaks -> objects: the ``K`` keypoints of each object around its centre peak.

    Every valid peak of keypoint ``center_keypoint`` is an object (the ``max_detections``
    best-scoring ones), with the centre's score and class. Every other peak belongs to the nearest
    object of its class; an object takes, for each keypoint ``k``, the best-scoring peak of
    keypoint ``k`` that belongs to it, else the nearest peak of keypoint ``k`` and its class (that
    belongs to a neighbour), else its own centre with score 0.

    Args:
        points: padded peaks, :meth:`KeypointDetector.decode_points`' dict: ``"points"``
            ``(B, P, 2)`` xy, ``"scores"`` ``(B, P)``, ``"labels"`` ``(B, P)`` object classes
            and ``"keypoint_ids"`` ``(B, P)``, -1 for padding.
        num_keypoints: ``K``.
        center_keypoint: the keypoint that stands for its object.
        max_detections: ``D``.

    Returns:
        Padded ``{"boxes": (B, D, 4) xyxy, "keypoints": (B, D, K, 3), "scores": (B, D),
        "labels": (B, D), "num_detections": (B,)}``; a keypoint is ``(x, y, score of its peak)``,
        the box is the extent of the keypoints found (score > 0) and the centre; entries past
        ``num_detections`` are -1.
    """
    k_total, center = int(num_keypoints), int(center_keypoint)
    d_total = int(max_detections)
    xy = tf.cast(points["points"], tf.float32)
    scores = tf.cast(points["scores"], tf.float32)
    labels = tf.cast(points["labels"], tf.int32)
    kids = tf.cast(points["keypoint_ids"], tf.int32)
    num_points = xy.shape[1]
    if num_points is not None and num_points < d_total:  # top_k needs D <= P
        pad = [[0, 0], [0, d_total - num_points]]
        xy = tf.pad(xy, pad + [[0, 0]], constant_values=-1.0)
        scores, labels, kids = (tf.pad(t, pad, constant_values=-1) for t in (scores, labels, kids))
    valid = labels >= 0
    is_center = valid & tf.equal(kids, center)
    center_scores, center_index = tf.math.top_k(tf.where(is_center, scores, -1.0), k=d_total)
    found = tf.gather(is_center, center_index, batch_dims=1)  # (B, D)
    center_xy = tf.gather(xy, center_index, batch_dims=1)
    center_labels = tf.gather(labels, center_index, batch_dims=1)

    distance = tf.norm(center_xy[:, :, None] - xy[:, None], axis=-1)  # (B, D, P)
    candidate = (
        found[:, :, None]
        & (valid & tf.not_equal(kids, center))[:, None]
        & tf.equal(center_labels[:, :, None], labels[:, None])
    )
    masked = tf.where(candidate, distance, _BIG)
    owner = tf.argmin(masked, axis=1, output_type=tf.int32)  # (B, P)
    owned = candidate & tf.equal(tf.range(d_total)[None, :, None], owner[:, None])
    of_keypoint = tf.equal(kids[:, None, None], tf.range(k_total)[None, None, :, None])
    owned_k = owned[:, :, None] & of_keypoint  # (B, D, K, P)
    any_k = candidate[:, :, None] & of_keypoint
    best_owned = tf.argmax(tf.where(owned_k, scores[:, None, None], -2.0), -1, tf.int32)
    nearest = tf.argmin(tf.where(any_k, distance[:, :, None], _BIG), -1, output_type=tf.int32)
    chosen = tf.where(tf.reduce_any(owned_k, -1), best_owned, nearest)  # (B, D, K)
    has = tf.reduce_any(any_k, -1)
    flat_chosen = tf.reshape(chosen, [-1, d_total * k_total])
    keypoint_xy = tf.reshape(tf.gather(xy, flat_chosen, batch_dims=1), [-1, d_total, k_total, 2])
    keypoint_scores = tf.reshape(
        tf.gather(scores, flat_chosen, batch_dims=1), [-1, d_total, k_total]
    )
    keypoint_xy = tf.where(has[..., None], keypoint_xy, center_xy[:, :, None])
    keypoint_scores = tf.where(has, keypoint_scores, 0.0)
    is_center_k = tf.equal(tf.range(k_total), center)[None, None]  # (1, 1, K)
    keypoint_xy = tf.where(is_center_k[..., None], center_xy[:, :, None], keypoint_xy)
    keypoint_scores = tf.where(is_center_k, center_scores[:, :, None], keypoint_scores)

    used = (keypoint_scores > 0.0) | is_center_k
    low = tf.reduce_min(tf.where(used[..., None], keypoint_xy, _BIG), axis=2)
    high = tf.reduce_max(tf.where(used[..., None], keypoint_xy, -_BIG), axis=2)
    boxes = tf.concat([low, high], axis=-1)
    keypoints = tf.concat([keypoint_xy, keypoint_scores[..., None]], axis=-1)
    return {
        "boxes": tf.where(found[..., None], boxes, -1.0),
        "keypoints": tf.where(found[..., None, None], keypoints, -1.0),
        "scores": tf.where(found, center_scores, -1.0),
        "labels": tf.where(found, center_labels, -1),
        "num_detections": tf.reduce_sum(tf.cast(found, tf.int32), axis=1),
    }


# ----------------------------------------------------------------------------- the model
#: Named configurations for :meth:`KeypointDetector.from_preset` (give ``num_classes`` and
#: ``num_keypoints``). The CPU one is sized for the book's 256 px shapes (objects of 8-200 px):
#: ResNet-tiny C2-C5 and the notes' BN FPN at P2-P5 (strides 4-32: small objects at stride 4, as
#: CenterNet), slim separate heads, and CenterNet's penalty-reduced focal loss with its prior
#: (0.1) on the centerness and 0.01 on the 30 point classes: with the plain BCE the whole-map
#: class term (over 160,000 cells x classes per image for ~25 points) learns far more slowly.
PRESETS = {
    "keypoint_tiny_256": dict(
        image_size=(256, 256), backbone="resnet_tiny", backbone_kwargs={"levels": [2, 3, 4, 5]},
        neck="fpn_bn", neck_kwargs={"min_level": 2, "max_level": 5}, num_channels=32,
        head_depth=2, class_loss="centernet_focal", centerness_loss="centernet_focal",
        prior_probability=0.1, class_prior_probability=0.01,
    ),
    "keypoint_resnet50_fpn": dict(
        image_size=(512, 512), backbone="resnet50", neck="fpn", neck_kwargs={"max_level": 5},
        num_channels=256, head_depth=4, class_loss="centernet_focal",
        centerness_loss="centernet_focal", prior_probability=0.1, class_prior_probability=0.01,
    ),
}  # fmt: skip


@keras.saving.register_keras_serializable(package="dlnotes")
class KeypointDetector(Detector):
    """The notes' anchor-free keypoint model: images ``(B, H, W, 3)`` RGB in [0, 255] -> per-level
    offset, point-class and centerness maps; ``predict`` -> objects as grouped keypoints.

    ``call`` returns ``{"offsets": [(B, H_l, W_l, p, 2)], "class_logits": [(B, H_l, W_l, p, T)],
    "centerness_logits": [(B, H_l, W_l)]}``, one entry per pyramid level (finest first), logits
    (sigmoid gives the offsets in cells and the probabilities); ``T = num_classes *
    num_keypoints``. ``predict`` returns ``{"boxes": (B, D, 4), "keypoints": (B, D, K, 3),
    "scores": (B, D), "labels": (B, D), "num_detections": (B,)}`` (:func:`group_keypoints`);
    :meth:`decode_points` the raw peaks. ``fit`` / ``evaluate`` take ``(images, {"keypoints": (B,
    N, K, 3), "labels": (B, N)[, "boxes": (B, N, 4)]})`` padded with -1 (what
    ``CocoDataset.to_tf_dataset(with_keypoints=True)`` yields) and log ``loss``, ``xy_loss``,
    ``class_loss`` and ``centerness_loss`` (global-batch values).

    Args:
        num_classes: ``C`` object classes.
        num_keypoints: ``K`` keypoints per object (the targets' ``K`` must match).
        image_size: static ``(height, width)``; every level's size must be ``ceil(size / stride)``.
        backbone: a name of :data:`dlnotes.backbones.BACKBONES` (``backbone_kwargs`` its knobs,
            e.g. ``{"levels": [2, 3, 4, 5]}`` for a ResNet's C2), ``backbone_weights`` None /
            ``"imagenet"`` / a file (construction only), ``preprocessing`` an
            :class:`~dlnotes.backbones.ImagePreprocessing` mode (default the backbone's).
        neck: a name of :data:`dlnotes.necks.NECKS` (``neck_kwargs`` its options, e.g.
            ``{"min_level": 2, "max_level": 5}``); ``num_channels`` its width and the heads'.
            Every level the neck returns gets the heads.
        head: ``"separate"`` (RetinaNet's two towers) or ``"shared"`` (YOLO's one), each
            ``head_depth`` 3x3 conv-ReLU, shared across levels.
        points_per_cell: ``p`` point slots per cell.
        prior_probability: initial sigmoid of the centerness output (RetinaNet's prior
            init), and of the class outputs unless ``class_prior_probability`` is given: over a
            whole map of ``T`` point classes the positive rate is far lower (about 1e-4 for the
            book's data at stride 4), so a lower class prior starts the class loss near its
            constant optimum.
        cells_per_object: the level-assignment size (see :func:`keypoint_targets`).
        min_overlap: of CenterNet's Gaussian radius.
        xy_loss: one of :data:`XY_LOSSES`; class_loss, centerness_loss: of
            :data:`KEYPOINT_LOSSES` (:func:`heatmap_loss` and its parameters ``focal_alpha``,
            ``focal_gamma``, ``centernet_alpha``, ``centernet_beta``, ``positive_weight``).
        xy_loss_weight, class_loss_weight, centerness_loss_weight: term weights in the loss.
        center_keypoint: the keypoint that stands for its object in the grouping.
        score_threshold: peaks with a score ``<=`` it are dropped.
        max_points: peaks kept (of all levels) before grouping; max_detections: objects.
    """

    presets = PRESETS
    target_keys = ("keypoints", "labels")

    def __init__(
        self,
        num_classes,
        num_keypoints,
        image_size=(512, 512),
        backbone="resnet50",
        backbone_kwargs=None,
        backbone_weights=None,
        preprocessing=None,
        neck="fpn",
        neck_kwargs=None,
        num_channels=256,
        head="separate",
        head_depth=4,
        points_per_cell=1,
        prior_probability=0.01,
        class_prior_probability=None,
        cells_per_object=8.0,
        min_overlap=0.7,
        xy_loss="bce",
        class_loss="bce",
        centerness_loss="bce",
        focal_alpha=0.25,
        focal_gamma=2.0,
        centernet_alpha=2.0,
        centernet_beta=4.0,
        positive_weight=10.0,
        xy_loss_weight=1.0,
        class_loss_weight=1.0,
        centerness_loss_weight=1.0,
        center_keypoint=0,
        score_threshold=0.01,
        max_points=500,
        max_detections=100,
        **kwargs,
    ):
        owner = type(self).__name__
        if head not in HEADS:
            raise ValueError(f"{owner}: head must be one of {HEADS}, got {head!r}.")
        if xy_loss not in XY_LOSSES:
            raise ValueError(f"{owner}: xy_loss must be one of {XY_LOSSES}, got {xy_loss!r}.")
        for name, value in (("class_loss", class_loss), ("centerness_loss", centerness_loss)):
            if value not in KEYPOINT_LOSSES:
                raise ValueError(
                    f"{owner}: {name} must be one of {KEYPOINT_LOSSES}, got {value!r}."
                )
        weights = {
            "xy_loss": float(xy_loss_weight),
            "class_loss": float(class_loss_weight),
            "centerness_loss": float(centerness_loss_weight),
        }
        super().__init__(num_classes, loss_terms=tuple(weights), term_weights=weights, **kwargs)
        self.num_keypoints = positive_int(num_keypoints, "num_keypoints", owner)
        self.image_size = tuple(int(v) for v in image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"{owner}: image_size must be (height, width), got {image_size!r}.")
        self.points_per_cell = positive_int(points_per_cell, "points_per_cell", owner)
        self.num_point_classes = self.num_classes * self.num_keypoints
        self.center_keypoint = int(center_keypoint)
        if not 0 <= self.center_keypoint < self.num_keypoints:
            raise ValueError(
                f"{owner}: center_keypoint must be in [0, num_keypoints={self.num_keypoints}), "
                f"got {center_keypoint!r}."
            )
        self.cells_per_object = float(cells_per_object)
        if not self.cells_per_object > 0:
            raise ValueError(f"{owner}: cells_per_object must be > 0, got {cells_per_object!r}.")
        if not 0.0 < float(min_overlap) < 1.0:
            raise ValueError(f"{owner}: min_overlap must be in (0, 1), got {min_overlap!r}.")
        self.min_overlap = float(min_overlap)
        self.head = head
        self.head_depth = int(head_depth)
        self.num_channels = positive_int(num_channels, "num_channels", owner)
        self.prior_probability = prior_probability
        self.class_prior_probability = class_prior_probability
        self.xy_loss, self.class_loss, self.centerness_loss = xy_loss, class_loss, centerness_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = float(focal_gamma)
        self.centernet_alpha = float(centernet_alpha)
        self.centernet_beta = float(centernet_beta)
        self.positive_weight = float(positive_weight)
        self.xy_loss_weight = weights["xy_loss"]
        self.class_loss_weight = weights["class_loss"]
        self.centerness_loss_weight = weights["centerness_loss"]
        self.score_threshold = float(score_threshold)
        self.max_points = positive_int(max_points, "max_points", owner)
        self.max_detections = positive_int(max_detections, "max_detections", owner)

        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self._preprocessing_mode = preprocessing
        self.preprocessing = (
            preprocess_for(backbone, backbone_weights)
            if preprocessing is None
            else ImagePreprocessing(preprocessing, name=f"{backbone}_preprocessing")
        )
        self.backbone = build_backbone(
            backbone, (*self.image_size, 3), weights=backbone_weights, **self.backbone_kwargs
        )
        self.neck_name = neck
        self.neck_kwargs = dict(neck_kwargs or {})
        self.neck = build_neck(neck, num_channels=self.num_channels, **self.neck_kwargs)
        #: Strides of the levels the heads run on (finest first), and their ``(H_l, W_l)``.
        self.strides = tuple(2**level for level in self.neck.levels)
        self._check_levels()

        slots, types = self.points_per_cell, self.num_point_classes
        if head == "separate":
            self.offset_head = RetinaNetHead(
                1, 2 * slots, self.num_channels, self.head_depth, name="offset_head"
            )
            self.class_head = RetinaNetHead(
                1, slots * types + 1, self.num_channels, self.head_depth,
                prior_probability=prior_probability, name="class_head",
            )  # fmt: skip
            self.heads = [self.offset_head, self.class_head]
        else:
            self.shared_head = RetinaNetHead(
                1, slots * (2 + types) + 1, self.num_channels, self.head_depth,
                prior_probability=prior_probability, name="shared_head",
            )  # fmt: skip
            self.heads = [self.shared_head]
        self.build((None, *self.image_size, 3))
        self._initialise_biases()

    # ------------------------------------------------------------------ construction

    def _initialise_biases(self):
        """Output biases: 0 for the offsets (the cell centre), the prior bias of
        ``class_prior_probability`` for the point classes and of ``prior_probability`` for the
        centerness (the head was built with the latter on all its outputs)."""
        head = self.class_head if self.head == "separate" else self.shared_head
        bias = head.output_conv.bias
        values = bias.numpy()
        channel = np.arange(values.shape[0])
        offsets = 0 if self.head == "separate" else 2 * self.points_per_cell
        if self.head == "shared":
            values[channel < offsets] = 0.0
        if self.class_prior_probability is not None:
            classes = (channel >= offsets) & (channel < values.shape[0] - 1)
            values[classes] = prior_bias(self.class_prior_probability)
        bias.assign(values)

    def _check_levels(self):
        """The neck's levels must be the backbone's strides and ``ceil(image_size / stride)``."""
        owner = type(self).__name__
        first = output_strides(self.backbone)[0]
        if first != self.strides[0]:
            raise ValueError(
                f"{owner}: the backbone's first output has stride {first} but the neck "
                f"{self.neck_name!r} takes it as level {self.neck.levels[0]} (stride "
                f"{self.strides[0]}); set the neck's min_level (neck_kwargs) to match the "
                "backbone's levels (backbone_kwargs)."
            )
        features = self.backbone.compute_output_spec(keras.KerasTensor((1, *self.image_size, 3)))
        self.neck.build([f.shape for f in features])
        levels = self.neck.compute_output_spec(features)
        self.grid_shapes = tuple((int(t.shape[1]), int(t.shape[2])) for t in levels)
        for stride, shape in zip(self.strides, self.grid_shapes, strict=True):
            expected = tuple(math.ceil(v / stride) for v in self.image_size)
            if shape != expected:
                raise ValueError(
                    f"{owner}: the level of stride {stride} is {shape} for image_size "
                    f"{self.image_size}, expected {expected}."
                )

    def build(self, input_shape):
        levels = self.pyramid_spec(input_shape)
        for head in self.heads:
            if not head.built:
                head.build([level.shape for level in levels])
        self.built = True

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "num_keypoints": self.num_keypoints,
            "image_size": list(self.image_size),
            "backbone": self.backbone_name,
            "backbone_kwargs": self.backbone_kwargs,
            "backbone_weights": None,  # a saved model restores its own weights
            "preprocessing": self._preprocessing_mode,
            "neck": self.neck_name,
            "neck_kwargs": self.neck_kwargs,
            "num_channels": self.num_channels,
            "head": self.head,
            "head_depth": self.head_depth,
            "points_per_cell": self.points_per_cell,
            "prior_probability": self.prior_probability,
            "class_prior_probability": self.class_prior_probability,
            "cells_per_object": self.cells_per_object,
            "min_overlap": self.min_overlap,
            "xy_loss": self.xy_loss,
            "class_loss": self.class_loss,
            "centerness_loss": self.centerness_loss,
            "focal_alpha": self.focal_alpha,
            "focal_gamma": self.focal_gamma,
            "centernet_alpha": self.centernet_alpha,
            "centernet_beta": self.centernet_beta,
            "positive_weight": self.positive_weight,
            "xy_loss_weight": self.xy_loss_weight,
            "class_loss_weight": self.class_loss_weight,
            "centerness_loss_weight": self.centerness_loss_weight,
            "center_keypoint": self.center_keypoint,
            "score_threshold": self.score_threshold,
            "max_points": self.max_points,
            "max_detections": self.max_detections,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ forward

    def call(self, images, training=False):
        levels = self.pyramid(images, training=training)
        slots, types = self.points_per_cell, self.num_point_classes
        outputs = {"offsets": [], "class_logits": [], "centerness_logits": []}
        if self.head == "separate":
            pairs = zip(self.offset_head(levels), self.class_head(levels), strict=True)
            raw = [tf.concat([o[..., 0, :], c[..., 0, :]], axis=-1) for o, c in pairs]
        else:
            raw = [o[..., 0, :] for o in self.shared_head(levels)]
        for x, (grid_h, grid_w) in zip(raw, self.grid_shapes, strict=True):
            shape = [-1, grid_h, grid_w, slots]
            outputs["offsets"].append(tf.reshape(x[..., : 2 * slots], [*shape, 2]))
            outputs["class_logits"].append(tf.reshape(x[..., 2 * slots : -1], [*shape, types]))
            outputs["centerness_logits"].append(x[..., -1])
        return outputs

    # ------------------------------------------------------------------ training

    def input_assertions(self, images, targets=None):
        """:meth:`Detector.input_assertions` plus :func:`keypoint_assertions` on the targets."""
        checks = super().input_assertions(images, targets)
        if isinstance(targets, dict) and "keypoints" in targets and "labels" in targets:
            checks += keypoint_assertions(
                targets["keypoints"], targets["labels"], type(self).__name__
            )
        return checks

    def compute_targets(self, keypoints, labels, boxes=None):
        """Per-level targets of padded keypoints (:func:`keypoint_targets` with the model's
        levels and settings); labels outside ``[-1, num_classes)`` raise through graph
        assertions the targets depend on."""
        _check_keypoint_count(keypoints, self.num_keypoints, type(self).__name__)
        return keypoint_targets(
            keypoints, self.checked_labels(labels), self.image_size, self.strides,
            self.grid_shapes, self.num_classes, boxes=boxes,
            points_per_cell=self.points_per_cell, cells_per_object=self.cells_per_object,
            min_overlap=self.min_overlap,
        )  # fmt: skip

    def _loss(self, kind, labels, logits):
        return heatmap_loss(
            labels, logits, kind, self.focal_alpha, self.focal_gamma, self.centernet_alpha,
            self.centernet_beta, self.positive_weight,
        )  # fmt: skip

    def loss_terms(self, y, y_pred):
        """``xy_loss``, ``class_loss`` and ``centerness_loss``: sums over the replica's batch and
        every level, divided by the number of target points of the global batch (at least 1)."""
        self.check_targets(y)
        _check_keypoint_count(y["keypoints"], self.num_keypoints, type(self).__name__)
        keys = ("offsets", "class_logits", "centerness_logits")
        if not isinstance(y_pred, dict) or not set(keys) <= set(y_pred):
            raise ValueError(
                f"{type(self).__name__} predictions must be the dict of call(): {keys}, got "
                f"{type(y_pred).__name__}."
            )
        targets = self.compute_targets(y["keypoints"], y["labels"], y.get("boxes"))
        xy_sum = class_sum = centerness_sum = positives = tf.constant(0.0)
        for level, target in enumerate(targets):
            positive = target["positive"]
            offsets = tf.cast(y_pred["offsets"][level], tf.float32)
            xy = heatmap_loss(target["offsets"], offsets, self.xy_loss)
            xy_sum += tf.reduce_sum(tf.reduce_sum(xy, -1) * positive)
            class_logits = tf.cast(y_pred["class_logits"][level], tf.float32)
            class_sum += tf.reduce_sum(self._loss(self.class_loss, target["classes"], class_logits))
            centerness = tf.cast(y_pred["centerness_logits"][level], tf.float32)
            centerness_sum += tf.reduce_sum(
                self._loss(self.centerness_loss, target["centerness"], centerness)
            )
            positives += tf.reduce_sum(positive)
        normalizer = global_normalizer(positives)
        return {
            "xy_loss": xy_sum / normalizer,
            "class_loss": class_sum / normalizer,
            "centerness_loss": centerness_sum / normalizer,
        }

    # ------------------------------------------------------------------ inference

    def decode_points(self, outputs):
        """Head outputs -> the ``max_points`` best peaks of all levels, padded.

        Score of (cell, slot, point class) = sigmoid(centerness) x sigmoid(class logit); a peak
        equals the 3x3 max pool of its map; the position is ``(cell + sigmoid(offset)) stride``.

        Returns:
            ``{"points": (B, P, 2) xy pixels, "scores": (B, P), "labels": (B, P) object classes,
            "keypoint_ids": (B, P), "num_points": (B,)}``, sorted by score, peaks with a score
            ``<= score_threshold`` and the padding -1.
        """
        slots, types, k_total = self.points_per_cell, self.num_point_classes, self.num_keypoints
        candidates = {"scores": [], "points": [], "types": []}
        for level, stride in enumerate(self.strides):
            grid_h, grid_w = self.grid_shapes[level]
            class_prob = tf.sigmoid(tf.cast(outputs["class_logits"][level], tf.float32))
            centerness = tf.sigmoid(tf.cast(outputs["centerness_logits"][level], tf.float32))
            score = tf.reshape(centerness[..., None, None] * class_prob,
                               [-1, grid_h, grid_w, slots * types])  # fmt: skip
            pooled = tf.nn.max_pool2d(score, ksize=3, strides=1, padding="SAME")
            score = tf.where(tf.equal(score, pooled), score, 0.0)
            size = grid_h * grid_w * slots * types
            top, index = tf.math.top_k(tf.reshape(score, [-1, size]), k=min(self.max_points, size))
            cell, rest = index // (slots * types), index % (slots * types)
            slot, point_type = rest // types, rest % types
            offsets = tf.sigmoid(tf.cast(outputs["offsets"][level], tf.float32))
            offsets = tf.reshape(offsets, [-1, grid_h * grid_w * slots, 2])
            offsets = tf.gather(offsets, cell * slots + slot, batch_dims=1)
            cells = tf.cast(tf.stack([cell % grid_w, cell // grid_w], -1), tf.float32)
            candidates["scores"].append(top)
            candidates["points"].append((cells + offsets) * float(stride))
            candidates["types"].append(point_type)
        scores = tf.concat(candidates["scores"], axis=1)
        k = min(self.max_points, scores.shape[1])
        scores, index = tf.math.top_k(scores, k=k)
        points = tf.gather(tf.concat(candidates["points"], 1), index, batch_dims=1)
        point_types = tf.gather(tf.concat(candidates["types"], 1), index, batch_dims=1)
        valid = scores > self.score_threshold
        return {
            "points": tf.where(valid[..., None], points, -1.0),
            "scores": tf.where(valid, scores, -1.0),
            "labels": tf.where(valid, point_types // k_total, -1),
            "keypoint_ids": tf.where(valid, point_types % k_total, -1),
            "num_points": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
        }

    def decode(self, outputs):
        """Head outputs -> padded objects: :meth:`decode_points` then :func:`group_keypoints`."""
        return group_keypoints(
            self.decode_points(outputs), self.num_keypoints, self.center_keypoint,
            self.max_detections,
        )  # fmt: skip


# ----------------------------------------------------------------------------- evaluation
@dataclass
class KeypointEvaluation:
    """The outcome of :func:`evaluate_keypoints`.

    Attributes:
        result: the keypoint :class:`~dlnotes.evaluation.EvalResult` (OKS AP, ``result["AP"]``).
        box_result: the box :class:`~dlnotes.evaluation.EvalResult` of the same detections
            (boxes = extents of the grouped keypoints).
        detections: the COCO result dicts (with ``"keypoints"``), in original-image pixels.
        samples: as :class:`~dlnotes.evaluation.DetectorEvaluation`'s.
    """

    result: object
    box_result: object
    detections: list
    samples: tuple | None = None


def evaluate_keypoints(model, dataset, batch_size=50, keep=0, kpt_oks_sigmas=None):
    """COCO keypoint AP (OKS) of a :class:`KeypointDetector` on a
    :class:`~dlnotes.data.CocoDataset` with keypoints.

    The images go through :func:`~dlnotes.evaluation.evaluate_detector` (letterbox, predict,
    map back with :func:`~dlnotes.evaluation.predictions_to_coco`, which carries the keypoints),
    then the same detections through ``coco_evaluate(..., iou_type="keypoints")``.

    Args:
        model: the detector; its ``num_keypoints`` must be the data set's.
        dataset: a ``CocoDataset`` whose categories define keypoints.
        batch_size, keep: of :func:`~dlnotes.evaluation.evaluate_detector`.
        kpt_oks_sigmas: per-keypoint OKS sigmas (default
            :data:`~dlnotes.evaluation.DEFAULT_KEYPOINT_SIGMA` for every keypoint).

    Returns:
        A :class:`KeypointEvaluation`.
    """
    from dlnotes.evaluation import coco_evaluate, evaluate_detector

    model_k, data_k = getattr(model, "num_keypoints", None), dataset.num_keypoints
    if model_k != data_k:
        raise ValueError(
            f"evaluate_keypoints: the model predicts {model_k} keypoints per object but "
            f"{dataset.annotation_file} has {data_k} ({dataset.keypoint_names})."
        )
    boxes = evaluate_detector(model, dataset, batch_size=batch_size, keep=keep)
    result = coco_evaluate(
        dataset.coco, boxes.detections, iou_type="keypoints", kpt_oks_sigmas=kpt_oks_sigmas
    )
    return KeypointEvaluation(result, boxes.result, boxes.detections, boxes.samples)
