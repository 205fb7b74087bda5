"""YOLOv3: the vectorised ignore mask against keras-yolo3's per-image loop; forward time against
the FLOP floor; the mini preset's time to mAP on the book's data set.

**Ignore mask** (the default mode). The YOLO loss needs, for every predicted box of every level,
its best IoU with the GT boxes *of its own image*. dlnotes computes it for the whole batch at once
(:func:`dlnotes.losses.yolo_ignore_mask`: one masked ``(B, M, N)`` pairwise IoU); keras-yolo3
runs a ``tf.while_loop`` over the images, each with a ``boolean_mask`` of its valid GTs
(:func:`ignore_mask_while_loop` below, with dynamic shapes). Both
variants are checked to give the same mask and the same loss, then timed inside the same
YOLOv3-416 (Darknet-53, 80 classes, random weights, batch ``--batch`` = 16, 2 to 12 GT boxes per
image) as the median of ``--repeats`` interleaved rounds after a warm-up:

* ignore mask alone: the mask of every (cell, anchor) of the three levels (B x 10,647 decoded
  boxes) against the padded GT boxes, in graph mode and with ``jit_compile=True`` (the loop's
  ``boolean_mask`` inside a ``while_loop`` has dynamic shapes; TF 2.21's XLA compiles it with
  its dynamic padder, older versions refuse it, which the table then reports);
* loss: target assignment + the YOLO loss on fixed head outputs (what the variants change), in
  graph mode and with XLA;
* forward + loss: ``model(x, training=True)``, targets and loss;
* train step: forward, targets, loss, gradients and an SGD update, in one ``tf.function``.

**FLOPs.** The forward pass of YOLOv3-416 at batch 1 and ``--batch`` against the time its
multiply-adds (counted from the conv shapes) would take at this machine's measured float32 matmul
rate (the best of 1024, 2048 and 4096 square ``tf.matmul`` in a ``tf.function``): a ratio near 1
means the convolutions run as fast as TensorFlow's dense matmul.

**Training** (``--train``). Trains the CPU configuration of chapter 4 (``yolov3_mini_256`` with
k-means anchors of the training set) on the book's data set for ``--epochs`` epochs, evaluating
COCO AP / AP50 on the validation split after every epoch, and prints the training wall time
(evaluation excluded) at which each AP50 level was first reached.

    python benchmarks/yolo_ignore_mask.py [--repeats N] [--batch B] [--initial-filters F]
    python benchmarks/yolo_ignore_mask.py --train [--epochs N]
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

from dlnotes.boxes import clip_boxes, pairwise_iou, yolo_decode  # noqa: E402
from dlnotes.flops import count_macs, matmul_rate  # noqa: E402
from dlnotes.losses import yolo_ignore_mask, yolo_loss  # noqa: E402
from dlnotes.models import YOLOv3  # noqa: E402


def ignore_mask_while_loop(pred_boxes, gt_boxes, gt_valid, ignore_thresh=0.5):
    """keras-yolo3's ignore mask: a ``tf.while_loop`` over the images, each with a
    ``boolean_mask`` of its valid GTs (dynamic shapes). ``(B, M, 4)``, ``(B, N, 4)``,
    ``(B, N)`` -> ``(B, M)`` bool."""
    batch = tf.shape(pred_boxes)[0]
    masks = tf.TensorArray(tf.bool, size=batch)

    def body(b, masks):
        true_box = tf.boolean_mask(gt_boxes[b], gt_valid[b])  # (n, 4)
        best_iou = tf.reduce_max(pairwise_iou(pred_boxes[b], true_box), axis=-1)
        return b + 1, masks.write(b, best_iou > ignore_thresh)

    _, masks = tf.while_loop(lambda b, masks: b < batch, body, [tf.constant(0), masks])
    return tf.stop_gradient(masks.stack())


def random_targets(batch, image_size, num_classes, rng, max_gt=12):
    """Padded ``{"boxes": (B, max_gt, 4), "labels": (B, max_gt)}`` with 2..max_gt boxes each."""
    boxes = -np.ones((batch, max_gt, 4), np.float32)
    labels = -np.ones((batch, max_gt), np.int32)
    for b in range(batch):
        n = rng.integers(2, max_gt + 1)
        wh = rng.uniform(16, image_size / 2, (n, 2))
        xy = rng.uniform(0, image_size - wh)
        boxes[b, :n] = np.concatenate([xy, xy + wh], -1)
        labels[b, :n] = rng.integers(0, num_classes, n)
    return {"boxes": boxes, "labels": labels}


def loss_fn(model, mask_fn):
    """``(y, outputs) -> total loss`` with the given ignore-mask implementation."""

    def fn(y, outputs):
        boxes = clip_boxes(tf.cast(y["boxes"], tf.float32), model.image_size)
        labels = tf.cast(y["labels"], tf.int32)
        y_true = model.compute_targets(boxes, labels)
        terms = yolo_loss(
            y_true, outputs, model.yolo_anchors, model.image_size, boxes, labels,
            ignore_thresh=model.ignore_thresh, ignore_mask_fn=mask_fn,
        )  # fmt: skip
        return terms["total"]

    return fn


def timed(rows, repeats):
    """Median seconds of each ``rows[name]()`` over interleaved rounds (after one warm-up)."""
    for fn in rows.values():
        fn()
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def speed(args):
    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    size = args.image_size
    model = YOLOv3(num_classes=80, image_size=(size, size), initial_filters=args.initial_filters)
    x = tf.constant(rng.uniform(0, 255, (args.batch, size, size, 3)).astype(np.float32))
    y = {k: tf.constant(v) for k, v in random_targets(args.batch, size, 80, rng).items()}
    outputs = [tf.constant(o) for o in model(x, training=True)]

    variants = {"vectorised": yolo_ignore_mask, "while_loop": ignore_mask_while_loop}
    # The same mask and loss from both (on real decoded boxes of the random model).
    losses = {name: loss_fn(model, fn) for name, fn in variants.items()}
    values = {name: float(tf.function(fn)(y, outputs)) for name, fn in losses.items()}
    assert abs(values["vectorised"] - values["while_loop"]) <= 1e-5 * abs(values["vectorised"])
    pred = tf.random.uniform((args.batch, 500, 4)) * size
    pred = tf.concat([pred[..., :2], pred[..., :2] + pred[..., 2:] / 4], -1)
    valid = y["labels"] >= 0
    same = tf.reduce_all(
        yolo_ignore_mask(pred, y["boxes"], valid, 0.1)
        == ignore_mask_while_loop(pred, y["boxes"], valid, 0.1)
    )
    assert bool(same), "the two ignore masks differ"

    # The mask alone on this model's decoded boxes (all levels at once), and under XLA, which the
    # loop's dynamic shapes (boolean_mask in a while_loop) may not allow (older TF versions).
    decoded = tf.concat(
        [
            tf.reshape(
                yolo_decode(
                    o[..., :4], model.yolo_anchors.level_anchors(k), model.yolo_anchors.strides[k]
                ),
                (args.batch, -1, 4),
            )
            for k, o in enumerate(outputs)
        ],
        axis=1,
    )
    mask_args = (decoded, y["boxes"], valid)
    xla_status = {}
    for name, fn in variants.items():
        try:
            xla = tf.function(fn, jit_compile=True)
            xla(*mask_args).numpy()
            xla_loss = tf.function(losses[name], jit_compile=True)
            xla_loss(y, outputs).numpy()
            xla_status[name] = (xla, xla_loss)
        except Exception as error:  # an XLA that rejects the dynamic shapes of the loop
            xla_status[name] = type(error).__name__

    optimizer = keras.optimizers.SGD(1e-6)
    optimizer.build(model.trainable_variables)
    rows = {}
    for name, fn in losses.items():
        loss_only = tf.function(fn)
        forward_loss = tf.function(lambda x, y, fn=fn: fn(y, model(x, training=True)))

        @tf.function
        def step(x, y, fn=fn):
            with tf.GradientTape() as tape:
                loss = fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        mask_only = tf.function(variants[name])
        rows[("ignore mask alone", name)] = lambda f=mask_only: f(*mask_args).numpy()
        if not isinstance(xla_status[name], str):
            xla_mask, xla_loss = xla_status[name]
            rows[("ignore mask alone, XLA", name)] = lambda f=xla_mask: f(*mask_args).numpy()
            rows[("loss, XLA", name)] = lambda f=xla_loss: f(y, outputs).numpy()
        rows[("loss", name)] = lambda f=loss_only: f(y, outputs).numpy()
        rows[("forward + loss", name)] = lambda f=forward_loss: f(x, y).numpy()
        rows[("train step", name)] = lambda f=step: f(x, y).numpy()
    print(f"timing {len(rows)} rows, {args.repeats} rounds ...", flush=True)
    medians = timed(rows, args.repeats)

    print(
        f"\nYOLOv3-{size} (initial_filters {args.initial_filters}), 80 classes, batch "
        f"{args.batch}, random weights; TF {tf.__version__}, Keras {keras.__version__}; "
        f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}; median of "
        f"{args.repeats} interleaved rounds\n"
    )
    print("| row | vectorised ms | while_loop ms | while_loop / vectorised |")
    print("| --- | ---: | ---: | ---: |")
    for row in (
        "ignore mask alone", "ignore mask alone, XLA", "loss", "loss, XLA", "forward + loss",
        "train step",
    ):  # fmt: skip
        v = medians[(row, "vectorised")]
        if (row, "while_loop") in medians:
            w = medians[(row, "while_loop")]
            print(f"| {row} | {v * 1e3:.1f} | {w * 1e3:.1f} | {w / v:.2f} |")
        else:
            print(f"| {row} | {v * 1e3:.1f} | fails to compile ({xla_status['while_loop']}) | |")

    rate = matmul_rate(sizes=(1024, 2048, 4096))
    macs = count_macs(model, (1, size, size, 3))  # the 75 convs
    forward = tf.function(lambda x: model(x, training=False))
    one = x[:1]
    fwd = timed({"1": lambda: forward(one)[0].numpy(), "B": lambda: forward(x)[0].numpy()},
                args.repeats)  # fmt: skip
    print(f"\nmeasured float32 matmul rate: {rate * 2 / 1e9:.0f} GFLOP/s ({rate / 1e9:.0f} G "
          f"multiply-adds/s); YOLOv3-{size}: {macs / 1e9:.2f} G multiply-adds per image\n")  # fmt: skip
    print("| forward | measured ms | at the matmul rate, ms | measured / matmul-rate time |")
    print("| --- | ---: | ---: | ---: |")
    for label, n in (("1", 1), ("B", args.batch)):
        floor = macs * n / rate
        print(f"| batch {n} | {fwd[label] * 1e3:.0f} | {floor * 1e3:.0f} | "
              f"{fwd[label] / floor:.2f} |")  # fmt: skip


def train(args):
    from dlnotes.anchors import kmeans_anchors
    from dlnotes.data import load_shapes
    from dlnotes.evaluation import evaluate_detector

    keras.utils.set_random_seed(args.seed)
    train_set, val_set = load_shapes("train"), load_shapes("val")
    boxes = train_set.padded_targets()["boxes"].reshape(-1, 4)
    boxes = boxes[boxes[:, 0] >= 0]
    anchors = kmeans_anchors(boxes[:, 2:] - boxes[:, :2], k=9)
    model = YOLOv3.from_preset(
        "yolov3_mini_256", num_classes=train_set.num_classes, anchors=anchors.tolist()
    )
    data = train_set.to_tf_dataset(
        batch_size=args.train_batch, image_size=256, horizontal_flip=True, shuffle=True,
        seed=args.seed, drop_remainder=True,
    )  # fmt: skip
    steps = len(train_set) // args.train_batch * args.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - 100, warmup_target=args.lr, warmup_steps=100
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, global_clipnorm=10.0),
        jit_compile=args.jit,
    )
    trained, reached = 0.0, {}
    print(f"yolov3_mini_256, {model.count_params():,d} parameters, {steps} steps of "
          f"{args.train_batch}; anchors {np.round(anchors).astype(int).tolist()}")  # fmt: skip
    print("| epoch | training s | loss | AP | AP50 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for epoch in range(args.epochs):
        start = time.perf_counter()
        logs = model.fit(data, epochs=epoch + 1, initial_epoch=epoch, verbose=0).history
        trained += time.perf_counter() - start
        stats = evaluate_detector(model, val_set).result.stats
        print(f"| {epoch + 1} | {trained:.0f} | {logs['loss'][-1]:.3f} | {stats['AP']:.3f} | "
              f"{stats['AP50']:.3f} |", flush=True)  # fmt: skip
        for level in (0.1, 0.2, 0.3, 0.4, 0.5):
            if stats["AP50"] >= level and level not in reached:
                reached[level] = trained
    print("\n| AP50 reached | training wall time, s |\n| ---: | ---: |")
    for level, seconds in reached.items():
        print(f"| {level:.1f} | {seconds:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=416)
    parser.add_argument("--initial-filters", type=int, default=32, help="32: YOLOv3 itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true", help="train yolov3_mini_256 to mAP")
    parser.add_argument("--epochs", type=int, default=8, help="--train: epochs")
    parser.add_argument("--train-batch", type=int, default=8, help="--train: batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="--train: peak learning rate")
    parser.add_argument("--jit", action="store_true", help="--train: jit_compile=True")
    args = parser.parse_args()
    train(args) if args.train else speed(args)


if __name__ == "__main__":
    main()
