"""Box formats, IoU family, clipping and the centre-size box coder.

Every concept here exists once and is reused by all models of the book:

* :func:`convert_format` between the ``keras.utils.bounding_boxes`` format names;
* :func:`pairwise_iou` / :func:`aligned_iou` for IoU, GIoU, DIoU and CIoU (one formula,
  the pairwise version is the aligned one on expanded dimensions);
* :func:`clip_boxes` and :func:`remove_small_boxes` for proposal post-processing;
* :class:`BoxCoder`, the RetinaNet / Faster R-CNN centre-size deltas;
* :func:`yolo_decode` / :func:`yolo_encode`, YOLOv3's grid-cell parametrisation.

All functions are TensorFlow graph code: they accept tensors, NumPy arrays or nested lists, use
only TF ops with static shapes (no Python loops over boxes), return ``tf.float32`` tensors and
work inside ``tf.function(jit_compile=True)``. Unless a function says otherwise, boxes are
absolute-pixel ``xyxy`` = ``(x_min, y_min, x_max, y_max)``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "DEFAULT_SCALE_CLIP",
    "FORMATS",
    "IOU_KINDS",
    "YOLO_SCALE_CLIP",
    "BoxCoder",
    "aligned_iou",
    "box_area",
    "clip_boxes",
    "convert_format",
    "pairwise_iou",
    "remove_small_boxes",
    "yolo_decode",
    "yolo_encode",
]

#: Supported box formats (names follow ``keras.utils.bounding_boxes``).
#:
#: * ``xyxy``: ``(x_min, y_min, x_max, y_max)``; ``yxyx``: ``(y_min, x_min, y_max, x_max)``
#: * ``xywh``: ``(x_min, y_min, width, height)``
#: * ``center_xywh``: ``(center_x, center_y, width, height)``;
#:   ``center_yxhw``: ``(center_y, center_x, height, width)``
#: * ``rel_*``: the same with x divided by the image width and y by the image height.
FORMATS = (
    "xyxy",
    "yxyx",
    "xywh",
    "center_xywh",
    "center_yxhw",
    "rel_xyxy",
    "rel_yxyx",
    "rel_xywh",
    "rel_center_xywh",
)

#: Overlap measures of :func:`pairwise_iou` / :func:`aligned_iou`.
IOU_KINDS = ("iou", "giou", "diou", "ciou")

#: Default upper bound of the log-size deltas in :meth:`BoxCoder.decode` (as in torchvision).
DEFAULT_SCALE_CLIP = math.log(1000.0 / 16)

#: Default upper bound of YOLO's raw ``tw, th`` before ``exp`` in :func:`yolo_decode`: a predicted
#: box is at most 1000 times its anchor. ``exp`` overflows float32 above 88.7, and long before that
#: the squares of CIoU's enclosing diagonal do (``w^2`` with ``w = 373 exp(40)``); with the clamp a
#: decoded side stays below ~4e5 pixels for the COCO anchors, so areas and squared distances are
#: finite. 1000 leaves room for any real target (a whole 4096-pixel image over the 10-pixel anchor
#: is a ratio of 410), so the clamp never hides a reachable box.
YOLO_SCALE_CLIP = math.log(1000.0)

# Added to every denominator so that zero-area boxes give finite values (IoU 0) instead of NaN.
_EPS = 1e-7
# Widths/heights are clamped to this before the log of the box coder (degenerate GT boxes).
_SIZE_EPS = 1e-6


def _to_float(x, name="boxes"):
    """Converts ``x`` (tensor, array, list) to a float32 tensor."""
    x = tf.convert_to_tensor(x, name=name)
    if x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    return x


def _to_boxes(boxes, name="boxes"):
    """float32 tensor of shape (..., 4); a clear ValueError otherwise."""
    boxes = _to_float(boxes, name)
    shape = boxes.shape
    if shape.rank == 0 or (shape.rank is not None and shape[-1] is not None and shape[-1] != 4):
        raise ValueError(
            f"`{name}` must have shape (..., 4) (last dimension 4), got shape {shape}."
        )
    return boxes


def _check_format(fmt, arg):
    if fmt not in FORMATS:
        raise ValueError(f"Unknown box format {fmt!r} for `{arg}`; supported formats: {FORMATS}.")


def _check_kind(kind):
    if kind not in IOU_KINDS:
        raise ValueError(f"Unknown IoU kind {kind!r}; expected one of {IOU_KINDS}.")


def _image_hw(image_shape, coord_rank):
    """(height, width) as float32 tensors broadcastable against a coordinate of rank ``coord_rank``.

    ``image_shape`` is ``(height, width)`` (extra trailing entries such as channels are ignored),
    or a per-image tensor of shape ``(B, 2+)`` that broadcasts against boxes ``(B, ..., 4)``.
    """
    shape = _to_float(image_shape, "image_shape")
    if shape.shape.rank == 0 or (shape.shape[-1] is not None and shape.shape[-1] < 2):
        raise ValueError(
            f"`image_shape` must be (height, width[, channels]) or (B, 2+), got shape {shape.shape}."
        )
    height, width = shape[..., 0], shape[..., 1]
    # Per-image shapes (B,) must broadcast against coordinates (B, N, ...): add trailing dims.
    if height.shape.rank:
        for _ in range(coord_rank - height.shape.rank):
            height, width = height[..., None], width[..., None]
    return height, width


def _to_xyxy(coords, source, image_shape):
    """Four coordinate tensors in ``source`` format -> absolute (x1, y1, x2, y2)."""
    a, b, c, d = coords
    base = source[4:] if source.startswith("rel_") else source
    if base == "xyxy":
        x1, y1, x2, y2 = a, b, c, d
    elif base == "yxyx":
        y1, x1, y2, x2 = a, b, c, d
    elif base == "xywh":
        x1, y1, x2, y2 = a, b, a + c, b + d
    elif base == "center_xywh":
        x1, y1, x2, y2 = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    else:  # center_yxhw
        x1, y1, x2, y2 = b - 0.5 * d, a - 0.5 * c, b + 0.5 * d, a + 0.5 * c
    if source.startswith("rel_"):
        height, width = _image_hw(image_shape, a.shape.rank)
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    return x1, y1, x2, y2


def _from_xyxy(x1, y1, x2, y2, target, image_shape):
    """Absolute (x1, y1, x2, y2) -> four coordinate tensors in ``target`` format."""
    if target.startswith("rel_"):
        height, width = _image_hw(image_shape, x1.shape.rank)
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    base = target[4:] if target.startswith("rel_") else target
    if base == "xyxy":
        return x1, y1, x2, y2
    if base == "yxyx":
        return y1, x1, y2, x2
    if base == "xywh":
        return x1, y1, x2 - x1, y2 - y1
    if base == "center_xywh":
        return 0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1
    # center_yxhw
    return 0.5 * (y1 + y2), 0.5 * (x1 + x2), y2 - y1, x2 - x1


def convert_format(boxes, source, target, image_shape=None):
    """Converts boxes between formats.

    Args:
        boxes: ``(..., 4)`` boxes in ``source`` format.
        source: one of :data:`FORMATS`.
        target: one of :data:`FORMATS`.
        image_shape: ``(height, width)`` of the image (trailing entries such as channels are
            ignored), or a ``(B, 2+)`` tensor of per-image shapes for boxes ``(B, N, 4)``.
            Required when ``source`` or ``target`` is relative (``rel_*``), where x is divided by
            the width and y by the height.

    Returns:
        ``(..., 4)`` float32 boxes in ``target`` format.

    Raises:
        ValueError: unknown format, last dimension not 4, or a relative format without
            ``image_shape``.
    """
    _check_format(source, "source")
    _check_format(target, "target")
    boxes = _to_boxes(boxes)
    if (source.startswith("rel_") or target.startswith("rel_")) and image_shape is None:
        raise ValueError(
            f"`image_shape=(height, width)` is required to convert from {source!r} to {target!r} "
            "(relative formats are divided by the image size)."
        )
    if source == target:
        return boxes
    coords = tf.unstack(boxes, num=4, axis=-1)
    x1, y1, x2, y2 = _to_xyxy(coords, source, image_shape)
    return tf.stack(_from_xyxy(x1, y1, x2, y2, target, image_shape), axis=-1)


def box_area(boxes):
    """Area of ``xyxy`` boxes ``(..., 4)`` -> ``(...,)``; negative widths/heights count as 0."""
    x1, y1, x2, y2 = tf.unstack(_to_boxes(boxes), num=4, axis=-1)
    return tf.nn.relu(x2 - x1) * tf.nn.relu(y2 - y1)


def _iou_from_coords(box1, box2, kind):
    """The one IoU formula; ``box1`` and ``box2`` are broadcastable 4-tuples of xyxy coordinates.

    ``box2`` plays the ground truth in CIoU (the aspect term is symmetric in any case).
    """
    ax1, ay1, ax2, ay2 = box1
    bx1, by1, bx2, by2 = box2
    aw, ah = tf.nn.relu(ax2 - ax1), tf.nn.relu(ay2 - ay1)
    bw, bh = tf.nn.relu(bx2 - bx1), tf.nn.relu(by2 - by1)
    inter_w = tf.nn.relu(tf.minimum(ax2, bx2) - tf.maximum(ax1, bx1))
    inter_h = tf.nn.relu(tf.minimum(ay2, by2) - tf.maximum(ay1, by1))
    inter = inter_w * inter_h
    union = aw * ah + bw * bh - inter
    iou = inter / (union + _EPS)
    if kind == "iou":
        return iou
    # Smallest enclosing box.
    cw = tf.maximum(ax2, bx2) - tf.minimum(ax1, bx1)
    ch = tf.maximum(ay2, by2) - tf.minimum(ay1, by1)
    if kind == "giou":
        enclose = cw * ch
        return iou - (enclose - union) / (enclose + _EPS)
    # DIoU / CIoU: squared centre distance over squared enclosing diagonal.
    rho2 = 0.25 * (tf.square(ax1 + ax2 - bx1 - bx2) + tf.square(ay1 + ay2 - by1 - by2))
    c2 = tf.square(cw) + tf.square(ch)
    diou = iou - rho2 / (c2 + _EPS)
    if kind == "diou":
        return diou
    # CIoU (Zheng et al. 2020): aspect-ratio consistency v, trade-off alpha held constant.
    v = (4.0 / math.pi**2) * tf.square(tf.atan(bw / (bh + _EPS)) - tf.atan(aw / (ah + _EPS)))
    alpha = tf.stop_gradient(v / (1.0 - iou + v + _EPS))
    return diou - alpha * v


def aligned_iou(boxes1, boxes2, kind="iou"):
    """Elementwise IoU-family overlap of ``xyxy`` boxes.

    Args:
        boxes1: ``(..., 4)`` xyxy boxes (e.g. predictions).
        boxes2: ``(..., 4)`` xyxy boxes (e.g. ground truth); broadcasts against ``boxes1``.
        kind: ``"iou"``, ``"giou"``, ``"diou"`` or ``"ciou"``.

    Returns:
        ``(...,)`` float32. IoU in [0, 1], GIoU and DIoU in [-1, 1], CIoU in [-1.5, 1] (its
        aspect penalty ``alpha * v`` is at most 1/2 when IoU = 0); zero-area boxes give finite
        values (IoU 0).
    """
    _check_kind(kind)
    box1 = tf.unstack(_to_boxes(boxes1, "boxes1"), num=4, axis=-1)
    box2 = tf.unstack(_to_boxes(boxes2, "boxes2"), num=4, axis=-1)
    return _iou_from_coords(box1, box2, kind)


def pairwise_iou(boxes1, boxes2, kind="iou", mask1=None, mask2=None, invalid_value=-1.0):
    """IoU-family overlap of every box in ``boxes1`` with every box in ``boxes2``.

    Args:
        boxes1: ``(..., N, 4)`` xyxy boxes (e.g. anchors ``(N, 4)``).
        boxes2: ``(..., M, 4)`` xyxy boxes (e.g. padded ground truth ``(B, M, 4)``). Leading dims
            broadcast: ``(N, 4)`` against ``(B, M, 4)`` gives ``(B, N, M)``.
        kind: ``"iou"``, ``"giou"``, ``"diou"`` or ``"ciou"``.
        mask1: optional boolean ``(..., N)``; pairs whose ``boxes1`` entry is False are invalid.
        mask2: optional boolean ``(..., M)``; pairs whose ``boxes2`` entry is False are invalid
            (use it for padded GT boxes, e.g. ``labels >= 0``).
        invalid_value: value written into invalid pairs.

    Returns:
        ``(..., N, M)`` float32.
    """
    _check_kind(kind)
    boxes1 = _to_boxes(boxes1, "boxes1")
    boxes2 = _to_boxes(boxes2, "boxes2")
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.shape.rank is not None and b.shape.rank < 2:
            raise ValueError(f"`{name}` must have shape (..., num_boxes, 4), got shape {b.shape}.")
    # Aligned IoU on expanded dims: (..., N, 1) against (..., 1, M). Unstacking first keeps the
    # intermediates at (..., N, M) instead of (..., N, M, 4).
    box1 = [c[..., :, None] for c in tf.unstack(boxes1, num=4, axis=-1)]
    box2 = [c[..., None, :] for c in tf.unstack(boxes2, num=4, axis=-1)]
    iou = _iou_from_coords(box1, box2, kind)
    if mask1 is None and mask2 is None:
        return iou
    valid = tf.ones_like(iou, dtype=tf.bool)
    if mask1 is not None:
        valid = tf.logical_and(valid, tf.cast(mask1, tf.bool)[..., :, None])
    if mask2 is not None:
        valid = tf.logical_and(valid, tf.cast(mask2, tf.bool)[..., None, :])
    return tf.where(valid, iou, tf.cast(invalid_value, tf.float32))


def clip_boxes(boxes, image_shape):
    """Clips ``xyxy`` boxes ``(..., 4)`` to ``[0, width] x [0, height]``.

    ``image_shape`` is ``(height, width[, channels])`` or a per-image ``(B, 2+)`` tensor for boxes
    ``(B, N, 4)``. Returns float32 ``(..., 4)``.
    """
    boxes = _to_boxes(boxes)
    x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
    height, width = _image_hw(image_shape, x1.shape.rank)
    x1, x2 = tf.minimum(tf.nn.relu(x1), width), tf.minimum(tf.nn.relu(x2), width)
    y1, y2 = tf.minimum(tf.nn.relu(y1), height), tf.minimum(tf.nn.relu(y2), height)
    return tf.stack([x1, y1, x2, y2], axis=-1)


def remove_small_boxes(boxes, min_size):
    """Keep-mask of ``xyxy`` boxes whose width and height are both ``>= min_size``.

    Args:
        boxes: ``(..., N, 4)`` xyxy boxes.
        min_size: scalar size in the boxes' units.

    Returns:
        Boolean ``(..., N)``. A mask rather than a gather keeps shapes static; combine it with
        scores (e.g. set removed scores to -inf) before top-k / NMS.
    """
    x1, y1, x2, y2 = tf.unstack(_to_boxes(boxes), num=4, axis=-1)
    min_size = tf.cast(min_size, tf.float32)
    return tf.logical_and(x2 - x1 >= min_size, y2 - y1 >= min_size)


@keras.saving.register_keras_serializable(package="dlnotes")
class BoxCoder:
    """Centre-size box deltas of RetinaNet / Faster R-CNN.

    With anchor centre ``(xa, ya)`` and size ``(wa, ha)`` and box centre/size ``(bx, by, bw, bh)``::

        t = (tx, ty, tw, th) = ((bx - xa) / wa, (by - ya) / ha, log(bw / wa), log(bh / ha))
        deltas = (t - mean) / std

    RetinaNet uses ``mean=0, std=0.2``; torchvision's Faster R-CNN uses weights ``(10, 10, 5, 5)``,
    i.e. ``std = 1 / weights`` (:meth:`from_weights`). Decoding clips ``tw, th`` at ``scale_clip``
    (default ``log(1000 / 16)``) before ``exp`` so that wild predictions never overflow.

    ``order="yx"`` gives the deltas in automl's (EfficientDet's) order ``(ty, tx, th, tw)``, the
    order of its ``yxyx`` boxes; ``mean`` / ``std`` then apply in that order. Boxes and anchors
    are ``xyxy`` either way.

    Attributes:
        mean: tuple of 4 floats.
        std: tuple of 4 positive floats.
        scale_clip: float, upper bound of ``tw, th`` before ``exp`` in :meth:`decode`.
        order: ``"xy"`` (``tx, ty, tw, th``) or ``"yx"`` (``ty, tx, th, tw``).
    """

    ORDERS = ("xy", "yx")

    def __init__(
        self,
        mean=(0.0, 0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0, 1.0),
        scale_clip=DEFAULT_SCALE_CLIP,
        order="xy",
    ):
        mean = tuple(float(m) for m in _flat4(mean, "mean"))
        std = tuple(float(s) for s in _flat4(std, "std"))
        if not all(s > 0 for s in std):
            raise ValueError(f"BoxCoder `std` must be positive, got {std}.")
        if order not in self.ORDERS:
            raise ValueError(f"BoxCoder `order` must be one of {self.ORDERS}, got {order!r}.")
        self.mean = mean
        self.std = std
        self.scale_clip = float(scale_clip)
        self.order = order

    @classmethod
    def from_weights(cls, weights, scale_clip=DEFAULT_SCALE_CLIP):
        """torchvision-style coder: ``deltas = weights * t``, i.e. ``std = 1 / weights``."""
        weights = _flat4(weights, "weights")
        if not all(w > 0 for w in weights):
            raise ValueError(f"BoxCoder weights must be positive, got {tuple(weights)}.")
        return cls(
            mean=(0.0,) * 4, std=tuple(1.0 / float(w) for w in weights), scale_clip=scale_clip
        )

    def encode(self, anchors, boxes):
        """Boxes -> normalised deltas.

        Args:
            anchors: ``(..., 4)`` xyxy anchors.
            boxes: ``(..., 4)`` xyxy target boxes; leading dims broadcast with ``anchors``
                (anchors ``(N, 4)`` against boxes ``(B, N, 4)``).

        Returns:
            ``(..., 4)`` float32 deltas ``(tx, ty, tw, th)`` normalised by ``mean`` / ``std``.
            Sizes are clamped to a small epsilon before the log, so degenerate (zero-width)
            boxes give finite deltas.
        """
        ax, ay, aw, ah = _center_size(_to_boxes(anchors, "anchors"))
        bx, by, bw, bh = _center_size(_to_boxes(boxes, "boxes"))
        aw, ah = tf.maximum(aw, _SIZE_EPS), tf.maximum(ah, _SIZE_EPS)
        bw, bh = tf.maximum(bw, _SIZE_EPS), tf.maximum(bh, _SIZE_EPS)
        t = [(bx - ax) / aw, (by - ay) / ah, tf.math.log(bw / aw), tf.math.log(bh / ah)]
        if self.order == "yx":
            t = [t[1], t[0], t[3], t[2]]
        t = tf.stack(t, axis=-1)
        return (t - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def decode(self, anchors, deltas):
        """Normalised deltas -> ``xyxy`` boxes.

        Args:
            anchors: ``(..., 4)`` xyxy anchors.
            deltas: ``(..., 4)`` deltas as produced by :meth:`encode` (or predicted); leading dims
                broadcast with ``anchors``.

        Returns:
            ``(..., 4)`` float32 xyxy boxes. ``tw, th`` are clipped at ``scale_clip`` before exp.
        """
        ax, ay, aw, ah = _center_size(_to_boxes(anchors, "anchors"))
        deltas = _to_boxes(deltas, "deltas")
        t = deltas * tf.constant(self.std, tf.float32) + tf.constant(self.mean, tf.float32)
        tx, ty, tw, th = tf.unstack(t, num=4, axis=-1)
        if self.order == "yx":
            tx, ty, tw, th = ty, tx, th, tw
        tw = tf.minimum(tw, self.scale_clip)
        th = tf.minimum(th, self.scale_clip)
        cx, cy = tx * aw + ax, ty * ah + ay
        half_w, half_h = 0.5 * tf.exp(tw) * aw, 0.5 * tf.exp(th) * ah
        return tf.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)

    def get_config(self):
        """Constructor arguments as plain Python values."""
        config = {"mean": list(self.mean), "std": list(self.std), "scale_clip": self.scale_clip}
        if self.order != "xy":
            config["order"] = self.order
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        order = "" if self.order == "xy" else f", order={self.order!r}"
        return (
            f"BoxCoder(mean={self.mean}, std={self.std}, scale_clip={self.scale_clip:.6g}{order})"
        )


def _flat4(values, name):
    """Four Python floats from a sequence/array; a clear ValueError otherwise."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (4,):
        raise ValueError(f"BoxCoder `{name}` must have 4 entries, got {values!r}.")
    return [float(v) for v in array]


