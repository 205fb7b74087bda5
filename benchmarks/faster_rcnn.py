"""Faster R-CNN on a CPU: inference and the train step split into their parts.

Two configurations of :class:`dlnotes.models.FasterRCNN`, random weights, graph mode
(``jit_compile=False``), the first images of the book's shapes data set
(``load_shapes("train")``, letterboxed to the model's size) with their targets:

* ``faster_rcnn_tiny_256``: the CPU preset, 6 classes, 256x256, batch 4 (``--batch``);
* ``faster_rcnn_vgg16``: the paper's model, 20 classes (VOC's; the shapes labels are 0-5),
  608x1008, batch 1. Heavy: ``--vgg-repeats`` rounds, fewer rows, skipped with ``--quick``.

**Inference** is :meth:`FasterRCNN.detect` (what ``predict`` runs after the input checks), split
into its parts, each its own ``tf.function`` on the outputs of the previous part, so that the
parts add up to about the whole: the trunk (preprocessing + backbone), the RPN head (+ flatten),
the proposals (test settings: top-k, decode, clip, NMS), RoI pooling, the detector head (fc6,
fc7, the two outputs) and the final decoding + per-class NMS. The whole ``detect`` (one
``tf.function``; the parts are checked to give its detection counts) and, for the tiny preset,
``predict_on_batch`` are timed beside them.

**The train step** is ``train_on_batch`` after ``compile(SGD)``, and its parts, each a
``tf.function`` on the previous part's outputs (``training=True``, a fixed sampling seed): the
trunk + RPN head + RPN targets + RPN loss; the proposals (train settings); the proposal targets;
RoI pooling + detector head + detector loss. ``FasterRCNN`` has no public method for the two
loss halves (``forward_with_loss`` runs them all), so the parts are rebuilt from its public
methods (``trunk``, ``rpn_outputs``, ``proposals``, ``roi_head``) and the public functions of
:mod:`dlnotes.models.rpn` / :mod:`dlnotes.models.roi_heads` with the model's ``get_config()``,
and checked to give ``forward_with_loss``'s four loss terms before timing. The backward pass is
``train_on_batch`` minus ``forward_with_loss``; for the tiny preset a ``GradientTape`` row
(forward + loss + gradients, no update) splits it into the backward pass alone and the SGD
update with Keras' step (input and finiteness checks, metrics). Two more rows give the gradients
of the two differentiable halves (trunk + RPN to their weights; RoI pooling + head to the head's
weights and the feature map), whose sum is about the whole forward + backward.

**RoIPool against RoIAlign.** For the tiny preset, a second model with ``roi_pooling="align"``
(``sampling_ratio=2``) and the same weights is timed in the same rounds.

**FLOPs.** The multiply-adds (``count_macs``) of the trunk (the backbone), the RPN head and the
detector head, against the float32 matmul rate of this machine: a 2048 x 2048 ``tf.matmul`` in a
``tf.function`` (what :func:`dlnotes.flops.matmul_rate` times, printed before and after) timed
in the same rounds as the parts, so that it sees the same load; measured time / the time at that
rate, in wall and in CPU time.

Every row is timed in interleaved rounds after ``--warmups`` calls (a part's call while it is
set up counts as one); the tables give the median wall time, the median process CPU time
(``time.process_time``: both cores; it moves less than the wall time with the load of other
jobs), and the share of the whole (median wall / the whole's median wall, and the same for the
CPU time).

    python benchmarks/faster_rcnn.py [--repeats N] [--vgg-repeats N] [--quick]
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
from dlnotes.flops import count_macs, matmul_rate  # noqa: E402
from dlnotes.models import FasterRCNN  # noqa: E402
from dlnotes.models.roi_heads import fast_rcnn_loss, proposal_targets  # noqa: E402
from dlnotes.models.rpn import rpn_loss, rpn_targets  # noqa: E402

# ---------------------------------------------------------------------------------- timing


def materialise(out):
    """Copies every tensor of a nest to the host (so the call has finished)."""
    for t in tf.nest.flatten(out):
        if hasattr(t, "numpy"):
            t.numpy()
    return out


class Rows:
    """Named callables to time; :meth:`add` with ``call=True`` also calls it once (its first
    call, which traces it) and returns the result."""

    def __init__(self):
        self.fns, self.first = {}, {}

    def add(self, name, fn, call=False):
        self.fns[name] = fn
        if call:
            start = time.perf_counter()
            out = fn()
            self.first[name] = time.perf_counter() - start
            return out
        return None


def timed(rows, repeats, warmups):
    """Wall and process CPU times (ms) of each row over ``repeats`` interleaved rounds, after
    ``warmups`` calls of each (tracing, graph optimisation; a call in :meth:`Rows.add`
    counts)."""
    results = {}
    for name, fn in rows.fns.items():
        print(f"  warm-up: {name.strip()}", flush=True)
        calls = warmups
        if name not in rows.first:
            start = time.perf_counter()
            fn()
            rows.first[name] = time.perf_counter() - start
        calls -= 1
        for _ in range(calls):
            fn()
        results[name] = {"first": rows.first[name], "wall": [], "cpu": []}
    for r in range(repeats):
        print(f"  round {r + 1}/{repeats}", flush=True)
        for name, fn in rows.fns.items():
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            results[name]["wall"].append((time.perf_counter() - wall) * 1e3)
            results[name]["cpu"].append((time.process_time() - cpu) * 1e3)
    return results


def med(result, key="wall"):
    return statistics.median(result[key])


def round_ratio(num, den, key="wall"):
    """Median over rounds of ``num / den`` (timed in the same rounds)."""
    return statistics.median(a / b for a, b in zip(num[key], den[key], strict=True))


def combine(results, plus, minus=()):
    """A derived row: per round, the sum of the ``plus`` rows minus the ``minus`` rows."""
    return {
        key: [
            sum(results[n][key][i] for n in plus) - sum(results[n][key][i] for n in minus)
            for i in range(len(results[plus[0]][key]))
        ]
        for key in ("wall", "cpu")
    }


def batch_of(model, batch, split="train"):
    """The first ``batch`` images of the shapes data set, letterboxed to the model's size."""
    data = load_shapes(split).to_tf_dataset(batch_size=batch, image_size=model.image_size)
    images, targets = next(iter(data))
    return images, {"boxes": targets["boxes"], "labels": targets["labels"]}


