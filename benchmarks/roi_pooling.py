"""RoI pooling: dlnotes' vectorised roi_pool / roi_align against a per-box loop and against
tf.image.crop_and_resize + max pooling (tf-faster-rcnn's "crop and pool" approximation).

Setting (Faster R-CNN with VGG16): one 600x1000 image, its stride-16 feature map (1, 38, 63, 512)
(ReLU features, as VGG's conv5_3), 512 and 2000 RPN-like proposals (sides log-uniform 16-600 px,
inside the image), 7x7 outputs. Timed, as medians of ``--repeats`` interleaved rounds after a
warm-up call (which compiles), forward alone and forward + gradient to the features:

1. dlnotes ``roi_pool`` (sparse table + 4 gathers per output cell, XLA inside);
2. dlnotes ``roi_align`` with ``sampling_ratio=2`` (torchvision's detection models) and with
   the adaptive grid (``-1``, bounded by ceil(38/7) x ceil(63/7) = 6 x 9 samples per bin);
3. ``tf.image.crop_and_resize`` to 14x14 then a 2x2 max pool, as tf-faster-rcnn's
   ``_crop_pool_layer`` (not RoIPool's semantics: bilinear samples, no bins);
4. the naive per-box loops, eagerly (a Python loop of TF ops; unrolled into a tf.function the
   RoIPool loop would be a graph of about 200,000 ops for 2000 boxes): RoIPool with one slice +
   ``reduce_max`` per bin (49 per box); RoIAlign per box, one ``gather_nd`` of the box's
   bilinear corners and a weighted sum. The loops run on ``--loop-rois`` boxes and their time
   is scaled per RoI to 512 / 2000 (the loop's cost is linear in the number of boxes).

Everything else runs in ``tf.function`` (graph mode). Before timing, the loops' outputs are
checked against dlnotes' on their boxes. Prints markdown tables: wall times with the peak
resident memory of each method at 2000 RoIs, and ratios of wall and of process CPU time (the
latter moves less when other jobs share the machine). Writes no files.

    python benchmarks/roi_pooling.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlnotes.roi import roi_align, roi_pool  # noqa: E402

IMAGE = (600, 1000)  # (height, width)
STRIDE = 16
FEATURES = (1, 38, 63, 512)
POOL = 7


# ----------------------------------------------------------------------------- data
def proposals(num, rng):
    """``(num, 4)`` float32 xyxy boxes inside the image, sides log-uniform 16-600 px."""
    height, width = IMAGE
    wh = np.exp(rng.uniform(math.log(16), math.log(600), (num, 2)))
    xy = rng.uniform(0, 1, (num, 2)) * (np.array([width, height]) - wh)
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- the loops
def _c_round(v):
    a = abs(float(v))
    r = math.floor(a) + (abs(float(v)) - math.floor(a) >= 0.5)
    return -r if v < 0 else r


def loop_roi_pool(features, boxes):
    """Per box, per bin: slice the bin and take its maximum (torchvision's bins), eagerly."""
    _, height, width, channels = features.shape
    scale = np.float32(1 / STRIDE)
    outputs = []
    for x1, y1, x2, y2 in boxes:
        sx, sy = _c_round(x1 * scale), _c_round(y1 * scale)
        ex, ey = _c_round(x2 * scale), _c_round(y2 * scale)
        bin_w = np.float32(max(ex - sx + 1, 1)) / np.float32(POOL)
        bin_h = np.float32(max(ey - sy + 1, 1)) / np.float32(POOL)
        cells = []
        for i in range(POOL):
            hs = min(max(int(np.floor(np.float32(i) * bin_h)) + sy, 0), height)
            he = min(max(int(np.ceil(np.float32(i + 1) * bin_h)) + sy, 0), height)
            for j in range(POOL):
                ws = min(max(int(np.floor(np.float32(j) * bin_w)) + sx, 0), width)
                we = min(max(int(np.ceil(np.float32(j + 1) * bin_w)) + sx, 0), width)
                if he <= hs or we <= ws:
                    cells.append(tf.zeros([channels], features.dtype))
                else:
                    cells.append(tf.reduce_max(features[0, hs:he, ws:we, :], axis=(0, 1)))
        outputs.append(tf.reshape(tf.stack(cells), [POOL, POOL, channels]))
    return tf.stack(outputs)


def _align_corners(lo, hi, size, sampling_ratio=2):
    """torchvision's sample corners along one axis of one box: (POOL, 2 s) rows and weights."""
    start = np.float32(lo) * np.float32(1 / STRIDE)
    length = max(np.float32(hi) * np.float32(1 / STRIDE) - start, np.float32(1))
    bin_size = length / np.float32(POOL)
    rows = np.zeros((POOL, 2 * sampling_ratio), np.int64)
    weights = np.zeros((POOL, 2 * sampling_ratio), np.float32)
    for i in range(POOL):
        for s in range(sampling_ratio):
            y = float(start + np.float32(i) * bin_size + np.float32(s + 0.5) * bin_size / 2)
            if y < -1 or y > size:
                continue
            y = max(y, 0.0)
            low = min(int(y), size - 1)
            frac = 0.0 if low == size - 1 else y - low
            rows[i, 2 * s : 2 * s + 2] = low, min(low + 1, size - 1)
            weights[i, 2 * s : 2 * s + 2] = (1 - frac) / sampling_ratio, frac / sampling_ratio
    return rows, weights


def loop_roi_align(features, boxes):
    """Per box: gather its (7 * 4) x (7 * 4) bilinear corners and sum them with their weights
    (torchvision's roi_align, sampling_ratio=2, aligned=False)."""
    _, height, width, channels = features.shape
    outputs = []
    for x1, y1, x2, y2 in boxes:
        rows, wy = _align_corners(y1, y2, height)
        cols, wx = _align_corners(x1, x2, width)
        index = np.stack(np.broadcast_arrays(rows[:, None, :, None], cols[None, :, None, :]), -1)
        weight = wy[:, None, :, None] * wx[None, :, None, :]  # (7, 7, 4, 4)
        corners = tf.gather_nd(features[0], index)  # (7, 7, 4, 4, C)
        outputs.append(tf.reduce_sum(corners * weight[..., None], axis=(2, 3)))
    return tf.stack(outputs)


# ----------------------------------------------------------------------------- timing
def peak_mb(fn):
    """Peak resident memory above the resident memory before ``fn()`` (Linux), in MB."""

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark
        before = status("VmRSS")
        fn()
        return status("VmHWM") - before
    except OSError:
        fn()
        return float("nan")


def timed(fns, repeats, warm_up=True):
    """Median wall time and process CPU time (ms) of each callable: interleaved rounds (load
    changes on a shared machine hit all methods alike), after a warm-up call each."""
    for fn in fns if warm_up else ():
        fn()
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for fn, w, c in zip(fns, wall, cpu, strict=True):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            w.append((time.perf_counter() - start) * 1e3)
            c.append((time.process_time() - start_cpu) * 1e3)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu, strict=True)]


