"""The keypoint model of chapter 7 against RetinaNet on the same backbone: train step, inference,
and decoding by peaks against decoding by NMS.

Both models are the book's CPU presets on the same trunk, ``resnet_tiny`` + ``fpn_bn``, random
weights, graph mode (``jit_compile=False``), on the first ``--batch`` (8) images of the shapes data
set at 256 x 256 with their targets:

* ``keypoint_tiny_256`` (:class:`dlnotes.models.KeypointDetector`): levels P2-P5 (strides 4-32),
  32 channels, 6 classes x 5 keypoints = 30 point classes + 1 centerness per cell;
* ``retinanet_tiny_256`` (:class:`dlnotes.models.RetinaNet`): levels P3-P7, 64 channels, 9
  anchors per cell, 6 classes;
* ``keypoint, RetinaNet's levels``: the keypoint model with RetinaNet's width (64) and levels
  (P3-P7, strides 8-128), so that only the heads, the targets and the decoding differ.

Rows, each timed in interleaved rounds after ``--warmups`` calls, as the median wall time and the
median process CPU time (``time.process_time``, both cores):

* **train step**: ``train_on_batch`` after ``compile(SGD)`` (forward, targets computed in the
  graph, loss, gradients, update, Keras' checks);
* **inference**: ``predict_on_batch`` (input checks, forward, decoding);
* **forward**: ``model(x, training=False)`` in a ``tf.function``;
* **decoding**: ``model.decode`` on fixed forward outputs, in a ``tf.function``. For the keypoint
  model that is the 3 x 3 max-pool peaks of centerness x class, the top 500 of all levels, and
  the grouping of the points around their centre keypoint (:func:`group_keypoints`); for RetinaNet
  the top 1,000 anchors per level, box decoding and the batched per-class NMS of
  :mod:`dlnotes.postprocess` (100 detections).

Decoding runs on the forward outputs with every logit map replaced by seeded N(0, 1) noise
(:func:`busy_outputs`): the untrained heads give prior scores below both score thresholds and
leave nothing to decode, while the noise puts every score far above them, so that both decoders
keep candidates up to their limits (500 peaks; 1,000 anchors per level into NMS), their most
expensive case. The multiply-adds of the forward pass
(:func:`dlnotes.flops.count_macs`) and the parameter counts are printed beside the times.

    python benchmarks/keypoint.py [--repeats N] [--batch B]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlnotes.data import load_shapes  # noqa: E402
from dlnotes.flops import count_macs  # noqa: E402
from dlnotes.models import KeypointDetector, RetinaNet  # noqa: E402

KEYPOINT_AT_RETINANET_LEVELS = dict(
    num_channels=64,
    backbone_kwargs={"levels": [3, 4, 5]},
    neck_kwargs={"min_level": 3, "max_level": 7},
)


def build_models(num_classes, num_keypoints):
    """The three configurations, seeded."""
    keras.utils.set_random_seed(0)
    return {
        "keypoint_tiny_256": KeypointDetector.from_preset(
            "keypoint_tiny_256", num_classes=num_classes, num_keypoints=num_keypoints
        ),
        "keypoint, RetinaNet's levels": KeypointDetector.from_preset(
            "keypoint_tiny_256",
            num_classes=num_classes,
            num_keypoints=num_keypoints,
            **KEYPOINT_AT_RETINANET_LEVELS,
        ),
        "retinanet_tiny_256": RetinaNet.from_preset("retinanet_tiny_256", num_classes=num_classes),
    }


def batch(batch_size):
    """The first images of the training split with boxes, labels and keypoints."""
    data = load_shapes("train")
    images, targets = next(
        iter(data.to_tf_dataset(batch_size=batch_size, image_size=256, with_keypoints=True))
    )
    return data, images, targets


def busy_outputs(outputs, seed=0):
    """The forward outputs with every logit map replaced by seeded N(0, 1) noise: scores around
    0.5, far above both models' score thresholds, so decoding keeps candidates up to its limits
    (an untrained head gives prior scores below the thresholds, and nothing to decode)."""
    rng = np.random.default_rng(seed)

    def replace(key, value):
        if "logit" not in key:
            return value
        if isinstance(value, (list, tuple)):
            return [tf.constant(rng.normal(size=v.shape), v.dtype) for v in value]
        return tf.constant(rng.normal(size=value.shape), value.dtype)

    return {key: replace(key, value) for key, value in outputs.items()}


def rows_for(name, model, images, targets):
    """name -> a function that runs one timed call."""
    keys = (
        ("keypoints", "labels", "boxes")
        if isinstance(model, KeypointDetector)
        else ("boxes", "labels")
    )
    y = {k: targets[k] for k in keys}
    model.compile(optimizer=keras.optimizers.SGD(1e-4))
    forward = tf.function(lambda x: model(x, training=False))
    outputs = busy_outputs(forward(images))
    decode = tf.function(model.decode)

    def materialise(out):
        return [v.numpy() for v in tf.nest.flatten(out)]

    return {
        f"{name}: train step": lambda: model.train_on_batch(images, y),
        f"{name}: inference (predict_on_batch)": lambda: model.predict_on_batch(images),
        f"{name}: forward": lambda: materialise(forward(images)),
        f"{name}: decoding": lambda: materialise(decode(outputs)),
    }


def timed(rows, repeats, warmups):
    """Wall and CPU times (ms) per row over ``repeats`` interleaved rounds after ``warmups``."""
    for name, fn in rows.items():
        print(f"  warm-up: {name}", flush=True)
        for _ in range(warmups):
            fn()
    results = {name: {"wall": [], "cpu": []} for name in rows}
    for r in range(repeats):
        print(f"  round {r + 1}/{repeats}", flush=True)
        for name, fn in rows.items():
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            results[name]["wall"].append((time.perf_counter() - wall) * 1e3)
            results[name]["cpu"].append((time.process_time() - cpu) * 1e3)
    return results


def ratio(results, num, den):
    """Median over rounds of ``num / den`` (wall times of the same rounds)."""
    pairs = zip(results[num]["wall"], results[den]["wall"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; batch {args.batch}, 256 x 256, "
        f"{args.repeats} rounds after {args.warmups} warm-up calls"
    )
    data, images, targets = batch(args.batch)
    models = build_models(data.num_classes, data.num_keypoints)
    print(f"\n{'model':30s} {'parameters':>11s} {'G multiply-adds':>16s} {'levels':>16s}")
    for name, model in models.items():
        macs = count_macs(model, (args.batch, 256, 256, 3))
        strides = "/".join(str(s) for s in model.strides) if hasattr(model, "strides") else "8-128"
        print(f"{name:30s} {model.count_params():11,d} {macs / 1e9:16.2f} {strides:>16s}")
    rows = {}
    for name, model in models.items():
        rows.update(rows_for(name, model, images, targets))
    results = timed(rows, args.repeats, args.warmups)
    print(f"\n{'row':58s} {'wall ms':>9s} {'CPU ms':>9s}")
    for name, result in results.items():
        wall, cpu = statistics.median(result["wall"]), statistics.median(result["cpu"])
        print(f"{name:58s} {wall:9.1f} {cpu:9.1f}")
    print("\nratios (median over rounds of the wall-time ratio)")
    for kp in ("keypoint_tiny_256", "keypoint, RetinaNet's levels"):
        for part in ("train step", "inference (predict_on_batch)", "forward", "decoding"):
            value = ratio(results, f"{kp}: {part}", f"retinanet_tiny_256: {part}")
            print(f"  {kp} / retinanet_tiny_256, {part:28s} {value:6.2f}")
    for name in models:
        share = ratio(results, f"{name}: decoding", f"{name}: inference (predict_on_batch)")
        print(f"  {name}: decoding / inference {share:6.2f}")
    assert np.isfinite([statistics.median(r["wall"]) for r in results.values()]).all()


if __name__ == "__main__":
    main()
