"""EfficientDet-D0: dlnotes against keras-cv-attention-models' ``EfficientDetD0``; FLOPs vs time.

**Peer.** ``keras-cv-attention-models`` (kecam, 1.4.3) is the Keras implementation of automl's
EfficientDet that installs from the registry. It does not run on Keras 3: it needs ``tf-keras``
(Keras 2) with ``TF_USE_LEGACY_KERAS=1``. This script sets that variable before TensorFlow is
imported, so ``tf.keras`` (kecam) is Keras 2 and ``import keras`` (dlnotes) is Keras 3, both in
one process on the same TensorFlow runtime. Install the peer with

    pip install keras-cv-attention-models "tf-keras~=<your TensorFlow version>" tqdm ftfy regex

or into a folder given with ``--peer-path`` (``pip install --target DIR --no-deps ...``). Without
it the script times dlnotes alone and says so.

Both models: random weights, 90 classes, 512x512, batch 2, the same images. kecam's backbone is
built explicitly with ``pretrained=None`` (nothing is downloaded). Timed as medians of
``--repeats`` interleaved rounds after two warm-up calls:

* forward: ``model(x, training=False)`` in a ``tf.function`` (graph; ``--xla`` adds XLA rows);
* train step: ``train_on_batch`` with SGD. dlnotes assigns anchors to the padded GT boxes inside
  the step; kecam's ``FocalLossWithBbox`` expects the assignment done in the data pipeline, so
  its targets are computed once beforehand with kecam's own
  ``assign_anchor_classes_by_iou_with_bboxes`` (its per-image time is printed separately). The
  two losses are the same (focal alpha 0.25, gamma 1.5; Huber delta 0.1, weight 50) except that
  kecam ignores anchors of IoU 0.4-0.5 where automl and dlnotes count them as background.

**FLOPs.** Multiply-adds of the forward pass (the convolutions, depthwise convolutions and matmuls
of the traced graph, as TensorFlow's profiler counts them, halved), against the time they take at
this machine's float32 matmul rate.

    python benchmarks/efficientdet_d0.py [--repeats N] [--xla] [--peer-path DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.keras = Keras 2 for the peer; `keras` stays Keras 3
# --peer-path must be importable before TensorFlow is: tf.keras resolves to tf_keras only if it
# can find it when TensorFlow is imported.
if "--peer-path" in sys.argv[:-1]:
    sys.path.insert(0, sys.argv[sys.argv.index("--peer-path") + 1])

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlnotes.flops import count_macs, matmul_rate  # noqa: E402
from dlnotes.models import EfficientDet  # noqa: E402

SIZE, CLASSES = 512, 90


def import_peer():
    try:
        from keras_cv_attention_models import coco, efficientdet, efficientnet
    except Exception as error:  # reported, then dlnotes is timed alone
        print(f"keras-cv-attention-models not available ({type(error).__name__}: {error})")
        return None
    return coco, efficientdet, efficientnet


def build_peer(peer):
    coco, efficientdet, efficientnet = peer
    backbone = efficientnet.EfficientNetV1B0(
        input_shape=(SIZE, SIZE, 3), num_classes=0, output_conv_filter=0, pretrained=None
    )
    picks = ["stack_2_block1_output", "stack_4_block2_output", "stack_6_block0_output"]
    model = efficientdet.EfficientDetD0(
        input_shape=(SIZE, SIZE, 3), num_classes=CLASSES, backbone=backbone, pretrained=None,
        features_pick=picks,
    )  # fmt: skip
    return model


def count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def random_batch(rng, batch, max_gt=6):
    images = rng.uniform(0, 255, (batch, SIZE, SIZE, 3)).astype(np.float32)
    boxes = -np.ones((batch, max_gt, 4), np.float32)
    labels = -np.ones((batch, max_gt), np.int32)
    for b in range(batch):
        n = rng.integers(3, max_gt + 1)
        xy = rng.uniform(0, SIZE * 0.7, (n, 2))
        wh = rng.uniform(24, SIZE * 0.3, (n, 2))
        boxes[b, :n] = np.concatenate([xy, np.minimum(xy + wh, SIZE - 1)], axis=1)
        labels[b, :n] = rng.integers(0, CLASSES, n)
    return images, {"boxes": boxes, "labels": labels}


def peer_targets(peer, targets):
    """kecam's training targets ``(B, A, 4 + classes + 1)``: its pipeline's assignment."""
    coco = peer[0]
    from keras_cv_attention_models.coco import anchors_func, tf_data

    anchors = anchors_func.get_anchors((SIZE, SIZE, 3), pyramid_levels=[3, 7], anchor_scale=4)
    rows = []
    for boxes, labels in zip(targets["boxes"], targets["labels"], strict=True):
        keep = labels >= 0
        yxyx = boxes[keep][:, [1, 0, 3, 2]] / SIZE  # kecam: relative yxyx, labels from 1
        bbox_labels = np.concatenate([yxyx, labels[keep, None] + 1.0], axis=1).astype(np.float32)
        assigned = anchors_func.assign_anchor_classes_by_iou_with_bboxes(bbox_labels, anchors)
        rows.append(tf_data.to_one_hot_with_class_mark(assigned, CLASSES))
    del coco
    return tf.stack(rows), anchors


def timed(rows, repeats, warmups=2):
    """Median wall ms of each callable over interleaved rounds (after ``warmups`` calls)."""
    for fn in rows.values():
        for _ in range(warmups):
            fn()
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--xla", action="store_true", help="add jit_compile=True forward rows")
    parser.add_argument("--peer-path", default=None, help="folder holding kecam and tf-keras")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images, targets = random_batch(rng, args.batch)
    x = tf.constant(images)
    keras.utils.set_random_seed(0)
    dl = EfficientDet.from_preset("efficientdet_d0", num_classes=CLASSES)
    dl.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9, global_clipnorm=10.0))
    dl.optimizer.build(dl.trainable_variables)
    peer = import_peer()
    kc = None
    if peer is not None:
        kc = build_peer(peer)
        from keras_cv_attention_models.coco.tf_losses import FocalLossWithBbox

        loss = FocalLossWithBbox(from_logits=False)  # kecam's outputs are sigmoids
        kc.compile(optimizer=tf.keras.optimizers.SGD(1e-4, momentum=0.9, global_clipnorm=10.0),
                   loss=loss)  # fmt: skip
        start = time.perf_counter()
        kc_targets, _ = peer_targets(peer, targets)
        assign_ms = (time.perf_counter() - start) * 1e3 / args.batch

    print(f"EfficientDet-D0, {CLASSES} classes, {SIZE}x{SIZE}, batch {args.batch}\n")
    print("| parameters | dlnotes | kecam |")
    print("| --- | ---: | ---: |")
    for label, fn in (("all", lambda m: m.count_params()),
                      ("trainable", lambda m: count(m.trainable_weights))):  # fmt: skip
        other = f"{fn(kc):,d}" if kc is not None else "-"
        print(f"| {label} | {fn(dl):,d} | {other} |")

    rows = {}
    for lib, model in (("dlnotes", dl), ("kecam", kc)):
        if model is None:
            continue
        fwd = tf.function(lambda x, m=model: m(x, training=False))
        rows[("forward, graph", lib)] = lambda f=fwd: np.asarray(tf.nest.flatten(f(x))[0])
        if args.xla:
            fx = tf.function(lambda x, m=model: m(x, training=False), jit_compile=True)
            rows[("forward, XLA", lib)] = lambda f=fx: np.asarray(tf.nest.flatten(f(x))[0])
    rows[("train step", "dlnotes")] = lambda: dl.train_on_batch(images, targets)
    if kc is not None:
        rows[("train step", "kecam")] = lambda: kc.train_on_batch(images, kc_targets)
    rows[("predict (decode + NMS)", "dlnotes")] = lambda: dl.predict(images, verbose=0)
    times = timed(rows, args.repeats)

    print("\n| work | dlnotes ms | kecam ms | kecam / dlnotes |")
    print("| --- | ---: | ---: | ---: |")
    for work in dict.fromkeys(name for name, _ in rows):
        d = statistics.median(times[(work, "dlnotes")])
        if (work, "kecam") in times:
            k = times[(work, "kecam")]
            ratio = statistics.median(
                a / b for a, b in zip(k, times[(work, "dlnotes")], strict=True)
            )
            print(f"| {work} | {d:.0f} | {statistics.median(k):.0f} | {ratio:.2f} |")
        else:
            print(f"| {work} | {d:.0f} | - | - |")
    if kc is not None:
        print(f"\nkecam's anchor assignment in its data pipeline: {assign_ms:.0f} ms per image "
              "(not in its train step; dlnotes' is)")  # fmt: skip

    macs = count_macs(dl, x[:1].shape)
    rate = matmul_rate()
    fwd = tf.function(lambda x: dl(x, training=False))
    one = timed({"1": lambda: np.asarray(fwd(x[:1])["class_logits"])}, args.repeats)["1"]
    measured = statistics.median(one) / 1e3
    print(f"\nD0 forward: {macs / 1e9:.2f} G multiply-adds per image (automl: 2.5 B FLOPs); "
          f"matmul rate {rate / 1e9:.0f} G multiply-adds/s; batch 1 forward {measured * 1e3:.0f} ms "
          f"= {measured / (macs / rate):.1f} x the time at the matmul rate")  # fmt: skip


if __name__ == "__main__":
    main()
