"""Tests of dlnotes.data.coco: validation errors, drop counts, label mapping, tf.data output."""

import contextlib
import io
import json
import math

import cv2
import numpy as np
import pytest
import tensorflow as tf
from pycocotools.cocoeval import COCOeval

from dlnotes.data import CocoDataset, CocoDataWarning, generate_shapes_dataset
from dlnotes.data.coco import image_file_problem
from dlnotes.data.shapes import CLASS_NAMES
from dlnotes.data.transforms import undo_letterbox


@pytest.fixture(scope="module")
def shapes_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate_shapes_dataset(root / "ds", num_train=6, num_val=2, image_size=64)


def _write_set(tmp_path, annotations, images=None, categories=None, sizes=None, name="set.json"):
    """A hand-made COCO set: PNGs of known content in tmp_path/img, JSON in tmp_path/name.

    Image ``i`` (id ``i + 1``) is ``sizes[i]`` (h, w), filled with value ``10 * (i + 1)`` in
    channel 0 and the column index in channel 1.
    """
    sizes = sizes or [(40, 50), (40, 50), (40, 50)]
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    if images is None:
        images = []
        for i, (h, w) in enumerate(sizes):
            pixels = np.zeros((h, w, 3), np.uint8)
            pixels[..., 0] = 10 * (i + 1)
            pixels[..., 1] = np.arange(w)[None, :]
            cv2.imwrite(str(folder / f"{i + 1}.png"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
            images.append({"id": i + 1, "file_name": f"{i + 1}.png", "height": h, "width": w})
    if categories is None:
        categories = [{"id": 3, "name": "c3"}, {"id": 10, "name": "c10"}, {"id": 7, "name": "c7"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path, folder


def _ann(ann_id, image_id, bbox, category_id=3, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


GOOD = [
    _ann(1, 1, [1, 2, 10, 20], 3),
    _ann(2, 1, [20, 5, 30, 15], 10),
    _ann(3, 3, [0, 0, 5, 5], 7),
    _ann(4, 3, [10, 10, 4, 6], 3),
    _ann(5, 3, [30, 20, 19.5, 19.5], 10),
]


# --------------------------------------------------------------------------- loading


def test_loads_the_shapes_set(shapes_paths):
    ds = CocoDataset(shapes_paths["train_annotations"])
    raw = json.loads(shapes_paths["train_annotations"].read_text())
    assert len(ds) == 6 and ds.image_ids == [1, 2, 3, 4, 5, 6]
    assert ds.image_dir == shapes_paths["train_images"].resolve()  # ../train found by itself
    assert ds.num_classes == 6 and ds.class_names == list(CLASS_NAMES)
    assert ds.category_ids == [1, 2, 3, 4, 5, 6]
    assert ds.num_keypoints == 5 and ds.flip_pairs == ((4, 2),)
    assert not ds.dropped and ds.clipped == 0
    for record in ds.records:
        anns = [a for a in raw["annotations"] if a["image_id"] == record["image_id"]]
        ref = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        assert record["boxes"].dtype == np.float32 and record["labels"].dtype == np.int32
        np.testing.assert_allclose(record["boxes"], ref, atol=1e-5)
        np.testing.assert_array_equal(record["labels"], [a["category_id"] - 1 for a in anns])
        ref_kps = np.array([a["keypoints"] for a in anns]).reshape(-1, 5, 3)
        np.testing.assert_allclose(record["keypoints"], ref_kps, atol=1e-5)
        assert record["path"].endswith(f"{record['image_id']:06d}.png")


def test_label_mapping_is_sorted_and_contiguous(tmp_path):
    path, folder = _write_set(tmp_path, GOOD)
    ds = CocoDataset(path, image_dir=folder)
    assert ds.category_ids == [3, 7, 10] and ds.class_names == ["c3", "c7", "c10"]
    assert ds.num_classes == 3 and ds.keypoint_names is None and ds.num_keypoints == 0
    assert ds.label_to_category(0) == 3 and ds.label_to_category(2) == 10
    assert ds.category_to_label(7) == 1
    np.testing.assert_array_equal(ds.label_to_category(np.array([2, 0, 1])), [10, 3, 7])
    np.testing.assert_array_equal(ds.category_to_label([10, 3]), [2, 0])
    with pytest.raises(ValueError, match="unknown category id"):
        ds.category_to_label(4)
    with pytest.raises(ValueError, match="out of range"):
        ds.label_to_category(3)
    rec = {r["image_id"]: r for r in ds.records}
    np.testing.assert_array_equal(rec[1]["labels"], [0, 2])
    np.testing.assert_allclose(rec[1]["boxes"], [[1, 2, 11, 22], [20, 5, 50, 20]])
    assert rec[2]["boxes"].shape == (0, 4) and rec[2]["labels"].shape == (0,)
    assert rec[3]["keypoints"] is None


def test_coco_property_is_quiet_and_evaluates_ground_truth_perfectly(shapes_paths):
    ds = CocoDataset(shapes_paths["val_annotations"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco = ds.coco
    assert out.getvalue() == ""
    assert sorted(coco.getImgIds()) == ds.image_ids
    # the ground truth itself, through label_to_category, is a perfect detector
    results = [
        {
            "image_id": r["image_id"],
            "category_id": ds.label_to_category(int(label)),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": 1.0,
        }
        for r in ds.records
        for (x1, y1, x2, y2), label in zip(r["boxes"], r["labels"], strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- errors


def test_missing_and_corrupt_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"bad\.json is not a valid JSON"):
        CocoDataset(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match=r'wrong\.json.*"images"'):
        CocoDataset(wrong)


def test_unresolvable_image_dir(tmp_path):
    path, _ = _write_set(tmp_path, GOOD)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "set.json"
    path.rename(moved)
    with pytest.raises(FileNotFoundError, match=r"cannot find image '1\.png'.*image_dir="):
        CocoDataset(moved)
    with pytest.raises(FileNotFoundError, match="image_dir"):
        CocoDataset(moved, image_dir=tmp_path / "missing")


def test_missing_image_file_raise_and_drop(tmp_path):
    path, folder = _write_set(tmp_path, GOOD)
    (folder / "3.png").unlink()
    with pytest.raises(ValueError, match=r"image id 3: image file not found: .*3\.png"):
        CocoDataset(path, image_dir=folder)
    with pytest.warns(CocoDataWarning, match="image_dropped: 3, missing_image_file: 1"):
        ds = CocoDataset(path, image_dir=folder, on_invalid="drop")
    assert ds.image_ids == [1, 2]
    assert ds.dropped == {"missing_image_file": 1, "image_dropped": 3}
    assert sorted(ds.coco.getImgIds()) == [1, 2] and len(ds.coco.getAnnIds()) == 2


BAD_CASES = [
    (_ann(7, 1, [1, 1, 5, 5], category_id=99), "unknown_category_id", r"category id 99"),
    # True == 1 in Python, but a JSON `true` is no category id (and no image id)
    (_ann(7, 1, [1, 1, 5, 5], category_id=True), "unknown_category_id", r"category id True"),
    (_ann(7, True, [1, 1, 5, 5]), "unknown_image_id", r"image id True is not in images"),
    (_ann(7, 9, [1, 1, 5, 5]), "unknown_image_id", r"image id 9 is not in images"),
    (_ann(7, 1, [1, 1, 0, 5]), "nonpositive_size", r"width and height must be > 0"),
    (_ann(7, 1, [1, 1, 5, -2]), "nonpositive_size", r"width and height must be > 0"),
    (_ann(7, 1, [1, math.nan, 5, 5]), "nonfinite_bbox", r"non-finite"),
    (_ann(7, 1, [1, 1, math.inf, 5]), "nonfinite_bbox", r"non-finite"),
    (_ann(7, 1, [60, 1, 5, 5]), "outside_image", r"outside the 50x40 image"),
    (_ann(7, 1, [-9, 1, 8, 5]), "outside_image", r"outside the 50x40 image"),
    (_ann(7, 1, [1, 2, 3]), "malformed_bbox", r"bbox must be 4 numbers"),
    (_ann(7, 1, [1, 2, "3", 4]), "malformed_bbox", r"bbox must be 4 numbers"),
]


@pytest.mark.parametrize(("bad", "reason", "message"), BAD_CASES)
def test_invalid_annotation_raises_naming_it(tmp_path, bad, reason, message):
    path, folder = _write_set(tmp_path, [*GOOD, bad])
    with pytest.raises(ValueError, match=message) as info:
        CocoDataset(path, image_dir=folder)
    text = str(info.value)
    assert "annotation id 7" in text and f"[{reason}]" in text and "set.json" in text
    if reason != "unknown_image_id":
        assert "(image id 1) [1.png]" in text


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:100], "PNG data is truncated"),  # a cut download
        (lambda data: b"", "the file is empty"),
        (lambda data: b"<html>404 Not Found</html>", r"not a PNG, JPEG, GIF or BMP image"),
    ],
    ids=["truncated", "empty", "text"],
)
def test_unreadable_image_files_are_named_when_the_set_is_indexed(tmp_path, damage, message):
    path, folder = _write_set(tmp_path, GOOD)
    png = folder / "3.png"
    png.write_bytes(damage(png.read_bytes()))
    with pytest.raises(
        ValueError, match=rf"image id 3: .*3\.png: .*{message}.*unreadable_image_file"
    ):
        CocoDataset(path, image_dir=folder)
    with pytest.warns(CocoDataWarning, match="unreadable_image_file: 1"):
        ds = CocoDataset(path, image_dir=folder, on_invalid="drop")
    assert ds.image_ids == [1, 2]
    images, _ = next(iter(ds.to_tf_dataset(batch_size=2, image_size=32)))  # the rest reads
    assert images.shape == (2, 32, 32, 3)


def test_complete_jpeg_gif_and_bmp_files_pass_the_file_check(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    for suffix in (".jpg", ".png", ".bmp"):
        file = tmp_path / f"image{suffix}"
        cv2.imwrite(str(file), pixels)
        assert image_file_problem(file) is None, suffix
        if suffix != ".bmp":
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
            assert "truncated" in image_file_problem(file), suffix
    gif = tmp_path / "image.gif"  # the smallest valid GIF: 1x1, one colour
    gif.write_bytes(
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
        b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )
    assert image_file_problem(gif) is None
    assert tf.io.decode_image(gif.read_bytes()).shape[-1] == 3


def test_drop_mode_counts_every_reason(tmp_path):
    bad = [dict(case[0], id=100 + i) for i, case in enumerate(BAD_CASES)]
    path, folder = _write_set(tmp_path, [*GOOD, *bad])
    with pytest.warns(CocoDataWarning) as record:
        ds = CocoDataset(path, image_dir=folder, on_invalid="drop")
    expected = {}
    for _, reason, _ in BAD_CASES:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(ds.dropped) == expected
    message = str(record[0].message)
    assert all(f"{reason}: {n}" in message for reason, n in expected.items())
    # the valid annotations all survive, unchanged
    assert sum(len(r["labels"]) for r in ds.records) == len(GOOD)
    assert len(ds.coco.getAnnIds()) == len(GOOD)


def test_partially_outside_boxes_are_clipped(tmp_path):
    path, folder = _write_set(tmp_path, [_ann(1, 1, [-5, 30, 20, 20]), _ann(2, 2, [45, -1, 9, 3])])
    ds = CocoDataset(path, image_dir=folder)
    np.testing.assert_allclose(ds.records[0]["boxes"], [[0, 30, 15, 40]])
    np.testing.assert_allclose(ds.records[1]["boxes"], [[45, 0, 50, 2]])
    assert ds.clipped == 2 and not ds.dropped
    np.testing.assert_allclose(ds.coco.anns[1]["bbox"], [0, 30, 15, 10])


def test_crowd_annotations_are_skipped_and_counted(tmp_path):
    crowd = _ann(9, 1, [0, 0, 8, 8], iscrowd=1)
    path, folder = _write_set(tmp_path, [*GOOD, crowd])
    with pytest.warns(CocoDataWarning, match="iscrowd: 1"):
        ds = CocoDataset(path, image_dir=folder)
    assert len(ds.records[0]["labels"]) == 2  # not a training target
    assert ds.coco.anns[9]["iscrowd"] == 1  # but an ignore region for COCOeval


def test_malformed_keypoints(tmp_path):
    cats = [{"id": 1, "name": "a", "keypoints": ["left", "right"]}]
    anns = [
        _ann(1, 1, [1, 1, 5, 5], 1, keypoints=[1, 2, 2, 3, 4, 1]),
        _ann(2, 1, [1, 1, 5, 5], 1),  # no keypoints: unlabelled (0, 0, 0)
        _ann(3, 2, [1, 1, 5, 5], 1, keypoints=[1, 2, 2]),
    ]
    path, folder = _write_set(tmp_path, anns, categories=cats)
    with pytest.raises(ValueError, match=r"annotation id 3.*keypoints must be 6 finite numbers"):
        CocoDataset(path, image_dir=folder)
    with pytest.warns(CocoDataWarning, match="malformed_keypoints: 1"):
        ds = CocoDataset(path, image_dir=folder, on_invalid="drop")
    np.testing.assert_array_equal(
        ds.records[0]["keypoints"], [[[1, 2, 2], [3, 4, 1]], [[0, 0, 0], [0, 0, 0]]]
    )
    assert ds.flip_pairs == ((0, 1),)
    # the evaluation copy gets the fields COCOeval's keypoint mode needs
    assert ds.coco.anns[2]["keypoints"] == [0.0] * 6 and ds.coco.anns[2]["num_keypoints"] == 0
    assert ds.coco.anns[1]["num_keypoints"] == 2


def test_bad_constructor_arguments(tmp_path):
    path, folder = _write_set(tmp_path, GOOD)
    with pytest.raises(ValueError, match="on_invalid"):
        CocoDataset(path, image_dir=folder, on_invalid="ignore")
    dup = tmp_path / "dup.json"
    data = json.loads(path.read_text())
    data["images"].append(dict(data["images"][0]))
    dup.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="duplicate image id 1"):
        CocoDataset(dup, image_dir=folder)


# --------------------------------------------------------------------------- tf.data


def test_tf_dataset_values_padding_and_dtypes(tmp_path):
    path, folder = _write_set(tmp_path, GOOD)
    ds = CocoDataset(path, image_dir=folder)
    images, targets, meta = next(iter(ds.to_tf_dataset(batch_size=3, with_meta=True)))
    assert images.shape == (3, 40, 50, 3) and images.dtype == tf.float32
    assert targets["boxes"].shape == (3, 3, 4) and targets["boxes"].dtype == tf.float32
    assert targets["labels"].shape == (3, 3) and targets["labels"].dtype == tf.int32
    assert "keypoints" not in targets
    for i in range(3):  # pixel values come through exactly (RGB order, [0, 255])
        np.testing.assert_array_equal(images[i, ..., 0].numpy(), 10.0 * (i + 1))
        np.testing.assert_array_equal(images[i, 0, :, 1].numpy(), np.arange(50))
    boxes, labels = targets["boxes"].numpy(), targets["labels"].numpy()
    np.testing.assert_allclose(boxes[0, :2], [[1, 2, 11, 22], [20, 5, 50, 20]])
    np.testing.assert_array_equal(labels[0], [0, 2, -1])
    np.testing.assert_array_equal(boxes[0, 2], -1)
    np.testing.assert_array_equal(boxes[1], -1)  # an image without objects
    np.testing.assert_array_equal(labels[1], -1)
    np.testing.assert_allclose(boxes[2], [[0, 0, 5, 5], [10, 10, 14, 16], [30, 20, 49.5, 39.5]])
    np.testing.assert_array_equal(labels[2], [1, 0, 2])
    np.testing.assert_array_equal(meta["image_id"].numpy(), [1, 2, 3])
    np.testing.assert_array_equal(meta["scale"].numpy(), 1.0)
    np.testing.assert_array_equal(meta["offset"].numpy(), 0.0)
    np.testing.assert_array_equal(meta["original_size"].numpy(), [[40, 50]] * 3)
    # larger max_boxes pads further; fewer raises naming the image
    wide = next(iter(ds.to_tf_dataset(batch_size=1, max_boxes=5)))[1]
    np.testing.assert_array_equal(wide["labels"].numpy(), [[0, 2, -1, -1, -1]])
    with pytest.raises(ValueError, match=r"image id 3 \(.*3\.png\) has 3 boxes.*max_boxes=2"):
        ds.to_tf_dataset(max_boxes=2)


def test_tf_dataset_letterbox_meta_maps_back(tmp_path):
    sizes = [(40, 50), (30, 60), (64, 32)]
    path, folder = _write_set(
        tmp_path,
        [_ann(1, 1, [1, 2, 10, 20]), _ann(2, 2, [5, 5, 50, 20]), _ann(3, 3, [4, 8, 20, 50])],
        sizes=sizes,
    )
    ds = CocoDataset(path, image_dir=folder)
    with pytest.raises(ValueError, match=r"images differ in size \(image id 1 is 40x50"):
        ds.to_tf_dataset()
    images, targets, meta = next(
        iter(ds.to_tf_dataset(batch_size=3, image_size=48, with_meta=True))
    )
    assert images.shape == (3, 48, 48, 3)
    back = undo_letterbox(targets["boxes"], meta["scale"], meta["offset"]).numpy()
    for i, record in enumerate(ds.records):
        h, w = sizes[i]
        s = min(48 / h, 48 / w)
        np.testing.assert_allclose(
            meta["scale"][i].numpy(), [round(w * s) / w, round(h * s) / h], rtol=1e-6
        )
        np.testing.assert_allclose(back[i, 0], record["boxes"][0], atol=1e-4)
        # the letterbox padding (bottom/right) is grey 114
        np.testing.assert_array_equal(images[i, 47, 47].numpy(), 114.0)
    stretched = next(
        iter(ds.to_tf_dataset(batch_size=3, image_size=(20, 40), resize="stretch", with_meta=True))
    )
    np.testing.assert_allclose(stretched[2]["scale"][1].numpy(), [40 / 60, 20 / 30], rtol=1e-6)
    np.testing.assert_allclose(
        stretched[1]["boxes"][1, 0].numpy(),
        [5 * 40 / 60, 5 * 20 / 30, 55 * 40 / 60, 25 * 20 / 30],
        rtol=1e-5,
    )


def test_tf_dataset_keypoints_flip_and_determinism(shapes_paths):
    ds = CocoDataset(shapes_paths["train_annotations"])
    kwargs = {"batch_size": 6, "with_keypoints": True, "with_meta": True}
    plain = next(iter(ds.to_tf_dataset(**kwargs)))
    flip_ds = ds.to_tf_dataset(horizontal_flip=True, shuffle=True, seed=1, **kwargs)
    first, second_epoch = next(iter(flip_ds)), next(iter(flip_ds))
    rebuilt = ds.to_tf_dataset(horizontal_flip=True, shuffle=True, seed=1, **kwargs)
    for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(next(iter(rebuilt))), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same seed -> same batch
    # a new epoch draws a new order and new flips (augmentation is not frozen)
    assert not np.array_equal(first[2]["image_id"], second_epoch[2]["image_id"])
    plain_flip_ds = ds.to_tf_dataset(horizontal_flip=True, **kwargs)
    epochs = [next(iter(plain_flip_ds))[2]["flipped"].numpy() for _ in range(4)]
    assert len({tuple(e) for e in epochs}) > 1  # even without shuffling

    kps = plain[1]["keypoints"].numpy()
    m = plain[1]["labels"].shape[1]
    assert kps.shape == (6, m, 5, 3) and m == max(len(r["labels"]) for r in ds.records)
    flipped = first[2]["flipped"].numpy()
    assert 0 < flipped.sum() < 6  # this seed flips some images and not others
    order = [ds.image_ids.index(i) for i in first[2]["image_id"].numpy()]
    assert sorted(order) == list(range(6)) and order != list(range(6))  # shuffled
    for row, src in enumerate(order):
        n = len(ds.records[src]["labels"])
        boxes, ref_boxes = first[1]["boxes"].numpy()[row], plain[1]["boxes"].numpy()[src]
        out_kps, ref_kps = first[1]["keypoints"].numpy()[row], kps[src]
        np.testing.assert_array_equal(boxes[n:], -1)
        np.testing.assert_array_equal(out_kps[n:], -1)  # keypoint padding is -1 as well
        np.testing.assert_array_equal(
            first[0].numpy()[row],
            plain[0].numpy()[src][:, ::-1] if flipped[row] else plain[0].numpy()[src],
        )
        if flipped[row]:
            ref_boxes = np.stack(
                [64 - ref_boxes[:, 2], ref_boxes[:, 1], 64 - ref_boxes[:, 0], ref_boxes[:, 3]],
                axis=1,
            )
            ref_kps = ref_kps.copy()
            ref_kps[..., 0] = 64 - ref_kps[..., 0]
            ref_kps = ref_kps[:, [0, 1, 4, 3, 2]]  # left and right extremes swap
        np.testing.assert_allclose(boxes[:n], ref_boxes[:n], atol=1e-4)
        np.testing.assert_allclose(out_kps[:n], ref_kps[:n], atol=1e-4)
    # a flipped "right" keypoint is still the rightmost point of its box
    for row in np.nonzero(flipped)[0]:
        n = len(ds.records[order[row]]["labels"])
        np.testing.assert_allclose(
            first[1]["keypoints"].numpy()[row, :n, 2, 0],
            first[1]["boxes"].numpy()[row, :n, 2],
            atol=1e-4,
        )


def test_tf_dataset_argument_errors(tmp_path):
    path, folder = _write_set(tmp_path, GOOD)
    ds = CocoDataset(path, image_dir=folder)
    with pytest.raises(ValueError, match="no category defines keypoints"):
        ds.to_tf_dataset(with_keypoints=True)
    with pytest.raises(ValueError, match="resize"):
        ds.to_tf_dataset(resize="crop", image_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        ds.to_tf_dataset(batch_size=0)


def test_tf_dataset_detects_size_mismatch_with_the_json(tmp_path):
    path, folder = _write_set(tmp_path, GOOD)
    data = json.loads(path.read_text())
    for img in data["images"]:
        img["height"], img["width"] = 50, 40  # the files are 40x50
    path.write_text(json.dumps(data))
    ds = CocoDataset(path, image_dir=folder)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"differs from the JSON.*1\.png"):
        next(iter(ds.to_tf_dataset(batch_size=1)))


def test_tf_dataset_repeat_static_batch_and_flip_without_keypoints(tmp_path):
    path, folder = _write_set(tmp_path, GOOD)
    ds = CocoDataset(path, image_dir=folder)
    tfds = ds.to_tf_dataset(
        batch_size=2, horizontal_flip=True, repeat=True, drop_remainder=True, with_meta=True
    )
    assert tfds.element_spec[0].shape == (2, 40, 50, 3)  # static batch for jit_compile
    assert tfds.element_spec[1]["boxes"].shape == (2, 3, 4)
    plain = {r["image_id"]: r for r in ds.records}
    seen_flip = set()
    for images, targets, meta in tfds.take(6):  # four passes over the 3 images
        for row in range(2):
            record = plain[int(meta["image_id"][row])]
            n, ref = len(record["labels"]), record["boxes"].copy()
            if meta["flipped"][row]:
                ref[:, [0, 2]] = 50 - ref[:, [2, 0]]
                assert images[row, 0, 0, 1] == 49.0  # channel 1 holds the column index
            else:
                assert images[row, 0, 0, 1] == 0.0
            seen_flip.add(bool(meta["flipped"][row]))
            np.testing.assert_allclose(targets["boxes"][row, :n].numpy(), ref, atol=1e-5)
            np.testing.assert_array_equal(targets["boxes"][row, n:].numpy(), -1)
    assert seen_flip == {True, False}


def test_load_image_reads_the_record_and_names_a_missing_file(shapes_paths, tmp_path):
    ds = CocoDataset(shapes_paths["train_annotations"])
    image = ds.load_image(0)
    assert image.dtype == np.uint8 and image.shape == (
        ds.records[0]["height"],
        ds.records[0]["width"],
        3,
    )
    expected = cv2.cvtColor(cv2.imread(str(ds.records[0]["path"])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(image, expected)
    ds.records[0]["path"] = tmp_path / "gone.png"
    with pytest.raises(ValueError, match="gone.png"):
        ds.load_image(0)


def test_padded_targets_match_the_tf_dataset_without_reading_images(shapes_paths, tmp_path):
    ds = CocoDataset(shapes_paths["train_annotations"])
    targets = ds.padded_targets(with_keypoints=True)
    n, m = len(ds), max(len(r["labels"]) for r in ds.records)
    assert targets["boxes"].shape == (n, m, 4) and targets["labels"].shape == (n, m)
    assert targets["keypoints"].shape == (n, m, ds.num_keypoints, 3)
    _, batch = next(iter(ds.to_tf_dataset(batch_size=n, with_keypoints=True)))
    for key in ("boxes", "labels", "keypoints"):
        np.testing.assert_array_equal(targets[key], batch[key].numpy())
    wide = ds.padded_targets(max_boxes=m + 3)
    assert np.all(wide["labels"][:, m:] == -1) and np.all(wide["boxes"][:, m:] == -1)
    with pytest.raises(ValueError, match="never silently dropped"):
        ds.padded_targets(max_boxes=1)
    # Reading no image: it works even when the image files are gone.
    for record in ds.records:
        record["path"] = tmp_path / "missing.png"
    np.testing.assert_array_equal(ds.padded_targets()["labels"], targets["labels"])
