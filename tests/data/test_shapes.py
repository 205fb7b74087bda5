"""Tests of the synthetic shapes data set: geometry, determinism, files, idempotence, CLI."""

import contextlib
import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from pycocotools.coco import COCO

from dlnotes.data import shapes
from dlnotes.data.shapes import (
    CLASS_NAMES,
    KEYPOINT_NAMES,
    generate_shapes_dataset,
    main,
    render_sample,
)

VERTICES = {"circle": 32, "square": 4, "triangle": 3, "star": 10, "hexagon": 6, "cross": 12}


def _samples(n, image_size=128, **kwargs):
    return [render_sample(np.random.default_rng([123, i]), image_size, **kwargs) for i in range(n)]


@pytest.fixture(scope="module")
def samples():
    return _samples(40)


def _file_bytes(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def _quiet_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# --------------------------------------------------------------------------- render_sample


def test_render_sample_is_deterministic():
    a_img, a_objs = render_sample(np.random.default_rng(5), 96)
    b_img, b_objs = render_sample(np.random.default_rng(5), 96)
    c_img, _ = render_sample(np.random.default_rng(6), 96)
    assert a_img.shape == (96, 96, 3) and a_img.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    assert len(a_objs) == len(b_objs)
    for a, b in zip(a_objs, b_objs, strict=True):
        np.testing.assert_array_equal(a["polygon"], b["polygon"])
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
    assert not np.array_equal(a_img, c_img)


def test_boxes_are_tight_polygon_bounds_inside_the_image(samples):
    count = 0
    for image, objects in samples:
        assert 1 <= len(objects) <= 8
        size = image.shape[0]
        for obj in objects:
            poly = obj["polygon"]
            assert obj["label"] in range(len(CLASS_NAMES))
            assert obj["name"] == CLASS_NAMES[obj["label"]]
            assert poly.shape == (VERTICES[obj["name"]], 2)
            np.testing.assert_array_equal(obj["box"][:2], poly.min(axis=0))
            np.testing.assert_array_equal(obj["box"][2:], poly.max(axis=0))
            assert np.all(poly >= 1.0 - 1e-9) and np.all(poly <= size - 1.0 + 1e-9)
            assert np.all(obj["box"][2:] > obj["box"][:2])
            # area: the shoelace formula vs OpenCV's contour area (float64 reference)
            ref_area = cv2.contourArea(poly.astype(np.float32))
            assert obj["area"] == pytest.approx(ref_area, rel=1e-4, abs=1e-3)
            count += 1
    assert count > 100


def test_keypoints_are_centre_and_polygon_extremes(samples):
    assert KEYPOINT_NAMES == ("center", "top", "right", "bottom", "left")
    for _, objects in samples:
        for obj in objects:
            poly, kps = obj["polygon"], obj["keypoints"]
            assert kps.shape == (5, 3)
            x1, y1, x2, y2 = obj["box"]
            # the centre is the shape's centre: inside the box, and for these regular or
            # point-symmetric outlines the mean of the vertices (up to the 1/100 px rounding)
            assert x1 < kps[0, 0] < x2 and y1 < kps[0, 1] < y2
            np.testing.assert_allclose(kps[0, :2], poly.mean(axis=0), atol=0.011)
            for index, axis, value in ((1, 1, y1), (2, 0, x2), (3, 1, y2), (4, 0, x1)):
                assert kps[index, axis] == pytest.approx(value, abs=1e-9)
                # the extreme point lies on the polygon: on the segment of tied extreme vertices
                tied = poly[np.abs(poly[:, axis] - value) <= 1e-6]
                other = 1 - axis
                lo, hi = tied[:, other].min(), tied[:, other].max()
                assert lo - 1e-9 <= kps[index, other] <= hi + 1e-9
            assert set(np.unique(kps[:, 2])) <= {1.0, 2.0}


def test_visibility_marks_keypoints_covered_by_later_objects(samples):
    covered_seen = 0
    for _, objects in samples:
        for i, obj in enumerate(objects):
            for kp in obj["keypoints"]:
                later = [MplPath(o["polygon"]) for o in objects[i + 1 :]]
                inside = [p.contains_point(kp[:2]) for p in later]
                # matplotlib's test is an independent reference (boundary cases may differ)
                expected = 1.0 if any(inside) else 2.0
                assert kp[2] == expected
                covered_seen += kp[2] == 1.0
    assert covered_seen > 0  # occlusion actually happens in this sample


def test_no_object_is_more_than_half_hidden(samples):
    for image, objects in samples:
        size = image.shape[0]
        centres = np.stack(np.mgrid[0:size, 0:size][::-1], axis=-1).reshape(-1, 2) + 0.5
        masks = [MplPath(o["polygon"]).contains_points(centres) for o in objects]
        for i, mask in enumerate(masks):
            hidden = np.zeros_like(mask)
            for later in masks[i + 1 :]:
                hidden |= later & mask
            # 50 % with a small allowance: reference rasterisation differs from the generator's
            assert hidden.sum() <= 0.5 * mask.sum() + 3


def test_painted_pixels_match_the_annotated_polygon():
    """Without noise, pixel centres at least 1 px inside the topmost polygon all carry its colour,
    and that colour differs from the background just outside its box (contrast)."""
    checked = 0
    for image, objects in _samples(12, 128, noise_std=0.0, max_clutter=0):
        top = objects[-1]
        contour = top["polygon"].astype(np.float32).reshape(-1, 1, 2)
        x1, y1, x2, y2 = top["box"]
        ys, xs = np.mgrid[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))]
        interior = [
            (y, x)
            for y, x in zip(ys.ravel(), xs.ravel(), strict=True)
            if cv2.pointPolygonTest(contour, (x + 0.5, y + 0.5), True) > 1.0
        ]
        if len(interior) < 10:
            continue
        colours = np.array([image[y, x] for y, x in interior], np.int32)
        assert np.all(np.abs(colours - colours[0]) <= 1)  # one flat colour
        checked += 1
    assert checked >= 6


