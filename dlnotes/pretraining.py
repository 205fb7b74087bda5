"""Pre-training a backbone on the shapes: the book's stand-in for ImageNet.

Chapter 8 finds that after a few minutes of training the detectors put a box on almost every
object but give it the right class only a third of the time: telling a hexagon from a circle
needs features that a backbone trained from scratch does not have yet. The detectors of the
papers start from a backbone trained to classify ImageNet; this module does the same on the
shapes, cheaply enough for a CPU:

1. :func:`object_crops` cuts every annotated object out of a shapes set *generated with another
   seed* (never the book's training or validation images): a square window around the object,
   at its own scale when it fits ``size`` px (small shapes stay small, as the detector sees them),
   scaled down otherwise, with a few pixels of random shift.
2. :func:`build_classifier` puts global average pooling of every level and one dense layer on
   the backbone; :func:`pretrain_backbone` trains it with the book's recipe
   (:mod:`dlnotes.training`: AdamW, warm-up, cosine decay) and random flips and quarter turns
   (the classes do not depend on orientation).
3. The backbone's weights are shipped with the package (:data:`~dlnotes.backbones.SHAPES_WEIGHTS`)
   and a detector asks for them with ``backbone_weights="shapes"``.

Reproduce the shipped file (``make pretrain``; on 2 CPU cores a few minutes to generate the
6,000 images and 2 to cut the 25,989 crops, then 11 minutes of training for resnet_tiny, to a
validation accuracy of 0.913)::

    python -m dlnotes.pretraining --backbone resnet_tiny --data data/shapes_pretrain \\
        --out resnet_tiny_shapes.weights.h5

Other backbones take ``--backbone NAME`` and their knobs as ``--knob initial_filters=4``. Not every
one learns the shapes as quickly (``benchmarks/README.md``): efficientnet_tiny reached a validation
accuracy of 0.62 in 1,200 steps, too little to help EfficientDet, and Darknet-53 at
``initial_filters=4`` stayed at chance for its first 300 steps; only resnet_tiny is shipped.

Images are ``(N, S, S, 3)`` float32 RGB in ``[0, 255]``; labels are contiguous class indices.
"""

from __future__ import annotations

import argparse
import ast
import os
import time

import keras
import numpy as np
import tensorflow as tf

from dlnotes.backbones import build_backbone, preprocess_for
from dlnotes.checks import positive_int
from dlnotes.saving import writing
from dlnotes.training import Recipe, make_optimizer

__all__ = ["PRETRAIN_DATA", "object_crops", "build_classifier", "pretrain_backbone"]

#: The generator settings of the pre-training set: the standard shapes at another seed.
PRETRAIN_DATA = {"seed": 1, "num_train": 6000, "num_val": 200}


