"""Region-of-interest pooling for two-stage detectors: RoIPool, RoIAlign and FPN's multi-level
RoIAlign, with torchvision's semantics, vectorised over all RoIs of a batch.

* :func:`roi_pool` — Fast/Faster R-CNN's max pooling of each RoI to a fixed grid, exactly
  ``torchvision.ops.roi_pool`` (corners rounded half away from zero, bin edges floor/ceil,
  empty bin -> 0, the gradient of a bin to its maximum);
* :func:`roi_align` — Mask R-CNN's bilinear RoIAlign, exactly ``torchvision.ops.roi_align``
  (``aligned`` half-pixel offset, fixed or adaptive sampling grid, torchvision's border rules);
* :func:`multiscale_roi_align` and :func:`fpn_level_for_boxes` — torchvision's
  ``MultiScaleRoIAlign``: each RoI pooled from its FPN level, all levels in one pass;
* :func:`batched_boxes_to_indices` / :func:`flat_to_batched` — padded ``(B, R, 4)`` boxes to
  the flat ``(B*R, 4)`` + ``box_indices`` form and the pooled result back. Every pooling function
  also takes ``(B, R, 4)`` boxes directly when ``box_indices`` is None.

Conventions: features are NHWC ``(B, H, W, C)``; boxes are absolute ``xyxy`` in *image* pixels,
mapped onto the feature map by ``spatial_scale`` (1/16 for a stride-16 map); ``box_indices``
``(K,)`` int32 says which image of the batch each box belongs to (``tf.image.crop_and_resize``'s
signature). The outputs are ``(K, ph, pw, C)``. Coordinates are computed in float64 for float64
features and in float32 otherwise, as torchvision computes them in the features' type; the boxes
receive no gradient (as in torchvision; Faster R-CNN treats proposals as constants).

How it is vectorised (no loop over boxes, static output shapes):

* RoIPool uses a 2-D *sparse table* (range-maximum structure): the maxima over every
  ``2^a x 2^b`` window that fits in the feature map, built by doubling with shifted
  ``tf.maximum``; the maximum of any bin is then the maximum of 4 overlapping windows, i.e.
  4 row gathers per output cell, whatever the bin size. The table holds ``sum_a (H - 2^a + 1) *
  sum_b (W - 2^b + 1)`` cells per image: 22.9 times a 38 x 63 map (112 MB at 512 channels), a
  cost per image, not per RoI. The backward pass builds the same table with the position of
  each window's first maximum, which gives torchvision's argmax (ties included).
* RoIAlign computes, per RoI and output row / column, the sample positions and their two
  bilinear corners with torchvision's weights (bilinear interpolation is separable, and so are
  its border rules), then sums ``E = (2 * grid_h) * (2 * grid_w)`` weighted row gathers per output
  cell (16 with ``sampling_ratio=2``). The adaptive grid ``ceil(roi / output)`` differs per RoI:
  it is evaluated with a static upper bound and a mask (see :func:`roi_align`).
* The gathers are compiled with XLA by default (``jit_compile=True``): XLA fuses them and the
  weighted sums into one loop over the output, so no ``(K, ph, pw, E, C)`` intermediate exists.
  TensorFlow's graph executor materialises each gather (about 10x slower for 2000 RoIs on a
  38 x 63 x 512 map, and several GB for RoIAlign's gradient, whose E gathered slices TensorFlow
  concatenates: here it is a loop of scatter-adds). The per-RoI geometry (bin edges, sample
  positions, weights; a few numbers per RoI) and RoIPool's sparse table are computed with
  TensorFlow's kernels outside the compiled part. The functions work eagerly, inside
  ``tf.function`` and inside ``tf.function(jit_compile=True)`` (then XLA compiles all of it);
  ``jit_compile=False`` runs the same ops without XLA (for devices without XLA support).
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from dlnotes.checks import integer, positive_int

__all__ = [
    "batched_boxes_to_indices",
    "flat_to_batched",
    "fpn_level_for_boxes",
    "multiscale_roi_align",
    "roi_align",
    "roi_pool",
]

# Weighted gathers of one RoIAlign output cell are unrolled up to this many terms (fastest under
# XLA); beyond it (adaptive grids on large feature maps) they run in a tf.while_loop.
_MAX_UNROLL = 64
# Rounded RoI corners of roi_pool are clamped to +-2^24 feature cells before the int32 cast, so
# absurd coordinates cannot overflow (every float32 integer above 2^24 is out of the map anyway).
_COORD_LIMIT = float(2**24)
# The public functions have no tensor-dependent Python control flow: inside a caller's
# tf.function, AutoGraph leaves them (and the custom gradients in them) as they are.
_no_autograph = tf.autograph.experimental.do_not_convert


# ----------------------------------------------------------------------------- argument checks
def _pair(value, what, owner):
    """``value`` (an int or a pair of ints) as a pair of positive ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(
                f"{owner}: {what} must be a positive integer or a pair (height, width), "
                f"got {value!r}."
            )
        return positive_int(value[0], what, owner), positive_int(value[1], what, owner)
    value = positive_int(value, what, owner)
    return value, value


def _check_scale(spatial_scale, owner, what="spatial_scale"):
    try:
        scale = float(spatial_scale)
    except (TypeError, ValueError):
        scale = float("nan")
    if isinstance(spatial_scale, bool) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{owner}: {what} must be a positive number, got {spatial_scale!r}.")
    return scale