def test_size_distribution_spans_every_pyramid_level():
    sizes = []
    for _, objects in _samples(60, 256):
        for obj in objects:
            w, h = obj["box"][2:] - obj["box"][:2]
            sizes.append(max(w, h))
    sizes = np.array(sizes)
    assert sizes.min() < 10 and sizes.min() >= 7.9
    assert sizes.max() > 128 and sizes.max() <= 0.8 * 256 + 0.1
    # log-uniform: every octave 8-16, 16-32, ..., 128-204 gets a fair share
    octaves = np.histogram(sizes, bins=[8, 16, 32, 64, 128, 205])[0]
    assert np.all(octaves >= 0.08 * len(sizes)), octaves


def test_render_sample_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image_size"):
        render_sample(rng, 8)
    with pytest.raises(ValueError, match="min_objects"):
        render_sample(rng, 64, max_objects=2, min_objects=3)
    with pytest.raises(ValueError, match="min_size"):
        render_sample(rng, 64, min_size=200)


# --------------------------------------------------------------------------- files


def test_generated_files_are_valid_coco(tmp_path):
    paths = generate_shapes_dataset(tmp_path / "ds", num_train=6, num_val=2, image_size=64)
    assert paths["train_annotations"] == tmp_path / "ds" / "annotations" / "instances_train.json"
    assert sorted(p.name for p in paths["train_images"].iterdir()) == [
        f"{i:06d}.png" for i in range(1, 7)
    ]
    assert len(list(paths["val_images"].iterdir())) == 2
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["config"]["num_train"] == 6 and manifest["config"]["seed"] == 0

    coco = _quiet_coco(paths["train_annotations"])
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) >= 6
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, 7))
    assert [c["name"] for c in cats] == list(CLASS_NAMES)
    assert all(c["keypoints"] == list(KEYPOINT_NAMES) for c in cats)
    assert all(c["skeleton"] == [[1, 2], [1, 3], [1, 4], [1, 5]] for c in cats)
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        pixels = cv2.imread(str(paths["train_images"] / img["file_name"]))
        assert pixels.shape == (img["height"], img["width"], 3) == (64, 64, 3)
        poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose([x, y, x + w, y + h], [*poly.min(0), *poly.max(0)], atol=0.011)
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        assert ann["area"] == pytest.approx(cv2.contourArea(poly.astype(np.float32)), abs=0.02)
        assert ann["iscrowd"] == 0 and len(ann["keypoints"]) == 15
        assert ann["num_keypoints"] == 5
        assert set(ann["keypoints"][2::3]) <= {1, 2}
        # pycocotools can rasterise the polygon, and its mask lies inside the box
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        assert xs.min() >= int(x) and xs.max() < x + w + 1 and ys.max() < y + h + 1