def object_crops(
    dataset, size: int = 96, context: float = 1.25, seed: int = 0, jitter: float = 4.0,
    batch: int = 50,
):  # fmt: skip
    """Every annotated object of ``dataset`` as a ``size`` x ``size`` crop, with its label.

    The window is square, centred on the box centre shifted by up to ``jitter`` px (uniform,
    from ``seed``), with side ``max(size, context * longer box side)``: an object that fits keeps its
    pixel scale; a larger one is scaled down to fit. Outside the image the window reads the
    image mirrored at its border (and zeros more than one image size away).

    Args:
        dataset: a :class:`~dlnotes.data.CocoDataset` whose images all have one size (read at
            their original size, as the shapes sets are).
        size: side of the crops in px.
        context: window side over the object's longer side, for objects larger than ``size``.
        seed: seed of the shifts.
        jitter: largest shift of the window in px, each axis.
        batch: images read per step.

    Returns:
        ``(images, labels)``: float32 ``(N, size, size, 3)`` in ``[0, 255]`` and int32 ``(N,)``,
        objects in the data set's image order.

    Raises:
        ValueError: ``size`` < 8, ``context`` < 1, or a data set without any object.
    """
    size = positive_int(size, "size")
    if size < 8 or not context >= 1:
        raise ValueError(f"object_crops: need size >= 8 and context >= 1, got {size}, {context}")
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for images, targets in dataset.to_tf_dataset(batch_size=batch):  # original sizes
        boxes, classes = targets["boxes"].numpy(), targets["labels"].numpy()
        height, width = images.shape[1:3]
        # mirrored margins of one image size (tf.pad's limit); beyond them crop_and_resize reads 0
        padded = tf.pad(
            images, [[0, 0], [height, height], [width, width], [0, 0]], mode="SYMMETRIC"
        )
        keep = classes >= 0
        index = np.nonzero(keep)[0].astype(np.int32)
        box = boxes[keep].astype(np.float64)
        centre = (box[:, :2] + box[:, 2:]) / 2 + rng.uniform(-jitter, jitter, (len(box), 2))
        side = np.maximum(size, context * np.max(box[:, 2:] - box[:, :2], axis=1))
        # crop_and_resize samples at pixel indices y1 * (H - 1) ... y2 * (H - 1); the centres of
        # the window's `size` output cells are at corner + (k + 0.5) * side / size - 0.5
        margin = np.array([width, height], np.float64)
        first = centre - side[:, None] / 2 + margin + 0.5 * side[:, None] / size - 0.5
        last = first + side[:, None] * (size - 1) / size
        scale = 3 * margin - 1
        first, last = first / scale, last / scale  # (x, y) normalised
        windows = np.stack([first[:, 1], first[:, 0], last[:, 1], last[:, 0]], 1)
        if len(index):
            crops.append(
                tf.image.crop_and_resize(
                    padded, windows.astype(np.float32), index, (size, size), method="bilinear"
                ).numpy()
            )
            labels.append(classes[keep].astype(np.int32))
    if not crops:
        raise ValueError(f"object_crops: {dataset.annotation_file} has no annotated object")
    return np.concatenate(crops), np.concatenate(labels)


def build_classifier(backbone: keras.Model, preprocessing, num_classes: int) -> keras.Model:
    """``(B, S, S, 3)`` RGB in ``[0, 255]`` -> ``(B, num_classes)`` logits.

    The backbone's preprocessing, the backbone, global average pooling of each of its levels,
    concatenated, and one dense layer: every level learns to tell the classes apart.
    """
    num_classes = positive_int(num_classes, "num_classes")
    inputs = keras.Input(backbone.input_shape[1:])
    levels = backbone(preprocessing(inputs))
    levels = levels if isinstance(levels, (list, tuple)) else [levels]
    pooled = [keras.layers.GlobalAveragePooling2D()(level) for level in levels]
    features = keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0]
    logits = keras.layers.Dense(num_classes, name="classes")(features)
    return keras.Model(inputs, logits, name=f"{backbone.name}_classifier")


def _augment(images, labels):
    images = tf.image.random_flip_left_right(images)
    turns = tf.random.uniform((), 0, 4, dtype=tf.int32)
    return tf.image.rot90(images, turns), labels


