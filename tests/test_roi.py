"""Tests of dlnotes.roi against NumPy ports of torchvision's C++ kernels (roi_pool, roi_align and
their backward passes), tf.image.crop_and_resize, and hand cases.

torch is not a dependency: the references below follow ``torchvision/csrc/ops/cpu/
roi_pool_kernel.cpp`` and ``roi_align_kernel.cpp`` / ``roi_align_common.h`` line by line, with
NHWC features and ``rois`` rows ``(batch_index, x1, y1, x2, y2)``. As in the kernels, the
coordinate arithmetic runs in the input's type ``T`` (float32 or float64: bin edges depend on its
rounding); the sums are accumulated in float64.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from dlnotes import roi as R

FLT_MAX = float(np.finfo(np.float32).max)
STRIDE = 16
FEATURES = (2, 12, 15, 3)  # (B, H, W, C): a 192 x 240 image at stride 16
OUTPUT = (7, 5)  # non-square on purpose


# ----------------------------------------------------------------------------- NumPy references
def c_round(v):
    """C's round(): half away from zero (Python's round() is half to even)."""
    a = abs(float(v))
    r = math.floor(a)
    r += (a - r) >= 0.5
    return int(-r if v < 0 else r)


def np_roi_pool(features, rois, output_size, spatial_scale, T=np.float32):
    """roi_pool_forward_kernel_impl -> (output (K, ph, pw, C) float64, argmax (K, ph, pw, C)):
    argmax is the flat ``h * W + w`` of the bin's first maximum, -1 for an empty bin."""
    _, height, width, channels = features.shape
    pooled_h, pooled_w = output_size
    out = np.zeros((len(rois), pooled_h, pooled_w, channels))
    argmax = np.full(out.shape, -1)
    scale = T(spatial_scale)
    for n, roi in enumerate(rois):
        b = int(roi[0])
        roi_start_w = c_round(T(roi[1]) * scale)
        roi_start_h = c_round(T(roi[2]) * scale)
        roi_end_w = c_round(T(roi[3]) * scale)
        roi_end_h = c_round(T(roi[4]) * scale)
        roi_width = max(roi_end_w - roi_start_w + 1, 1)  # malformed RoIs forced to 1x1
        roi_height = max(roi_end_h - roi_start_h + 1, 1)
        bin_size_h = T(roi_height) / T(pooled_h)
        bin_size_w = T(roi_width) / T(pooled_w)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                hstart = int(np.floor(T(ph) * bin_size_h))
                wstart = int(np.floor(T(pw) * bin_size_w))
                hend = int(np.ceil(T(ph + 1) * bin_size_h))
                wend = int(np.ceil(T(pw + 1) * bin_size_w))
                hstart = min(max(hstart + roi_start_h, 0), height)
                hend = min(max(hend + roi_start_h, 0), height)
                wstart = min(max(wstart + roi_start_w, 0), width)
                wend = min(max(wend + roi_start_w, 0), width)
                is_empty = hend <= hstart or wend <= wstart
                # The channel loop, vectorised: same strict ">" scan for every channel.
                maxval = np.full(channels, 0.0 if is_empty else -FLT_MAX)
                maxidx = np.full(channels, -1)
                for h in range(hstart, hend):
                    for w in range(wstart, wend):
                        value = features[b, h, w].astype(np.float64)
                        better = value > maxval
                        maxval = np.where(better, value, maxval)
                        maxidx = np.where(better, h * width + w, maxidx)
                out[n, ph, pw] = maxval
                argmax[n, ph, pw] = maxidx
    return out, argmax


def np_roi_pool_grad(features, rois, argmax, grad_output):
    """roi_pool_backward_kernel_impl: each bin's gradient to its argmax."""
    grad = np.zeros(features.shape)
    width = features.shape[2]
    for n, i, j, c in zip(*np.nonzero(argmax >= 0), strict=True):
        h, w = divmod(int(argmax[n, i, j, c]), width)
        grad[int(rois[n][0]), h, w, c] += grad_output[n, i, j, c]
    return grad


