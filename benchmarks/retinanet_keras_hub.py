"""RetinaNet-R50-FPN: dlnotes against keras-hub's ``RetinaNetObjectDetector``; dlnotes' time to mAP.

**Speed** (the default mode). Both detectors are built offline with random weights at the same
size: ResNet-50 backbone, FPN P3-P7 with P6 from C5, class and box subnets of four 256-channel
3x3 convs shared across levels, 9 anchors per location (49,104 anchors at 512x512), 80 classes.
dlnotes is ``RetinaNet.from_preset("retinanet_resnet50_fpn", num_classes=80)``; keras-hub is
``ResNetBackbone`` (the ResNet-50 configuration of keras-hub's presets) + ``RetinaNetBackbone``
(``use_p5=True``: in keras-hub 0.32 that builds P6 from the backbone's C5, like dlnotes and the
paper) + ``RetinaNetObjectDetector`` with its default anchors (sizes 32-512, 3 scales, 3 ratios)
and label encoder, and its ``NonMaxSuppression`` set to dlnotes' post-processing settings
(score 0.05, IoU 0.5, 300 detections). Batch 2, the same random images and the same padded GT
boxes (3 to 6 per image) for both. Both models are compiled with the same SGD (learning rate
1e-4, momentum 0.9, global clipnorm 10, so that the random models' losses stay finite), once
with ``jit_compile=False`` and once with ``True`` (one model instance per mode), and their
optimizer variables are built before the first step (see ``speed``).

Timed, as the median of ``--repeats`` interleaved rounds after two warm-up calls of each row
(the first call's time, tracing and compilation, is printed too):

* forward: ``model(x, training=False)`` in a ``tf.function`` (``jit_compile`` as the mode);
* predict: ``model.predict(x)``: forward, box decoding and NMS, each model's own path. With
  random weights (and fresh BatchNorm statistics) nearly every (anchor, class) score passes 0.05,
  the worst case for post-processing;
* train step: ``train_on_batch``: forward, target assignment, loss, backward, SGD update;
* post-processing alone (graph mode) on the same sparse head outputs shaped like a trained
  model's, where a few hundred (anchor, class) pairs per image pass 0.05.

The ratio columns are medians over the rounds of keras-hub's time divided by dlnotes' time in
the same round (> 1: dlnotes is faster); the CPU column uses the process CPU time of each call
instead of the wall time, which other processes on a shared machine disturb much less.
``--breakdown`` adds a table that splits each train step (graph mode) into forward, target
assignment, loss and backward.

**Training** (``--train``). Trains dlnotes' CPU preset ``retinanet_tiny_256`` on the book's data
set (``dlnotes.data.load_shapes("train")``, 800 images of 256x256, 6 classes) for ``--steps``
steps and evaluates COCO AP / AP50 on the validation split every ``--eval-every`` steps, printing
the training wall time (evaluation excluded) at which each AP50 level was first reached.
keras-hub is not needed for it.

    python benchmarks/retinanet_keras_hub.py [--repeats N] [--no-xla] [--breakdown]
    python benchmarks/retinanet_keras_hub.py --train [--steps N] [--eval-every N]

keras-hub is an optional dependency: ``pip install keras-hub`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlnotes.models import RetinaNet  # noqa: E402

KERAS_HUB_INSTALL = (
    "This benchmark compares dlnotes with keras-hub's RetinaNet, and keras-hub is not installed. "
    "Install it into this environment with\n\n    {python} -m pip install keras-hub\n\n"
    "(it pulls tensorflow-text, whose version must match TensorFlow's). `--train` does not need it."
)

LIBS = ("dlnotes", "keras-hub")

#: keras-hub's ResNet-50 (v1.5: the stride on the 3x3 conv, no conv bias), as in its presets.
KERAS_HUB_RESNET50 = dict(
    input_conv_filters=[64],
    input_conv_kernel_sizes=[7],
    stackwise_num_filters=[64, 128, 256, 512],
    stackwise_num_blocks=[3, 4, 6, 3],
    stackwise_num_strides=[1, 2, 2, 2],
    block_type="bottleneck_block",
    use_pre_activation=False,
)


def import_keras_hub():
    """keras_hub, or exit with the command that installs it."""
    try:
        import keras_hub
    except ImportError:
        sys.exit(KERAS_HUB_INSTALL.format(python=sys.executable))
    return keras_hub


# ---------------------------------------------------------------------------------- models


def build_dlnotes(num_classes, image_size):
    """dlnotes' RetinaNet-R50-FPN preset (random weights)."""
    return RetinaNet.from_preset(
        "retinanet_resnet50_fpn", num_classes=num_classes, image_size=image_size
    )