# ---------------------------------------------------------------------------------- the parts

TRUNK = "trunk (preprocessing + backbone)"
RPN_HEAD = "RPN head + flatten"
HEAD = "detector head (fc6, fc7, outputs)"
INFERENCE_PARTS = (
    TRUNK,
    RPN_HEAD,
    "proposals (top-k, decode, clip, NMS)",
    "RoI pooling",
    HEAD,
    "decoding + per-class NMS",
)
DETECT = "detect, one tf.function"
PREDICT = "predict_on_batch (checks + detect)"
HEAD_300 = "detector head on 300 RoIs per image (the paper's test setting)"

TRAIN_PARTS = (
    "trunk + RPN head + RPN targets + loss",
    "proposals (train settings)",
    "proposal targets",
    "RoI pooling + head + detector loss",
)
RPN_LOSS = "  of which RPN targets + loss"
FORWARD = "forward_with_loss, one tf.function"
GRADIENTS = "forward + loss + gradients (GradientTape, no update)"
STEP = "train_on_batch (SGD)"
RPN_GRAD = "trunk + RPN + loss, with gradients"
ROI_GRAD = "RoI pooling + head + loss, with gradients"
POOL_GRAD = "  of which RoI pooling forward + gradient"
BACKWARD = "backward pass + update (train_on_batch - forward_with_loss)"
BACKWARD_ONLY = "  backward pass (gradients - forward_with_loss)"
UPDATE = "  SGD update + Keras step (train_on_batch - gradients)"
SUM_INFERENCE = "sum of the six parts"
SUM_TRAIN = "sum of the four forward parts"
MATMUL_SIZE = 2048
MATMUL = "reference: 2048 x 2048 matmul"