def np_roi_align(
    features,
    rois,
    output_size,
    spatial_scale,
    sampling_ratio,
    aligned,
    T=np.float32,
    grad_output=None,
    max_grid=None,
):
    """roi_align_forward_kernel_impl (and, with ``grad_output``, the backward kernel) ->
    output (K, ph, pw, C) float64 [, grad of the features]. ``max_grid`` caps the adaptive grid
    per axis (dlnotes' documented bound); None is torchvision."""
    _, height, width, channels = features.shape
    pooled_h, pooled_w = output_size
    out = np.zeros((len(rois), pooled_h, pooled_w, channels))
    grad = np.zeros(features.shape)
    scale = T(spatial_scale)
    for n, roi in enumerate(rois):
        b = int(roi[0])
        offset = T(0.5) if aligned else T(0.0)
        roi_start_w = T(roi[1]) * scale - offset
        roi_start_h = T(roi[2]) * scale - offset
        roi_end_w = T(roi[3]) * scale - offset
        roi_end_h = T(roi[4]) * scale - offset
        roi_width = roi_end_w - roi_start_w
        roi_height = roi_end_h - roi_start_h
        if not aligned:
            roi_width = max(roi_width, T(1.0))
            roi_height = max(roi_height, T(1.0))
        bin_size_h = roi_height / T(pooled_h)
        bin_size_w = roi_width / T(pooled_w)
        grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_height / T(pooled_h)))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_width / T(pooled_w)))
        if max_grid is not None:
            grid_h, grid_w = min(grid_h, max_grid[0]), min(grid_w, max_grid[1])
        count = max(grid_h * grid_w, 1)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                total = np.zeros(channels)
                for iy in range(grid_h):
                    yy = roi_start_h + T(ph) * bin_size_h + T(iy + 0.5) * bin_size_h / T(grid_h)
                    for ix in range(grid_w):
                        xx = roi_start_w + T(pw) * bin_size_w + T(ix + 0.5) * bin_size_w / T(grid_w)
                        y, x = float(yy), float(xx)
                        if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
                            continue
                        y, x = max(y, 0.0), max(x, 0.0)
                        y_low, x_low = int(y), int(x)
                        if y_low >= height - 1:
                            y_high = y_low = height - 1
                            y = float(y_low)
                        else:
                            y_high = y_low + 1
                        if x_low >= width - 1:
                            x_high = x_low = width - 1
                            x = float(x_low)
                        else:
                            x_high = x_low + 1
                        ly, lx = y - y_low, x - x_low
                        hy, hx = 1.0 - ly, 1.0 - lx
                        corners = (
                            (y_low, x_low, hy * hx),
                            (y_low, x_high, hy * lx),
                            (y_high, x_low, ly * hx),
                            (y_high, x_high, ly * lx),
                        )
                        for r, c, w in corners:
                            total += w * features[b, r, c]
                            if grad_output is not None:
                                grad[b, r, c] += grad_output[n, ph, pw] * w / count
                out[n, ph, pw] = total / count
    return (out, grad) if grad_output is not None else out


def adaptive_grid(rois, output_size, spatial_scale, aligned):
    """torchvision's adaptive grid ``(K, 2)`` as (rows, columns), in float64 (the half-pixel
    offset cancels in the size; enough to compare with a bound)."""
    size = (rois[:, [4, 3]] - rois[:, [2, 1]]) * spatial_scale
    size = size if aligned else np.maximum(size, 1.0)
    return np.ceil(size / np.array(output_size))


def np_fpn_levels(boxes, k_min=2, k_max=5, s0=224.0, lvl0=4.0, eps=1e-6):
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = lvl0 + np.log2(np.sqrt(area) / s0) + eps
    return raw, np.clip(np.nan_to_num(np.floor(raw), nan=k_min), k_min, k_max).astype(int)


