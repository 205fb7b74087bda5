"""Tests of dlnotes.data.tfds: ``tfds`` detection examples give the batches of
``CocoDataset.to_tf_dataset``. Offline: ``tfds.testing.mock_data`` replaces the builders' data,
with examples written here in each builder's own feature structure (its random examples give
the fields of ``objects`` different lengths, which real data never has)."""

import json

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dlnotes.data import CocoDataset, CocoDataWarning
from dlnotes.data.tfds import (
    COCO2017_CATEGORY_IDS,
    example_targets,
    label_names,
    load,
    to_tf_dataset,
)

# Three images (height, width) and their objects: (x, y, w, h) pixels, COCO category id, crowd.
SIZES = [(40, 50), (30, 64), (48, 36)]
OBJECTS = [
    [((1, 2, 10, 20), 3, False), ((20, 5, 30, 15), 10, False), ((5, 5, 20, 20), 7, True)],
    [],
    [((0, 0, 5, 5), 7, False), ((10, 10, 4, 6), 3, False), ((30, 20, 5.5, 27.5), 10, False)],
]
CATEGORY_IDS = [3, 7, 10]  # labels 0, 1, 2 in both conventions


def _pixels(index, height, width):
    """A deterministic uint8 image with structure in both axes (flips and resizes show)."""
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """The three images as PNGs and a COCO JSON (the CocoDataset side)."""
    root = tmp_path_factory.mktemp("tfds_coco")
    images, annotations = [], []
    for i, ((h, w), objects) in enumerate(zip(SIZES, OBJECTS, strict=True)):
        cv2.imwrite(str(root / f"{i + 1}.png"), cv2.cvtColor(_pixels(i, h, w), cv2.COLOR_RGB2BGR))
        images.append({"id": 100 + i, "file_name": f"{i + 1}.png", "height": h, "width": w})
        for box, category, crowd in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "bbox": box,
                                "category_id": category, "iscrowd": int(crowd),
                                "area": box[2] * box[3]})  # fmt: skip
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))  # fmt: skip
    return path


def _relative(box, height, width):
    """COCO ``xywh`` pixels -> tfds' ``[ymin, xmin, ymax, xmax]`` relative to the image."""
    x, y, w, h = box
    return [y / height, x / width, (y + h) / height, (x + w) / width]


def _coco_examples():
    """The three images as ``coco/2017`` examples (tfds' structure)."""
    examples = []
    for i, ((h, w), objects) in enumerate(zip(SIZES, OBJECTS, strict=True)):
        n = len(objects)
        examples.append({
            "image": _pixels(i, h, w),
            "image/filename": f"{i + 1}.png",
            "image/id": 100 + i,
            "objects": {
                "area": np.array([int(b[2] * b[3]) for b, _, _ in objects], np.int64),
                "bbox": np.array([_relative(b, h, w) for b, _, _ in objects], np.float32)
                .reshape(n, 4),
                "id": np.arange(1, n + 1, dtype=np.int64),
                "is_crowd": np.array([c for _, _, c in objects], bool),
                "label": np.array([CATEGORY_IDS.index(c) for _, c, _ in objects], np.int64),
            },
        })  # fmt: skip
    return examples


def _as_dataset(examples):
    """An ``as_dataset_fn`` for ``tfds.testing.mock_data`` yielding ``examples`` with the
    builder's own feature dtypes and shapes (a missing or extra key fails)."""

    def as_dataset(self, *args, **kwargs):
        return tf.data.Dataset.from_generator(
            lambda: iter(examples),
            output_types=self.info.features.dtype,
            output_shapes=self.info.features.shape,
        )

    return as_dataset


def _numpy(batches):
    """A batched dataset -> a list of its elements as nests of NumPy arrays."""
    return [tf.nest.map_structure(np.asarray, element) for element in batches]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_coco_examples_give_the_batches_of_coco_dataset(coco_files, flip, resize):
    options = dict(batch_size=2, image_size=(32, 48), resize=resize, horizontal_flip=flip,
                   seed=3, max_boxes=4, with_meta=True)  # fmt: skip
    with pytest.warns(CocoDataWarning, match="iscrowd: 1"):  # CocoDataset leaves crowds out too
        coco = CocoDataset(coco_files)
    want = _numpy(coco.to_tf_dataset(**options))
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_coco_examples())):
        got = _numpy(to_tf_dataset(tfds.load("coco/2017", split="train"), **options))
    assert len(got) == len(want) == 2
    for (g_images, g_targets, g_meta), (w_images, w_targets, w_meta) in zip(got, want, strict=True):
        assert g_images.dtype == w_images.dtype and g_images.shape == w_images.shape
        np.testing.assert_allclose(g_images, w_images, atol=1e-3)
        assert set(g_targets) == set(w_targets) == {"boxes", "labels"}
        for key in g_targets:
            assert g_targets[key].dtype == w_targets[key].dtype, key
        np.testing.assert_allclose(g_targets["boxes"], w_targets["boxes"], atol=1e-4)
        np.testing.assert_array_equal(g_targets["labels"], w_targets["labels"])
        assert set(g_meta) == set(w_meta)
        for key in g_meta:
            assert g_meta[key].dtype == w_meta[key].dtype, key
            np.testing.assert_allclose(g_meta[key], w_meta[key], rtol=1e-6, err_msg=key)
    flipped = np.concatenate([meta["flipped"] for _, _, meta in got])
    assert flipped.any() == flip  # the seed flips some of the three images
    # the crowd region is not a target; the empty image is all padding
    labels = np.concatenate([targets["labels"] for _, targets, _ in got])
    np.testing.assert_array_equal((labels >= 0).sum(1), [2, 0, 3])
    assert np.all(np.concatenate([t["boxes"] for _, t, _ in got])[labels < 0] == -1)


