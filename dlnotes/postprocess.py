"""Post-processing: raw head outputs -> padded detections (the one NMS path of every model).

:func:`decode_detections` turns anchor deltas and class logits into boxes and probabilities with
the shared :class:`~dlnotes.boxes.BoxCoder`; :func:`batched_nms` keeps the best non-overlapping
boxes per image and returns the Keras detection convention::

    {"boxes": (B, D, 4) xyxy, "scores": (B, D), "labels": (B, D), "num_detections": (B,)}

padded to ``D = max_detections`` with -1 and sorted by score within each image.

Boxes are absolute-pixel ``xyxy``. TensorFlow's NMS kernels think in ``yxyx``, but IoU is the same
whichever axis comes first, so the boxes are passed unchanged.
"""

from __future__ import annotations

import tensorflow as tf

from dlnotes.boxes import clip_boxes, remove_small_boxes
from dlnotes.checks import positive_int

__all__ = ["ACTIVATIONS", "batched_nms", "decode_detections"]

#: Accepted values of ``decode_detections(activation=...)``.
ACTIVATIONS = ("sigmoid", "softmax", None)


def _pad_detections(boxes, scores, labels, num_detections):
    """Writes -1 into every entry at or after ``num_detections`` (Keras detection convention)."""
    max_detections = tf.shape(scores)[1]
    valid = tf.range(max_detections)[None, :] < num_detections[:, None]  # (B, D)
    return {
        "boxes": tf.where(valid[..., None], boxes, -1.0),
        "scores": tf.where(valid, scores, -1.0),
        "labels": tf.where(valid, labels, -1),
        "num_detections": num_detections,
    }


def batched_nms(
    boxes,
    scores,
    iou_threshold=0.5,
    score_threshold=0.05,
    max_detections=100,
    max_per_class=None,
    class_agnostic=False,
    pre_nms_top_k=None,
):
    """Greedy non-maximum suppression over a batch, padded to a fixed number of detections.

    Args:
        boxes: ``(B, N, 4)`` xyxy boxes shared by all classes, or ``(B, N, C, 4)`` one box per
            class (Faster R-CNN's box head).
        scores: ``(B, N, C)`` class probabilities (no background column).
        iou_threshold: a box is suppressed by a higher-scoring kept box of the same class (any
            class if ``class_agnostic``) when their IoU is above this value.
        score_threshold: only (box, class) pairs with a score ``> score_threshold`` are kept.
        max_detections: ``D``, detections returned per image.
        max_per_class: optional cap on detections per class and image (default ``D``); per-class
            mode only.
        class_agnostic: one NMS over all classes, each box taking its highest-scoring class
            (the RPN proposals, or when classes overlap heavily). Otherwise NMS runs per class
            via ``tf.image.combined_non_max_suppression`` and a box may be kept for several
            classes.
        pre_nms_top_k: optional static ``k``: only the ``k`` boxes per image with the highest
            max-class score enter NMS (keeps NMS cheap on dense anchor grids).

    Returns:
        dict with ``"boxes"`` ``(B, D, 4)`` float32 xyxy, ``"scores"`` ``(B, D)`` float32,
        ``"labels"`` ``(B, D)`` int32, ``"num_detections"`` ``(B,)`` int32. Entries are sorted by
        score; entries past ``num_detections`` are -1.

    Raises:
        ValueError: shapes that do not fit together, or out-of-range arguments.

    Note:
        TensorFlow's two kernels differ at *exact* equality ``IoU == iou_threshold``: the
        per-class kernel keeps the box, the class-agnostic one suppresses it.
    """
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    if scores.shape.rank != 3:
        raise ValueError(f"`scores` must have shape (B, N, C), got {scores.shape}.")
    if boxes.shape.rank not in (3, 4) or boxes.shape[-1] != 4:
        raise ValueError(f"`boxes` must have shape (B, N, 4) or (B, N, C, 4), got {boxes.shape}.")
    if not boxes.shape[:2].is_compatible_with(scores.shape[:2]) or (
        boxes.shape.rank == 4 and not boxes.shape[2:3].is_compatible_with(scores.shape[2:3])
    ):
        raise ValueError(
            f"`boxes` {boxes.shape} do not match `scores` {scores.shape} (expected boxes "
            "(B, N, 4) or (B, N, C, 4) for scores (B, N, C))."
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}.")
    max_detections = positive_int(max_detections, "max_detections")
    if class_agnostic and max_per_class is not None:
        raise ValueError("max_per_class only applies to per-class NMS (class_agnostic=False).")
    if max_per_class is not None:
        max_per_class = positive_int(max_per_class, "max_per_class")

    if pre_nms_top_k is not None:
        num_boxes = boxes.shape[1]
        k = int(pre_nms_top_k) if num_boxes is None else min(int(pre_nms_top_k), num_boxes)
        _, top = tf.math.top_k(tf.reduce_max(scores, axis=-1), k=k)  # (B, k)
        boxes = tf.gather(boxes, top, axis=1, batch_dims=1)
        scores = tf.gather(scores, top, axis=1, batch_dims=1)

    if class_agnostic:
        return _class_agnostic_nms(boxes, scores, iou_threshold, score_threshold, max_detections)

    if boxes.shape.rank == 3:
        boxes = boxes[:, :, None, :]  # (B, N, 1, 4): one box for all classes
    nms = tf.image.combined_non_max_suppression(
        boxes,
        scores,
        max_output_size_per_class=int(max_per_class or max_detections),
        max_total_size=int(max_detections),
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        pad_per_class=False,
        clip_boxes=False,  # pixel boxes; clipping would squash them into [0, 1]
    )
    return _pad_detections(
        nms.nmsed_boxes,
        nms.nmsed_scores,
        tf.cast(nms.nmsed_classes, tf.int32),
        nms.valid_detections,
    )


