"""Centerness: how central a location is in an object, three ways (chapter 7).

The notes (seed ``001``, "kp model") compare two published definitions, both computed from the
distances of a location to the object's contour, with the one the keypoint model regresses:

* **FCOS** (Tian et al. 2019), from the distances ``l, t, r, b`` of a location to the four sides
  of its box (:func:`box_distances`)::

      centerness = sqrt( min(l, r) / max(l, r) * min(t, b) / max(t, b) )

  1 at the box centre, 0 on its border; the square root "slows down the decay" (the notes: 可以加
  个sqrt). :func:`fcos_centerness`.
* **PolarMask** (Xie et al. 2020), from the distances ``d_1..d_n`` of a location to the contour
  along ``n`` rays at equal angles (:func:`polygon_ray_distances`)::

      centerness = sqrt( min(d_i) / max(d_i) )

  the same idea for any shape: 1 only where every ray is equally long (the centre of a circle).
  :func:`polarmask_centerness`.
* **A Gaussian kernel** around a point (CenterNet, Zhou et al. 2019): a keypoint has no contour, so
  the notes' keypoint model regresses a Gaussian "centerness" instead (我们只预测关键点的话，可以
  直接回归一个高斯核的conf). :func:`gaussian_radius` is CenterNet's radius from the object's size
  and :func:`gaussian_heatmap` draws the kernels of many points into one map (their maximum),
  with CenterNet's ``sigma = (2 r + 1) / 6`` and its square ``(2 r + 1) x (2 r + 1)`` window, so a
  point's cell holds exactly 1.

Everything is TensorFlow graph code with static shapes (no Python loops over points or boxes),
returns float32 and works inside ``tf.function(jit_compile=True)``. Locations and boxes are in
the same units (pixels, or grid cells for the heatmaps); boxes are ``xyxy``.
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = [
    "box_distances",
    "fcos_centerness",
    "gaussian_heatmap",
    "gaussian_radius",
    "gaussian_sigma",
    "polarmask_centerness",
    "polygon_ray_distances",
]


def _float(x, name):
    x = tf.convert_to_tensor(x, name=name)
    return x if x.dtype == tf.float32 else tf.cast(x, tf.float32)


def _last_dim(x, size, name, form):
    last = x.shape[-1] if x.shape.rank else None
    if x.shape.rank == 0 or (last is not None and last != size):
        raise ValueError(f"`{name}` must have shape {form}, got shape {x.shape}.")


def _safe_ratio(numerator, denominator):
    """``numerator / denominator``, 0 where the denominator is not positive (finite gradients)."""
    positive = denominator > 0.0
    return tf.where(positive, numerator / tf.where(positive, denominator, 1.0), 0.0)


def _safe_sqrt(x):
    """``sqrt(x)`` for ``x >= 0`` with a finite gradient at 0 (where it is taken as 0)."""
    positive = x > 0.0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, 1.0)), 0.0)


def box_distances(points, boxes):
    """Distances ``(l, t, r, b)`` from points to the sides of ``xyxy`` boxes (FCOS' targets).

    Args:
        points: ``(..., 2)`` ``(x, y)`` locations.
        boxes: ``(..., 4)`` ``xyxy`` boxes, broadcastable against the points (e.g. points
            ``(P, 1, 2)`` and boxes ``(1, M, 4)`` give every pair).

    Returns:
        ``(..., 4)`` float32 ``(x - x1, y - y1, x2 - x, y2 - y)``; a negative entry means the point
        is outside the box on that side.
    """
    points = _float(points, "points")
    boxes = _float(boxes, "boxes")
    _last_dim(points, 2, "points", "(..., 2)")
    _last_dim(boxes, 4, "boxes", "(..., 4)")
    x, y = points[..., 0], points[..., 1]
    x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
    return tf.stack([x - x1, y - y1, x2 - x, y2 - y], axis=-1)


def fcos_centerness(distances, sqrt=True):
    """FCOS centerness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``.

    FCOS only trains centerness on locations inside a box, where every distance is positive. Here
    negative distances (a location outside the box) are clipped to 0, so a location outside the
    box, or on its border, has centerness 0; a degenerate box (``max = 0``) gives 0 too, with
    finite gradients.

    Args:
        distances: ``(..., 4)`` ``(l, t, r, b)`` (:func:`box_distances`).
        sqrt: take the square root (the paper's); ``False`` gives the plain product.

    Returns:
        ``(...)`` float32 in [0, 1].
    """
    distances = _float(distances, "distances")
    _last_dim(distances, 4, "distances", "(..., 4) (l, t, r, b)")
    left, top, right, bottom = tf.unstack(tf.nn.relu(distances), num=4, axis=-1)
    horizontal = _safe_ratio(tf.minimum(left, right), tf.maximum(left, right))
    vertical = _safe_ratio(tf.minimum(top, bottom), tf.maximum(top, bottom))
    product = horizontal * vertical
    return _safe_sqrt(product) if sqrt else product


def polarmask_centerness(distances, sqrt=True):
    """PolarMask centerness ``sqrt(min_i d_i / max_i d_i)`` over the ``n`` ray distances.

    The notes write ``min(d0, d1, ...) / max(d0, d1, ...)``; the paper takes the square root, as
    FCOS (``sqrt=False`` for the notes' form). A location with a ray of length 0 (on the contour,
    or outside the shape: :func:`polygon_ray_distances` gives zeros there) has centerness 0.

    Args:
        distances: ``(..., n)`` non-negative distances to the contour along ``n`` rays.
        sqrt: take the square root.

    Returns:
        ``(...)`` float32 in [0, 1].
    """
    distances = tf.nn.relu(_float(distances, "distances"))
    if distances.shape.rank == 0:
        raise ValueError(f"`distances` must have shape (..., n), got shape {distances.shape}.")
    ratio = _safe_ratio(tf.reduce_min(distances, -1), tf.reduce_max(distances, -1))
    return _safe_sqrt(ratio) if sqrt else ratio


def _cross(ax, ay, bx, by):
    return ax * by - ay * bx


def polygon_ray_distances(points, polygon, num_rays=36):
    """Distances from points to a polygon's contour along ``num_rays`` rays (PolarMask's targets).

    Ray ``i`` leaves the point at the angle ``2 pi i / num_rays`` (ray 0 along +x, angles growing
    towards +y, i.e. clockwise on an image); its distance is that of the first crossing with an
    edge. A point outside the polygon (even-odd rule) gets all zeros, so its
    :func:`polarmask_centerness` is 0, as PolarMask trains centerness only inside the mask.

    Args:
        points: ``(..., 2)`` locations ``(x, y)``.
        polygon: ``(V, 2)`` vertices of one closed polygon (the last joins the first), e.g. a
            COCO ``segmentation`` reshaped.
        num_rays: ``n`` (36 in PolarMask).

    Returns:
        ``(..., num_rays)`` float32 distances (0 for a ray that meets no edge).
    """
    points = _float(points, "points")
    polygon = _float(polygon, "polygon")
    _last_dim(points, 2, "points", "(..., 2)")
    if polygon.shape.rank != 2 or polygon.shape[-1] != 2 or (polygon.shape[0] or 3) < 3:
        raise ValueError(f"`polygon` must have shape (V >= 3, 2), got shape {polygon.shape}.")
    num_rays = int(num_rays)
    if num_rays < 1:
        raise ValueError(f"`num_rays` must be a positive integer, got {num_rays!r}.")
    angles = tf.range(num_rays, dtype=tf.float32) * (2.0 * math.pi / num_rays)
    ux, uy = tf.cos(angles), tf.sin(angles)  # (n,)
    ax, ay = polygon[:, 0], polygon[:, 1]  # (V,)
    bx, by = tf.roll(ax, -1, 0), tf.roll(ay, -1, 0)
    ex, ey = bx - ax, by - ay
    # (..., 1, 1) points against (n, 1) rays and (V,) edges: p + t u = a + s e.
    px, py = points[..., 0][..., None, None], points[..., 1][..., None, None]
    dx, dy = ax - px, ay - py  # (..., 1, V)
    denom = _cross(ux[:, None], uy[:, None], ex, ey)  # (n, V)
    parallel = tf.abs(denom) < 1e-9
    safe = tf.where(parallel, 1.0, denom)
    t = _cross(dx, dy, ex, ey) / safe  # (..., n, V)
    s = _cross(dx, dy, ux[:, None], uy[:, None]) / safe
    hit = (~parallel) & (t > 0.0) & (s >= 0.0) & (s <= 1.0)
    big = tf.constant(3.0e38, tf.float32)
    first = tf.reduce_min(tf.where(hit, t, big), axis=-1)  # (..., n)
    first = tf.where(first < big, first, 0.0)
    # Even-odd rule along +x with half-open edges in y (robust at vertices).
    pxs, pys = points[..., 0][..., None], points[..., 1][..., None]  # (..., 1)
    straddles = (ay > pys) != (by > pys)
    x_cross = ax + (pys - ay) * ex / tf.where(tf.abs(ey) > 0.0, ey, 1.0)
    crossings = tf.reduce_sum(tf.cast(straddles & (pxs < x_cross), tf.int32), axis=-1)
    inside = tf.equal(crossings % 2, 1)
    return tf.where(inside[..., None], first, 0.0)


def gaussian_radius(height, width, min_overlap=0.7):
    """CenterNet's Gaussian radius for an object of size ``height x width`` (elementwise).

    The radius of the disc of corner positions that keep a box's IoU with the true box above
    ``min_overlap`` (CornerNet's three cases, the smallest wins), exactly as CenterNet's
    ``gaussian_radius`` computes it, including its ``(b + sqrt(b^2 - 4ac)) / 2`` (the quadratic
    formula's ``2a`` is not divided out), so radii equal CenterNet's. CenterNet uses
    ``max(0, int(r))`` of it with sizes in output cells (``ceil(h / stride)``).

    Args:
        height, width: broadcastable sizes (any units; the radius is in the same units).
        min_overlap: the IoU to keep (0.7).

    Returns:
        float32 radius (not rounded), >= 0 for non-negative sizes.
    """
    if not 0.0 < float(min_overlap) < 1.0:
        raise ValueError(f"`min_overlap` must be in (0, 1), got {min_overlap!r}.")
    h, w = _float(height, "height"), _float(width, "width")
    m = float(min_overlap)
    b1 = h + w
    c1 = w * h * (1.0 - m) / (1.0 + m)
    r1 = (b1 + tf.sqrt(tf.nn.relu(b1**2 - 4.0 * c1))) / 2.0
    b2 = 2.0 * (h + w)
    c2 = (1.0 - m) * w * h
    r2 = (b2 + tf.sqrt(tf.nn.relu(b2**2 - 16.0 * c2))) / 2.0
    a3 = 4.0 * m
    b3 = -2.0 * m * (h + w)
    c3 = (m - 1.0) * w * h
    r3 = (b3 + tf.sqrt(tf.nn.relu(b3**2 - 4.0 * a3 * c3))) / 2.0
    return tf.minimum(tf.minimum(r1, r2), r3)


def gaussian_sigma(radius):
    """CenterNet's ``sigma = (2 r + 1) / 6`` of a kernel of radius ``r`` (diameter / 6)."""
    return (2.0 * _float(radius, "radius") + 1.0) / 6.0


def gaussian_heatmap(cells, radii, valid, grid_shape):
    """The maximum of the Gaussian kernels of many points, per image: CenterNet's heatmap.

    Point ``p`` contributes ``exp(-(dx^2 + dy^2) / (2 sigma_p^2))`` at the cells ``(x, y)`` with
    ``dx = x - cx_p``, ``dy = y - cy_p``, ``|dx| <= r_p`` and ``|dy| <= r_p`` (CenterNet's
    ``draw_umich_gaussian`` window), ``sigma_p = (2 r_p + 1) / 6``; overlapping kernels merge by
    their maximum, so every point's own cell holds exactly 1. Invalid points contribute nothing.

    Memory: one ``(B, P, H, W)`` float32 intermediate (``P`` points); the book's 256 px inputs at
    stride 4 with 8 objects of 5 keypoints need ``B x 40 x 64 x 64`` values (0.6 MiB per image).

    Args:
        cells: ``(B, P, 2)`` integer cells ``(cx, cy)`` (column, row) of the points.
        radii: ``(B, P)`` radii in cells (integers, e.g. ``max(0, floor(gaussian_radius(...)))``).
        valid: ``(B, P)`` bool; False for padding and points without a target.
        grid_shape: static ``(H, W)``.

    Returns:
        ``(B, H, W)`` float32 in [0, 1].
    """
    cells = _float(cells, "cells")
    radii = _float(radii, "radii")
    valid = tf.cast(valid, tf.bool)
    _last_dim(cells, 2, "cells", "(B, P, 2)")
    height, width = (int(v) for v in grid_shape)
    cx, cy = cells[..., 0][..., None, None], cells[..., 1][..., None, None]  # (B, P, 1, 1)
    r = radii[..., None, None]
    xs = tf.range(width, dtype=tf.float32)[None, None, None, :]
    ys = tf.range(height, dtype=tf.float32)[None, None, :, None]
    dx, dy = xs - cx, ys - cy  # (B, P, 1, W), (B, P, H, 1)
    sigma = gaussian_sigma(r)
    kernel = tf.exp(-(dx**2 + dy**2) / (2.0 * sigma**2))
    inside = (tf.abs(dx) <= r) & (tf.abs(dy) <= r) & valid[..., None, None]
    heatmaps = tf.where(inside, kernel, 0.0)  # (B, P, H, W)
    return tf.maximum(tf.reduce_max(heatmaps, axis=1), 0.0)  # P = 0: the max is -inf