def inference_parts(rows, model, x, tag="", names=None, heavy=False):
    """Adds detect's parts (each a tf.function on the previous part's outputs) to ``rows``
    (only ``names`` if given); returns the proposal and detection counts."""
    trunk = tf.function(lambda x: model.trunk(x, training=False))
    rpn = tf.function(lambda levels: model.rpn_outputs(levels))
    proposals = tf.function(lambda o, d: model.proposals(o, d, training=False))
    pool = tf.function(lambda levels, rois: model.pool_rois(levels, rois))
    head = tf.function(lambda pooled: model.box_head(pooled, training=False))
    detect = tf.function(model.detect)

    @tf.function
    def decode(rois, num_proposals, class_logits, box_deltas):
        mask = tf.range(tf.shape(rois)[1])[None, :] < num_proposals[:, None]
        return model.decode(
            {"rois": rois, "roi_mask": mask, "class_logits": class_logits, "box_deltas": box_deltas}
        )

    def add(name, fn):
        if names is None or name in names:
            return rows.add(name + tag, lambda: materialise(fn()), call=True)
        return materialise(fn())

    levels = add(TRUNK, lambda: trunk(x))
    objectness, deltas = add(RPN_HEAD, lambda: rpn(levels))
    props = add(INFERENCE_PARTS[2], lambda: proposals(objectness, deltas))
    pooled = add(INFERENCE_PARTS[3], lambda: pool(levels, props["boxes"]))
    logits, box_deltas = add(HEAD, lambda: head(pooled))
    dets = add(
        INFERENCE_PARTS[5],
        lambda: decode(props["boxes"], props["num_proposals"], logits, box_deltas),
    )
    whole = add(DETECT, lambda: detect(x))
    assert np.array_equal(whole["num_detections"], dets["num_detections"]), "parts != detect"
    if names is None and not heavy:
        rows.add(PREDICT + tag, lambda: materialise(model.predict_on_batch(x)))
    if names is None and pooled.shape[1] > 300:
        rows.add(HEAD_300 + tag, lambda: materialise(head(pooled[:, :300])))
    return {
        "test proposals per image": float(np.mean(props["num_proposals"])),
        "detections per image": float(np.mean(dets["num_detections"])),
    }