def _class_agnostic_nms(boxes, scores, iou_threshold, score_threshold, max_detections):
    """One NMS per image over all classes; each box takes its best class."""
    labels = tf.argmax(scores, axis=-1, output_type=tf.int32)  # (B, N)
    best_scores = tf.reduce_max(scores, axis=-1)
    if boxes.shape.rank == 4:  # per-class boxes: the box of the winning class
        boxes = tf.gather(boxes, labels, axis=2, batch_dims=2)

    def one_image(args):
        image_boxes, image_scores = args
        # TF 2.21's padded NMS (for rank 2 too) treats a box with no positive coordinate as
        # removed, which is wrong for boxes off the image: shift the image's boxes so that every
        # coordinate is at least 1 (IoU does not change under a translation).
        image_boxes = image_boxes - tf.minimum(tf.reduce_min(image_boxes), 0.0) + 1.0
        return tf.image.non_max_suppression_padded(
            image_boxes,
            image_scores,
            max_output_size=max_detections,
            iou_threshold=iou_threshold,
            score_threshold=score_threshold,
            pad_to_max_output_size=True,
        )

    keep, num_detections = tf.map_fn(
        one_image,
        (boxes, best_scores),
        fn_output_signature=(
            tf.TensorSpec([max_detections], tf.int32),
            tf.TensorSpec([], tf.int32),
        ),
    )
    return _pad_detections(
        tf.gather(boxes, keep, axis=1, batch_dims=1),
        tf.gather(best_scores, keep, axis=1, batch_dims=1),
        tf.gather(labels, keep, axis=1, batch_dims=1),
        num_detections,
    )


def decode_detections(
    anchors,
    box_deltas,
    class_logits,
    box_coder,
    image_shape=None,
    activation="sigmoid",
    min_size=None,
    **nms_kwargs,
):
    """Head outputs -> padded detections: decode, clip, activate, :func:`batched_nms`.

    Args:
        anchors: ``(A, 4)`` xyxy anchors (or ``(B, A, 4)`` per image, e.g. proposals).
        box_deltas: ``(B, A, 4)`` predicted deltas, or ``(B, A, C, 4)`` one per class.
        class_logits: ``(B, A, C)`` logits.
        box_coder: the :class:`~dlnotes.boxes.BoxCoder` the deltas were trained with.
        image_shape: optional ``(height, width)`` (or ``(B, 2)``) to clip the boxes to.
        activation: ``"sigmoid"`` (RetinaNet, YOLO), ``"softmax"`` (over all C columns; drop a
            background column from the result yourself) or ``None`` when ``class_logits``
            already are probabilities.
        min_size: optional; boxes (after clipping) narrower or shorter than this get score 0, so
            no score threshold >= 0 lets them through (Faster R-CNN's test-time
            ``min_size=1e-2``).
        **nms_kwargs: forwarded to :func:`batched_nms` (``iou_threshold``, ``score_threshold``,
            ``max_detections``, ``max_per_class``, ``class_agnostic``, ``pre_nms_top_k``).

    Returns:
        The :func:`batched_nms` dict.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    anchors = tf.cast(tf.convert_to_tensor(anchors), tf.float32)
    box_deltas = tf.cast(tf.convert_to_tensor(box_deltas), tf.float32)
    if box_deltas.shape.rank == 4:  # per-class deltas: the same anchor for every class
        anchors = anchors[..., None, :]
    boxes = box_coder.decode(anchors, box_deltas)
    if image_shape is not None:
        boxes = clip_boxes(boxes, image_shape)
    class_logits = tf.cast(tf.convert_to_tensor(class_logits), tf.float32)
    if activation == "sigmoid":
        scores = tf.sigmoid(class_logits)
    elif activation == "softmax":
        scores = tf.nn.softmax(class_logits, axis=-1)
    else:
        scores = class_logits
    if min_size is not None:
        # Zero scores rather than a gather keep shapes static; 0 fails the strict `score >
        # score_threshold` test of NMS.
        keep = remove_small_boxes(boxes, min_size)  # (B, A) or (B, A, C)
        if box_deltas.shape.rank == 3:
            keep = keep[..., None]
        scores = tf.where(keep, scores, 0.0)
    return batched_nms(boxes, scores, **nms_kwargs)