def _forward_and_gradient(op, features):
    with tf.GradientTape() as tape:
        tape.watch(features)
        pooled = op(features)
        loss = tf.reduce_sum(tf.square(pooled))
    return pooled, tape.gradient(loss, features)


def forward_and_gradient(op):
    """``features -> (pooled, d sum(pooled^2) / d features)`` (a partial: tf.function counts
    retracing per code object, and each method is traced once)."""
    return functools.partial(_forward_and_gradient, op)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--quick", action="store_true", help="128 / 512 RoIs, 2 rounds")
    parser.add_argument("--loop-rois", type=int, default=64, help="boxes the loops run on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = (128, 512) if args.quick else (512, 2000)
    repeats = 2 if args.quick else args.repeats
    loop_rois = min(args.loop_rois, 16) if args.quick else args.loop_rois

    rng = np.random.default_rng(args.seed)
    features = tf.constant(np.maximum(rng.normal(size=FEATURES), 0).astype(np.float32))
    all_boxes = proposals(max(counts), rng)

    # --- correctness of the loops before timing ------------------------------------------------
    few = all_boxes[:loop_rois]
    zeros = np.zeros(len(few), np.int32)
    np.testing.assert_array_equal(
        loop_roi_pool(features, few).numpy(), roi_pool(features, few, zeros).numpy()
    )
    np.testing.assert_allclose(
        loop_roi_align(features, few).numpy(),
        roi_align(features, few, zeros, sampling_ratio=2).numpy(),
        atol=1e-5,
    )
    print(f"loops agree with dlnotes on {loop_rois} boxes")

    def methods(boxes):
        indices = tf.zeros([len(boxes)], tf.int32)
        boxes_t = tf.constant(boxes)
        # tf-faster-rcnn: coordinates normalised by (map size - 1) * stride, crop 14, pool 2x2
        norm = np.array([FEATURES[1] - 1, FEATURES[2] - 1] * 2, np.float32) * STRIDE
        crop_boxes = tf.constant(boxes[:, [1, 0, 3, 2]] / norm)

        def crop_pool(f):
            crops = tf.image.crop_and_resize(f, crop_boxes, indices, [2 * POOL, 2 * POOL])
            return tf.nn.max_pool2d(crops, 2, 2, "SAME")

        return {
            "dlnotes roi_pool": lambda f: roi_pool(f, boxes_t, indices),
            "dlnotes roi_align, sampling_ratio=2": lambda f: roi_align(
                f, boxes_t, indices, sampling_ratio=2
            ),
            "dlnotes roi_align, adaptive (-1)": lambda f: roi_align(f, boxes_t, indices),
            "crop_and_resize 14x14 + max pool 2x2": crop_pool,
        }

    results = {}  # (method, K, pass) -> ms
    memory = {}
    for k in counts:
        ops = methods(all_boxes[:k])
        for mode in ("forward", "forward+gradient"):
            wrap = (lambda op: op) if mode == "forward" else forward_and_gradient
            fns = []
            for op in ops.values():
                fn = tf.function(wrap(op))
                fns.append(lambda fn=fn: tf.nest.map_structure(lambda t: t.numpy(), fn(features)))
            for name, fn in zip(ops, fns, strict=True):
                fn()  # compile first, then measure the memory of a run
                memory[name, k, mode] = peak_mb(fn)
            for name, ms in zip(ops, timed(fns, repeats, warm_up=False), strict=True):
                results[name, k, mode] = ms  # (wall, CPU)
            print(f"timed {k} RoIs, {mode}", flush=True)

    # the loops, on loop_rois boxes, scaled per RoI (eager: each call runs op by op)
    few = all_boxes[:loop_rois]
    loops = {
        "loop roi_pool (eager, per bin)": loop_roi_pool,
        "loop roi_align (eager, per box)": loop_roi_align,
    }
    for name, op in loops.items():
        for mode in ("forward", "forward+gradient"):
            wrap = (lambda op: op) if mode == "forward" else forward_and_gradient

            def run(op=op, wrap=wrap):
                return tf.nest.map_structure(
                    lambda t: t.numpy(), wrap(lambda f: op(f, few))(features)
                )

            ((wall, cpu),) = timed([run], max(1, min(repeats, 3)))
            for k in counts:
                results[name, k, mode] = (wall * k / loop_rois, cpu * k / loop_rois)
        print(f"timed {name} on {loop_rois} boxes", flush=True)

    # --- report --------------------------------------------------------------------------------
    columns = [(k, mode) for k in counts for mode in ("forward", "forward+gradient")]
    header = " | ".join(f"{k} RoIs {mode}" for k, mode in columns)
    k_max = max(counts)
    print(
        f"\nfeatures {FEATURES} (stride {STRIDE} of {IMAGE[0]}x{IMAGE[1]}), {POOL}x{POOL} "
        f"outputs; TF {tf.__version__}, {os.cpu_count()} CPU(s), {platform.machine()}; "
        f"{datetime.date.today()}; median of {repeats} rounds; loops on {loop_rois} boxes, "
        "scaled per RoI\n"
    )
    print(f"wall time, ms\n\n| method | {header} | peak MB, {k_max} RoIs fwd+grad |")
    print("| --- |" + " ---: |" * (len(columns) + 1))
    names = list(methods(all_boxes[:1])) + list(loops)
    for name in names:
        cells = " | ".join(f"{results[name, k, mode][0]:.0f}" for k, mode in columns)
        mem = memory.get((name, k_max, "forward+gradient"))
        print(f"| {name} | {cells} | {'-' if mem is None else f'{mem:.0f}'} |")

    pool, crop = "dlnotes roi_pool", "crop_and_resize 14x14 + max pool 2x2"
    align2, adaptive = "dlnotes roi_align, sampling_ratio=2", "dlnotes roi_align, adaptive (-1)"
    ratios = [
        ("loop / vectorised, roi_pool", "loop roi_pool (eager, per bin)", pool),
        ("loop / vectorised, roi_align (2)", "loop roi_align (eager, per box)", align2),
        ("vectorised roi_pool / crop_and_resize", pool, crop),
        ("vectorised roi_align (2) / crop_and_resize", align2, crop),
        ("vectorised roi_align (-1) / crop_and_resize", adaptive, crop),
    ]
    for unit, i in (("wall time", 0), ("process CPU time", 1)):
        print(f"\nratios of {unit}\n\n| ratio | {header} |")
        print("| --- |" + " ---: |" * len(columns))
        for label, num, den in ratios:
            cells = " | ".join(
                f"{results[num, k, mode][i] / results[den, k, mode][i]:.2f}" for k, mode in columns
            )
            print(f"| {label} | {cells} |")


if __name__ == "__main__":
    main()