# ----------------------------------------------------------------------------- data
def make_case(seed, batch=FEATURES[0], height=FEATURES[1], width=FEATURES[2], channels=FEATURES[3]):
    """Random features and boxes (with every awkward kind of box) -> features, boxes, indices."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    img_w, img_h = width * STRIDE, height * STRIDE
    xy = rng.uniform(-0.3, 1.1, (24, 2)) * [img_w, img_h]
    wh = rng.uniform(0, 0.8, (24, 2)) * [img_w, img_h]
    special = [
        [50, 50, 50, 50],  # zero area
        [100, 80, 40, 20],  # inverted
        [400, 400, 500, 500],  # fully outside (below right)
        [-300, -300, -200, -100],  # fully outside (above left)
        [-40, 100, 60, 300],  # partly outside
        [33.3, 40.1, 33.9, 40.4],  # tiny
        [8, 24, 40, 56],  # x * 1/16 = 0.5, 1.5, 2.5, 3.5: rounding half away from zero
        [-8, -24, 8, 72],  # -0.5, -1.5, 0.5, 4.5
        [0, 0, img_w, img_h],  # the whole map
        [-100, -100, img_w + 200, img_h + 150],  # larger than the map
        [img_w - 8, img_h - 8, img_w + 8, img_h + 8],  # on the far corner
    ]
    boxes = np.concatenate([np.concatenate([xy, xy + wh], 1), special]).astype(np.float32)
    indices = rng.integers(0, batch, len(boxes)).astype(np.int32)
    return features, boxes, indices


def as_rois(boxes, indices):
    return np.concatenate([indices[:, None].astype(np.float64), boxes.astype(np.float64)], 1)


CASE = make_case(0)


def grad_of(fn, features, upstream):
    features = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = tf.reduce_sum(fn(features) * tf.cast(upstream, features.dtype))
    return tape.gradient(loss, features).numpy()


# ----------------------------------------------------------------------------- roi_pool
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_pool_matches_torchvision(jit_compile, dtype):
    features, boxes, indices = CASE
    features = features.astype(dtype)
    got = R.roi_pool(
        features, boxes.astype(dtype), indices, OUTPUT, 1 / STRIDE, jit_compile=jit_compile
    )
    want, _ = np_roi_pool(features, as_rois(boxes, indices), OUTPUT, 1 / STRIDE, T=dtype)
    assert got.shape == (len(boxes),) + OUTPUT + (3,) and got.dtype == dtype
    np.testing.assert_array_equal(got.numpy(), want)


def test_roi_pool_rounds_half_away_from_zero():
    """0.5 -> 1 and 2.5 -> 3 (half to even would give 0 and 2); -0.5 -> -1."""
    features = np.arange(6 * 6, dtype=np.float32).reshape(1, 6, 6, 1) % 7
    boxes = np.array([[8, 8, 40, 40], [-8, -8, 8, 8]], np.float32)
    got = R.roi_pool(features, boxes, [0, 0], output_size=1).numpy()[:, 0, 0, 0]
    assert got[0] == features[0, 1:4, 1:4].max()  # cells 1..3 (start 1, end 3)
    assert got[1] == features[0, 0:2, 0:2].max()  # cells -1..1, clamped to 0..1
    want, _ = np_roi_pool(features, as_rois(boxes, np.zeros(2)), (1, 1), 1 / 16)
    np.testing.assert_array_equal(got, want[:, 0, 0, 0])


@pytest.mark.parametrize("ties", [False, True])
def test_roi_pool_gradient_goes_to_the_argmax(ties):
    """Exactly torchvision's backward, ties included (the first maximum in row-major order)."""
    features, boxes, indices = CASE
    if ties:  # few distinct values: most bins have several maxima
        features = np.random.default_rng(1).integers(0, 3, features.shape).astype(np.float32)
    rois = as_rois(boxes, indices)
    upstream = np.random.default_rng(2).normal(size=(len(boxes),) + OUTPUT + (3,))
    _, argmax = np_roi_pool(features, rois, OUTPUT, 1 / STRIDE)
    want = np_roi_pool_grad(features, rois, argmax, upstream)
    for jit_compile in (True, False):
        got = grad_of(
            lambda f, j=jit_compile: R.roi_pool(f, boxes, indices, OUTPUT, jit_compile=j),
            features,
            upstream,
        )
        np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- roi_align
ALIGN_CASES = [(s, a) for s in (-1, 1, 2, 3) for a in (False, True)]