def train_parts(rows, model, x, y, tag="", names=None, heavy=False):
    """Adds the train step and its parts to ``rows`` (only ``names`` if given), after checking
    that the parts give forward_with_loss's four loss terms; returns counts and the terms."""
    c = model.get_config()
    seed = tf.constant([0, 1], tf.int64)
    boxes, labels = tf.cast(y["boxes"], tf.float32), tf.cast(y["labels"], tf.int32)
    locations = sum(h * w for h, w in model.anchor_generator.level_shapes(model.image_size))
    rpn_weights = [*model.backbone.trainable_weights, *model.rpn_head.trainable_weights]
    head_weights = model.box_head.trainable_weights

    def rpn_terms(objectness, deltas):
        targets = rpn_targets(
            model.anchors, boxes, labels, model.image_size, model.rpn_box_coder, seed,
            positive_threshold=c["rpn_positive_threshold"],
            negative_threshold=c["rpn_negative_threshold"], num_samples=c["rpn_num_samples"],
            positive_fraction=c["rpn_positive_fraction"], allowed_border=c["allowed_border"],
        )  # fmt: skip
        return rpn_loss(
            targets.states, targets.box_targets, objectness, deltas,
            normalization=c["rpn_loss_normalization"], num_samples=c["rpn_num_samples"],
            num_locations=locations,
        )  # fmt: skip

    def trunk_rpn(x):
        levels = model.trunk(x, training=True)
        objectness, deltas = model.rpn_outputs(levels)
        return levels, objectness, deltas, rpn_terms(objectness, deltas)

    def sample(props):
        mask = tf.range(tf.shape(props["boxes"])[1])[None, :] < props["num_proposals"][:, None]
        roi_seed = tf.stack([seed[0] + 1, seed[1]])  # forward_with_loss's second draw
        return proposal_targets(
            props["boxes"], mask, boxes, labels, roi_seed, model.num_classes,
            model.roi_box_coder, num_samples=c["roi_num_samples"],
            positive_fraction=c["roi_positive_fraction"], fg_threshold=c["roi_fg_threshold"],
            bg_threshold=c["roi_bg_threshold"],
        )  # fmt: skip

    def roi_loss(levels, targets):
        class_logits, box_deltas = model.roi_head(levels, targets.rois, training=True)
        losses = fast_rcnn_loss(
            targets.class_targets, targets.box_targets, targets.valid, class_logits, box_deltas,
            beta=c["smooth_l1_beta"],
        )  # fmt: skip
        return losses["class_loss"], losses["box_loss"]

    f_trunk_rpn = tf.function(trunk_rpn)
    f_rpn_loss = tf.function(rpn_terms)
    f_proposals = tf.function(lambda o, d: model.proposals(o, d, training=True))
    f_sample = tf.function(sample)
    f_roi = tf.function(roi_loss)
    f_forward = tf.function(lambda x, y: model.forward_with_loss(x, y, training=True, seed=seed)[1])

    @tf.function
    def f_gradients(x, y):
        with tf.GradientTape() as tape:
            _, terms = model.forward_with_loss(x, y, training=True, seed=seed)
            loss = tf.add_n(list(terms.values()))
        return loss, tape.gradient(loss, model.trainable_weights)

    @tf.function
    def f_trunk_rpn_grad(x):
        with tf.GradientTape() as tape:
            *_, (obj_loss, box_loss) = trunk_rpn(x)
            loss = obj_loss + box_loss
        return loss, tape.gradient(loss, rpn_weights)

    @tf.function
    def f_roi_grad(levels, targets):
        with tf.GradientTape() as tape:
            tape.watch(levels)
            loss = tf.add_n(roi_loss(levels, targets))
        return loss, tape.gradient(loss, [*head_weights, *levels])

    @tf.function
    def f_pool_grad(levels, rois):
        with tf.GradientTape() as tape:
            tape.watch(levels)
            pooled = model.pool_rois(levels, rois)
        return pooled, tape.gradient(pooled, levels)  # upstream gradient: ones

    def add(name, fn, needed=False):
        if names is None or name in names:
            return rows.add(name + tag, lambda: materialise(fn()), call=True)
        return materialise(fn()) if needed else None

    levels, objectness, deltas, rpn_losses = add(TRAIN_PARTS[0], lambda: f_trunk_rpn(x), True)
    add(RPN_LOSS, lambda: f_rpn_loss(objectness, deltas))
    props = add(TRAIN_PARTS[1], lambda: f_proposals(objectness, deltas), True)
    targets = add(TRAIN_PARTS[2], lambda: f_sample(props), True)
    roi_losses = add(TRAIN_PARTS[3], lambda: f_roi(levels, targets), True)
    terms = add(FORWARD, lambda: f_forward(x, y), True)
    parts = [float(v) for v in (*rpn_losses, *roi_losses)]
    keys = ("rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss")
    expected = [float(terms[k]) for k in keys]
    assert np.allclose(parts, expected, rtol=1e-4, atol=1e-6), (parts, expected)
    if names is None or GRADIENTS in names:
        if not heavy:
            rows.add(GRADIENTS + tag, lambda: materialise(f_gradients(x, y)))
    rows.add(STEP + tag, lambda: model.train_on_batch(x, y))
    for name, fn in (
        (RPN_GRAD, lambda: f_trunk_rpn_grad(x)),
        (ROI_GRAD, lambda: f_roi_grad(levels, targets)),
        (POOL_GRAD, lambda: f_pool_grad(levels, targets.rois)),
    ):
        if names is None or name in names:
            rows.add(name + tag, lambda fn=fn: materialise(fn()))
    return {
        "train proposals per image": float(np.mean(props["num_proposals"])),
        "sampled RoIs per image (of the slots)": (
            float(np.mean(np.sum(targets.valid, axis=1))),
            int(targets.valid.shape[1]),
        ),
        "foreground RoIs per image": float(np.mean(np.sum(targets.class_targets > 0, axis=1))),
        "loss terms": {k: round(v, 4) for k, v in zip(keys, parts, strict=True)},
    }