def pretrain_backbone(name, train_crops, val_crops=None, recipe: Recipe | None = None,
                      print_fn=print, **knobs):  # fmt: skip
    """Trains backbone ``name`` to classify ``train_crops``; returns it with its learning curve.

    Args:
        name: a backbone of :data:`dlnotes.backbones.BACKBONES`.
        train_crops, val_crops: ``(images, labels)`` as :func:`object_crops` returns them;
            ``val_crops`` is evaluated every ``recipe.log_every`` steps (optional).
        recipe: a :class:`~dlnotes.training.Recipe` (its ``steps``, ``batch_size``, rate,
            warm-up, weight decay, clipping, ``log_every``, ``seed``); default 2,400 steps of 64
            at peak rate 3e-3 with 50 warm-up steps.
        print_fn: where the one-line progress reports go (``None``: nowhere).
        knobs: the backbone's knobs (as :func:`~dlnotes.backbones.build_backbone` takes them).

    Returns:
        ``(backbone, rows)``: the trained backbone (a ``keras.Model`` for inputs of the crops'
        size; its weights load into the same backbone at any input size) and one dict per log
        step: ``{"step", "seconds", "loss", "accuracy", "val_accuracy"}``.

    Raises:
        ValueError: crops and labels of different lengths, labels outside ``[0, C)``.
    """
    images, labels = train_crops
    if len(images) != len(labels) or images.ndim != 4:
        raise ValueError(
            f"pretrain_backbone: {len(images)} crops of shape {images.shape[1:]} but "
            f"{len(labels)} labels; expected (N, S, S, 3) crops and (N,) labels"
        )
    num_classes = int(np.max(labels)) + 1
    if np.min(labels) < 0:
        raise ValueError("pretrain_backbone: labels must be class indices >= 0")
    recipe = recipe or Recipe(steps=2400, batch_size=64, learning_rate=3e-3, warmup_steps=50)
    backbone = build_backbone(name, images.shape[1:], **knobs)
    model = build_classifier(backbone, preprocess_for(name), num_classes)
    model.compile(
        optimizer=make_optimizer(recipe),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    batches = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .shuffle(len(images), seed=recipe.seed)
        .repeat()
        .map(_augment)
        .batch(recipe.batch_size, drop_remainder=True)
        .prefetch(2)
    )
    rows, start = [], time.perf_counter()

    class _Log(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            row = {
                "step": (epoch + 1) * recipe.log_every,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": round(float(logs["loss"]), 4),
                "accuracy": round(float(logs["accuracy"]), 4),
            }
            if val_crops is not None:
                val = model.evaluate(*val_crops, batch_size=256, verbose=0, return_dict=True)
                row["val_accuracy"] = round(float(val["accuracy"]), 4)
            rows.append(row)
            if print_fn is not None:
                print_fn(", ".join(f"{k} {v}" for k, v in row.items()))

    model.fit(
        batches,
        steps_per_epoch=recipe.log_every,
        epochs=recipe.steps // recipe.log_every,
        verbose=0,
        shuffle=False,  # the pipeline shuffles
        callbacks=[_Log()],
    )
    return backbone, rows


def main(argv=None):
    """The command line: generate the pre-training set if needed, crop, train, save."""
    from dlnotes.data.shapes import generate_shapes_dataset, load_shapes

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet_tiny")
    parser.add_argument("--data", default="data/shapes_pretrain", help="pre-training set folder")
    parser.add_argument("--out", required=True, help="the backbone's .weights.h5 (not replaced)")
    parser.add_argument("--size", type=int, default=96, help="crop side in px")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--knob", action="append", default=[], metavar="NAME=VALUE",
        help="a backbone knob, e.g. initial_filters=4 (repeatable; VALUE is a Python literal)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    knobs = {}
    for item in args.knob:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"--knob {item!r}: expected NAME=VALUE, e.g. initial_filters=4")
        try:
            knobs[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"--knob {item!r}: {value!r} is not a Python literal")
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists and is kept; choose another --out")
    # writes the set once; an existing folder must hold exactly this set (else FileExistsError)
    generate_shapes_dataset(args.data, **PRETRAIN_DATA)
    train = load_shapes("train", root=args.data)
    val = load_shapes("val", root=args.data)
    start = time.perf_counter()
    train_crops = object_crops(train, args.size, seed=0)
    val_crops = object_crops(val, args.size, seed=1)
    print(f"{len(train_crops[1])} training and {len(val_crops[1])} validation crops of "
          f"{args.size} px in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    keras.utils.set_random_seed(0)
    recipe = Recipe(steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                    warmup_steps=50, log_every=100)  # fmt: skip
    backbone, _ = pretrain_backbone(
        args.backbone, train_crops, val_crops, recipe,
        print_fn=lambda s: print(s, flush=True), **knobs,
    )  # fmt: skip
    with writing(args.out, owner="pretraining", suffix=".weights.h5") as tmp:
        backbone.save_weights(tmp)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