@pytest.mark.parametrize("sampling_ratio, aligned", ALIGN_CASES)
def test_roi_align_matches_torchvision(sampling_ratio, aligned):
    features, boxes, indices = CASE
    rois = as_rois(boxes, indices)
    got = R.roi_align(features, boxes, indices, OUTPUT, 1 / STRIDE, sampling_ratio, aligned)
    want = np_roi_align(features, rois, OUTPUT, 1 / STRIDE, sampling_ratio, aligned)
    assert got.shape == (len(boxes),) + OUTPUT + (3,)
    if sampling_ratio <= 0:
        # Only the RoI larger than the map exceeds the default bound (ceil(12/7), ceil(15/5)).
        bound = (2, 3)
        within = np.all(adaptive_grid(rois, OUTPUT, 1 / STRIDE, aligned) <= bound, axis=1)
        assert within.sum() == len(boxes) - 1 and not within[-2]
        np.testing.assert_allclose(got.numpy()[within], want[within], rtol=1e-5, atol=1e-5)
        # Beyond the bound, the grid is capped at the bound (the documented departure).
        capped = np_roi_align(features, rois, OUTPUT, 1 / STRIDE, -1, aligned, max_grid=bound)
        np.testing.assert_allclose(got.numpy(), capped, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio, aligned", [(-1, False), (2, True)])
def test_roi_align_float64_and_without_xla(sampling_ratio, aligned):
    features, boxes, indices = CASE
    rois = as_rois(boxes, indices)
    f64 = features.astype(np.float64)
    grid = (2, 3) if sampling_ratio <= 0 else None
    want = np_roi_align(
        f64, rois, OUTPUT, 1 / STRIDE, sampling_ratio, aligned, T=np.float64, max_grid=grid
    )
    for jit_compile in (True, False):
        got = R.roi_align(
            f64, boxes.astype(np.float64), indices, OUTPUT, 1 / STRIDE, sampling_ratio, aligned,
            jit_compile=jit_compile,
        )  # fmt: skip
        assert got.dtype == tf.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio, aligned", [(-1, False), (-1, True), (2, False)])
def test_roi_align_gradient(sampling_ratio, aligned):
    features, boxes, indices = CASE
    rois = as_rois(boxes, indices)
    upstream = np.random.default_rng(3).normal(size=(len(boxes),) + OUTPUT + (3,))
    _, want = np_roi_align(
        features, rois, OUTPUT, 1 / STRIDE, sampling_ratio, aligned, grad_output=upstream,
        max_grid=(2, 3),
    )  # fmt: skip
    for jit_compile in (True, False):
        got = grad_of(
            lambda f, j=jit_compile: R.roi_align(
                f, boxes, indices, OUTPUT, 1 / STRIDE, sampling_ratio, aligned, jit_compile=j
            ),
            features,
            upstream,
        )
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_roi_align_large_grid_uses_the_loop():
    """4 * 5 * 8 = 160 terms per output cell > 64: the tf.while_loop path, forward and gradient."""
    features, boxes, indices = CASE
    rois = as_rois(boxes, indices)
    upstream = np.random.default_rng(4).normal(size=(len(boxes), 2, 2, 3))
    want, want_grad = np_roi_align(
        features, rois, (2, 2), 1 / STRIDE, -1, True, grad_output=upstream, max_grid=(5, 8)
    )

    def pool(f):
        return R.roi_align(f, boxes, indices, 2, 1 / STRIDE, aligned=True, max_sampling_grid=(5, 8))

    np.testing.assert_allclose(pool(features).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_of(pool, features, upstream), want_grad, atol=2e-5)


def test_roi_align_equals_crop_and_resize_where_they_coincide():
    """aligned=True, sampling_ratio=1: bin i of a box samples y = y1 s - 0.5 + (i + 0.5) bin
    (bin = (y2 - y1) s / ph), a regular grid from y1 s - 0.5 + bin / 2 to y2 s - 0.5 - bin / 2.
    crop_and_resize with crop height ph samples y1n (H - 1) + i (y2n - y1n) (H - 1) / (ph - 1)
    for a normalised box: the same points for y1n = (y1 s - 0.5 + bin / 2) / (H - 1) and y2n =
    (y2 s - 0.5 - bin / 2) / (H - 1) (x likewise). Both interpolate bilinearly inside [0, H - 1]
    (and read row H - 1 at H - 1); outside they differ (torchvision reads the edge down to -1,
    crop_and_resize extrapolates), so the boxes keep every sample inside."""
    rng = np.random.default_rng(5)
    features = rng.normal(size=(2, 12, 15, 3)).astype(np.float32)
    height, width = 12, 15
    ph, pw = OUTPUT
    x1 = rng.uniform(16, 100, 20)
    y1 = rng.uniform(16, 80, 20)
    x2 = x1 + rng.uniform(5, 100, 20)
    y2 = y1 + rng.uniform(5, 80, 20)
    boxes = np.stack([x1, y1, x2, y2], 1)
    indices = rng.integers(0, 2, 20).astype(np.int32)
    s = 1 / STRIDE
    bin_h, bin_w = (y2 - y1) * s / ph, (x2 - x1) * s / pw
    crop_boxes = np.stack(
        [
            (y1 * s - 0.5 + bin_h / 2) / (height - 1),
            (x1 * s - 0.5 + bin_w / 2) / (width - 1),
            (y2 * s - 0.5 - bin_h / 2) / (height - 1),
            (x2 * s - 0.5 - bin_w / 2) / (width - 1),
        ],
        1,
    )
    assert crop_boxes.min() >= 0 and crop_boxes.max() <= 1
    want = tf.image.crop_and_resize(features, crop_boxes.astype(np.float32), indices, OUTPUT)
    got = R.roi_align(features, boxes.astype(np.float32), indices, OUTPUT, s, 1, aligned=True)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5)


