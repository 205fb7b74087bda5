"""Geometric transforms of an image together with its boxes and keypoints (TensorFlow graph ops).

Every function is made of TensorFlow ops only, so it runs inside ``tf.data`` ``map`` functions and
``tf.function`` (no Python loops over boxes or images).

Conventions shared by all functions
-----------------------------------
* ``image``: ``(H, W, C)`` or a batch ``(B, H, W, C)``, any real dtype. Geometric resampling
  (:func:`resize`, :func:`letterbox`) returns float32; :func:`horizontal_flip` keeps the dtype.
* ``boxes``: absolute-pixel ``xyxy`` float32, ``(N, 4)`` or ``(B, N, 4)``. Pixel coordinates are
  continuous: pixel column ``j`` covers ``[j, j+1)``, so the image spans ``[0, W] x [0, H]``
  and a horizontal flip maps ``x -> W - x``.
* ``keypoints``: ``(N, K, 3)`` or ``(B, N, K, 3)`` rows ``(x, y, visibility)``, or ``None``.
* Padding: padded box rows are ``-1`` in all four coordinates (labels ``-1`` in the targets);
  the transforms cannot see the labels, so **a box row is padding when all four coordinates are
  -1** (:func:`valid_box_mask`). A keypoint is moved only when its visibility is ``> 0``:
  unlabelled keypoints ``(0, 0, 0)`` and padded keypoints ``(-1, -1, -1)`` stay as they are.
* Return values: every transform returns ``(image, boxes, keypoints, ...)`` with ``keypoints``
  ``None`` when none were given. Resizing transforms also return ``scale`` and ``offset``, float32
  ``(2,)`` in ``(x, y)`` order, with ``new = old * scale + offset``; :func:`undo_letterbox` inverts
  that map.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

__all__ = [
    "valid_box_mask",
    "resize",
    "letterbox",
    "horizontal_flip",
    "random_horizontal_flip",
    "undo_letterbox",
    "undo_letterbox_keypoints",
    "keypoint_flip_pairs",
    "flip_and_resize",
    "seeded_batches",
]


def valid_box_mask(boxes: tf.Tensor) -> tf.Tensor:
    """``True`` for real boxes, ``False`` for padding rows (all four coordinates == -1).

    Args:
        boxes: ``(..., N, 4)``.
    Returns:
        bool ``(..., N)``.
    """
    boxes = tf.convert_to_tensor(boxes)
    return tf.logical_not(tf.reduce_all(tf.equal(boxes, tf.cast(-1, boxes.dtype)), axis=-1))


def _target_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` (int or ``(height, width)``) -> ``(height, width)`` Python ints."""
    if isinstance(size, int):
        height = width = size
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return height, width


def _check_image(image: tf.Tensor) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.shape.rank not in (3, 4):
        raise ValueError(f"image must be (H, W, C) or (B, H, W, C), got shape {image.shape}")
    return image