def _center_size(boxes):
    """xyxy ``(..., 4)`` -> (cx, cy, w, h), each ``(...,)``."""
    x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
    return 0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1


def _yolo_anchors_wh(anchors_wh):
    anchors_wh = _to_float(anchors_wh, "anchors_wh")
    if anchors_wh.shape.rank == 0 or anchors_wh.shape[-1] not in (None, 2):
        raise ValueError(
            f"`anchors_wh` must have shape (A, 2) of anchor [w, h] in pixels, got shape "
            f"{anchors_wh.shape}."
        )
    return anchors_wh


def _yolo_stride(stride):
    if tf.is_tensor(stride) or not float(stride) > 0:
        raise ValueError(f"`stride` must be a positive Python number, got {stride!r}.")
    return float(stride)


def yolo_decode(raw_offsets, anchors_wh, stride, scale_clip=YOLO_SCALE_CLIP):
    """YOLOv3 raw offsets of one output level -> ``xyxy`` boxes in input pixels.

    For the cell in column ``cx`` and row ``cy`` and the anchor ``(aw, ah)`` (pixels)::

        bx = (sigmoid(tx) + cx) * stride       by = (sigmoid(ty) + cy) * stride
        bw = aw * exp(min(tw, scale_clip))     bh = ah * exp(min(th, scale_clip))

    i.e. the notes' grid-relative centre ``sigmoid(t) + c`` scaled to pixels; the centre always
    lies inside its cell. ``tw, th`` are clamped from above at ``scale_clip`` (default
    :data:`YOLO_SCALE_CLIP` = ``log(1000)``) so that ``exp`` and the areas / squared distances of
    the IoU family stay finite for any raw output (a fresh network can emit ``tw = 100``); the
    gradient with respect to a clamped ``tw`` is 0. Large negative ``tw`` give zero-size boxes,
    which the IoU functions handle.

    Args:
        raw_offsets: ``(..., H, W, A, 4)`` raw ``(tx, ty, tw, th)`` of one level, e.g.
            ``y_pred[..., :4]`` of an output ``(B, H, W, A, 4 + 1 + C)``.
        anchors_wh: ``(A, 2)`` anchor ``[w, h]`` in input pixels (``YoloAnchors.level_anchors``).
        stride: the level's stride in pixels (Python number; 32, 16 or 8 for YOLOv3).
        scale_clip: upper bound of ``tw, th`` before ``exp``.

    Returns:
        ``(..., H, W, A, 4)`` float32 ``xyxy`` boxes in input pixels.
    """
    raw = _to_boxes(raw_offsets, "raw_offsets")
    if raw.shape.rank is not None and raw.shape.rank < 4:
        raise ValueError(f"`raw_offsets` must have shape (..., H, W, A, 4), got shape {raw.shape}.")
    anchors_wh = _yolo_anchors_wh(anchors_wh)
    stride = _yolo_stride(stride)
    shape = tf.shape(raw)
    col = tf.cast(tf.range(shape[-3]), tf.float32)[None, :, None]  # (1, W, 1)
    row = tf.cast(tf.range(shape[-4]), tf.float32)[:, None, None]  # (H, 1, 1)
    tx, ty, tw, th = tf.unstack(raw, num=4, axis=-1)
    x = (tf.sigmoid(tx) + col) * stride
    y = (tf.sigmoid(ty) + row) * stride
    half_w = 0.5 * anchors_wh[..., 0] * tf.exp(tf.minimum(tw, float(scale_clip)))
    half_h = 0.5 * anchors_wh[..., 1] * tf.exp(tf.minimum(th, float(scale_clip)))
    return tf.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=-1)


