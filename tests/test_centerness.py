"""Tests of dlnotes.centerness: FCOS and PolarMask centerness, ray distances to a polygon and
CenterNet's Gaussian radius and heatmaps, against float64 NumPy references written from the
papers' (and CenterNet's) definitions."""

import math

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.path import Path

from dlnotes.centerness import (
    box_distances,
    fcos_centerness,
    gaussian_heatmap,
    gaussian_radius,
    gaussian_sigma,
    polarmask_centerness,
    polygon_ray_distances,
)


# ----------------------------------------------------------------------------- references
def np_fcos(point, box, sqrt=True):
    """FCOS centerness of one point and one xyxy box; outside (or on the border) -> 0."""
    x, y = point
    left, top, right, bottom = x - box[0], y - box[1], box[2] - x, box[3] - y
    if min(left, top, right, bottom) <= 0:
        return 0.0
    value = min(left, right) / max(left, right) * min(top, bottom) / max(top, bottom)
    return math.sqrt(value) if sqrt else value


def np_rays(point, polygon, num_rays):
    """Distance to the first edge along each ray (a 2x2 solve per ray and edge), 0 if none;
    all 0 outside the polygon (matplotlib's point-in-polygon)."""
    polygon = np.asarray(polygon, np.float64)
    if not Path(polygon).contains_point(point):
        return np.zeros(num_rays)
    out = np.zeros(num_rays)
    for i in range(num_rays):
        angle = 2 * math.pi * i / num_rays
        u = np.array([math.cos(angle), math.sin(angle)])
        best = math.inf
        for a, b in zip(polygon, np.roll(polygon, -1, 0), strict=True):
            matrix = np.stack([u, a - b], axis=1)
            if abs(np.linalg.det(matrix)) < 1e-12:
                continue
            t, s = np.linalg.solve(matrix, a - np.asarray(point, np.float64))
            if t > 0 and 0 <= s <= 1:
                best = min(best, t)
        out[i] = 0.0 if best == math.inf else best
    return out


def centernet_gaussian_radius(det_size, min_overlap=0.7):
    """CenterNet's ``gaussian_radius`` (src/lib/utils/image.py), verbatim but for NumPy names."""
    height, width = det_size
    a1 = 1
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    sq1 = np.sqrt(b1**2 - 4 * a1 * c1)
    r1 = (b1 + sq1) / 2
    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    sq2 = np.sqrt(b2**2 - 4 * a2 * c2)
    r2 = (b2 + sq2) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    sq3 = np.sqrt(b3**2 - 4 * a3 * c3)
    r3 = (b3 + sq3) / 2
    return min(r1, r2, r3)


