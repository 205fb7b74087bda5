"""Anchors: the multi-level RetinaNet generator, YOLO anchors and k-means anchor selection.

* :class:`AnchorGenerator` reproduces keras-retinanet's ``anchors_for_shape`` exactly (values and
  order): per pyramid level, ``len(ratios) * len(scales)`` base anchors centred at 0, shifted to
  the cell centres ``(i + offset) * stride`` in row-major (y, x) order, anchor index fastest,
  levels concatenated. Anchors depend only on the (static) image shape, so they are computed once
  in float64 NumPy and handed to the graph as a float32 constant.
* :class:`YoloAnchors` holds YOLOv3's 9 ``[w, h]`` anchors and which 3 each output level uses.
* :func:`wh_iou`, :func:`kmeans_anchors` and :func:`mean_best_iou` implement the YOLOv2 k-means
  (distance ``1 - IoU`` of boxes sharing a corner) used to choose anchors for a data set.

Boxes are absolute-pixel ``xyxy``; ``image_shape`` is ``(height, width)`` and any extra trailing
entries (channels) are ignored.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "YOLO_COCO_ANCHORS",
    "YOLO_MASKS",
    "AnchorGenerator",
    "YoloAnchors",
    "kmeans_anchors",
    "mean_best_iou",
    "wh_iou",
]

#: The 9 YOLOv3 COCO anchors ``[w, h]`` in pixels of a 416x416 input, sorted by area.
YOLO_COCO_ANCHORS = np.array(
    [
        [10, 13],
        [16, 30],
        [33, 23],
        [30, 61],
        [62, 45],
        [59, 119],
        [116, 90],
        [156, 198],
        [373, 326],
    ],
    dtype=np.float32,
)

#: Anchor indices used by each YOLOv3 output, in output order (stride 32, 16, 8): large anchors
#: on the coarse level.
YOLO_MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))


def _static_hw(image_shape):
    """``(height, width)`` as Python ints from a tuple/list/array/TensorShape/eager tensor."""
    if isinstance(image_shape, tf.TensorShape):
        image_shape = image_shape.as_list()
    elif tf.is_tensor(image_shape):
        if not tf.executing_eagerly() or not hasattr(image_shape, "numpy"):
            raise ValueError(
                "Anchors need a static image shape (Python ints); got a symbolic tensor "
                f"{image_shape!r}. Pass the model's fixed input size instead."
            )
        image_shape = image_shape.numpy()
    values = list(np.asarray(image_shape).reshape(-1)) if image_shape is not None else []
    if len(values) < 2 or any(v is None for v in values[:2]):
        raise ValueError(
            f"`image_shape` must be (height, width[, channels]) with known sizes, got {image_shape!r}."
        )
    height, width = values[0], values[1]
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(
            f"`image_shape` must hold positive integer sizes (height, width), got {image_shape!r}."
        )
    return int(height), int(width)


def _positive_floats(values, name):
    values = tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"`{name}` must be a non-empty sequence of positive numbers, got {values}."
        )
    return values


@keras.saving.register_keras_serializable(package="dlnotes")
class AnchorGenerator:
    """Multi-level anchors of RetinaNet, identical to keras-retinanet's ``anchors_for_shape``.

    Per level ``l`` with size ``s`` and stride ``d``:

    * base anchors in ``generate_anchors`` order, ratio-major / scale-minor
      (``index = ratio_idx * len(scales) + scale_idx``): area ``(s * scale)^2``,
      ``w = sqrt(area / ratio)``, ``h = w * ratio`` (ratio = h / w), centred at 0;
    * feature-map shape ``ceil(H / d) x ceil(W / d)`` (keras-retinanet's ``guess_shapes``);
    * centres ``((j + offset) * d, (i + offset) * d)`` for row ``i``, column ``j``; anchors are
      ordered row-major over ``(i, j)`` then anchor index, which matches a head output
      ``[B, H_l, W_l, A, 4]`` reshaped to ``[B, H_l * W_l * A, 4]``.

    Levels are concatenated from the finest (P3) to the coarsest (P7).

    Args:
        sizes: base anchor size per level (pixels).
        strides: stride per level (pixels); same length as ``sizes``.
        ratios: aspect ratios ``h / w``.
        scales: size multipliers.
        offset: cell-centre offset in units of the stride (0.5 = cell centre).
    """

    def __init__(
        self,
        sizes=(32, 64, 128, 256, 512),
        strides=(8, 16, 32, 64, 128),
        ratios=(0.5, 1.0, 2.0),
        scales=(2**0, 2 ** (1 / 3), 2 ** (2 / 3)),
        offset=0.5,
    ):
        self.sizes = _positive_floats(sizes, "sizes")
        strides = _positive_floats(strides, "strides")
        if any(s != int(s) for s in strides):
            raise ValueError(f"`strides` must be integers, got {strides}.")
        self.strides = tuple(int(s) for s in strides)
        if len(self.sizes) != len(self.strides):
            raise ValueError(
                f"`sizes` ({len(self.sizes)} levels) and `strides` ({len(self.strides)} levels) "
                "must have the same length."
            )
        self.ratios = _positive_floats(ratios, "ratios")
        self.scales = _positive_floats(scales, "scales")
        self.offset = float(offset)

    @property
    def num_levels(self):
        """Number of pyramid levels."""
        return len(self.sizes)

    @property
    def num_anchors_per_location(self):
        """``A = len(ratios) * len(scales)`` anchors per feature-map cell."""
        return len(self.ratios) * len(self.scales)

    def level_shapes(self, image_shape):
        """Feature-map ``(H_l, W_l)`` per level: ``ceil(H / stride)``, ``ceil(W / stride)``."""
        height, width = _static_hw(image_shape)
        return [(-(-height // s), -(-width // s)) for s in self.strides]

    def level_sizes(self, image_shape):
        """Number of anchors per level, ``H_l * W_l * A``."""
        a = self.num_anchors_per_location
        return [h * w * a for h, w in self.level_shapes(image_shape)]

    def base_anchors(self, level_index):
        """``(A, 4)`` float64 xyxy anchors of level ``level_index`` centred at the origin."""
        if not 0 <= level_index < self.num_levels:
            raise ValueError(f"`level_index` must be in [0, {self.num_levels}), got {level_index}.")
        ratios = np.repeat(np.array(self.ratios), len(self.scales))  # ratio-major
        scales = np.tile(np.array(self.scales), len(self.ratios))  # scale-minor
        areas = (self.sizes[level_index] * scales) ** 2
        widths = np.sqrt(areas / ratios)
        heights = widths * ratios
        return np.stack([-widths / 2, -heights / 2, widths / 2, heights / 2], axis=-1)

    def _level_anchors_numpy(self, level_index, shape):
        """``(H_l * W_l * A, 4)`` float64 anchors of one level for a ``(H_l, W_l)`` map."""
        stride = self.strides[level_index]
        ys = (np.arange(shape[0]) + self.offset) * stride
        xs = (np.arange(shape[1]) + self.offset) * stride
        cx, cy = np.meshgrid(xs, ys)  # (H_l, W_l), row-major over (y, x)
        shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
        return (shifts + self.base_anchors(level_index)[None]).reshape(-1, 4)

    def anchors_per_level(self, image_shape):
        """List of float32 xyxy tensors ``(H_l * W_l * A, 4)``, one per level."""
        shapes = self.level_shapes(image_shape)
        return [
            tf.constant(self._level_anchors_numpy(i, shape), dtype=tf.float32)
            for i, shape in enumerate(shapes)
        ]

    def __call__(self, image_shape):
        """All anchors, float32 xyxy ``(N, 4)`` with ``N = sum(level_sizes(image_shape))``."""
        shapes = self.level_shapes(image_shape)
        anchors = np.concatenate(
            [self._level_anchors_numpy(i, shape) for i, shape in enumerate(shapes)], axis=0
        )
        return tf.constant(anchors, dtype=tf.float32)

    def get_config(self):
        """Constructor arguments as plain Python values."""
        return {
            "sizes": list(self.sizes),
            "strides": list(self.strides),
            "ratios": list(self.ratios),
            "scales": list(self.scales),
            "offset": self.offset,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"AnchorGenerator(sizes={self.sizes}, strides={self.strides}, ratios={self.ratios}, "
            f"scales={tuple(round(s, 4) for s in self.scales)}, offset={self.offset})"
        )


@keras.saving.register_keras_serializable(package="dlnotes")
class YoloAnchors:
    """YOLOv3 anchors: ``[w, h]`` priors and which of them each output level uses.

    Args:
        anchors: ``(K, 2)`` anchor sizes ``[w, h]`` in input pixels.
        masks: per output level, the indices into ``anchors`` it uses (output order).
        strides: stride of each output level, same order as ``masks`` (default 32, 16, 8).
    """

    def __init__(self, anchors=YOLO_COCO_ANCHORS, masks=YOLO_MASKS, strides=(32, 16, 8)):
        anchors = np.asarray(anchors, dtype=np.float32)
        if anchors.ndim != 2 or anchors.shape[1] != 2 or not np.all(anchors > 0):
            raise ValueError(
                f"`anchors` must be a (K, 2) array of positive [w, h], got shape {anchors.shape}."
            )
        masks = tuple(tuple(int(i) for i in m) for m in masks)
        strides = tuple(int(s) for s in strides)
        if len(masks) != len(strides):
            raise ValueError(
                f"`masks` ({len(masks)} levels) and `strides` ({len(strides)} levels) must match."
            )
        for m in masks:
            if not m or any(not 0 <= i < len(anchors) for i in m):
                raise ValueError(f"Mask {m} must index into the {len(anchors)} anchors.")
        if len({len(m) for m in masks}) != 1:
            raise ValueError(f"Every level must use the same number of anchors, got {masks}.")
        if any(s < 1 for s in strides):
            raise ValueError(f"`strides` must be positive, got {strides}.")
        self.anchors = anchors
        self.masks = masks
        self.strides = strides

    @property
    def num_levels(self):
        return len(self.masks)

    @property
    def num_anchors_per_location(self):
        """Anchors per cell on each level (3 for YOLOv3)."""
        return len(self.masks[0])

    def level_shapes(self, image_shape):
        """Output grid ``(H // stride, W // stride)`` per level; the sizes must be divisible."""
        height, width = _static_hw(image_shape)
        for s in self.strides:
            if height % s or width % s:
                raise ValueError(
                    f"YOLO input size {height}x{width} must be divisible by every stride "
                    f"{self.strides} (here {s})."
                )
        return [(height // s, width // s) for s in self.strides]

    def level_anchors(self, level):
        """``(A, 2)`` float32 ``[w, h]`` anchors of output level ``level``."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"`level` must be in [0, {self.num_levels}), got {level}.")
        return self.anchors[list(self.masks[level])]

    def boxes(self, image_shape):
        """Anchor boxes per level, float32 xyxy tensors ``(H_l, W_l, A, 4)``.

        Each anchor is centred at its cell centre ``((j + 0.5) * stride, (i + 0.5) * stride)``;
        useful for drawing and for shape-matching GT boxes to anchors.
        """
        out = []
        for level, (h, w) in enumerate(self.level_shapes(image_shape)):
            stride = self.strides[level]
            cx, cy = np.meshgrid((np.arange(w) + 0.5) * stride, (np.arange(h) + 0.5) * stride)
            centres = np.stack([cx, cy], axis=-1)[:, :, None, :]  # (H, W, 1, 2)
            half = self.level_anchors(level).astype(np.float64)[None, None] / 2  # (1, 1, A, 2)
            out.append(
                tf.constant(np.concatenate([centres - half, centres + half], -1), tf.float32)
            )
        return out

    def get_config(self):
        """Constructor arguments as plain Python values."""
        return {
            "anchors": self.anchors.tolist(),
            "masks": [list(m) for m in self.masks],
            "strides": list(self.strides),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"YoloAnchors(anchors={self.anchors.tolist()}, masks={self.masks}, strides={self.strides})"


def _as_wh(wh, name):
    wh = np.asarray(wh, dtype=np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"`{name}` must have shape (N, 2) of [w, h], got shape {wh.shape}.")
    return wh


def wh_iou(wh1, wh2):
    """IoU of boxes that share a corner, i.e. compared by shape only.

    Args:
        wh1: ``(N, 2)`` sizes ``[w, h]``.
        wh2: ``(K, 2)`` sizes ``[w, h]``.

    Returns:
        ``(N, K)`` float64 NumPy array, ``min(w) * min(h) / (w1 h1 + w2 h2 - min(w) * min(h))``;
        0 where both boxes are empty.
    """
    wh1, wh2 = _as_wh(wh1, "wh1"), _as_wh(wh2, "wh2")
    w1, h1 = wh1[:, None, 0], wh1[:, None, 1]
    w2, h2 = wh2[None, :, 0], wh2[None, :, 1]
    inter = np.minimum(w1, w2).clip(0) * np.minimum(h1, h2).clip(0)
    union = w1.clip(0) * h1.clip(0) + w2.clip(0) * h2.clip(0) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mean_best_iou(wh, anchors):
    """Average over boxes of the best :func:`wh_iou` to any anchor (the figure YOLOv2 quotes)."""
    return float(wh_iou(wh, anchors).max(axis=1).mean())


def kmeans_anchors(wh, k=9, seed=0, max_iter=300):
    """YOLOv2 k-means anchors with distance ``1 - wh_iou``.

    Initialisation is k-means++ (first centre uniform, then proportional to the squared distance
    to the nearest chosen centre) with ``np.random.default_rng(seed)``, so the result is
    deterministic for a given seed. The update takes the per-cluster **median** of ``w`` and
    ``h`` (robust to the long tail of box sizes). An empty cluster is re-seeded with the box
    farthest from its current centre. Iteration stops when assignments no longer change.

    Args:
        wh: ``(N, 2)`` positive box sizes ``[w, h]``, ``N >= k``.
        k: number of anchors.
        seed: random seed.
        max_iter: maximum number of assignment/update rounds.

    Returns:
        ``(k, 2)`` float64 anchors ``[w, h]`` sorted by area ascending.

    Raises:
        ValueError: wrong shape, fewer than ``k`` boxes, non-finite or non-positive sizes.
    """
    wh = _as_wh(wh, "wh")
    k = int(k)
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    if len(wh) < k:
        raise ValueError(f"k-means needs at least k={k} boxes, got {len(wh)}.")
    if not np.all(np.isfinite(wh)) or not np.all(wh > 0):
        bad = np.flatnonzero(~(np.isfinite(wh) & (wh > 0)).all(axis=1))
        raise ValueError(
            f"k-means needs finite, positive box sizes; {len(bad)} boxes are not "
            f"(first at index {bad[0]}: {wh[bad[0]].tolist()})."
        )
    rng = np.random.default_rng(seed)

    # k-means++ initialisation on the 1 - IoU distance.
    centres = [wh[rng.integers(len(wh))]]
    nearest = 1.0 - wh_iou(wh, centres[0][None])[:, 0]
    for _ in range(1, k):
        weights = nearest**2
        total = weights.sum()
        # All boxes coincide with a centre (duplicates): fall back to a uniform draw.
        probs = weights / total if total > 0 else None
        centres.append(wh[rng.choice(len(wh), p=probs)])
        nearest = np.minimum(nearest, 1.0 - wh_iou(wh, centres[-1][None])[:, 0])
    centres = np.array(centres)

    assign = None
    for _ in range(max_iter):
        dist = 1.0 - wh_iou(wh, centres)  # (N, k)
        new_assign = dist.argmin(axis=1)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        point_dist = dist[np.arange(len(wh)), assign]
        for j in range(k):
            members = assign == j
            if members.any():
                centres[j] = np.median(wh[members], axis=0)
            else:
                # Re-seed an empty cluster with the worst-fitting box, and take it out of the
                # running so two empty clusters do not grab the same box.
                far = int(point_dist.argmax())
                centres[j] = wh[far]
                point_dist[far] = -1.0
    order = np.argsort(centres[:, 0] * centres[:, 1], kind="stable")
    return centres[order]
