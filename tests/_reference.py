"""References and helpers shared by the tests: float64 NumPy IoU, random weights, comparisons of
padded detections, and scripts that run a model on two replicas in a fresh interpreter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# ----------------------------------------------------------------------------- IoU


def np_iou(a, b):
    """float64 IoU of xyxy boxes ``a`` (N, 4) x ``b`` (M, 4) -> (N, M).

    Inverted sides count as 0 (zero area), and an empty union gives 0.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)[:, None]
    b = np.asarray(b, np.float64).reshape(-1, 4)[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area_a, area_b = (
        np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)
        for x in (a, b)
    )
    union = area_a + area_b - iw * ih
    return np.divide(iw * ih, union, out=np.zeros_like(union), where=union > 0)


def np_iou_pair(a, b, kind="iou"):
    """IoU family of two single xyxy boxes, float64, straight from the papers' definitions:
    ``kind`` in ``"iou"``, ``"giou"``, ``"diou"``, ``"ciou"``."""
    aw, ah = max(a[2] - a[0], 0.0), max(a[3] - a[1], 0.0)
    bw, bh = max(b[2] - b[0], 0.0), max(b[3] - b[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    iou = inter / union if union > 0 else 0.0
    if kind == "iou":
        return iou
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    if kind == "giou":
        return iou - (cw * ch - union) / (cw * ch)
    rho2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + (
        (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    ) ** 2
    diou = iou - rho2 / (cw**2 + ch**2)
    if kind == "diou":
        return diou
    v = 4 / math.pi**2 * (math.atan(bw / bh) - math.atan(aw / ah)) ** 2
    alpha = v / (1 - iou + v) if v > 0 else 0.0  # identical shapes: v = 0, no penalty
    return diou - alpha * v


# ----------------------------------------------------------------------------- weights


def randomize(model, seed, spread=0.2, bias_spread=None, kernel_gain=None):
    """Random BN statistics and affine, and biases of a realistic size, so that a copy, a file
    round trip or a NumPy reference is really tested (an initial BN is the identity).

    Gammas U(0.5, 1.5), moving variances U(0.5, 2), betas and moving means N(0, ``spread``),
    biases N(0, ``bias_spread``, default ``spread``); with ``kernel_gain``, kernels are redrawn
    too, N(0, ``kernel_gain / sqrt(fan_in)``). Returns ``model``.
    """
    rng = np.random.default_rng(seed)
    bias_spread = spread if bias_spread is None else bias_spread
    for w in model.weights:
        name = w.path.rsplit("/", 1)[-1]
        shape = tuple(w.shape)
        if name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("beta", "moving_mean"):
            value = rng.normal(0.0, spread, shape)
        elif name == "bias":
            value = rng.normal(0.0, bias_spread, shape)
        elif name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        elif kernel_gain is not None and len(shape) >= 2:
            value = rng.normal(0.0, kernel_gain / np.sqrt(np.prod(shape[:-1])), shape)
        else:
            continue
        w.assign(value.astype(w.dtype))
    return model


# ----------------------------------------------------------------------------- detections


def _rows(det, b):
    n = int(det["num_detections"][b])
    return (
        np.asarray(det["scores"][b, :n], np.float64),
        np.asarray(det["labels"][b, :n]),
        np.asarray(det["boxes"][b, :n], np.float64),
    )


def _pair(g, w, tol, min_overlap=None):
    """Greedy pairing of detections ``g`` / ``w`` (scores, labels, boxes): best score of ``g``
    first, to the nearest free detection of ``w`` with the same label whose score is within
    ``tol`` and whose box is the same within ``tol`` (or, with ``min_overlap``, overlaps it at
    an IoU above that). Returns the unpaired indices of each side."""
    g_free, w_free = np.ones(len(g[0]), bool), np.ones(len(w[0]), bool)
    for i in np.argsort(-g[0], kind="stable"):
        score_gap = np.abs(w[0] - g[0][i])
        close = w_free & (w[1] == g[1][i]) & (score_gap <= tol(w[0]))
        box_gap = np.abs(w[2] - g[2][i])
        distance = score_gap + box_gap.max(-1, initial=0.0)
        if min_overlap is None:
            close &= np.all(box_gap <= tol(w[2]), axis=-1)
        else:
            close &= np_iou(g[2][i], w[2])[0] > min_overlap
        if close.any():
            w_free[int(np.argmin(np.where(close, distance, np.inf)))] = False
            g_free[i] = False
    return np.flatnonzero(g_free), np.flatnonzero(w_free)


def assert_same_detections(got, want, atol=1e-4, rtol=0.0, nms_iou=0.45):
    """Asserts that two padded detection dicts hold the same detections per image, as sets.

    Two computations of the same model (graph and XLA, two batchings, a saved copy) give scores
    that agree only to float rounding, and NMS then orders near-tied scores either way: a
    position-by-position comparison is flaky. Per image:

    * every detection of ``got`` is paired with a distinct detection of ``want`` of the same
      label whose score and box agree within ``atol + rtol * |want|`` (greedy, best score
      first, nearest candidate);
    * what is left may only be near-ties: a detection whose score ties (within the tolerance)
      an unpaired one of the same label on the other side that it overlaps at an IoU above
      ``nms_iou`` (NMS kept the other of two tied boxes that suppress each other), or whose
      score ties the lowest score of the image (the score threshold or the
      ``max_detections`` cut fell between near-equal scores);
    * scores are sorted (non-increasing) and padding past ``num_detections`` is -1, in both.
    """
    keys = {"boxes", "scores", "labels", "num_detections"}
    assert set(got) == set(want) == keys, (sorted(got), sorted(want))
    for key in keys:
        assert np.shape(got[key]) == np.shape(want[key]), (key, np.shape(got[key]))

    def tol(reference):
        return atol + rtol * np.abs(reference)

    for b in range(np.shape(got["scores"])[0]):
        sides = {}
        for name, det in (("got", got), ("want", want)):
            n = int(det["num_detections"][b])
            for key in ("boxes", "scores", "labels"):
                padding = np.asarray(det[key])[b, n:]
                assert (padding == -1).all(), f"{name}: image {b}: {key} past {n} is not -1"
            sides[name] = _rows(det, b)
            scores = sides[name][0]
            assert (np.diff(scores) <= tol(scores[1:])).all(), f"{name}: image {b}: unsorted"
        g, w = sides["got"], sides["want"]
        g_left, w_left = _pair(g, w, tol)
        # Near-tied substitutions: same label and score, another box that it suppresses.
        g_sub, w_sub = _pair(
            tuple(v[g_left] for v in g), tuple(v[w_left] for v in w), tol, min_overlap=nms_iou
        )
        g_left, w_left = g_left[g_sub], w_left[w_sub]
        lowest = min([*g[0][-1:], *w[0][-1:]], default=0.0)
        for name, side, left in (("got", g, g_left), ("want", w, w_left)):
            for i in left:
                if side[0][i] > lowest + tol(side[0][i]):
                    raise AssertionError(
                        f"image {b}: detection {i} of {name} (score {side[0][i]:.6f}, label "
                        f"{side[1][i]}, box {np.round(side[2][i], 4).tolist()}) has no "
                        f"counterpart within atol={atol}, rtol={rtol} and is no near-tie "
                        f"(lowest score {lowest:.6f}); {len(g[0])} vs {len(w[0])} detections"
                    )


# ----------------------------------------------------------------------------- two replicas

#: Two logical CPU devices; must run before TensorFlow initialises them (a fresh interpreter).
TWO_CPUS = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    """
)


def start_script(script):
    """Starts ``TWO_CPUS + script`` in a fresh interpreter (so it runs beside the tests); read
    its result with :func:`script_result`."""
    return subprocess.Popen(
        [sys.executable, "-c", TWO_CPUS + textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def script_beside_tests(request, test_name, script):
    """A fixture body (``yield from``): starts ``script`` (:func:`start_script`) at setup when the
    test ``test_name`` is selected, so that it runs beside the other tests, yields the process
    (``None`` when the test is not selected) and kills it at teardown if it still runs."""
    if not any(item.name == test_name for item in request.session.items):
        yield None
        return
    process = start_script(script)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


def script_result(process, timeout=300):
    """The JSON object a started script printed on its last line (its stderr if it failed)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def detector_replicas_script(model_class, kwargs):
    """A script comparing one device with two replicas for a dlnotes detector.

    ``model_class`` is ``"module:Class"`` (e.g. ``"dlnotes.models.retinanet:RetinaNet"``),
    ``kwargs`` its JSON-able constructor arguments. BN is frozen (per-replica batch statistics
    would differ from the global batch's). Replica 0 gets images 0-1 (3 GTs), replica 1 images
    2-3 (1 GT and an empty image), so per-replica normalisers would give other gradients. It
    prints the loss shares, the gradient error of summing the replicas' gradients, and one SGD
    ``fit`` step on each (logs and the update).
    """
    module, cls = model_class.split(":")
    return f"""
    import importlib
    import keras

    Model = getattr(importlib.import_module({module!r}), {cls!r})
    KWARGS = json.loads({json.dumps(json.dumps(kwargs))})

    def build():
        m = Model(**KWARGS)
        for layer in m._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        return m

    size = KWARGS["image_size"]
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (4, size[0], size[1], 3)).astype("float32")
    boxes = -np.ones((4, 3, 4), "float32")
    labels = -np.ones((4, 3), "int32")
    boxes[0, :2] = [[8, 8, 40, 40], [30, 20, 60, 50]]; labels[0, :2] = [0, 1]
    boxes[1, 0] = [4, 30, 24, 62]; labels[1, 0] = 2
    boxes[3, 0] = [10, 10, 50, 30]; labels[3, 0] = 1
    y = {{"boxes": boxes, "labels": labels}}

    # Fixed weights: with a random draw, a decoded box can land at an IoU within float rounding of
    # YOLO's ignore threshold, where a batch of 2 and one of 4 may decide differently.
    keras.utils.set_random_seed(0)
    single = build()
    initial = single.get_weights()
    def step_loss(model, x, y):
        # The loss of Keras' train step: forward_with_loss (one forward pass and the loss of
        # its outputs for a one-stage detector; both stages for a two-stage one).
        _, terms = model.forward_with_loss(x, y, training=True, seed=model.step_seed())
        return model.total_loss(terms, y)

    with tf.GradientTape() as tape:
        loss = step_loss(single, x, y)
    grads = tape.gradient(loss, single.trainable_variables)

    with strategy.scope():
        dist = build()
    dist.set_weights(initial)

    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            loss = step_loss(dist, x, y)
        grads = tape.gradient(loss, dist.trainable_variables)
        ctx = tf.distribute.get_replica_context()
        return loss, ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    batch = next(iter(strategy.experimental_distribute_dataset(data)))
    losses, dist_grads = tf.function(lambda b: strategy.run(replica_fn, args=b))(batch)
    shares = [float(v) for v in strategy.experimental_local_results(losses)]
    grad_error = max(
        float(np.abs(strategy.experimental_local_results(d)[0].numpy() - g.numpy()).max())
        for d, g in zip(dist_grads, grads)
    )
    grad_scale = max(float(np.abs(g.numpy()).max()) for g in grads)

    # Keras' own train step: one SGD step on the same global batch.
    single.compile(optimizer=keras.optimizers.SGD(1.0))
    with strategy.scope():
        dist.compile(optimizer=keras.optimizers.SGD(1.0))
    h_single = single.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0).history
    h_dist = dist.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0).history
    u_single = np.concatenate([(w - w0).ravel() for w, w0 in zip(single.get_weights(), initial)])
    u_dist = np.concatenate([(w - w0).ravel() for w, w0 in zip(dist.get_weights(), initial)])
    print(json.dumps({{
        "replicas": strategy.num_replicas_in_sync, "single_loss": float(loss), "shares": shares,
        "grad_error": grad_error, "grad_scale": grad_scale,
        "h_single": {{k: v[0] for k, v in h_single.items()}},
        "h_dist": {{k: v[0] for k, v in h_dist.items()}},
        "update_norm": float(np.linalg.norm(u_single)),
        "update_error": float(np.linalg.norm(u_dist - u_single)),
    }}))
    """


def check_replicas_match_one_device(out, terms):
    """The assertions on :func:`detector_replicas_script`'s result (``terms``: the logged loss
    terms besides ``loss``)."""
    assert out["replicas"] == 2
    # Each replica returns its share of the global loss; the shares sum to the one-device loss.
    assert sum(out["shares"]) == pytest.approx(out["single_loss"], rel=1e-5)
    assert abs(out["shares"][0] - out["shares"][1]) > 1e-2 * abs(out["single_loss"])
    # Summed gradients are the one-device gradients.
    assert out["grad_error"] <= 1e-4 * out["grad_scale"]
    # Keras' train step (SUM all-reduce) applies the one-device SGD update and reports the
    # global-batch losses.
    assert out["update_norm"] > 1e-3
    assert out["update_error"] <= 1e-3 * out["update_norm"]
    for key in ("loss", *terms):
        assert out["h_dist"][key] == pytest.approx(out["h_single"][key], rel=1e-4), key