def build_keras_hub(keras_hub, num_classes, image_size):
    """keras-hub's RetinaNet-R50-FPN from its public building blocks, offline, random weights."""
    image_shape = (*image_size, 3)
    encoder = keras_hub.models.ResNetBackbone(**KERAS_HUB_RESNET50, image_shape=image_shape)
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=7, use_p5=True, image_shape=image_shape
    )
    # The detector's defaults, spelled out: anchor_size 4 x stride = 32..512 px.
    anchors = keras_hub.layers.AnchorGenerator(
        bounding_box_format="xyxy", min_level=3, max_level=7, num_scales=3,
        aspect_ratios=[0.5, 1.0, 2.0], anchor_size=4,
    )  # fmt: skip
    # keras-hub's defaults are a 0.5 confidence threshold and 100 detections; use dlnotes' ones.
    decoder = keras_hub.layers.NonMaxSuppression(
        bounding_box_format="xyxy", from_logits=True, iou_threshold=0.5,
        confidence_threshold=0.05, max_detections=300,
    )  # fmt: skip
    return keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, anchor_generator=anchors, num_classes=num_classes,
        bounding_box_format="xyxy", prediction_decoder=decoder,
    )  # fmt: skip


def parameter_table(dl, kh):
    """Markdown rows of parameter counts by part."""
    parts = [
        ("backbone", dl.backbone.count_params(), kh.backbone.image_encoder.count_params()),
        ("FPN", dl.neck.count_params(), kh.backbone.feature_pyramid.count_params()),
        ("class subnet", dl.class_head.count_params(), kh.classification_head.count_params()),
        ("box subnet", dl.box_head.count_params(), kh.box_head.count_params()),
        ("total", dl.count_params(), kh.count_params()),
    ]
    lines = ["| parameters | dlnotes | keras-hub | difference |", "| --- | ---: | ---: | ---: |"]
    for name, a, b in parts:
        lines.append(f"| {name} | {a:,} | {b:,} | {a - b:+,} |")
    return "\n".join(lines)


def train_step_fn(model):
    """``model.train_on_batch``, bound to the model (keras-hub: ``keras.Model``'s method)."""
    if isinstance(model, RetinaNet):
        return model.train_on_batch
    # keras-hub 0.32's PipelineModel.train_on_batch calls ops.convert_to_tensor on the target
    # dict and fails; without a preprocessor, keras.Model's method runs the same train step.
    return functools.partial(keras.Model.train_on_batch, model)


def random_batch(batch, image_size, num_gt, num_classes, rng):
    """Images ``(B, H, W, 3)`` in [0, 255] and padded xyxy GT (3..num_gt boxes per image)."""
    height, width = image_size
    images = rng.uniform(0, 255, size=(batch, height, width, 3)).astype(np.float32)
    boxes = np.full((batch, num_gt, 4), -1.0, np.float32)
    labels = np.full((batch, num_gt), -1, np.int32)
    for b in range(batch):
        n = int(rng.integers(3, num_gt + 1))
        wh = rng.uniform(32, 256, size=(n, 2))
        xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([width, height]) - wh)
        boxes[b, :n] = np.concatenate([xy, xy + wh], axis=-1)
        labels[b, :n] = rng.integers(0, num_classes, size=n)
    return images, {"boxes": boxes, "labels": labels}


def sparse_head_outputs(batch, num_anchors, num_classes, rng, objects=200):
    """Head outputs shaped like a trained model's: logits ``(B, N, C)`` ~ N(-7, 1) (scores about
    0.001) except one class of ``objects`` random anchors per image ~ N(2, 1); deltas ~ N(0, 0.5).
    A few hundred (anchor, class) pairs per image pass the 0.05 score threshold."""
    logits = rng.normal(-7.0, 1.0, (batch, num_anchors, num_classes))
    for b in range(batch):
        chosen = rng.choice(num_anchors, objects, replace=False)
        logits[b, chosen, rng.integers(0, num_classes, objects)] = rng.normal(2.0, 1.0, objects)
    deltas = rng.normal(0.0, 0.5, (batch, num_anchors, 4))
    return tf.constant(logits.astype(np.float32)), tf.constant(deltas.astype(np.float32))