def _features(features, owner, name="features"):
    """Float tensor of rank 4 (NHWC); ValueError naming the tensor and its shape otherwise."""
    features = tf.convert_to_tensor(features, name=name)
    if not features.dtype.is_floating:
        features = tf.cast(features, tf.float32)
    if features.shape.rank != 4:
        raise ValueError(
            f"{owner}: `{name}` must have shape (B, H, W, C) (NHWC), got shape {features.shape}."
        )
    return features


def _coord_dtype(features):
    """Coordinates in float64 for float64 features, float32 otherwise (torchvision's ``T``)."""
    return tf.float64 if features.dtype == tf.float64 else tf.float32


def _boxes_and_indices(boxes, box_indices, dtype, owner):
    """Checked ``(K, 4)`` boxes in ``dtype`` and ``(K,)`` int32 indices, plus the batch size
    when ``box_indices`` was None and ``boxes`` was ``(B, R, 4)`` (else None)."""
    boxes = tf.convert_to_tensor(boxes, name="boxes")
    shape = boxes.shape
    if box_indices is None:
        if shape.rank != 3 or shape[-1] not in (None, 4):
            raise ValueError(
                f"{owner}: without `box_indices`, `boxes` must have shape (B, R, 4) (padded "
                f"boxes per image), got shape {shape}; give `box_indices` (K,) with boxes (K, 4)."
            )
        batch = shape[0] if shape[0] is not None else tf.shape(boxes)[0]
        boxes, box_indices = batched_boxes_to_indices(boxes)
        return tf.cast(boxes, dtype), box_indices, batch
    if shape.rank != 2 or shape[-1] not in (None, 4):
        raise ValueError(f"{owner}: `boxes` must have shape (K, 4) (xyxy), got shape {shape}.")
    box_indices = tf.convert_to_tensor(box_indices, name="box_indices")
    if box_indices.shape.rank != 1:
        raise ValueError(
            f"{owner}: `box_indices` must have shape (K,), got shape {box_indices.shape}."
        )
    k_boxes, k_indices = shape[0], box_indices.shape[0]
    if k_boxes is not None and k_indices is not None and k_boxes != k_indices:
        raise ValueError(
            f"{owner}: `box_indices` must have one entry per box: boxes have shape {shape} "
            f"(K={k_boxes}) but box_indices has shape {box_indices.shape}."
        )
    if box_indices.dtype.is_floating:
        raise ValueError(
            f"{owner}: `box_indices` must be integers (image index of each box), "
            f"got dtype {box_indices.dtype.name}."
        )
    return tf.cast(boxes, dtype), tf.cast(box_indices, tf.int32), None


def _static_hw(features, owner, why):
    height, width = features.shape[1], features.shape[2]
    if height is None or width is None:
        raise ValueError(
            f"{owner}: {why} needs a static feature-map height and width, got `features` of "
            f"shape {features.shape}."
        )
    if height < 1 or width < 1:
        raise ValueError(f"{owner}: empty feature map, `features` has shape {features.shape}.")
    return int(height), int(width)


def _finish(pooled, boxes, output_size, features, batch):
    """The static shape ``(K, ph, pw, C)`` (lost in the compiled call), then ``(B, R, ...)``
    when the boxes came batched (``batch`` not None)."""
    if not tf.executing_eagerly():
        pooled.set_shape([boxes.shape[0], *output_size, features.shape[-1]])
    return pooled if batch is None else flat_to_batched(pooled, batch)


# ----------------------------------------------------------------------------- batched boxes
@_no_autograph
def batched_boxes_to_indices(boxes):
    """Padded per-image boxes ``(B, R, 4)`` -> flat boxes ``(B*R, 4)`` and ``box_indices``.

    Args:
        boxes: ``(B, R, 4)`` boxes, ``R`` per image (padding rows included: they are pooled like
            any box and are for the caller to mask).

    Returns:
        ``(flat_boxes, box_indices)``: ``(B*R, 4)`` boxes (same dtype) in image-major order and
        ``(B*R,)`` int32 image indices ``[0]*R + [1]*R + ...``. :func:`flat_to_batched`
        reshapes a pooled ``(B*R, ...)`` result back to ``(B, R, ...)``.
    """
    boxes = tf.convert_to_tensor(boxes, name="boxes")
    if boxes.shape.rank != 3 or boxes.shape[-1] not in (None, 4):
        raise ValueError(f"`boxes` must have shape (B, R, 4), got shape {boxes.shape}.")
    shape = tf.shape(boxes)
    indices = tf.repeat(tf.range(shape[0], dtype=tf.int32), shape[1])
    return tf.reshape(boxes, [-1, 4]), indices


