"""Checks shared by every module, so that the same mistake gets the same message.

Arguments: each check returns the value in its canonical Python type or raises ``ValueError``
naming the argument, the function or class it was given to (``owner``) and the value it got::

    positive_int(0, "initial_filters", "build_darknet53")
    # ValueError: build_darknet53: initial_filters must be a positive integer, got 0.

Tensors inside a training / inference graph: ``*_assertions`` return graph assertions (images with
NaN pixels, boxes that are not absolute xyxy, a non-finite loss) that the detectors' steps depend
on, and :func:`reported_message` extracts their message from TensorFlow's error.
"""

from __future__ import annotations

import numbers
import re

import tensorflow as tf

__all__ = [
    "box_assertions",
    "check_image_batch",
    "check_num_classes",
    "finite_assertions",
    "image_assertions",
    "integer",
    "label_assertions",
    "positive_int",
    "reported_message",
]


def _prefix(owner):
    return f"{owner}: " if owner else ""


def integer(value, what, owner=None, minimum=None):
    """``value`` as an ``int`` (a Python or NumPy integer, or an integral float such as ``3.0``).

    Booleans, strings, non-integral numbers and values below ``minimum`` raise ``ValueError``
    with a message that names ``what`` and ``owner``.
    """
    if minimum == 1:
        kind = "a positive integer"
    else:
        kind = "an integer" if minimum is None else f"an integer >= {minimum}"
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and float(value).is_integer()
    )
    if isinstance(value, bool) or not integral or (minimum is not None and value < minimum):
        raise ValueError(f"{_prefix(owner)}{what} must be {kind}, got {value!r}.")
    return int(value)


def positive_int(value, what, owner=None):
    """``value`` as an ``int`` >= 1, else ``ValueError`` naming ``what`` (and ``owner``)."""
    return integer(value, what, owner, minimum=1)


def check_num_classes(num_classes, owner=None):
    """``num_classes`` as a positive ``int`` (the number of object classes, no background)."""
    return positive_int(num_classes, "num_classes", owner)


# ----------------------------------------------------------------------------- tensors in a graph
# Graph assertions: the ops of a step that depend on them (via tf.control_dependencies) do not run
# when one fails, so bad input changes nothing. Their messages start with the owner's name, carry
# the offending positions as 1-D data and hold no square brackets (TensorFlow brackets each part
# of the message; reported_message() reads them back).


def check_image_batch(images, owner):
    """Static check of an image batch: ``(B, H, W, 3)``; ``ValueError`` naming the shape."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{owner}: images must be RGB batches (B, H, W, 3), got shape {shape} (grayscale or "
            "RGBA images must be converted to 3 channels first)."
        )


def image_assertions(images, owner):
    """Graph assertions that every pixel of ``images`` ``(B, H, W, C)`` is finite."""
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        return []
    finite = tf.reduce_all(tf.math.is_finite(tf.reshape(images, [tf.shape(images)[0], -1])), 1)
    return [
        tf.debugging.Assert(
            tf.reduce_all(finite),
            [
                f"{owner}: NaN or inf pixel values in the images at batch positions",
                tf.where(tf.logical_not(finite))[:, 0],
                "(expected finite RGB values 0..255); nothing was computed from this batch",
            ],
            summarize=16,
        )
    ]


def label_assertions(labels, num_classes, owner):
    """Graph assertions that every label is a class ``0..num_classes - 1`` or the padding -1."""
    labels = tf.cast(labels, tf.int32)
    n = int(num_classes)
    return [
        tf.debugging.Assert(
            tf.reduce_all(labels < n),
            [
                f"{owner}(num_classes={n}): a target label is >= num_classes (labels must be "
                f"0..{n - 1}, padding -1); check the data set's classes or the model's "
                "num_classes. Largest label",
                tf.reduce_max(labels),
            ],
        ),
        tf.debugging.Assert(
            tf.reduce_all(labels >= -1),
            [
                f"{owner}(num_classes={n}): a target label is < -1 (labels must be 0..{n - 1}, "
                "padding -1). Smallest label",
                tf.reduce_min(labels),
            ],
        ),
    ]


def box_assertions(boxes, labels, owner):
    """Graph assertions that every box with a label ``>= 0`` is a finite absolute-pixel ``xyxy``
    box: ``x2 >= x1`` and ``y2 >= y1`` (inverted boxes are typically ``xywh`` passed as
    ``xyxy``), and not normalised to ``[0, 1]`` (every box of the batch inside the unit square).
    Padded slots (label -1) are not checked.

    Args:
        boxes: ``(B, M, 4)``; labels ``(B, M)``.
    """
    boxes = tf.cast(boxes, tf.float32)
    valid = tf.cast(labels, tf.int32) >= 0
    finite = tf.reduce_all(tf.math.is_finite(boxes), axis=-1)
    ordered = tf.logical_and(boxes[..., 2] >= boxes[..., 0], boxes[..., 3] >= boxes[..., 1])
    bad = tf.logical_and(valid, tf.logical_not(tf.logical_and(finite, ordered)))
    largest = tf.reduce_max(tf.where(valid[..., None], tf.abs(boxes), 0.0))
    normalised = tf.logical_and(tf.reduce_any(valid), largest <= 1.0)
    return [
        tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(bad)),
            [
                f"{owner}: target boxes that are not absolute-pixel xyxy (x1 <= x2, y1 <= y2, "
                "finite) at (image, slot)",
                tf.reshape(tf.where(bad), [-1]),
                "with label >= 0; boxes must be xyxy pixels (convert xywh / center_xywh with "
                "dlnotes.boxes.convert_format), padded slots -1",
            ],
            summarize=16,
        ),
        tf.debugging.Assert(
            tf.logical_not(normalised),
            [
                f"{owner}: every target box of the batch lies inside the unit square 0..1: boxes look "
                "normalised (rel_xyxy), but absolute pixel xyxy boxes are expected (multiply by "
                "the image width / height); largest coordinate",
                largest,
            ],
        ),
    ]


def finite_assertions(values, names, message):
    """Graph assertions that every tensor of ``values`` is finite; a failure reports
    ``message`` and the ``names`` of the tensors that are not (``None`` values are skipped)."""
    pairs = [(v, n) for v, n in zip(values, names, strict=True) if v is not None]
    if not pairs:
        return []
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v, _ in pairs])
    bad = tf.boolean_mask(tf.constant([n for _, n in pairs]), tf.logical_not(finite))
    return [tf.debugging.Assert(tf.reduce_all(finite), [message, bad], summarize=8)]


_GRAPH_ASSERTION = re.compile(r"assertion failed: (.*)")
_EAGER_ASSERTION = re.compile(r"Summarized data: (.*)", re.S)


def reported_message(error):
    """The message of a failed graph assertion (``InvalidArgumentError``) in one line, or None.

    In a graph TensorFlow reports it as "Graph execution error: ... Detected at node ...
    assertion failed: [message] [data] [...]" after a stack trace, eagerly as "Expected ... to
    be true. Summarized data: b'message' ..."; both give "message data ...".
    """
    text = getattr(error, "message", "") or ""
    found = _GRAPH_ASSERTION.search(text)
    if found:
        parts = re.findall(r"\[([^\[\]]*)\]", found.group(1))
    else:
        found = _EAGER_ASSERTION.search(text)
        if not found:
            return None
        parts = [re.sub(r"^b'(.*)'$", r"\1", line.strip()) for line in found.group(1).split("\n")]
    text = " ".join(p.strip() for p in parts if p.strip())
    return text.replace("\\'", "'") or None