# ----------------------------------------------------------------------------- multi-level
def test_fpn_levels():
    rng = np.random.default_rng(6)
    xy = rng.uniform(0, 500, (300, 2))
    wh = np.exp(rng.uniform(np.log(4), np.log(1200), (300, 2)))
    powers = [[0, 0, s, s] for s in (28, 56, 112, 224, 448, 896)]  # exact level boundaries
    # zero area, negative area, inverted on both axes (a positive area in torchvision's box_area)
    odd = [[10, 10, 10, 50], [50, 50, 40, 60], [500, 500, 0, 0]]
    boxes = np.concatenate([np.concatenate([xy, xy + wh], 1), powers, odd]).astype(np.float32)
    raw, want = np_fpn_levels(boxes.astype(np.float64))
    got = R.fpn_level_for_boxes(boxes).numpy()
    with np.errstate(invalid="ignore"):  # float32 and float64 may round apart near integers
        near = np.abs(raw - np.round(raw)) < 1e-5
    np.testing.assert_array_equal(got[~near], want[~near])
    np.testing.assert_array_equal(got[300:], [2, 2, 3, 4, 5, 5, 2, 2, 5])
    jit = tf.function(R.fpn_level_for_boxes, jit_compile=True)(boxes).numpy()
    np.testing.assert_array_equal(jit, got)
    custom = R.fpn_level_for_boxes(boxes[300:306], 112, 3, 3, 6).numpy()
    np.testing.assert_array_equal(custom, [3, 3, 3, 4, 5, 6])


def _pyramid(seed, channels=3):
    rng = np.random.default_rng(seed)
    sizes = [(64, 80), (32, 40), (16, 20), (8, 10)]  # P2-P5 of a 256 x 320 image
    features = [rng.normal(size=(2, h, w, channels)).astype(np.float32) for h, w in sizes]
    xy = rng.uniform(-20, 300, (36, 2))
    wh = np.exp(rng.uniform(np.log(8), np.log(400), (36, 2)))
    one_per_level = [[0, 0, 30, 30], [10, 10, 150, 150], [5, 5, 260, 260], [0, 0, 500, 480]]
    boxes = np.concatenate([np.concatenate([xy, xy + wh], 1), one_per_level]).astype(np.float32)
    return features, boxes, rng.integers(0, 2, 40).astype(np.int32)


def test_multiscale_roi_align_equals_roi_align_on_each_level():
    features, boxes, indices = _pyramid(7)
    got = R.multiscale_roi_align(features, boxes, indices, OUTPUT).numpy()
    levels = R.fpn_level_for_boxes(boxes).numpy()
    assert set(levels) == {2, 3, 4, 5}
    for level in range(2, 6):
        sel = levels == level
        want = R.roi_align(
            features[level - 2], boxes[sel], indices[sel], OUTPUT, 2.0**-level, sampling_ratio=2
        )
        np.testing.assert_allclose(got[sel], want.numpy(), rtol=1e-6, atol=1e-6)