@_no_autograph
def flat_to_batched(values, batch_size):
    """``(B*R, ...)`` -> ``(B, R, ...)``, the inverse of :func:`batched_boxes_to_indices`."""
    values = tf.convert_to_tensor(values)
    if values.shape.rank is None or values.shape.rank < 1:
        raise ValueError(f"`values` must have shape (B*R, ...), got shape {values.shape}.")
    shape = tf.shape(values)
    new_shape = tf.concat([[batch_size, shape[0] // batch_size], shape[1:]], 0)
    out = tf.reshape(values, new_shape)
    if isinstance(batch_size, int) and values.shape[0] is not None:
        out.set_shape([batch_size, values.shape[0] // batch_size] + values.shape[1:].as_list())
    return out


# ----------------------------------------------------------------------------- shared helpers
def _div(x, n):
    """``x / n`` rounded as IEEE division even when XLA compiles it.

    The geometry runs outside dlnotes' own XLA clusters, but a caller may compile everything
    (``tf.function(jit_compile=True)``), and XLA's CPU compiler replaces a division by a constant
    with a multiplication by its reciprocal, which is not correctly rounded: ``7 * (10 / 7)`` can
    become ``10.000001`` and move a RoIPool bin edge by one cell. In float32 the quotient is taken
    in float64 and rounded once to float32: that is the correctly rounded float32 quotient
    whatever the float64 rounding (the quotient of a float32 by an integer below 2^26 is never
    within 2^-52 relative of a float32 rounding boundary). float64 divides in float64: exact
    unless the caller compiles it with XLA (then within one unit in the last place).
    """
    if x.dtype == tf.float32:
        return tf.cast(tf.cast(x, tf.float64) / tf.cast(n, tf.float64), tf.float32)
    return x / tf.cast(n, x.dtype)


def _jit(cache, impl, **static):
    """One ``tf.function(jit_compile=True)`` per static configuration (shapes generalise)."""
    key = (impl.__name__,) + tuple(sorted(static.items()))
    if key not in cache:
        # A partial per configuration: TensorFlow counts retracing per Python code object, so
        # configurations do not trigger each other's "excessive retracing" warnings.
        fn = functools.partial(impl, **static)
        cache[key] = tf.function(fn, jit_compile=True, reduce_retracing=True, autograph=False)
    return cache[key]


_JIT_CACHE = {}


# ----------------------------------------------------------------------------- RoIPool
def _round_half_away(v):
    """C's ``round``: half away from zero (``tf.round`` rounds half to even); exact in float."""
    a = tf.minimum(tf.abs(v), _COORD_LIMIT)
    r = tf.floor(a)
    r = r + tf.cast(a - r >= 0.5, v.dtype)  # a - floor(a) is exact
    return tf.cast(tf.where(v < 0, -r, r), tf.int32)


def _pool_bins(lo, hi, scale, n, size):
    """torchvision's integer bin edges along one axis: ``(K, n)`` first and last (exclusive)
    cells, clamped to ``[0, size]``."""
    lo = tf.where(tf.math.is_nan(lo), tf.zeros_like(lo), lo)
    hi = tf.where(tf.math.is_nan(hi), tf.zeros_like(hi), hi)
    start = _round_half_away(lo * scale)  # roi_start_w = round(x1 * spatial_scale)
    end = _round_half_away(hi * scale)
    length = tf.maximum(end - start + 1, 1)  # malformed RoIs are forced to 1x1
    bin_size = _div(tf.cast(length, lo.dtype), n)  # (T) roi_width / (T) pooled_width
    i = tf.range(n, dtype=lo.dtype)[None, :]
    first = tf.cast(tf.floor(i * bin_size[:, None]), tf.int32) + start[:, None]
    last = tf.cast(tf.math.ceil((i + 1) * bin_size[:, None]), tf.int32) + start[:, None]
    return tf.clip_by_value(first, 0, size), tf.clip_by_value(last, 0, size)


def _windows(first, last):
    """Sparse-table level ``floor(log2(last - first))`` and the starts of the two windows of
    that size covering ``[first, last)``; empty ranges become ``[0, 1)`` (masked later)."""
    empty = last <= first
    first = tf.where(empty, 0, first)
    length = tf.where(empty, 1, last - first)
    # floor(log2(n)) exactly, for 1 <= n < 2^24: the float32 exponent of n.
    level = tf.bitwise.right_shift(tf.bitcast(tf.cast(length, tf.float32), tf.int32), 23) - 127
    return level, first, first + length - tf.bitwise.left_shift(1, level), empty


def _table_layout(height, width):
    """Cells per image of each sparse-table plane ``(a, b)`` (only the windows that fit:
    ``(H - 2^a + 1) x (W - 2^b + 1)``) and where each plane starts, a-major: Python lists."""
    rows = [height - 2**a + 1 for a in range(height.bit_length())]
    cols = [width - 2**b + 1 for b in range(width.bit_length())]
    sizes = [r * c for r in rows for c in cols]
    return rows, cols, [sum(sizes[:i]) for i in range(len(sizes))]


def _pool_geometry(boxes, box_indices, batch, height, width, output_size, spatial_scale):
    """Flat table rows of the 4 windows of every bin, ``(K, ph, pw)`` int32 each, and the
    ``(K, ph, pw)`` empty-bin mask."""
    ph, pw = output_size
    rows, cols, starts = _table_layout(height, width)
    scale = tf.constant(spatial_scale, boxes.dtype)
    x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
    level_h, r0, r1, empty_h = _windows(*_pool_bins(y1, y2, scale, ph, height))  # (K, ph)
    level_w, c0, c1, empty_w = _windows(*_pool_bins(x1, x2, scale, pw, width))  # (K, pw)
    plane = level_h[:, :, None] * len(cols) + level_w[:, None, :]  # (K, ph, pw)
    plane_rows = tf.gather(tf.constant(rows), level_h)[:, :, None]
    plane_cols = tf.gather(tf.constant(cols), level_w)[:, None, :]
    start = batch * tf.gather(tf.constant(starts), plane)
    image = start + box_indices[:, None, None] * plane_rows * plane_cols
    row_starts = [image + r[:, :, None] * plane_cols for r in (r0, r1)]
    index = tuple(row + c[:, None, :] for row in row_starts for c in (c0, c1))  # 00 01 10 11
    empty = tf.logical_or(empty_h[:, :, None], empty_w[:, None, :])
    return index, empty


def _sparse_table(planes, height, width, combine):
    """2-D sparse table of per-element ``planes`` (a tuple of ``(B, H, W, C)`` tensors combined
    by ``combine(first, second, axis)``, ``second`` lying below (axis 1) or right of (axis 2)
    ``first``).

    Plane ``(a, b)`` holds, for every window of ``2^a`` rows and ``2^b`` columns that fits in
    the map, the combination over the window: ``(B, H - 2^a + 1, W - 2^b + 1, C)``, built from
    plane ``(a, b - 1)`` (or ``(a - 1, b)``) as ``combine(window, window shifted by half its
    size)``. All planes are flattened and concatenated a-major (layout: :func:`_table_layout`),
    ``(cells, C)`` for each of ``planes``.
    """

    def step(p, s, axis):
        if axis == 1:
            return combine([x[:, :-s] for x in p], [x[:, s:] for x in p], axis)
        return combine([x[:, :, :-s] for x in p], [x[:, :, s:] for x in p], axis)

    by_width = [tuple(planes)]
    for b in range(width.bit_length() - 1):
        by_width.append(step(by_width[-1], 2**b, 2))
    grid = [by_width]  # grid[a][b]
    for a in range(height.bit_length() - 1):
        grid.append([step(p, 2**a, 1) for p in grid[-1]])
    channels = tf.shape(planes[0])[-1]
    return tuple(
        tf.concat([tf.reshape(p[i], [-1, channels]) for row in grid for p in row], 0)
        for i in range(len(planes))
    )


def _max_values(a, b, axis):
    return (tf.maximum(a[0], b[0]),)


def _max_positions(a, b, axis):
    """Maximum and the flat position of its first occurrence in row-major order.

    Below (axis 1) every position of ``b`` comes after every position of ``a``: a tie keeps
    ``a``'s. Right of it (axis 2, same rows) ``b``'s first maximum can sit on an earlier row.
    """
    (va, pa), (vb, pb) = a, b
    take_b = vb > va
    if axis == 2:
        take_b = take_b | ((vb == va) & (pb < pa))
    return tf.maximum(va, vb), tf.where(take_b, pb, pa)


def _max_of_windows(table, index):
    """``(M, C)`` maximum of the 4 windows of every bin: ``index`` holds 4 ``(M,)`` table rows."""
    t00, t01, t10, t11 = (tf.gather(table, i) for i in index)
    return tf.maximum(tf.maximum(t00, t01), tf.maximum(t10, t11))


def _argmax_scatter(values, positions, best, index, upstream, features):
    """The gradient of RoIPool: ``upstream`` ``(M, C)`` added at each bin's argmax.

    ``values`` / ``positions``: the sparse table of maxima and of the flat element index of
    each window's first maximum; ``best`` ``(M, C)``: each bin's maximum. The bin's argmax (the
    first maximum in row-major order) is the smallest position among its windows that hold
    ``best``. Returns the gradient of ``features`` (whose shape it takes).
    """
    size = tf.size(features)
    first = tf.fill(tf.shape(best), tf.int32.max)
    for i in index:
        where = tf.gather(positions, i)
        first = tf.where((tf.gather(values, i) == best) & (where < first), where, first)
    first = tf.minimum(first, size - 1)  # no-op: every bin's maximum is in one of its windows
    flat = tf.math.unsorted_segment_sum(tf.reshape(upstream, [-1]), tf.reshape(first, [-1]), size)
    return tf.reshape(flat, tf.shape(features))


def _roi_pool_impl(features, index, empty, height, width, compiled):
    """Sparse table (TensorFlow ops: faster than XLA's code for it on a CPU), the 4 window
    gathers (``compiled`` by XLA when given), and torchvision's argmax gradient."""
    shape = tf.concat([tf.shape(empty), tf.shape(features)[-1:]], 0)
    index = [tf.reshape(i, [-1]) for i in index]
    mask = tf.reshape(empty, [-1, 1])
    gather = compiled[0] if compiled else _max_of_windows
    scatter = compiled[1] if compiled else _argmax_scatter

    @tf.custom_gradient
    def pool(features):
        (table,) = _sparse_table((features,), height, width, _max_values)
        best = gather(table, index)
        pooled = tf.where(mask, tf.zeros_like(best), best)

        def grad(upstream):
            batch, channels = tf.shape(features)[0], tf.shape(features)[-1]
            position = tf.range(batch * height * width)[:, None] * channels + tf.range(channels)
            position = tf.reshape(position, tf.shape(features))  # flat element index
            values, positions = _sparse_table((features, position), height, width, _max_positions)
            upstream = tf.where(mask, tf.zeros_like(upstream), upstream)
            return scatter(values, positions, best, index, upstream, features)

        return pooled, grad

    return tf.reshape(pool(features), shape)


@_no_autograph
def roi_pool(
    features,
    boxes,
    box_indices=None,
    output_size=7,
    spatial_scale=1 / 16,
    *,
    jit_compile=True,
):
    """RoI max pooling (Fast R-CNN), exactly ``torchvision.ops.roi_pool``, vectorised over RoIs.

    For each RoI (in feature-map cells, per axis): ``start = round(x1 * spatial_scale)``,
    ``end = round(x2 * spatial_scale)`` rounded half away from zero, ``size = max(end - start +
    1, 1)``, ``bin = size / pw``; bin ``j`` covers columns ``[floor(j * bin), ceil((j + 1) *
    bin))`` shifted by ``start`` and clamped to ``[0, W]``. The output is the maximum over the
    bin, 0 for an empty bin (a RoI partly or fully outside the map gives zeros there).

    Args:
        features: ``(B, H, W, C)`` float feature maps; ``H`` and ``W`` must be static.
        boxes: ``(K, 4)`` absolute ``xyxy`` boxes in image pixels; or ``(B, R, 4)`` padded boxes
            per image when ``box_indices`` is None.
        box_indices: ``(K,)`` integer image index of each box, in ``[0, B)`` (not checked: an
            index out of range is an error without XLA and is clamped under XLA).
        output_size: ``ph`` = ``pw``, or a pair ``(ph, pw)``.
        spatial_scale: feature-map cells per image pixel (``1 / stride``).
        jit_compile: compile the window gathers and the gradient's scatter with XLA (default;
            several times faster on a CPU). The sparse table is built with TensorFlow's own
            kernels either way (faster than XLA's code for it on a CPU).

    Returns:
        ``(K, ph, pw, C)`` in the features' dtype, or ``(B, R, ph, pw, C)`` for batched boxes.

    Gradient: each output cell's gradient goes to the bin's argmax, the first maximum in
    row-major order (torchvision's, ties included), nothing for empty bins; none to the boxes.

    Cost: 4 row gathers of ``C`` values per output cell, whatever the RoI size, plus the sparse
    table, ``sum_a (H - 2^a + 1) * sum_b (W - 2^b + 1)`` cells per image (22.9 times a 38 x 63
    map), a cost per image, not per RoI: against ``crop_and_resize`` it pays off from a few
    hundred RoIs per image.

    Raises:
        ValueError: wrong ranks or last dimensions (the message names the tensor and its shape),
            mismatched ``boxes`` / ``box_indices`` lengths, dynamic ``H`` or ``W``, a
            non-positive ``output_size`` or ``spatial_scale``.
    """
    owner = "roi_pool"
    output_size = _pair(output_size, "output_size", owner)
    spatial_scale = _check_scale(spatial_scale, owner)
    features = _features(features, owner)
    height, width = _static_hw(features, owner, "the sparse table")
    boxes, box_indices, batch = _boxes_and_indices(
        boxes, box_indices, _coord_dtype(features), owner
    )
    index, empty = _pool_geometry(
        tf.stop_gradient(boxes),
        box_indices,
        tf.shape(features)[0],
        height,
        width,
        output_size,
        spatial_scale,
    )
    compiled = None
    if jit_compile:
        compiled = _jit(_JIT_CACHE, _max_of_windows), _jit(_JIT_CACHE, _argmax_scatter)
    pooled = _roi_pool_impl(features, index, empty, height, width, compiled)
    return _finish(pooled, boxes, output_size, features, batch)


# ----------------------------------------------------------------------------- RoIAlign
def _align_samples(lo, hi, scale, size, n, sampling_ratio, grid, aligned):
    """Sample rows (or columns) of torchvision's RoIAlign along one axis, with their weights.

    Args:
        lo, hi: ``(K,)`` box edges in image pixels; ``scale``: ``(K,)`` spatial scales;
        size: ``(K,)`` feature-map size along the axis (int32); ``n``: bins along the axis;
        sampling_ratio: > 0 a fixed grid, else adaptive ``ceil(roi_size / n)`` bounded by
        ``grid``; aligned: the half-pixel offset.

    Returns:
        ``(index, weight)``, both ``(K, n, 2 * grid)``: for bin ``i`` and sample ``s``, the low
        and high bilinear corner (int32, inside ``[0, size)``) and its weight divided by the
        number of samples of the RoI along the axis (0 for masked or out-of-range samples). The
        product of the y and x weights is torchvision's ``w1..w4 / count``.
    """
    dtype = lo.dtype
    offset = tf.constant(0.5 if aligned else 0.0, dtype)
    start = lo * scale - offset
    length = (hi * scale - offset) - start
    if not aligned:
        length = tf.maximum(length, tf.constant(1.0, dtype))  # malformed RoIs forced to 1x1
    bin_size = _div(length, n)
    if sampling_ratio > 0:
        count = tf.fill(tf.shape(lo), tf.constant(float(sampling_ratio), dtype))
    else:
        count = tf.math.ceil(bin_size)  # ceil(roi_height / pooled_height); <= 0: no samples
        count = tf.where(tf.math.is_nan(count), tf.zeros_like(count), count)
        count = tf.clip_by_value(count, 0.0, float(grid))
    divisor = tf.maximum(count, 1.0)[:, None, None]

    i = tf.range(n, dtype=dtype)[None, :, None]
    s = tf.range(grid, dtype=dtype)[None, None, :]
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    # torchvision: roi_start + ph * bin_size + (iy + .5) * bin_size / grid, in this order.
    pos = (start + i * bin_size) + _div((s + 0.5) * bin_size, divisor)  # (K, n, grid)

    limit = tf.cast(size, dtype)[:, None, None]
    valid = (pos >= -1.0) & (pos <= limit) & (s < count[:, None, None])  # False for NaN
    pos = tf.where(valid & (pos > 0), pos, tf.zeros_like(pos))  # y <= 0 is read at 0
    low = tf.floor(pos)
    at_end = low >= limit - 1  # y_low >= H - 1: both corners H - 1, and y = y_low
    low = tf.where(at_end, limit - 1, low)
    high = tf.where(at_end, low, low + 1)
    frac = tf.where(at_end, tf.zeros_like(pos), pos - low)
    zero = tf.zeros_like(pos)
    w_low = _div(tf.where(valid, 1.0 - frac, zero), divisor)
    w_high = _div(tf.where(valid, frac, zero), divisor)
    k = tf.shape(lo)[0]
    index = tf.reshape(tf.stack([low, high], -1), [k, n, 2 * grid])
    weight = tf.reshape(tf.stack([w_low, w_high], -1), [k, n, 2 * grid])
    return tf.cast(index, tf.int32), weight


def _align_geometry(features_list, boxes, box_indices, levels, output_size, scales, **kw):
    """Per-axis samples of every RoI on its level, and where its image starts in the flat
    table of all levels: ``rows, wy`` ``(K, ph, 2 G_h)``, ``cols, wx`` ``(K, pw, 2 G_w)``,
    ``base`` and ``width`` ``(K,)``."""
    ph, pw = output_size
    grid_h, grid_w = kw.pop("grid")
    shapes = [tf.shape(f) for f in features_list]
    heights = tf.stack([s[1] for s in shapes])
    widths = tf.stack([s[2] for s in shapes])
    plane = heights * widths
    offsets = tf.math.cumsum(tf.stack([s[0] for s in shapes]) * plane, exclusive=True)
    height = tf.gather(heights, levels)
    width = tf.gather(widths, levels)
    base = tf.gather(offsets, levels) + box_indices * tf.gather(plane, levels)
    scale = tf.gather(tf.constant(scales, boxes.dtype), levels)
    x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
    rows, wy = _align_samples(y1, y2, scale, height, ph, grid=grid_h, **kw)
    cols, wx = _align_samples(x1, x2, scale, width, pw, grid=grid_w, **kw)
    return rows, wy, cols, wx, base, width


@tf.custom_gradient
def _weighted_gather(flat, index, weight):
    """``out[m] = sum_e weight[e, m] * flat[index[e, m]]``: ``flat`` ``(N, C)``, ``index`` and
    ``weight`` ``(E, M)`` -> ``(M, C)``. The gradient (to ``flat`` only) is a loop of
    scatter-adds, so that no ``(E, M, C)`` tensor of gathered rows or updates is ever built
    (TensorFlow's own gradient of E gathers concatenates E ``(M, C)`` slices)."""
    terms = int(index.shape[0])
    if terms <= _MAX_UNROLL:
        out = tf.gather(flat, index[0]) * weight[0][:, None]
        for e in range(1, terms):
            out = out + tf.gather(flat, index[e]) * weight[e][:, None]
    else:

        def body(e, acc):
            return e + 1, acc + tf.gather(flat, index[e]) * weight[e][:, None]

        zeros = tf.zeros(tf.stack([tf.shape(index)[1], tf.shape(flat)[1]]), flat.dtype)
        _, out = tf.while_loop(lambda e, acc: e < terms, body, (tf.constant(0), zeros))

    def grad(upstream):
        def body(e, acc):
            update = upstream * weight[e][:, None]
            return e + 1, tf.tensor_scatter_nd_add(acc, index[e][:, None], update)

        _, dflat = tf.while_loop(
            lambda e, acc: e < terms, body, (tf.constant(0), tf.zeros_like(flat))
        )
        return dflat, None, None

    return out, grad


def _roi_align_gather(features_list, rows, wy, cols, wx, base, width, *, output_size, grid):
    """Weighted sum of the ``(2 G_h) x (2 G_w)`` corners of every output cell."""
    (ph, pw), terms = output_size, 4 * grid[0] * grid[1]
    k = tf.shape(rows)[0]
    channels = tf.shape(features_list[0])[-1]
    flat = tf.concat([tf.reshape(f, [-1, channels]) for f in features_list], axis=0)
    # (K, ph, pw, 2 G_h, 2 G_w): flat row and weight of every corner of every sample.
    index = (
        base[:, None, None, None, None]
        + rows[:, :, None, :, None] * width[:, None, None, None, None]
        + cols[:, None, :, None, :]
    )
    weight = tf.cast(wy[:, :, None, :, None] * wx[:, None, :, None, :], flat.dtype)
    index = tf.transpose(tf.reshape(index, [k * ph * pw, terms]))
    weight = tf.transpose(tf.reshape(weight, [k * ph * pw, terms]))
    pooled = _weighted_gather(flat, index, weight)
    return tf.reshape(pooled, tf.stack([k, ph, pw, channels]))


def _sampling_grid(sampling_ratio, max_sampling_grid, features_list, output_size, owner):
    """Static samples per bin and axis: the ratio itself, or the adaptive grid's upper bound."""
    if sampling_ratio > 0:
        return sampling_ratio, sampling_ratio
    if max_sampling_grid is not None:
        return _pair(max_sampling_grid, "max_sampling_grid", owner)
    why = "the adaptive sampling grid (sampling_ratio <= 0) without max_sampling_grid"
    sizes = [_static_hw(f, owner, why) for f in features_list]
    # ceil(roi / output) <= ceil(size / output) for every RoI of at most size cells.
    return (
        max(-(-h // output_size[0]) for h, _ in sizes),
        max(-(-w // output_size[1]) for _, w in sizes),
    )


def _roi_align_levels(
    owner,
    features_list,
    boxes,
    box_indices,
    levels,
    output_size,
    scales,
    sampling_ratio,
    aligned,
    max_sampling_grid,
    jit_compile,
    batch,
):
    grid = _sampling_grid(sampling_ratio, max_sampling_grid, features_list, output_size, owner)
    geometry = _align_geometry(
        features_list,
        tf.stop_gradient(boxes),
        box_indices,
        levels,
        output_size,
        scales,
        grid=grid,
        sampling_ratio=sampling_ratio,
        aligned=bool(aligned),
    )
    static = {"output_size": output_size, "grid": grid}
    if jit_compile:
        gather = _jit(_JIT_CACHE, _roi_align_gather, **static)
    else:
        gather = functools.partial(_roi_align_gather, **static)
    pooled = gather(tuple(features_list), *geometry)
    return _finish(pooled, boxes, output_size, features_list[0], batch)


@_no_autograph
def roi_align(
    features,
    boxes,
    box_indices=None,
    output_size=7,
    spatial_scale=1 / 16,
    sampling_ratio=-1,
    aligned=False,
    *,
    max_sampling_grid=None,
    jit_compile=True,
):
    """RoIAlign (Mask R-CNN), exactly ``torchvision.ops.roi_align``, vectorised over RoIs.

    Per RoI and axis (no rounding): ``start = x1 * spatial_scale - offset`` and ``end = x2 *
    spatial_scale - offset`` with ``offset = 0.5`` when ``aligned`` (pixel centres) else 0;
    ``size = end - start``, forced to at least 1 only when not ``aligned``; ``bin = size / pw``.
    Each bin averages a ``grid_h x grid_w`` grid of bilinear samples at ``start + j * bin + (s +
    0.5) * bin / grid``, with ``grid = sampling_ratio`` if > 0 else ``ceil(size / pw)`` (adaptive,
    per RoI). torchvision's border rules: a sample with ``y < -1`` or ``y > H`` (or x likewise)
    counts as 0; ``y <= 0`` is read at 0; ``y >= H - 1`` at row ``H - 1``. A grid of 0 samples
    (an ``aligned`` RoI with a negative size) gives 0.

    Args:
        features: ``(B, H, W, C)`` float feature maps.
        boxes: ``(K, 4)`` absolute ``xyxy`` boxes in image pixels; or ``(B, R, 4)`` padded boxes
            per image when ``box_indices`` is None.
        box_indices: ``(K,)`` integer image index of each box, in ``[0, B)`` (not checked).
        output_size: ``ph`` = ``pw``, or a pair ``(ph, pw)``.
        spatial_scale: feature-map cells per image pixel (``1 / stride``).
        sampling_ratio: samples per bin and axis; ``<= 0`` for torchvision's adaptive grid.
        aligned: shift the box by -0.5 cell (Detectron2's ``ROIAlignV2``); False is the
            original RoIAlign.
        max_sampling_grid: adaptive grid only: the static bound ``G`` (int or ``(G_h, G_w)``) on
            the samples per bin and axis. Default ``(ceil(H / ph), ceil(W / pw))``: exact for
            every RoI of at most ``H x W`` feature cells (any box inside the image, when the
            map covers the image). A RoI whose grid would exceed the bound is sampled with ``G``
            points per bin along that axis (as with ``sampling_ratio=G``): the one departure from
            torchvision. The cost is ``4 G_h G_w`` row gathers per output cell whatever the RoI
            sizes: 16 with a fixed ``sampling_ratio=2`` (torchvision's detection models), 216
            with the default bound on a 38 x 63 map.
        jit_compile: compile the gathers with XLA (default; several times faster on a CPU and
            without the large intermediates of TensorFlow's graph executor).

    Returns:
        ``(K, ph, pw, C)`` in the features' dtype, or ``(B, R, ph, pw, C)`` for batched boxes.

    Gradient: to the features, each sample's bilinear weights divided by the sample count (as
    torchvision's backward kernel); none to the boxes.

    Raises:
        ValueError: wrong ranks or last dimensions (the message names the tensor and its shape),
            mismatched ``boxes`` / ``box_indices`` lengths, a non-positive ``output_size``,
            ``spatial_scale`` or ``max_sampling_grid``, a non-integer ``sampling_ratio``, an
            adaptive grid without ``max_sampling_grid`` on a map of dynamic size.
    """
    owner = "roi_align"
    output_size = _pair(output_size, "output_size", owner)
    spatial_scale = _check_scale(spatial_scale, owner)
    sampling_ratio = integer(sampling_ratio, "sampling_ratio", owner)
    features = _features(features, owner)
    boxes, box_indices, batch = _boxes_and_indices(
        boxes, box_indices, _coord_dtype(features), owner
    )
    return _roi_align_levels(
        owner,
        [features],
        boxes,
        box_indices,
        tf.zeros_like(box_indices),
        output_size,
        (spatial_scale,),
        sampling_ratio,
        aligned,
        max_sampling_grid,
        jit_compile,
        batch,
    )


# ----------------------------------------------------------------------------- multi-level
@_no_autograph
def fpn_level_for_boxes(
    boxes, canonical_scale=224, canonical_level=4, min_level=2, max_level=5, eps=1e-6
):
    """FPN level of each RoI (FPN paper eq. 1, torchvision's ``LevelMapper``).

    ``level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)`` clamped to
    ``[min_level, max_level]``, with ``area = (x2 - x1) * (y2 - y1)`` (unclamped, as
    torchvision's ``box_area``), computed in float32. A 224 x 224 box goes to level 4, 112 x 112
    to level 3; ``eps`` keeps exact powers of two on the upper level despite rounding. Zero-area
    boxes go to ``min_level``, and so do boxes with a negative area (torchvision's result is
    undefined there: ``sqrt`` of a negative number).

    Args:
        boxes: ``(..., 4)`` absolute ``xyxy`` boxes in image pixels.
        canonical_scale, canonical_level: a box of side ``canonical_scale`` goes to
            ``canonical_level`` (224 and 4: ImageNet's size on C4).
        min_level, max_level: the levels available.
        eps: added before the floor.

    Returns:
        ``(...)`` int32 absolute levels (``min_level`` .. ``max_level``).
    """
    owner = "fpn_level_for_boxes"
    min_level = integer(min_level, "min_level", owner)
    max_level = integer(max_level, "max_level", owner)
    if max_level < min_level:
        raise ValueError(
            f"{owner}: max_level must be >= min_level, got min_level={min_level}, "
            f"max_level={max_level}."
        )
    canonical_scale = _check_scale(canonical_scale, owner, "canonical_scale")
    boxes = tf.convert_to_tensor(boxes, name="boxes")
    if boxes.shape.rank == 0 or boxes.shape[-1] not in (None, 4):
        raise ValueError(f"{owner}: `boxes` must have shape (..., 4), got shape {boxes.shape}.")
    x1, y1, x2, y2 = tf.unstack(tf.cast(boxes, tf.float32), num=4, axis=-1)
    side = tf.sqrt((x2 - x1) * (y2 - y1))
    log2 = tf.math.log(side / canonical_scale) / tf.constant(math.log(2.0), tf.float32)
    level = tf.floor(float(canonical_level) + log2 + eps)
    level = tf.where(tf.math.is_nan(level), float(min_level), level)
    level = tf.clip_by_value(level, float(min_level), float(max_level))
    return tf.cast(level, tf.int32)


@_no_autograph
def multiscale_roi_align(
    features_list,
    boxes,
    box_indices=None,
    output_size=7,
    sampling_ratio=2,
    canonical_scale=224,
    canonical_level=4,
    min_level=2,
    max_level=5,
    aligned=False,
    *,
    max_sampling_grid=None,
    jit_compile=True,
):
    """RoIAlign of each RoI on its FPN level (torchvision's ``MultiScaleRoIAlign``), in one pass.

    Each RoI goes to level ``fpn_level_for_boxes(boxes, canonical_scale, canonical_level,
    min_level, max_level)`` and is pooled exactly as ``roi_align(features_list[level -
    min_level], ..., spatial_scale=2 ** -level)``. All levels are flattened into one table and
    each RoI's samples index its own level: one vectorised gather pass over all RoIs (no loop
    over levels or boxes, no work on the other levels), static shapes, every RoI's result in its
    input slot. It works eagerly, in ``tf.function`` and with ``jit_compile=True`` (nothing in it
    needs dynamic shapes).

    Args:
        features_list: levels ``min_level .. max_level`` in order, ``(B, H_l, W_l, C)`` each
            (e.g. FPN P2-P5 for strides 4-32), same ``B``, ``C`` and dtype.
        boxes: ``(K, 4)`` absolute ``xyxy`` boxes in image pixels; or ``(B, R, 4)`` when
            ``box_indices`` is None.
        box_indices: ``(K,)`` integer image index of each box.
        output_size, sampling_ratio, aligned, max_sampling_grid, jit_compile: as
            :func:`roi_align` (torchvision's defaults here: 7, 2, False). For an adaptive grid
            the default bound is the largest level's (``ceil(H_min_level / ph)``), costly on a
            stride-4 map: prefer a fixed ``sampling_ratio``.
        canonical_scale, canonical_level, min_level, max_level: the level rule.

    Returns:
        ``(K, ph, pw, C)``, or ``(B, R, ph, pw, C)`` for batched boxes.

    Raises:
        ValueError: as :func:`roi_align`, and a ``features_list`` that is not one map per level
            or whose maps differ in channels or dtype.
    """
    owner = "multiscale_roi_align"
    min_level = integer(min_level, "min_level", owner)
    max_level = integer(max_level, "max_level", owner)
    if not isinstance(features_list, (list, tuple)) or not features_list:
        raise ValueError(
            f"{owner}: `features_list` must be a non-empty list of (B, H, W, C) maps, one per "
            f"level {min_level}..{max_level}, got {type(features_list).__name__}."
        )
    if len(features_list) != max_level - min_level + 1:
        raise ValueError(
            f"{owner}: `features_list` must hold one map per level {min_level}..{max_level} "
            f"({max_level - min_level + 1}), got {len(features_list)}."
        )
    output_size = _pair(output_size, "output_size", owner)
    sampling_ratio = integer(sampling_ratio, "sampling_ratio", owner)
    features_list = [
        _features(f, owner, f"features_list[{i}]") for i, f in enumerate(features_list)
    ]
    first = features_list[0]
    for i, f in enumerate(features_list):
        channels = (first.shape[-1], f.shape[-1])
        if f.dtype != first.dtype or (None not in channels and channels[0] != channels[1]):
            raise ValueError(
                f"{owner}: every level must have the same channels and dtype: features_list[0] "
                f"has shape {first.shape} ({first.dtype.name}), features_list[{i}] has shape "
                f"{f.shape} ({f.dtype.name})."
            )
    boxes, box_indices, batch = _boxes_and_indices(boxes, box_indices, _coord_dtype(first), owner)
    levels = fpn_level_for_boxes(boxes, canonical_scale, canonical_level, min_level, max_level)
    scales = tuple(2.0**-level for level in range(min_level, max_level + 1))
    return _roi_align_levels(
        owner,
        features_list,
        boxes,
        box_indices,
        levels - min_level,
        output_size,
        scales,
        sampling_ratio,
        aligned,
        max_sampling_grid,
        jit_compile,
        batch,
    )