# ---------------------------------------------------------------------------------- tables


def print_table(title, names, results, whole, macs=None, rates=None):
    """``| part | median ms | CPU ms | share (CPU) | [MACs, floor, measured / floor (CPU)] |``;
    ``rates``: multiply-adds per wall second and per CPU second of the reference matmul."""
    print(f"\n{title}\n")
    head = "| part | median ms | CPU ms | share of the whole (CPU) |"
    rule = "| --- | ---: | ---: | ---: |"
    if macs is not None:
        head += " G multiply-adds | at the matmul rate, ms | measured / matmul-rate time (CPU) |"
        rule += " ---: | ---: | ---: |"
    print(head + "\n" + rule)
    for name in names:
        if name not in results:
            continue
        r = results[name]
        line = (
            f"| {name} | {med(r):.1f} | {med(r, 'cpu'):.1f} | {med(r) / med(whole):.0%} "
            f"({med(r, 'cpu') / med(whole, 'cpu'):.0%}) |"
        )
        if macs is not None:
            if name in macs:
                floor, cpu_floor = (macs[name] / rate * 1e3 for rate in rates)
                line += (
                    f" {macs[name] / 1e9:.2f} | {floor:.1f} | {med(r) / floor:.2f} "
                    f"({med(r, 'cpu') / cpu_floor:.2f}) |"
                )
            else:
                line += " | | |"
        print(line)


def largest(names, results):
    """``name (wall ms, CPU ms)`` of the largest of ``names`` by median CPU time."""
    best = max(names, key=lambda n: med(results[n], "cpu"))
    return f"{best.strip()!r} ({med(results[best]):.0f} ms, CPU {med(results[best], 'cpu'):.0f} ms)"


def count_model_macs(model, x, batch):
    """Multiply-adds of the backbone, the RPN head and the detector head (test proposals)."""
    h, w = model.image_size
    size = model.get_config()["roi_output_size"]
    channels = model.box_head.fc6.kernel.shape[0] // size**2
    level = model.trunk(x[:1])[0]
    rois = batch * model.test_proposals[1]
    macs = {
        TRUNK: count_macs(model.backbone, (1, h, w, 3)) * batch,
        RPN_HEAD: count_macs(lambda t: model.rpn_head([t]), level.shape) * batch,
        HEAD: count_macs(lambda t: model.box_head(t), (rois, size, size, channels)),
    }
    macs[DETECT] = sum(macs.values())
    if model.test_proposals[1] > 300:
        macs[HEAD_300] = macs[HEAD] * 300 // model.test_proposals[1]
    return macs