def yolo_encode(boxes, anchors_wh, stride, cell_xy=None):
    """Regression targets of ``xyxy`` boxes for their YOLO cell and anchor (inverse of decode).

    With the box centre ``(x, y)`` and size ``(w, h)`` in pixels, the cell ``(cx, cy)`` (column,
    row) and the anchor ``(aw, ah)``::

        targets = (x / stride - cx, y / stride - cy, log(w / aw), log(h / ah))

    The first two are the targets of ``sigmoid(tx), sigmoid(ty)`` -- in [0, 1] when the centre
    lies in the cell -- not of the raw ``tx, ty`` (``logit`` of them is infinite on the cell
    edges): the YOLO loss compares them with a binary cross entropy on the logits ``tx, ty``
    (keras-yolo3's ``raw_true_xy``). The last two are the raw ``tw, th`` targets
    (``raw_true_wh``). So for boxes decoded by :func:`yolo_decode` in their own cell,
    ``yolo_encode`` returns ``(sigmoid(tx), sigmoid(ty), tw, th)``. Widths and heights are
    clamped to a small epsilon before the log, so zero-size boxes give finite targets.

    Args:
        boxes: ``(..., 4)`` ``xyxy`` boxes in input pixels.
        anchors_wh: ``(..., 2)`` anchor ``[w, h]`` in pixels, broadcastable to ``boxes[..., :2]``
            (e.g. ``(A, 2)`` against boxes ``(B, H, W, A, 4)``).
        stride: the level's stride in pixels (Python number).
        cell_xy: optional ``(..., 2)`` cell ``(column, row)`` (ints or floats), broadcastable;
            default the cell containing the centre, ``floor(centre / stride)`` (no clamping to the
            grid: a centre on the right / bottom image border needs the last cell passed in).

    Returns:
        ``(..., 4)`` float32 targets ``(sx, sy, tw, th)`` (broadcast shape).
    """
    boxes = _to_boxes(boxes, "boxes")
    anchors_wh = _yolo_anchors_wh(anchors_wh)
    stride = _yolo_stride(stride)
    x, y, w, h = _center_size(boxes)
    gx, gy = x / stride, y / stride  # centre in grid units
    if cell_xy is None:
        cell_x, cell_y = tf.floor(gx), tf.floor(gy)
    else:
        cell_xy = _to_float(cell_xy, "cell_xy")
        if cell_xy.shape.rank == 0 or cell_xy.shape[-1] not in (None, 2):
            raise ValueError(f"`cell_xy` must have shape (..., 2), got shape {cell_xy.shape}.")
        cell_x, cell_y = cell_xy[..., 0], cell_xy[..., 1]
    tw = tf.math.log(tf.maximum(w, _SIZE_EPS) / anchors_wh[..., 0])
    th = tf.math.log(tf.maximum(h, _SIZE_EPS) / anchors_wh[..., 1])
    return tf.stack(_broadcast_all(gx - cell_x, gy - cell_y, tw, th), axis=-1)


def _broadcast_all(*tensors):
    """Broadcasts tensors against each other (``tf.stack`` needs equal shapes)."""
    shape = tf.shape(tensors[0])
    for t in tensors[1:]:
        shape = tf.broadcast_dynamic_shape(shape, tf.shape(t))
    return [tf.broadcast_to(t, shape) for t in tensors]