# ---------------------------------------------------------------------------------- timing


def to_numpy(outputs):
    """Forces (possibly asynchronous) results into host memory."""
    return tf.nest.map_structure(lambda t: t.numpy() if tf.is_tensor(t) else t, outputs)


def timed(rows, repeats, warmups=2):
    """Wall and CPU times (ms) of each callable of ``rows`` over ``repeats`` interleaved rounds.

    Every callable is first called ``warmups`` times (tracing, graph optimisation, XLA
    compilation; a Keras train function whose optimizer is built inside the first trace is traced
    twice and pays graph optimisation again on its second call); one that raises is reported as
    failing and left out. Then each round calls every callable once, so that load changes on a
    shared machine hit all rows alike.

    Returns:
        ``{name: {"first": s, "wall": [ms per round], "cpu": [ms per round]}}`` or
        ``{name: {"error": str}}``; ``first`` is the wall time of the first call.
    """
    results, live = {}, []
    for name, fn in rows:
        print(f"  warm-up: {' / '.join(name)}", flush=True)
        try:
            start = time.perf_counter()
            fn()
            first = time.perf_counter() - start
            for _ in range(warmups - 1):
                fn()
        except Exception as error:  # reported in the table instead
            message = " ".join(str(error).split())[:160]
            results[name] = {"error": f"{type(error).__name__}: {message}"}
            continue
        results[name] = {"first": first, "wall": [], "cpu": []}
        live.append((name, fn))
    for _ in range(repeats):
        for name, fn in live:
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            results[name]["wall"].append((time.perf_counter() - wall) * 1e3)
            results[name]["cpu"].append((time.process_time() - cpu) * 1e3)
    return results


def median(result, key="wall"):
    return statistics.median(result[key])


def round_ratio(num, den, key="wall"):
    """Median over rounds of ``num / den`` (both timed in the same rounds)."""
    return statistics.median(a / b for a, b in zip(num[key], den[key], strict=True))


# ---------------------------------------------------------------------------------- speed