def _voc_examples():
    """Two ``voc/2007`` examples; the second object of the first is "difficult"."""
    boxes = [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 1.0]]
    return [
        {
            "image": _pixels(0, 20, 40),
            "image/filename": "000005.jpg",
            "labels": np.array([4, 11], np.int64),
            "labels_no_difficult": np.array([4], np.int64),
            "objects": {
                "bbox": np.array(boxes[:2], np.float32),
                "is_difficult": np.array([False, True]),
                "is_truncated": np.array([False, False]),
                "label": np.array([4, 11], np.int64),
                "pose": np.array([0, 1], np.int64),
            },
        },
        {
            "image": _pixels(1, 10, 10),
            "image/filename": "000007.jpg",
            "labels": np.array([0], np.int64),
            "labels_no_difficult": np.array([0], np.int64),
            "objects": {
                "bbox": np.array(boxes[2:], np.float32),
                "is_difficult": np.array([False]),
                "is_truncated": np.array([True]),
                "label": np.array([0], np.int64),
                "pose": np.array([2], np.int64),
            },
        },
    ]


@pytest.mark.parametrize("drop_difficult", [False, True])
def test_voc_examples(drop_difficult):
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_voc_examples())):
        examples, names = load("voc/2007", split="train")
        batches = to_tf_dataset(examples, batch_size=2, image_size=40, max_boxes=3,
                                with_meta=True, drop_difficult=drop_difficult)  # fmt: skip
        (images, targets, meta), = _numpy(batches)  # fmt: skip
    assert names[:2] == ["aeroplane", "bicycle"] and len(names) == 20
    assert images.shape == (2, 40, 40, 3) and images.dtype == np.float32
    # no image/id in VOC: the position in the split; letterbox scale 1 (40 x 20) and 4 (10 x 10)
    np.testing.assert_array_equal(meta["image_id"], [0, 1])
    np.testing.assert_allclose(meta["scale"], [[1, 1], [4, 4]])
    np.testing.assert_array_equal(meta["original_size"], [[20, 40], [10, 10]])
    want_boxes = -np.ones((2, 3, 4), np.float32)
    want_labels = -np.ones((2, 3), np.int32)
    want_boxes[0, 0], want_labels[0, 0] = [8, 2, 24, 10], 4  # ymin 0.1 xmin 0.2 of 20 x 40
    if not drop_difficult:
        want_boxes[0, 1], want_labels[0, 1] = [0, 0, 40, 20], 11
    want_boxes[1, 0], want_labels[1, 0] = [20, 10, 40, 30], 0  # x 5..10, y 2.5..7.5, times 4
    np.testing.assert_allclose(targets["boxes"], want_boxes, atol=1e-4)
    np.testing.assert_array_equal(targets["labels"], want_labels)
    assert targets["labels"].dtype == np.int32 and targets["boxes"].dtype == np.float32


def test_more_objects_than_max_boxes_raise_naming_the_image():
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_coco_examples())):
        batches = to_tf_dataset(tfds.load("coco/2017", split="train"), 1, 32, max_boxes=2)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"max_boxes=2[^\n]*102"):
            _numpy(batches)  # the third image (id 102) has 3 objects


def test_example_targets_drop_zero_area_boxes_and_crowds():
    example = {
        "image": np.zeros((10, 20, 3), np.uint8),
        "objects": {
            "bbox": np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.2, 0.6], [0, 0, 1, 1]], "f4"),
            "label": np.array([1, 2, 3]),
            "is_crowd": np.array([False, False, True]),
        },
    }
    image, boxes, labels = example_targets(example)
    assert image.shape == (10, 20, 3)
    np.testing.assert_allclose(boxes, [[2, 1, 10, 5]], atol=1e-5)  # xyxy pixels
    np.testing.assert_array_equal(labels, [1])
    _, boxes, labels = example_targets(example, drop_crowd=False)
    np.testing.assert_array_equal(labels, [1, 3])


def test_coco_labels_and_category_ids():
    ids = np.array(COCO2017_CATEGORY_IDS)
    assert len(ids) == 80 and np.all(np.diff(ids) > 0) and ids[0] == 1 and ids[-1] == 90
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)  # COCO's unused ids
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_coco_examples())):
        assert len(label_names(tfds.builder("coco/2017"))) == 80
    with pytest.raises(ValueError, match="max_boxes"):
        to_tf_dataset(tf.data.Dataset.range(1), max_boxes=0)