def centernet_draw_gaussian(heatmap, center, radius):
    """CenterNet's ``draw_umich_gaussian`` (with ``gaussian2D``), in place, float64."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    m = (diameter - 1.0) / 2.0
    yy, xx = np.ogrid[-m : m + 1, -m : m + 1]
    gaussian = np.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma))
    gaussian[gaussian < np.finfo(gaussian.dtype).eps * gaussian.max()] = 0
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape[0:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked_heatmap = heatmap[y - top : y + bottom, x - left : x + right]
    masked_gaussian = gaussian[radius - top : radius + bottom, radius - left : radius + right]
    if min(masked_gaussian.shape) > 0 and min(masked_heatmap.shape) > 0:
        np.maximum(masked_heatmap, masked_gaussian, out=masked_heatmap)
    return heatmap


# ----------------------------------------------------------------------------- FCOS
def test_fcos_centerness_matches_numpy_inside_outside_and_on_the_border():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 50, (40, 2)), rng.uniform(55, 120, (40, 2))], 1)
    boxes = boxes[:, [0, 1, 2, 3]]
    points = rng.uniform(-10, 130, (40, 2))
    points[:5] = (boxes[:5, :2] + boxes[:5, 2:]) / 2  # centres: exactly 1
    points[5] = boxes[5, :2]  # a corner: 0
    points[6] = [boxes[6, 0], (boxes[6, 1] + boxes[6, 3]) / 2]  # on the left side: 0
    distances = box_distances(points, boxes)
    for sqrt in (True, False):
        got = fcos_centerness(distances, sqrt=sqrt).numpy()
        want = [np_fcos(p, b, sqrt) for p, b in zip(points, boxes, strict=True)]
        np.testing.assert_allclose(got, want, atol=2e-6)
    got = fcos_centerness(distances).numpy()
    np.testing.assert_allclose(got[:5], 1.0, atol=1e-6)
    assert got[5] == 0.0 and got[6] == 0.0
    assert (
        got[np.array([np_fcos(p, b) for p, b in zip(points, boxes, strict=True)]) == 0] == 0
    ).all()
    # Broadcasting: every point against every box.
    pairs = fcos_centerness(box_distances(points[:, None], boxes[None, :3])).numpy()
    want = [[np_fcos(p, b) for b in boxes[:3]] for p in points]
    np.testing.assert_allclose(pairs, want, atol=2e-6)
    # Known value: (l, t, r, b) = (1, 2, 3, 6) -> sqrt(1/3 * 2/6) = 1/3.
    assert float(fcos_centerness([1.0, 2.0, 3.0, 6.0])) == pytest.approx(1 / 3, abs=1e-6)


def test_fcos_centerness_degenerate_boxes_are_finite_with_finite_gradients():
    distances = tf.constant([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [-1.0, 2.0, 3.0, 2.0]])
    with tf.GradientTape() as tape:
        tape.watch(distances)
        value = fcos_centerness(distances)
    grad = tape.gradient(value, distances)
    np.testing.assert_array_equal(value.numpy(), 0.0)
    assert np.isfinite(grad.numpy()).all()
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        fcos_centerness([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="points"):
        box_distances([[1.0, 2.0, 3.0]], [[0.0, 0.0, 4.0, 4.0]])


# ----------------------------------------------------------------------------- PolarMask
def test_polygon_ray_distances_match_numpy_for_convex_and_concave_polygons():
    rng = np.random.default_rng(1)
    square = np.array([[10.0, 10.0], [50.0, 10.0], [50.0, 50.0], [10.0, 50.0]])
    a = 0.3
    cross = 20.0 * np.array(
        [[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
         [-1, -a], [-a, -a], [-a, -1]]
    ) + 30.0  # fmt: skip
    for polygon in (square, cross):
        points = rng.uniform(5, 55, (25, 2))
        got = polygon_ray_distances(points, polygon, num_rays=36).numpy()
        want = np.stack([np_rays(p, polygon, 36) for p in points])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert got.shape == (25, 36)
    # The square's centre: ray i has length 20 / max(|cos|, |sin|), centerness 2^-1/4.
    d = polygon_ray_distances([30.0, 30.0], square, num_rays=8).numpy()
    angles = 2 * np.pi * np.arange(8) / 8
    np.testing.assert_allclose(d, 20 / np.maximum(np.abs(np.cos(angles)), np.abs(np.sin(angles))),
                               rtol=1e-5)  # fmt: skip
    assert float(polarmask_centerness(d)) == pytest.approx(2**-0.25, rel=1e-5)
    assert float(polarmask_centerness(d, sqrt=False)) == pytest.approx(2**-0.5, rel=1e-5)


def test_polarmask_centerness_matches_numpy_and_is_zero_outside():
    circle = 30 + 20 * np.stack(
        [np.cos(2 * np.pi * np.arange(32) / 32), np.sin(2 * np.pi * np.arange(32) / 32)], 1
    )
    points = np.array([[30.0, 30.0], [35.0, 28.0], [45.0, 30.0], [70.0, 70.0], [30.0, 49.9]])
    distances = polygon_ray_distances(points, circle, num_rays=36)
    got = polarmask_centerness(distances).numpy()
    rays = np.stack([np_rays(p, circle, 36) for p in points])
    want = np.where(rays.max(1) > 0, np.sqrt(rays.min(1) / np.maximum(rays.max(1), 1e-12)), 0.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[0] > 0.99  # the centre of a circle
    assert got[0] > got[1] > got[2] > 0.0  # decays towards the contour
    assert got[3] == 0.0  # outside
    assert (polygon_ray_distances(points[3], circle).numpy() == 0).all()
    # Arbitrary distances, the notes' ratio and the paper's square root.
    d = np.random.default_rng(2).uniform(0.1, 10, (7, 12))
    np.testing.assert_allclose(polarmask_centerness(d, sqrt=False), d.min(1) / d.max(1), rtol=1e-5)
    np.testing.assert_allclose(polarmask_centerness(d), np.sqrt(d.min(1) / d.max(1)), rtol=1e-5)
    assert float(polarmask_centerness(np.zeros(5))) == 0.0
    with pytest.raises(ValueError, match="polygon"):
        polygon_ray_distances([1.0, 1.0], [[0.0, 0.0], [1.0, 1.0]])


# ----------------------------------------------------------------------------- Gaussian
def test_gaussian_radius_is_centernets():
    sizes = [(1, 1), (3, 7), (8, 8), (11, 11), (40, 13), (64, 64), (0.5, 100)]
    for overlap in (0.7, 0.5):
        got = gaussian_radius([h for h, _ in sizes], [w for _, w in sizes], overlap).numpy()
        want = [centernet_gaussian_radius(s, overlap) for s in sizes]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(gaussian_radius(0.0, 0.0)) == 0.0
    np.testing.assert_allclose(gaussian_sigma([0.0, 1.0, 3.0]), [1 / 6, 0.5, 7 / 6])
    with pytest.raises(ValueError, match="min_overlap"):
        gaussian_radius(3.0, 3.0, min_overlap=1.0)


def test_gaussian_heatmap_matches_centernets_drawing():
    rng = np.random.default_rng(3)
    height, width = 24, 20
    cells = np.stack([rng.integers(0, width, (2, 9)), rng.integers(0, height, (2, 9))], -1)
    cells[0, 0] = [0, 0]  # kernels clipped at every border
    cells[0, 1] = [width - 1, height - 1]
    radii = rng.integers(0, 6, (2, 9))
    valid = rng.uniform(size=(2, 9)) < 0.8
    valid[0, :2] = True
    got = gaussian_heatmap(cells, radii, valid, (height, width)).numpy()
    for b in range(2):
        want = np.zeros((height, width))
        for p in np.flatnonzero(valid[b]):
            centernet_draw_gaussian(want, cells[b, p], int(radii[b, p]))
        np.testing.assert_allclose(got[b], want, atol=1e-6)
        # Peak exactly 1 at every valid point's cell; overlapping kernels merge by max.
        for p in np.flatnonzero(valid[b]):
            assert got[b, cells[b, p, 1], cells[b, p, 0]] == 1.0
    assert got.max() == 1.0 and got.min() == 0.0
    empty = gaussian_heatmap(np.zeros((2, 0, 2)), np.zeros((2, 0)), np.zeros((2, 0), bool), (4, 5))
    np.testing.assert_array_equal(empty.numpy(), np.zeros((2, 4, 5)))


def test_centerness_functions_compile_with_xla():
    @tf.function(jit_compile=True)
    def all_three(points, boxes, polygon, cells, radii):
        valid = tf.ones(tf.shape(radii), tf.bool)
        return (
            fcos_centerness(box_distances(points, boxes)),
            polarmask_centerness(polygon_ray_distances(points, polygon, 16)),
            gaussian_heatmap(cells, radii, valid, (8, 8)),
        )

    points = tf.constant([[20.0, 20.0], [5.0, 5.0]])
    boxes = tf.constant([[10.0, 10.0, 30.0, 40.0], [0.0, 0.0, 10.0, 10.0]])
    polygon = tf.constant([[0.0, 0.0], [40.0, 0.0], [40.0, 40.0], [0.0, 40.0]])
    fcos, polar, heat = all_three(points, boxes, polygon, tf.constant([[[3, 4]]]), [[2.0]])
    np.testing.assert_allclose(fcos, [np_fcos([20, 20], [10, 10, 30, 40]), 1.0], atol=1e-6)
    want = [np.sqrt(np_rays(p, polygon.numpy(), 16).min() / np_rays(p, polygon.numpy(), 16).max())
            for p in points.numpy()]  # fmt: skip
    np.testing.assert_allclose(polar, want, atol=1e-5)
    assert heat.shape == (1, 8, 8) and float(heat[0, 4, 3]) == 1.0