def speed(args):
    keras_hub = import_keras_hub()
    image_size = (args.image_size, args.image_size)
    rng = np.random.default_rng(args.seed)
    images, targets = random_batch(args.batch, image_size, args.max_gt, args.num_classes, rng)
    x = tf.constant(images)
    modes = [False] if args.no_xla else [False, True]

    models = {}
    for jit in modes:
        keras.utils.set_random_seed(args.seed)
        dl = build_dlnotes(args.num_classes, image_size)
        kh = build_keras_hub(keras_hub, args.num_classes, image_size)
        for model in (dl, kh):
            model.compile(
                optimizer=keras.optimizers.SGD(1e-4, momentum=0.9, global_clipnorm=10.0),
                jit_compile=jit,
            )
            # Keras creates the optimizer's variables inside the first traced train step unless
            # they exist; TensorFlow then traces the step twice, and with jit_compile=True it
            # cannot lift them out of a step that runs under control dependencies (dlnotes'
            # label checks). Building them here, for both models, measures the steady state.
            model.optimizer.build(model.trainable_variables)
        models[jit] = (dl, kh)
    dl, kh = models[False]
    print(parameter_table(dl, kh))

    rows = []
    for jit in modes:
        dl, kh = models[jit]
        tag = "XLA" if jit else "graph"
        for lib, model in (("dlnotes", dl), ("keras-hub", kh)):
            forward = tf.function(lambda x, m=model: m(x, training=False), jit_compile=jit)
            step = train_step_fn(model)
            rows += [
                ((tag, "forward", lib), lambda f=forward: to_numpy(f(x))),
                (
                    (tag, "predict", lib),
                    lambda m=model: m.predict(images, batch_size=args.batch, verbose=0),
                ),
                (
                    (tag, "train step", lib),
                    lambda t=step: t(images, targets),
                ),
            ]
    # Post-processing alone (decoding + NMS, graph mode: dlnotes' per-class NMS kernel has no XLA
    # version) on (a) each model's own random-weight head outputs, where nearly every score
    # passes 0.05, and (b) the same sparse, trained-like head outputs for both.
    dl, kh = models[False]
    decode_dl = tf.function(lambda c, d: dl.decode({"class_logits": c, "box_deltas": d}))
    decode_kh = tf.function(
        lambda c, d: kh.decode_predictions({"cls_logits": c, "bbox_regression": d}, x)
    )
    own_dl = dl(x, training=False)
    own_kh = kh(x, training=False)
    dense = {
        "dlnotes": (own_dl["class_logits"], own_dl["box_deltas"]),
        "keras-hub": (own_kh["cls_logits"], own_kh["bbox_regression"]),
    }
    logits, deltas = sparse_head_outputs(
        args.batch, dl.anchors.shape[0], args.num_classes, np.random.default_rng(args.seed + 1)
    )
    sparse = {"dlnotes": (logits, deltas), "keras-hub": (logits, deltas)}
    decoders = {"dlnotes": decode_dl, "keras-hub": decode_kh}
    for row, inputs in (
        ("post-processing alone, random weights", dense),
        ("post-processing alone, sparse outputs", sparse),
    ):
        for lib in LIBS:
            rows.append(
                (("graph", row, lib), lambda f=decoders[lib], a=inputs[lib]: to_numpy(f(*a)))
            )
    print(f"\nTiming {len(rows)} rows, {args.repeats} rounds (the warm-up compiles everything):")
    results = timed(rows, args.repeats)

    # Detections and final losses: evidence that both models really ran their full paths.
    for jit in modes:
        tag = "XLA" if jit else "graph"
        for lib, model in zip(LIBS, models[jit], strict=True):
            if any("error" in results[(tag, row, lib)] for row in ("predict", "train step")):
                continue
            out = model.predict(images, batch_size=args.batch, verbose=0)
            loss = train_step_fn(model)(images, targets)
            loss = loss[0] if isinstance(loss, list) else loss
            print(
                f"{lib} ({tag}): detections per image "
                f"{np.asarray(out['num_detections']).tolist()}, loss after the run {float(loss):.4g}"
            )

    for lib in LIBS:
        detections = np.asarray(decoders[lib](*sparse[lib])["num_detections"]).tolist()
        print(f"{lib}: detections per image on the sparse head outputs {detections}")

    print(
        f"\nRetinaNet-R50-FPN, {args.num_classes} classes, batch {args.batch}, "
        f"{args.image_size}x{args.image_size}, random weights; TF {tf.__version__}, Keras "
        f"{keras.__version__}, keras-hub {keras_hub.__version__}; "
        f"{len(tf.config.list_physical_devices('GPU'))} GPU(s), {os.cpu_count()} CPU(s); "
        f"median of {args.repeats} interleaved rounds\n"
    )
    print(
        "| mode | row | dlnotes ms | keras-hub ms | keras-hub / dlnotes | dlnotes CPU ms | "
        "keras-hub CPU ms | keras-hub / dlnotes (CPU) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    table = [
        (tag, row)
        for tag in ("XLA" if jit else "graph" for jit in modes)
        for row in ("forward", "predict", "train step")
    ]
    table += [
        ("graph", "post-processing alone, random weights"),
        ("graph", "post-processing alone, sparse outputs"),
    ]
    for tag, row in table:
        a, b = (results[(tag, row, lib)] for lib in LIBS)
        if "error" in a or "error" in b:
            print(f"| {tag} | {row} | {a.get('error', '')} | {b.get('error', '')} | | | | |")
            continue
        print(
            f"| {tag} | {row} | {median(a):.0f} | {median(b):.0f} | {round_ratio(b, a):.2f} | "
            f"{median(a, 'cpu'):.0f} | {median(b, 'cpu'):.0f} | {round_ratio(b, a, 'cpu'):.2f} |"
        )

    print("\n| mode | train step / forward | dlnotes | keras-hub |")
    print("| --- | --- | ---: | ---: |")
    for jit in modes:
        tag = "XLA" if jit else "graph"
        ratios = []
        for lib in ("dlnotes", "keras-hub"):
            fwd, step = results[(tag, "forward", lib)], results[(tag, "train step", lib)]
            ok = "error" not in fwd and "error" not in step
            ratios.append(
                f"{round_ratio(step, fwd):.2f} (CPU {round_ratio(step, fwd, 'cpu'):.2f})"
                if ok
                else "n/a"
            )
        print(f"| {tag} | wall (CPU time) | {ratios[0]} | {ratios[1]} |")

    print(
        "\n| mode | first call, s (tracing, graph optimisation / XLA compilation) | dlnotes | keras-hub |"
    )
    print("| --- | --- | ---: | ---: |")
    for jit in modes:
        tag = "XLA" if jit else "graph"
        for row in ("forward", "predict", "train step"):
            cells = [
                "fails"
                if "error" in results[(tag, row, lib)]
                else f"{results[(tag, row, lib)]['first']:.1f}"
                for lib in LIBS
            ]
            print(f"| {tag} | {row} | {cells[0]} | {cells[1]} |")

    if args.breakdown:
        breakdown(models[False], x, targets, args)