def _affine_boxes(boxes: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """``boxes * scale + offset`` on real rows; padding rows unchanged. scale/offset ``(2,)``."""
    boxes = tf.cast(boxes, tf.float32)
    scale4 = tf.tile(scale, [2])
    offset4 = tf.tile(offset, [2])
    moved = boxes * scale4 + offset4
    return tf.where(valid_box_mask(boxes)[..., None], moved, boxes)


def _affine_keypoints(keypoints: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """``xy * scale + offset`` where visibility > 0; other keypoints unchanged."""
    keypoints = tf.cast(keypoints, tf.float32)
    xy = keypoints[..., :2] * scale + offset
    moved = tf.concat([xy, keypoints[..., 2:]], axis=-1)
    return tf.where(keypoints[..., 2:] > 0, moved, keypoints)


def resize(
    image: tf.Tensor,
    boxes: tf.Tensor,
    size: int | Sequence[int],
    keypoints: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None, tf.Tensor, tf.Tensor]:
    """Stretch the image to ``size`` (aspect ratio not kept), moving boxes and keypoints.

    Args:
        image: ``(H, W, C)`` or ``(B, H, W, C)``.
        boxes: ``(N, 4)`` or ``(B, N, 4)`` xyxy pixels; padding rows (-1) are left alone.
        size: ``S`` or ``(height, width)`` of the output.
        keypoints: optional ``(N, K, 3)`` or ``(B, N, K, 3)``.

    Returns:
        ``(image, boxes, keypoints, scale, offset)``: float32 image ``(..., height, width, C)``
        (bilinear), boxes / keypoints in the new pixel frame, ``scale = (width / W, height / H)``
        and ``offset = (0, 0)``, both float32 ``(2,)``.
    """
    image = _check_image(image)
    height, width = _target_size(size)
    shape = tf.shape(image)
    in_hw = tf.cast(shape[-3:-1], tf.float32)
    scale = tf.stack([width / in_hw[1], height / in_hw[0]])
    offset = tf.zeros([2], tf.float32)
    out = tf.image.resize(tf.cast(image, tf.float32), [height, width], method="bilinear")
    boxes = _affine_boxes(boxes, scale, offset)
    if keypoints is not None:
        keypoints = _affine_keypoints(keypoints, scale, offset)
    return out, boxes, keypoints, scale, offset


def letterbox(
    image: tf.Tensor,
    boxes: tf.Tensor,
    size: int | Sequence[int],
    keypoints: tf.Tensor | None = None,
    pad_value: float = 114.0,
    align: str = "top_left",
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None, tf.Tensor, tf.Tensor]:
    """Resize keeping the aspect ratio, then pad to ``size`` with ``pad_value``.

    The image is scaled by ``s = min(height / H, width / W)`` to ``round(H*s) x round(W*s)``
    (bilinear) and placed in the output canvas. With ``align="top_left"`` (the default) the
    padding is on the bottom and right, so ``offset = (0, 0)`` and un-doing the letterbox is a
    division; ``align="center"`` centres the image (``offset`` = half the padding, floored).
    The per-axis scales are the exact ratios of the rounded sizes, so boxes follow the pixels.

    Args:
        image: ``(H, W, C)`` or ``(B, H, W, C)``.
        boxes: ``(N, 4)`` or ``(B, N, 4)`` xyxy pixels; padding rows (-1) are left alone.
        size: ``S`` or ``(height, width)`` of the output.
        keypoints: optional ``(N, K, 3)`` or ``(B, N, K, 3)``.
        pad_value: value of the padded pixels (114 is the usual grey of YOLO letterboxing).
        align: ``"top_left"`` or ``"center"``.

    Returns:
        ``(image, boxes, keypoints, scale, offset)``: float32 image ``(..., height, width, C)``;
        boxes / keypoints in the output frame; ``scale`` ``(sx, sy)`` and ``offset`` ``(ox, oy)``,
        float32 ``(2,)``, with ``output_xy = input_xy * scale + offset``.
    """
    if align not in ("top_left", "center"):
        raise ValueError(f'align must be "top_left" or "center", got {align!r}')
    image = _check_image(image)
    height, width = _target_size(size)
    shape = tf.shape(image)
    in_h = tf.cast(shape[-3], tf.float32)
    in_w = tf.cast(shape[-2], tf.float32)
    ratio = tf.minimum(height / in_h, width / in_w)
    new_h = tf.clip_by_value(tf.cast(tf.round(in_h * ratio), tf.int32), 1, height)
    new_w = tf.clip_by_value(tf.cast(tf.round(in_w * ratio), tf.int32), 1, width)
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]))
    if align == "center":
        off_y, off_x = (height - new_h) // 2, (width - new_w) // 2
    else:
        off_y, off_x = tf.constant(0), tf.constant(0)
    # pad_to_bounding_box pads with zeros: shift so that the zeros become pad_value
    pad = tf.constant(pad_value, tf.float32)
    out = tf.image.pad_to_bounding_box(resized - pad, off_y, off_x, height, width) + pad
    scale = tf.stack([tf.cast(new_w, tf.float32) / in_w, tf.cast(new_h, tf.float32) / in_h])
    offset = tf.cast(tf.stack([off_x, off_y]), tf.float32)
    boxes = _affine_boxes(boxes, scale, offset)
    if keypoints is not None:
        keypoints = _affine_keypoints(keypoints, scale, offset)
    return out, boxes, keypoints, scale, offset


def _flip_permutation(num_keypoints: int, flip_pairs: Sequence[Sequence[int]]) -> list[int]:
    perm = list(range(num_keypoints))
    for pair in flip_pairs:
        i, j = (int(v) for v in pair)
        if not (0 <= i < num_keypoints and 0 <= j < num_keypoints):
            raise ValueError(
                f"flip pair {tuple(pair)} is out of range for {num_keypoints} keypoints"
            )
        perm[i], perm[j] = j, i
    return perm