def test_multiscale_against_the_reference_and_its_gradient():
    """Adaptive grid (bounded at 4) and aligned: every RoI and the gradient of every level
    against the NumPy reference on the RoI's own level."""
    features, boxes, indices = _pyramid(8)
    upstream = np.random.default_rng(9).normal(size=(len(boxes),) + OUTPUT + (3,))
    levels = R.fpn_level_for_boxes(boxes).numpy()
    tensors = [tf.constant(f) for f in features]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        got = R.multiscale_roi_align(
            tensors, boxes, indices, OUTPUT, sampling_ratio=-1, aligned=True, max_sampling_grid=4
        )
        loss = tf.reduce_sum(got * upstream)
    grads = tape.gradient(loss, tensors)
    for level in range(2, 6):
        sel = levels == level
        want, want_grad = np_roi_align(
            features[level - 2], as_rois(boxes[sel], indices[sel]), OUTPUT, 2.0**-level, -1,
            True, grad_output=upstream[sel], max_grid=(4, 4),
        )  # fmt: skip
        np.testing.assert_allclose(got.numpy()[sel], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[level - 2].numpy(), want_grad, atol=2e-5)


# ----------------------------------------------------------------------------- graph modes
def test_inside_jit_compile():
    """Each op inside the caller's XLA cluster (geometry included) against the reference; the
    gradient of roi_pool (custom, with its table of positions) under XLA too. (Plain
    tf.function: test_dynamic_number_of_rois_and_dynamic_map_size.)"""
    features, boxes, indices = CASE
    rois = as_rois(boxes, indices)

    def xla(fn, *args):
        return tf.function(fn, jit_compile=True)(*args).numpy()

    pooled = xla(lambda f: R.roi_pool(f, boxes, indices, OUTPUT), features)
    want, argmax = np_roi_pool(features, rois, OUTPUT, 1 / STRIDE)
    np.testing.assert_array_equal(pooled, want)
    aligned = xla(lambda f: R.roi_align(f, boxes, indices, OUTPUT, aligned=True), features)
    want = np_roi_align(features, rois, OUTPUT, 1 / STRIDE, -1, True, max_grid=(2, 3))
    np.testing.assert_allclose(aligned, want, rtol=1e-5, atol=1e-5)
    pyramid, p_boxes, p_indices = _pyramid(7)
    multiscale = lambda p: R.multiscale_roi_align(p, p_boxes, p_indices, OUTPUT)  # noqa: E731
    np.testing.assert_allclose(
        xla(multiscale, pyramid), multiscale(pyramid).numpy(), rtol=1e-5, atol=1e-5
    )

    upstream = np.random.default_rng(10).normal(size=(len(boxes),) + OUTPUT + (3,))

    def grads(f):
        with tf.GradientTape() as tape:
            tape.watch(f)
            loss = tf.reduce_sum(R.roi_pool(f, boxes, indices, OUTPUT) * upstream)
        return tape.gradient(loss, f)

    want = np_roi_pool_grad(features, rois, argmax, upstream)
    np.testing.assert_allclose(xla(grads, tf.constant(features)), want, atol=1e-5)


def test_dynamic_number_of_rois_and_dynamic_map_size():
    features, boxes, indices = CASE
    spec = [
        tf.TensorSpec([None, None, None, 3]),
        tf.TensorSpec([None, 4]),
        tf.TensorSpec([None], tf.int32),
    ]
    want = R.roi_align(features, boxes, indices, OUTPUT, sampling_ratio=2).numpy()
    align = tf.function(
        lambda f, b, i: R.roi_align(f, b, i, OUTPUT, sampling_ratio=2), input_signature=spec
    )
    got = align(features, boxes[:17], indices[:17]).numpy()
    np.testing.assert_allclose(got, want[:17], rtol=1e-6, atol=1e-6)
    pool = tf.function(lambda f, b, i: R.roi_pool(f, b, i, OUTPUT), input_signature=spec)
    with pytest.raises(ValueError, match=r"roi_pool: the sparse table needs a static .*None"):
        pool(features, boxes, indices)
    spec[0] = tf.TensorSpec([None, 12, 15, 3])
    pool = tf.function(lambda f, b, i: R.roi_pool(f, b, i, OUTPUT), input_signature=spec)
    np.testing.assert_array_equal(
        pool(features, boxes[:9], indices[:9]).numpy(),
        R.roi_pool(features, boxes, indices, OUTPUT).numpy()[:9],
    )