def breakdown(models, x, targets, args):
    """Splits each model's train step (graph mode) into its parts by timing growing prefixes."""
    dl, kh = models
    y = tf.nest.map_structure(tf.constant, targets)
    rng = np.random.default_rng(args.seed + 1)
    num_anchors = dl.anchors.shape[0]
    # Fixed head outputs for the loss alone: logits around the prior, deltas ~ N(0, 1).
    logits = tf.constant(
        rng.normal(-4.6, 1.0, (args.batch, num_anchors, args.num_classes)).astype(np.float32)
    )
    deltas = tf.constant(rng.normal(0.0, 1.0, (args.batch, num_anchors, 4)).astype(np.float32))

    def pieces(model, lib):
        variables = model.trainable_variables
        names = (
            ("class_logits", "box_deltas")
            if lib == "dlnotes"
            else ("cls_logits", "bbox_regression")
        )

        def loss_of(x, y, outputs):
            return model.compute_loss(x=x, y=y, y_pred=outputs, sample_weight=None)

        if lib == "dlnotes":
            targets_fn = tf.function(lambda y: model.compute_targets(y["boxes"], y["labels"]))
        else:
            targets_fn = tf.function(
                lambda y: model.label_encoder(images=x, gt_boxes=y["boxes"], gt_classes=y["labels"])
            )

        @tf.function
        def forward(x):
            return model(x, training=True)

        @tf.function
        def forward_loss(x, y):
            return loss_of(x, y, model(x, training=True))

        @tf.function
        def gradients(x, y):
            with tf.GradientTape() as tape:
                loss = loss_of(x, y, model(x, training=True))
            return tape.gradient(loss, variables)

        @tf.function
        def loss_only(logits, deltas):
            with tf.GradientTape() as tape:
                tape.watch([logits, deltas])
                loss = loss_of(x, y, {names[0]: logits, names[1]: deltas})
            return loss, tape.gradient(loss, [logits, deltas])

        step = train_step_fn(model)
        return [
            ((lib, "forward (training=True)"), lambda: to_numpy(forward(x))),
            ((lib, "target assignment"), lambda: to_numpy(targets_fn(y))),
            ((lib, "forward + targets + loss"), lambda: to_numpy(forward_loss(x, y))),
            ((lib, "... + backward (gradients)"), lambda: to_numpy(gradients(x, y))),
            ((lib, "... + SGD update = train_on_batch"), lambda: step(x, y)),
            ((lib, "loss + its gradient on fixed head outputs"), lambda: to_numpy(loss_only(logits, deltas))),
        ]  # fmt: skip

    rows = pieces(dl, "dlnotes") + pieces(kh, "keras-hub")
    print(f"\nBreakdown of the train step (graph mode), {args.repeats} rounds:")
    results = timed(rows, args.repeats)
    labels = [name for (lib, name), _ in rows if lib == "dlnotes"]
    print(
        "\n| train step part (graph mode) | dlnotes ms | keras-hub ms | dlnotes CPU ms | keras-hub CPU ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for label in labels:
        cells = []
        for key in ("wall", "cpu"):
            for lib in ("dlnotes", "keras-hub"):
                r = results[(lib, label)]
                cells.append("fails" if "error" in r else f"{median(r, key):.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        "\nEach row after the first adds a part to the one above it (target assignment alone is "
        "also inside 'forward + targets + loss'); differences of medians estimate each part."
    )


# ---------------------------------------------------------------------------------- training


def train(args):
    from dlnotes.data import load_shapes
    from dlnotes.evaluation import coco_evaluate, predictions_to_coco

    keras.utils.set_random_seed(args.seed)
    train_set, val_set = load_shapes("train"), load_shapes("val")
    model = RetinaNet.from_preset("retinanet_tiny_256", num_classes=train_set.num_classes)
    size = model.image_size
    data = train_set.to_tf_dataset(
        batch_size=args.train_batch, image_size=size, shuffle=True, horizontal_flip=True,
        repeat=True, drop_remainder=True, seed=args.seed,
    )  # fmt: skip
    val_data = val_set.to_tf_dataset(batch_size=50, image_size=size, with_meta=True)
    warmup = min(50, args.steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps - warmup, warmup_target=args.lr, warmup_steps=warmup
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4), jit_compile=args.jit
    )

    def evaluate():
        detections = []
        for images, _, meta in val_data:
            predictions = model.predict_on_batch(images)
            detections += predictions_to_coco(
                predictions, meta["image_id"].numpy(), val_set.label_to_category,
                scale=meta["scale"].numpy(), offset=meta["offset"].numpy(),
            )  # fmt: skip
        return coco_evaluate(val_set.coco, detections)

    print(
        f"Training retinanet_tiny_256 ({model.count_params():,} parameters) on the shapes data "
        f"set: {len(train_set)} train / {len(val_set)} val images, batch {args.train_batch}, "
        f"{args.steps} steps, AdamW {args.lr} (cosine, {warmup} warm-up steps), "
        f"jit_compile={args.jit}; TF {tf.__version__}, {os.cpu_count()} CPU(s)",
        flush=True,
    )
    history, train_time, done = [], 0.0, 0
    iterator = iter(data)
    while done < args.steps:
        chunk = min(args.eval_every, args.steps - done)
        start = time.perf_counter()
        for _ in range(chunk):
            images, targets = next(iterator)
            logs = model.train_on_batch(images, targets, return_dict=True)
        train_time += time.perf_counter() - start
        done += chunk
        start = time.perf_counter()
        result = evaluate()
        eval_time = time.perf_counter() - start
        history.append((done, train_time, result["AP"], result["AP50"], logs["loss"]))
        print(
            f"step {done}: loss {logs['loss']:.3f}, AP {result['AP']:.3f}, AP50 "
            f"{result['AP50']:.3f}, training {train_time:.0f} s (evaluation {eval_time:.0f} s)",
            flush=True,
        )

    print("\n| step | training wall time (s) | loss (last batch) | val AP | val AP50 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for step, seconds, ap, ap50, loss in history:
        print(f"| {step} | {seconds:.0f} | {loss:.3f} | {ap:.3f} | {ap50:.3f} |")
    print("\n| val AP50 reached | at step | training wall time (s) |")
    print("| ---: | ---: | ---: |")
    for level in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        first = next((h for h in history if h[3] >= level), None)
        if first is not None:
            print(f"| {level:.2f} | {first[0]} | {first[1]:.0f} |")
    first_steps, first_time = history[0][0], history[0][1]
    steady = (
        f"; after the first evaluation {(train_time - first_time) / (args.steps - first_steps) * 1e3:.0f} ms"
        if args.steps > first_steps
        else ""
    )
    print(
        f"\nPer training step: {train_time / args.steps * 1e3:.0f} ms over the run, tracing "
        f"included{steady} (evaluation excluded)."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--max-gt", type=int, default=6, help="GT boxes per image: 3..max-gt")
    parser.add_argument("--no-xla", action="store_true", help="skip the jit_compile=True rows")
    parser.add_argument("--breakdown", action="store_true", help="split the train steps up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true", help="train retinanet_tiny_256 to mAP")
    parser.add_argument("--steps", type=int, default=600, help="--train: training steps")
    parser.add_argument("--eval-every", type=int, default=100, help="--train: steps per eval")
    parser.add_argument("--train-batch", type=int, default=8, help="--train: batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="--train: peak learning rate")
    parser.add_argument("--jit", action="store_true", help="--train: jit_compile=True")
    args = parser.parse_args()
    if args.max_gt < 3:
        parser.error("--max-gt must be at least 3")
    if args.train:
        train(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