def horizontal_flip(
    image: tf.Tensor,
    boxes: tf.Tensor,
    keypoints: tf.Tensor | None = None,
    flip_pairs: Sequence[Sequence[int]] | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
    """Mirror the image left-right and move boxes and keypoints with it.

    Boxes: ``(x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2)``. Keypoints with visibility > 0:
    ``x -> W - x``; then the keypoint *identities* in ``flip_pairs`` swap (what was the left
    extreme of a shape is its right extreme after the flip), for every row including unlabelled
    ones. Flipping twice is the identity.

    Args:
        image: ``(H, W, C)`` or ``(B, H, W, C)``; the dtype is kept.
        boxes: ``(N, 4)`` or ``(B, N, 4)`` xyxy; padding rows (-1) are left alone.
        keypoints: optional ``(N, K, 3)`` or ``(B, N, K, 3)``.
        flip_pairs: 0-based index pairs ``(i, j)`` of keypoints to swap, e.g.
            :data:`dlnotes.data.shapes.KEYPOINT_FLIP_PAIRS` or :func:`keypoint_flip_pairs`.

    Returns:
        ``(image, boxes, keypoints)``, keypoints ``None`` if none were given.
    """
    image = _check_image(image)
    width = tf.cast(tf.shape(image)[-2], tf.float32)
    flipped_image = tf.reverse(image, axis=[-2])
    boxes = tf.cast(boxes, tf.float32)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    mirrored = tf.stack([width - x2, y1, width - x1, y2], axis=-1)
    boxes = tf.where(valid_box_mask(boxes)[..., None], mirrored, boxes)
    if keypoints is not None:
        keypoints = tf.cast(keypoints, tf.float32)
        x = tf.where(keypoints[..., 2] > 0, width - keypoints[..., 0], keypoints[..., 0])
        keypoints = tf.concat([x[..., None], keypoints[..., 1:]], axis=-1)
        if flip_pairs:
            num_keypoints = keypoints.shape[-2]
            if num_keypoints is None:
                raise ValueError("flip_pairs needs a static number of keypoints (K)")
            perm = _flip_permutation(num_keypoints, flip_pairs)
            keypoints = tf.gather(keypoints, perm, axis=-2)
    return flipped_image, boxes, keypoints


def random_horizontal_flip(
    image: tf.Tensor,
    boxes: tf.Tensor,
    keypoints: tf.Tensor | None = None,
    flip_pairs: Sequence[Sequence[int]] | None = None,
    *,
    seed: tf.Tensor | Sequence[int],
    probability: float = 0.5,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """:func:`horizontal_flip` with probability ``probability``, decided by a stateless RNG.

    The decision is a pure function of ``seed`` (shape ``(2,)`` integer, as for
    ``tf.random.stateless_uniform``), so a ``tf.data`` pipeline that derives the seed from
    ``(global seed, element index)`` is deterministic however its map is parallelised.
    For a batched image the whole batch flips together.

    Returns:
        ``(image, boxes, keypoints, flipped)``, ``flipped`` a scalar bool tensor.
    """
    image = _check_image(image)
    boxes = tf.cast(boxes, tf.float32)
    flipped = tf.random.stateless_uniform([], seed=seed) < probability
    if keypoints is None:
        out_image, out_boxes = tf.cond(
            flipped,
            lambda: horizontal_flip(image, boxes)[:2],
            lambda: (image, boxes),
        )
        return out_image, out_boxes, None, flipped
    keypoints = tf.cast(keypoints, tf.float32)
    out_image, out_boxes, out_keypoints = tf.cond(
        flipped,
        lambda: horizontal_flip(image, boxes, keypoints, flip_pairs),
        lambda: (image, boxes, keypoints),
    )
    return out_image, out_boxes, out_keypoints, flipped


def _per_box(values: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
    """Broadcast ``(2,)`` or ``(B, 2)`` xy values to ``boxes (..., N, 4)`` as ``(.., 4)``."""
    values4 = tf.tile(tf.cast(values, tf.float32), [1] * (values.shape.rank - 1) + [2])
    if values.shape.rank == 2:
        values4 = values4[:, None, :]
    return values4


def undo_letterbox(
    boxes: tf.Tensor,
    scale: tf.Tensor,
    offset: tf.Tensor,
    original_size: tf.Tensor | None = None,
) -> tf.Tensor:
    """Map boxes from the letterboxed / resized frame back to original image pixels.

    ``original = (boxes - offset) / scale``, the inverse of :func:`letterbox` and :func:`resize`.

    Args:
        boxes: ``(N, 4)`` with ``scale``/``offset`` ``(2,)``, or ``(B, N, 4)`` with ``(2,)`` or
            ``(B, 2)`` (e.g. the ``meta`` of :meth:`CocoDataset.to_tf_dataset`); padding rows
            (all -1) are returned unchanged.
        scale, offset: ``(x, y)`` as returned by :func:`letterbox`.
        original_size: optional ``(height, width)``, ``(2,)`` or ``(B, 2)``; boxes are then
            clipped to ``[0, width] x [0, height]`` (predictions may spill into the padding).

    Returns:
        float32 boxes of the input's shape, xyxy in original pixels.
    """
    boxes = tf.cast(boxes, tf.float32)
    scale = tf.convert_to_tensor(scale, tf.float32)
    offset = tf.convert_to_tensor(offset, tf.float32)
    original = (boxes - _per_box(offset, boxes)) / _per_box(scale, boxes)
    if original_size is not None:
        size = tf.cast(tf.convert_to_tensor(original_size), tf.float32)
        upper = _per_box(tf.reverse(size, axis=[-1]), boxes)  # (w, h, w, h)
        original = tf.clip_by_value(original, 0.0, upper)
    return tf.where(valid_box_mask(boxes)[..., None], original, boxes)


def undo_letterbox_keypoints(
    keypoints: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor
) -> tf.Tensor:
    """Keypoints ``(N, K, 3)`` / ``(B, N, K, 3)`` back to original pixels (visibility > 0 only).

    ``scale`` and ``offset`` are ``(2,)``, or ``(B, 2)`` for batched keypoints.
    """
    keypoints = tf.cast(keypoints, tf.float32)
    scale = tf.convert_to_tensor(scale, tf.float32)
    offset = tf.convert_to_tensor(offset, tf.float32)
    if scale.shape.rank == 2:  # (B, 2) -> (B, 1, 1, 2) against (B, N, K, 2)
        scale, offset = scale[:, None, None, :], offset[:, None, None, :]
    xy = (keypoints[..., :2] - offset) / scale
    moved = tf.concat([xy, keypoints[..., 2:]], axis=-1)
    return tf.where(keypoints[..., 2:] > 0, moved, keypoints)


def keypoint_flip_pairs(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Index pairs of keypoints whose names differ only by "left" <-> "right".

    ``("center", "top", "right", "bottom", "left") -> ((4, 2),)``; COCO person keypoints give
    ``((1, 2), (3, 4), ...)`` for ``left_eye``/``right_eye`` and so on.
    """
    lowered = [name.lower() for name in names]
    pairs = []
    for i, name in enumerate(lowered):
        if "left" in name:
            partner = name.replace("left", "right")
            if partner in lowered:
                pairs.append((i, lowered.index(partner)))
    return tuple(pairs)


def flip_and_resize(
    image: tf.Tensor,
    boxes: tf.Tensor,
    keypoints: tf.Tensor | None,
    random_value: tf.Tensor,
    *,
    seed: int,
    horizontal_flip: bool,
    size: tuple[int, int] | None,
    resize_mode: str = "letterbox",
    flip_pairs: Sequence[Sequence[int]] | None = None,
):
    """One training example's augmentation: a seeded random flip, then the resize to ``size``.

    The flip (probability 1/2) is decided by the stateless RNG seeded with ``(seed,
    random_value)``, ``random_value`` being the example's draw from :func:`seeded_batches`'
    stream; ``size`` ``(height, width)`` is reached by :func:`letterbox` or :func:`resize`
    (``resize_mode``), or ``None`` keeps the image as it is.

    Returns:
        ``(image float32 (H, W, 3), boxes (M, 4) xyxy, keypoints or None, scale (2,), offset (2,),
        flipped ())`` with ``output = original * scale + offset`` in ``(x, y)`` order.
    """
    flipped = tf.constant(False)
    if horizontal_flip:
        pair = tf.stack([tf.constant(seed, tf.int64), random_value])
        image, boxes, keypoints, flipped = random_horizontal_flip(
            image, boxes, keypoints, flip_pairs, seed=pair
        )
    if size is None:
        image = tf.cast(image, tf.float32)
        scale, offset = tf.ones([2], tf.float32), tf.zeros([2], tf.float32)
    else:
        resize_fn = letterbox if resize_mode == "letterbox" else resize
        image, boxes, keypoints, scale, offset = resize_fn(image, boxes, size, keypoints)
        image = tf.ensure_shape(image, [*size, 3])
    return image, boxes, keypoints, scale, offset, flipped


def seeded_batches(
    elements: tf.data.Dataset, load, seed: int, batch_size: int, drop_remainder: bool
) -> tf.data.Dataset:
    """``elements`` (already shuffled / repeated) mapped by ``load(random_value, element)`` and
    batched, with one random int64 per element from a stream seeded by ``seed`` and redrawn
    every epoch: the random flips of :func:`flip_and_resize` are deterministic given ``seed``,
    differ between epochs, and do not depend on how the parallel map is scheduled."""
    randomness = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(randomness, elements)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