def run_config(args, preset, num_classes, batch, repeats, heavy):
    print(f"\n=== {preset}: {num_classes} classes, batch {batch} ===", flush=True)
    keras.utils.set_random_seed(args.seed)
    model = FasterRCNN.from_preset(preset, num_classes=num_classes)
    model.compile(optimizer=keras.optimizers.SGD(args.lr))
    x, y = batch_of(model, batch)
    rows = Rows()
    print("  setting up the parts (first calls)", flush=True)
    info = inference_parts(rows, model, x, heavy=heavy)
    info.update(train_parts(rows, model, x, y, heavy=heavy))
    if not heavy:  # the same model with RoIAlign, the same weights
        align = FasterRCNN.from_preset(preset, num_classes=num_classes, roi_pooling="align")
        align.set_weights(model.get_weights())
        align.compile(optimizer=keras.optimizers.SGD(args.lr))
        inference_parts(rows, align, x, " [align]", names=("RoI pooling", DETECT))
        align_names = (TRAIN_PARTS[3], FORWARD, STEP, ROI_GRAD, POOL_GRAD)
        train_parts(rows, align, x, y, " [align]", names=align_names)
    a = tf.random.normal((MATMUL_SIZE, MATMUL_SIZE))
    product = tf.function(lambda a: tf.matmul(a, a))
    rows.add(MATMUL, lambda: product(a).numpy())
    print(f"timing {len(rows.fns)} rows, {repeats} rounds ...", flush=True)
    results = timed(rows, repeats, args.warmups)

    rates = [MATMUL_SIZE**3 / (med(results[MATMUL], key) / 1e3) for key in ("wall", "cpu")]
    macs = count_model_macs(model, x, batch)
    results[SUM_INFERENCE] = combine(results, INFERENCE_PARTS)
    results[SUM_TRAIN] = combine(results, TRAIN_PARTS)
    results[BACKWARD] = combine(results, [STEP], [FORWARD])
    if GRADIENTS in results:
        results[BACKWARD_ONLY] = combine(results, [GRADIENTS], [FORWARD])
        results[UPDATE] = combine(results, [STEP], [GRADIENTS])

    h, w = model.image_size
    print(
        f"\n{preset}, {num_classes} classes, {h}x{w}, batch {batch}, "
        f"{model.count_params():,d} parameters, random weights, graph mode; TF {tf.__version__}, "
        f"Keras {keras.__version__}; {os.cpu_count()} CPU(s), "
        f"{platform.processor() or platform.machine()}; median of {repeats} interleaved rounds"
    )
    print(f"info: {info}")
    print(
        f"matmul rate in the rounds: {rates[0] / 1e9:.0f} G multiply-adds per second, "
        f"{rates[1] / 1e9:.0f} G per CPU second; "
        + ", ".join(f"{k}: {v / 1e9:.2f} G" for k, v in macs.items())
    )
    print_table(
        f"Inference ({preset}; share of `detect`)",
        [*INFERENCE_PARTS, SUM_INFERENCE, DETECT, PREDICT, HEAD_300],
        results,
        results[DETECT],
        macs,
        rates,
    )
    print_table(
        f"Train step ({preset}; share of `train_on_batch`)",
        [
            TRAIN_PARTS[0], RPN_LOSS, *TRAIN_PARTS[1:], SUM_TRAIN, FORWARD, BACKWARD,
            BACKWARD_ONLY, UPDATE, GRADIENTS, STEP, RPN_GRAD, ROI_GRAD, POOL_GRAD,
        ],
        results,
        results[STEP],
    )  # fmt: skip
    print(f"\ninference: the largest part is {largest(INFERENCE_PARTS, results)}")
    print(f"train step: the largest part is {largest([*TRAIN_PARTS, BACKWARD], results)}")
    print(
        f"first calls (tracing + graph optimisation): detect {results[DETECT]['first']:.1f} s, "
        f"train_on_batch {results[STEP]['first']:.1f} s"
    )

    if not heavy:
        print("\n| row | RoIPool ms | RoIAlign (2) ms | align / pool | align / pool (CPU) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for n in ("RoI pooling", DETECT, TRAIN_PARTS[3], POOL_GRAD, ROI_GRAD, FORWARD, STEP):
            p, a = results[n], results[n + " [align]"]
            print(
                f"| {n.strip()} | {med(p):.1f} | {med(a):.1f} | {round_ratio(a, p):.2f} | "
                f"{round_ratio(a, p, 'cpu'):.2f} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, tiny preset")
    parser.add_argument("--vgg-repeats", type=int, default=2, help="timed rounds, VGG16")
    parser.add_argument("--warmups", type=int, default=1, help="untimed calls per row")
    parser.add_argument("--batch", type=int, default=4, help="tiny preset's batch")
    parser.add_argument("--quick", action="store_true", help="skip faster_rcnn_vgg16")
    parser.add_argument("--skip-tiny", action="store_true", help="only faster_rcnn_vgg16")
    parser.add_argument("--lr", type=float, default=1e-6, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rate = matmul_rate(sizes=(1024, 2048))
    print(f"matmul_rate() before: {rate / 1e9:.0f} G multiply-adds/s", flush=True)
    if not args.skip_tiny:
        run_config(args, "faster_rcnn_tiny_256", 6, args.batch, args.repeats, heavy=False)
    if not args.quick:
        run_config(args, "faster_rcnn_vgg16", 20, 1, args.vgg_repeats, heavy=True)
    rate = matmul_rate(sizes=(1024, 2048))
    print(f"\nmatmul_rate() after: {rate / 1e9:.0f} G multiply-adds/s")


if __name__ == "__main__":
    main()