# ----------------------------------------------------------------------------- batched boxes
def test_batched_boxes():
    features, boxes, _ = CASE
    batched = boxes[:30].reshape(2, 15, 4)
    flat, indices = R.batched_boxes_to_indices(batched)
    np.testing.assert_array_equal(flat.numpy(), boxes[:30])
    np.testing.assert_array_equal(indices.numpy(), [0] * 15 + [1] * 15)
    for op in (R.roi_pool, R.roi_align):
        got = op(features, batched, output_size=OUTPUT)
        assert got.shape == (2, 15) + OUTPUT + (3,)
        want = op(features, flat, indices, output_size=OUTPUT)
        np.testing.assert_array_equal(got.numpy(), R.flat_to_batched(want, 2).numpy())
    got = R.multiscale_roi_align([features] * 4, batched)
    assert got.shape == (2, 15, 7, 7, 3)
    # static shapes survive the compiled call inside a graph (a detector head needs R and C)
    specs = (tf.TensorSpec(features.shape), tf.TensorSpec((2, 15, 4)))
    for op in (R.roi_pool, R.roi_align):
        traced = tf.function(lambda f, b, op=op: op(f, b, output_size=OUTPUT))
        assert traced.get_concrete_function(*specs).output_shapes == (2, 15) + OUTPUT + (3,)


# ----------------------------------------------------------------------------- edge cases
def test_no_rois_and_non_finite_boxes():
    features = CASE[0]
    empty = np.zeros((0, 4), np.float32)
    assert R.roi_pool(features, empty, np.zeros(0, np.int32)).shape == (0, 7, 7, 3)
    assert R.roi_align(features, empty, np.zeros(0, np.int32)).shape == (0, 7, 7, 3)
    bad = np.array([[np.nan, 0, 10, 10], [0, 0, np.inf, 50], [-np.inf, -np.inf, 1e30, 1e30]])
    bad = bad.astype(np.float32)
    assert np.all(np.isfinite(R.roi_pool(features, bad, [0, 1, 0]).numpy()))
    for out in (
        R.roi_align(features, bad, [0, 1, 0], aligned=True),
        R.multiscale_roi_align([features] * 4, bad, [0, 1, 0]),
    ):
        assert np.all(np.isfinite(out.numpy()))
        assert np.all(out.numpy()[0] == 0)  # torchvision: a NaN sample counts as outside (0)


def test_bad_arguments():
    features, boxes, indices = CASE
    cases = [
        (lambda: R.roi_pool(features[0], boxes, indices), r"`features` must have shape \(B, H"),
        (lambda: R.roi_align(features, boxes[:, :3], indices), r"`boxes` must have shape \(K, 4"),
        (lambda: R.roi_align(features, boxes, indices[:3]), r"K=35\) but box_indices has shape"),
        (lambda: R.roi_pool(features, boxes, indices[:, None]), r"`box_indices` must have shape"),
        (lambda: R.roi_pool(features, boxes, indices * 1.0), "must be integers"),
        (lambda: R.roi_pool(features, boxes), r"without `box_indices`, `boxes` must have shape"),
        (lambda: R.roi_pool(features, boxes, indices, 0), "output_size must be a positive"),
        (lambda: R.roi_align(features, boxes, indices, (7, 0)), "output_size must be a positive"),
        (lambda: R.roi_align(features, boxes, indices, (7, 7, 7)), "or a pair"),
        (lambda: R.roi_align(features, boxes, indices, 7, 0.0), "spatial_scale must be a pos"),
        (lambda: R.roi_align(features, boxes, indices, sampling_ratio=1.5), "must be an integer"),
        (lambda: R.roi_align(features, boxes, indices, max_sampling_grid=0), "max_sampling_grid"),
        (lambda: R.multiscale_roi_align([features] * 3, boxes, indices), r"one map per level"),
        (lambda: R.multiscale_roi_align(features, boxes, indices), "non-empty list"),
        (
            lambda: R.multiscale_roi_align([features] * 3 + [features[..., :2]], boxes, indices),
            r"same channels and dtype.*features_list\[3\] has shape \(2, 12, 15, 2\)",
        ),
        (lambda: R.fpn_level_for_boxes(boxes, min_level=5, max_level=2), "max_level must be"),
        (lambda: R.fpn_level_for_boxes(boxes[:, :2]), r"`boxes` must have shape \(\.\.\., 4\)"),
        (lambda: R.batched_boxes_to_indices(boxes), r"\(B, R, 4\), got shape \(35, 4\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