def test_generation_is_byte_deterministic(tmp_path):
    a = generate_shapes_dataset(tmp_path / "a", num_train=4, num_val=2, image_size=48, seed=3)
    b = generate_shapes_dataset(tmp_path / "b", num_train=4, num_val=2, image_size=48, seed=3)
    c = generate_shapes_dataset(tmp_path / "c", num_train=4, num_val=2, image_size=48, seed=4)
    bytes_a, bytes_b, bytes_c = (_file_bytes(p["root"]) for p in (a, b, c))
    assert bytes_a == bytes_b
    assert bytes_a.keys() == bytes_c.keys()
    for name in ("annotations/instances_train.json", "train/000001.png", "val/000002.png"):
        assert bytes_a[name] != bytes_c[name]
    # image i depends on (seed, split, i) only: a longer data set starts with the same images
    d = generate_shapes_dataset(tmp_path / "d", num_train=6, num_val=1, image_size=48, seed=3)
    bytes_d = _file_bytes(d["root"])
    for i in range(1, 5):
        assert bytes_d[f"train/{i:06d}.png"] == bytes_a[f"train/{i:06d}.png"]


def test_generation_is_idempotent_and_never_clobbers_foreign_files(tmp_path):
    root = tmp_path / "ds"
    kwargs = {"num_train": 3, "num_val": 1, "image_size": 32}
    paths = generate_shapes_dataset(root, **kwargs)
    stamps = {p: os.stat(root / p).st_mtime_ns for p in _file_bytes(root)}
    assert generate_shapes_dataset(root, **kwargs) == paths
    assert {p: os.stat(root / p).st_mtime_ns for p in _file_bytes(root)} == stamps  # untouched

    # a different config into the same folder is refused...
    with pytest.raises(FileExistsError, match="different config"):
        generate_shapes_dataset(root, seed=1, **kwargs)
    # ...and so is any folder with foreign content
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"mine.*overwrite=True"):
        generate_shapes_dataset(foreign, **kwargs)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.txt"]
    # a file where the folder should be
    with pytest.raises(FileExistsError, match="not a directory"):
        generate_shapes_dataset(foreign / "thesis.txt", **kwargs)

    # overwrite=True replaces only the generator's own files
    (root / "train" / "notes.txt").write_text("keep me")
    before = _file_bytes(root)["train/000001.png"]
    generate_shapes_dataset(root, seed=1, overwrite=True, **kwargs)
    assert (root / "train" / "notes.txt").read_text() == "keep me"
    assert _file_bytes(root)["train/000001.png"] != before
    assert json.loads((root / "manifest.json").read_text())["config"]["seed"] == 1

    # a missing image makes the set incomplete: refused without overwrite, repaired with it
    (root / "val" / "000001.png").unlink()
    with pytest.raises(FileExistsError):
        generate_shapes_dataset(root, seed=1, **kwargs)
    generate_shapes_dataset(root, seed=1, overwrite=True, **kwargs)
    assert (root / "val" / "000001.png").is_file()


