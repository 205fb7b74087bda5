"""TensorFlow Datasets (``tfds.load``) detection examples -> the padded batches of
:meth:`dlnotes.data.CocoDataset.to_tf_dataset`, for Colab, where COCO 2017 and Pascal VOC come
from ``tfds``::

    examples, class_names = load("coco/2017", split="train")
    train = to_tf_dataset(examples, batch_size=16, image_size=512, horizontal_flip=True,
                          shuffle=True, repeat=True, drop_remainder=True)
    images, targets = next(iter(train))
    # images (16, 512, 512, 3) float32 in [0, 255] (letterbox padding 114)
    # targets["boxes"] (16, 100, 4) xyxy pixels, targets["labels"] (16, 100) int32, padding -1

``tfds`` stores boxes as ``BBoxFeature``: ``[ymin, xmin, ymax, xmax]`` relative to the image
(``[0, 1]``); here they become absolute-pixel ``xyxy`` of the output image, as everywhere in
dlnotes. Labels are ``tfds``'s ``ClassLabel`` ints ``0..C-1``: for ``coco/2017`` that is the
categories of the annotation file in file order, i.e. sorted COCO category ids, the convention of
:class:`~dlnotes.data.CocoDataset` (:data:`COCO2017_CATEGORY_IDS` maps them back for COCO
evaluation); for ``voc`` the 20 classes in alphabetical order.

Only ``tensorflow`` is needed to convert examples; :func:`load` imports ``tensorflow_datasets``
(the ``tfds`` extra: ``pip install "dlnotes[tfds]"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from dlnotes.checks import positive_int
from dlnotes.data import transforms

__all__ = ["COCO2017_CATEGORY_IDS", "example_targets", "label_names", "load", "to_tf_dataset"]

#: COCO category ids of the 80 ``coco/2017`` labels: label ``k`` is ``COCO2017_CATEGORY_IDS[k]``
#: (pass it as ``label_to_category`` to :func:`dlnotes.evaluation.predictions_to_coco`).
COCO2017_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip


def label_names(info) -> list[str]:
    """The class names, in label order, of a ``tfds`` ``DatasetInfo`` (or builder) whose
    examples hold ``objects/label``."""
    info = getattr(info, "info", info)
    return list(info.features["objects"]["label"].names)


def load(name: str, split: str, data_dir: str | None = None, **kwargs):
    """``tfds.load(name, split=split)`` -> ``(examples, class names)``.

    Args:
        name: a ``tfds`` detection data set whose examples hold ``image`` and ``objects`` with
            ``bbox`` and ``label``: ``"coco/2017"``, ``"voc/2007"``, ``"voc/2012"``, ...
        split: e.g. ``"train"``, ``"validation"``, ``"train[:10%]"``.
        data_dir: where ``tfds`` keeps (or downloads) the data.
        kwargs: more ``tfds.load`` arguments (``download``, ``read_config``, ...).

    Returns:
        A ``tf.data.Dataset`` of ``tfds`` examples and the class names (:func:`label_names`).
    """
    import tensorflow_datasets as tfds

    examples, info = tfds.load(name, split=split, data_dir=data_dir, with_info=True, **kwargs)
    return examples, label_names(info)


def example_targets(example: dict, drop_crowd: bool = True, drop_difficult: bool = False):
    """One ``tfds`` example -> ``(image, boxes, labels)`` of its objects.

    Args:
        example: a ``tfds`` example: ``image`` uint8 ``(H, W, 3)``, ``objects/bbox`` ``(N, 4)``
            ``[ymin, xmin, ymax, xmax]`` relative to the image, ``objects/label`` ``(N,)``, and
            optionally ``objects/is_crowd`` (COCO) or ``objects/is_difficult`` (VOC).
        drop_crowd: leave out crowd regions, as :class:`~dlnotes.data.CocoDataset` does
            (``iscrowd`` annotations are not training targets).
        drop_difficult: leave out VOC's "difficult" objects.

    Returns:
        ``image`` uint8 ``(H, W, 3)``, ``boxes`` float32 ``(n, 4)`` absolute-pixel ``xyxy``,
        ``labels`` int32 ``(n,)``. Boxes without area (zero width or height in pixels) are left
        out, as ``CocoDataset`` refuses them.
    """
    image = example["image"]
    objects = example["objects"]
    height_width = tf.cast(tf.shape(image)[:2], tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(tf.cast(objects["bbox"], tf.float32), 4, axis=-1)
    height, width = height_width[0], height_width[1]
    boxes = tf.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)
    keep = tf.logical_and(boxes[:, 2] > boxes[:, 0], boxes[:, 3] > boxes[:, 1])
    if drop_crowd and "is_crowd" in objects:
        keep = tf.logical_and(keep, tf.logical_not(objects["is_crowd"]))
    if drop_difficult and "is_difficult" in objects:
        keep = tf.logical_and(keep, tf.logical_not(objects["is_difficult"]))
    labels = tf.cast(objects["label"], tf.int32)
    return image, tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)


def _padded(values, size, image_id):
    """``values`` ``(n, ...)`` padded with -1 to ``(size, ...)``; an assertion naming the image
    when ``n > size`` (objects are never silently dropped)."""
    count = tf.shape(values)[0]
    check = tf.debugging.Assert(
        count <= size,
        [
            f"dlnotes.data.tfds: an image has more objects than max_boxes={size}; raise "
            "max_boxes (objects are never silently dropped). Image id, objects:",
            image_id,
            count,
        ],
    )
    with tf.control_dependencies([check]):
        pad = [[0, size - count]] + [[0, 0]] * (values.shape.rank - 1)
        padded = tf.pad(values, pad, constant_values=tf.cast(-1, values.dtype))
    return tf.ensure_shape(padded, [size, *values.shape[1:]])


def to_tf_dataset(
    examples: tf.data.Dataset,
    batch_size: int = 8,
    image_size: int | Sequence[int] = 512,
    resize: str = "letterbox",
    horizontal_flip: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    max_boxes: int = 100,
    with_meta: bool = False,
    repeat: bool = False,
    drop_remainder: bool = False,
    drop_crowd: bool = True,
    drop_difficult: bool = False,
    shuffle_buffer: int = 1024,
) -> tf.data.Dataset:
    """``tfds`` detection examples -> the batches of :meth:`CocoDataset.to_tf_dataset
    <dlnotes.data.CocoDataset.to_tf_dataset>`: same keys, box format, labels, padding and
    augmentation.

    Per example, in this order: its objects (:func:`example_targets`) padded to ``max_boxes``
    with -1; optionally flipped left-right (probability 1/2, decided as in ``CocoDataset``: a
    seeded stream redrawn every epoch); letterboxed (or stretched) to ``image_size``; batched.

    Args:
        examples: a ``tf.data.Dataset`` of ``tfds`` examples (``tfds.load(...)`` or
            :func:`load`).
        batch_size: images per batch.
        image_size: ``S`` or ``(height, width)`` of the output (``tfds`` images differ in size).
        resize: ``"letterbox"`` or ``"stretch"``.
        horizontal_flip: random left-right flips.
        shuffle: shuffle with a buffer of ``shuffle_buffer`` examples (deterministic given
            ``seed``, reshuffled every epoch); a ``tfds`` split is too large to shuffle whole.
        seed: seed of the shuffle and the flips.
        max_boxes: ``M``, objects per image after padding (COCO 2017 has at most 93 per image,
            crowd regions included). An image with more raises ``InvalidArgumentError`` when
            it is read.
        with_meta: add the ``meta`` dict.
        repeat: repeat forever.
        drop_remainder: drop the last incomplete batch (static batch dimension).
        drop_crowd, drop_difficult: of :func:`example_targets`.
        shuffle_buffer: examples in the shuffle buffer.

    Returns:
        ``(images, targets)`` or ``(images, targets, meta)``: ``images`` float32
        ``(B, H, W, 3)`` in [0, 255]; ``targets`` ``{"boxes": (B, M, 4) float32 xyxy pixels of
        the output images, "labels": (B, M) int32}``, every padded entry -1; ``meta``
        ``{"image_id": (B,) int64`` (``image/id`` where the data set has one, as COCO does,
        else the example's position in ``examples``), ``"scale", "offset": (B, 2)`` float32
        ``(x, y)`` with ``output = original * scale + offset``, ``"original_size": (B, 2)``
        int32 ``(height, width)``, ``"flipped": (B,) bool}``.
    """
    if resize not in ("letterbox", "stretch"):
        raise ValueError(f'resize must be "letterbox" or "stretch", got {resize!r}')
    batch_size = positive_int(batch_size, "batch_size", "dlnotes.data.tfds.to_tf_dataset")
    max_boxes = positive_int(max_boxes, "max_boxes", "dlnotes.data.tfds.to_tf_dataset")
    out_h, out_w = transforms._target_size(image_size)
    seed_value = int(seed)

    def load(random_value, indexed):
        index, example = indexed
        image_id = tf.cast(example.get("image/id", index), tf.int64)
        image, boxes, labels = example_targets(example, drop_crowd, drop_difficult)
        boxes = _padded(boxes, max_boxes, image_id)
        labels = _padded(labels, max_boxes, image_id)
        original_size = tf.shape(image)[:2]
        image, boxes, _, scale, offset, flipped = transforms.flip_and_resize(
            image, boxes, None, random_value, seed=seed_value, horizontal_flip=horizontal_flip,
            size=(out_h, out_w), resize_mode=resize,
        )  # fmt: skip
        targets = {"boxes": boxes, "labels": labels}
        if not with_meta:
            return image, targets
        meta = {
            "image_id": image_id,
            "scale": scale,
            "offset": offset,
            "original_size": original_size,
            "flipped": flipped,
        }
        return image, targets, meta

    ds = examples.enumerate()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed_value, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return transforms.seeded_batches(ds, load, seed_value, batch_size, drop_remainder)