def test_generate_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_shapes_dataset(tmp_path / "x", num_train=-1)
    with pytest.raises(ValueError, match="max_objects"):
        generate_shapes_dataset(tmp_path / "x", max_objects=0)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--num-train", "2", "--num-val", "1", "--image-size", "32"]
    assert main(args) == 0
    assert "written" in capsys.readouterr().out
    assert main(args) == 0
    assert "already up to date" in capsys.readouterr().out
    assert main([*args, "--seed", "9"]) == 2
    assert "overwrite" in capsys.readouterr().err
    # `python -m` runs the module cleanly (runpy warns if the package pre-imports it)
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::RuntimeWarning",
            "-m",
            "dlnotes.data.shapes",
            "--out",
            str(tmp_path / "m"),
            "--num-train",
            "1",
            "--num-val",
            "1",
            "--image-size",
            "32",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert (tmp_path / "m" / "manifest.json").is_file()
    assert shapes.GENERATOR_VERSION >= 1


def test_default_data_dir_finds_repository_data(tmp_path, monkeypatch):
    from dlnotes.data.shapes import DATA_ENV_VAR, default_data_dir

    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "book").mkdir()
    monkeypatch.chdir(tmp_path / "book")
    assert default_data_dir() == tmp_path.resolve() / "data" / "shapes"
    assert default_data_dir("easy") == tmp_path.resolve() / "data" / "shapes_easy"
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"
    assert default_data_dir("easy") == tmp_path / "elsewhere_easy"
    with pytest.raises(ValueError, match="variant 'hard'"):
        default_data_dir("hard")


def test_easy_variant_has_fewer_larger_objects_on_smaller_images(tmp_path):
    paths = generate_shapes_dataset(tmp_path / "easy", num_train=40, num_val=2, variant="easy")
    coco = json.loads(paths["train_annotations"].read_text())
    assert {(im["width"], im["height"]) for im in coco["images"]} == {(128, 128)}
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=41)[1:]
    assert per_image.min() >= 1 and per_image.max() == 4
    longer_sides = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert longer_sides.min() >= 12.0 - 0.01 and longer_sides.max() <= 0.8 * 128 + 0.01
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["config"]["variant"] == "easy"
    assert manifest["render"] == {"min_size": 12.0, "max_clutter": 2, "noise_std": 4.0}
    # the variant is part of the data set's identity: a standard request does not reuse it
    with pytest.raises(FileExistsError, match="different config"):
        generate_shapes_dataset(tmp_path / "easy", num_train=40, num_val=2, image_size=128)
    with pytest.raises(ValueError, match="unknown shapes variant 'hard'"):
        generate_shapes_dataset(tmp_path / "hard", variant="hard")
    # the standard variant's config (and so its manifest) is what it was before variants
    standard = generate_shapes_dataset(tmp_path / "std", num_train=1, num_val=1, image_size=32)
    config = json.loads(standard["manifest"].read_text())["config"]
    assert "variant" not in config and config["max_objects"] == 8


def test_load_shapes_generates_once_and_never_regenerates(tmp_path, monkeypatch):
    from dlnotes.data import shapes

    calls = []
    real = shapes.generate_shapes_dataset

    def tiny(root, variant):  # the default set is large; the logic under test is the same
        calls.append((root, variant))
        return real(root, num_train=3, num_val=2, image_size=64, max_objects=3, variant=variant)

    monkeypatch.setattr(shapes, "generate_shapes_dataset", tiny)
    root = tmp_path / "shapes"
    val = shapes.load_shapes("val", root=root)
    assert len(val) == 2 and val.num_classes == len(shapes.CLASS_NAMES)
    manifest_time = (root / "manifest.json").stat().st_mtime_ns
    train = shapes.load_shapes("train", root=root)
    assert len(train) == 3
    assert calls == [(root, "standard")]  # second call loads what is there
    assert (root / "manifest.json").stat().st_mtime_ns == manifest_time
    with pytest.raises(ValueError, match="split"):
        shapes.load_shapes("test", root=root)
    easy = shapes.load_shapes("val", root=tmp_path / "easy", variant="easy")
    assert calls[-1] == (tmp_path / "easy", "easy") and len(easy) == 2
