"""The book's synthetic detection data set: coloured shapes on a cluttered, noisy background.

Every image is drawn from a NumPy generator seeded by ``(seed, split, index)``, so a data set is
a pure function of its configuration: the same seed gives byte-identical PNGs and JSON, and
asking for more images keeps the first ones unchanged.

What an image contains
----------------------
* a background: a linear gradient between two random colours, plus Gaussian pixel noise;
* clutter that is *not* annotated: thin lines and elongated ellipses (never circle-like), drawn
  under the objects so they never hide one;
* ``min_objects..max_objects`` objects of the classes in :data:`CLASS_NAMES`, each a polygon
  (circles are 32-gons) with a random rotation (circles excepted), a random colour that
  contrasts with the background and with the objects it overlaps, and a size (the longer side
  of its box) drawn log-uniformly from ``min_size`` px to ``max_size_fraction * image_size``,
  so every pyramid level has objects of its scale once the anchor sizes follow the input size
  (RetinaNet's 32-512 px anchors are meant for ~512-800 px inputs: halve them for 256 px
  images, or letterbox the images to 512 px).

Objects are painted in order, later ones partially occluding earlier ones; a placement is
rejected if it would leave any earlier object more than ``max_occlusion`` (50 %) hidden. Every
polygon lies fully inside the image with a one-pixel margin. Edges are anti-aliased by 4x4
supersampling, so the painted pixels match the annotated polygon to about 1/8 px.

Coordinates are continuous pixel coordinates: pixel ``(row i, column j)`` covers
``[j, j+1) x [i, i+1)``, so the image spans ``[0, W] x [0, H]``.

Per object the annotation holds the polygon, its tight box, the class and five keypoints
(:data:`KEYPOINT_NAMES`): the shape's centre and the polygon's extreme points in each direction
(when two vertices tie for an extreme, the midpoint of the tied vertices, which keeps keypoints
consistent under flips). A keypoint has visibility 2, or 1 when a later object covers it.

The files (see :func:`generate_shapes_dataset`) are COCO "instances" JSON with keypoints, readable
by ``pycocotools`` and by :class:`dlnotes.data.CocoDataset`. Command line::

    python -m dlnotes.data.shapes --out data/shapes [--num-train 800 --num-val 200 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np

from dlnotes.checks import integer, positive_int

__all__ = [
    "CLASS_NAMES",
    "KEYPOINT_NAMES",
    "KEYPOINT_SKELETON",
    "KEYPOINT_FLIP_PAIRS",
    "GENERATOR_VERSION",
    "VARIANTS",
    "render_sample",
    "generate_shapes_dataset",
    "default_data_dir",
    "load_shapes",
    "main",
]

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
"""Class names; class ``k`` has COCO category id ``k + 1`` and contiguous label ``k``."""

KEYPOINT_NAMES: tuple[str, ...] = ("center", "top", "right", "bottom", "left")
"""Keypoint names, in the order of the ``(K, 3)`` keypoint arrays."""

KEYPOINT_SKELETON: tuple[tuple[int, int], ...] = ((1, 2), (1, 3), (1, 4), (1, 5))
"""COCO skeleton (1-based keypoint indices): the centre joined to each extreme point."""

KEYPOINT_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (KEYPOINT_NAMES.index("left"), KEYPOINT_NAMES.index("right")),
)
"""0-based keypoint index pairs that swap under a horizontal flip: ``((4, 2),)``."""

GENERATOR_VERSION = 1
"""Bumped whenever a change to this module changes the generated pixels or annotations."""

VARIANTS: dict[str, dict] = {
    "standard": {
        "image_size": 256, "max_objects": 8, "min_size": 8.0, "max_clutter": 4, "noise_std": 6.0,
    },
    "easy": {
        "image_size": 128, "max_objects": 4, "min_size": 12.0, "max_clutter": 2, "noise_std": 4.0,
    },
}  # fmt: skip
"""The named data sets. ``"standard"`` (``data/shapes``) is the book's data set, used by every
chapter: 256 px images with up to 8 objects from 8 px, the full range of scales the pyramid
chapters need. ``"easy"`` (``data/shapes_easy``) is a lighter set for quick experiments: 128 px
images (a training step at 128 px costs about 0.3 of one at 256 px), up to 4 objects of at least
12 px, less clutter and noise. Measured with ``benchmarks/time_to_ap50.py``: the tiny detectors
learn it *more slowly per second* at 128 px than the standard set at 256 px (their stride-4 stems
leave a 12 px object 3 cells wide), so the chapters keep the standard set. Both variants share
the classes, keypoints, colours and occlusion rule."""

_SUPERSAMPLE = 4  # anti-aliasing factor: sub-pixel edge error <= 0.5 / _SUPERSAMPLE px
_MARGIN = 1.0  # px between every polygon and the image border
_MIN_CONTRAST = 90.0  # required RGB distance (of 441 max) from background / overlapped objects
_FILE_PATTERN = re.compile(r"^\d{6}\.png$")
_SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- geometry


def _unit_polygon(name: str) -> np.ndarray:
    """Vertices ``(V, 2)`` float64 of the class outline centred at the origin (radius ~1)."""
    if name == "circle":
        angles = 2.0 * np.pi * np.arange(32) / 32
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "square":
        angles = np.pi / 4 + np.pi / 2 * np.arange(4)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "triangle":
        angles = -np.pi / 2 + 2.0 * np.pi * np.arange(3) / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "star":
        angles = -np.pi / 2 + np.pi * np.arange(10) / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if name == "hexagon":
        angles = np.pi / 3 * np.arange(6)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "cross":
        a = 0.3  # half-width of an arm, relative to the half-length 1
        return np.array(
            [
                [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
                [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1],
            ],
            dtype=np.float64,
        )  # fmt: skip
    raise ValueError(f"unknown shape class {name!r}; expected one of {CLASS_NAMES}")


_UNIT_POLYGONS = {name: _unit_polygon(name) for name in CLASS_NAMES}


def _polygon_area(polygon: np.ndarray) -> float:
    """Shoelace area of a simple polygon ``(V, 2)``."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: which of ``points (P, 2)`` lie strictly inside ``polygon (V, 2)``."""
    px, py = points[:, 0:1], points[:, 1:2]
    x1, y1 = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    straddles = (y1 > py) != (y2 > py)  # (P, V) edges crossing the horizontal ray
    dy = np.where(straddles, y2 - y1, 1.0)  # avoid 0/0 on edges that cannot cross
    x_cross = x1 + (py - y1) * (x2 - x1) / dy
    return (np.count_nonzero(straddles & (px < x_cross), axis=1) % 2) == 1


def _extreme_point(polygon: np.ndarray, axis: int, use_max: bool) -> np.ndarray:
    """The extreme vertex along ``axis``; the midpoint of tied vertices if several tie."""
    values = polygon[:, axis]
    target = values.max() if use_max else values.min()
    return polygon[np.abs(values - target) <= 1e-6].mean(axis=0)


def _keypoints(polygon: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``(5, 2)`` keypoints in :data:`KEYPOINT_NAMES` order: centre, top, right, bottom, left."""
    return np.stack(
        [
            center,
            _extreme_point(polygon, 1, use_max=False),
            _extreme_point(polygon, 0, use_max=True),
            _extreme_point(polygon, 1, use_max=True),
            _extreme_point(polygon, 0, use_max=False),
        ]
    )


def _coverage(polygon: np.ndarray, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Anti-aliased coverage of ``polygon`` over its box region.

    Returns ``(alpha, (x0, y0))``: ``alpha`` is a float32 ``(h, w)`` array in [0, 1] giving the
    fraction of each pixel covered, for the pixels ``[y0, y0+h) x [x0, x0+w)``.
    """
    x0 = max(int(math.floor(polygon[:, 0].min())), 0)
    y0 = max(int(math.floor(polygon[:, 1].min())), 0)
    x1 = min(int(math.ceil(polygon[:, 0].max())), image_size)
    y1 = min(int(math.ceil(polygon[:, 1].max())), image_size)
    s = _SUPERSAMPLE
    canvas = np.zeros(((y1 - y0) * s, (x1 - x0) * s), dtype=np.uint8)
    # cv2 puts pixel centres on integer coordinates, ours on +0.5: hence the -0.5 shift.
    # shift=4 gives cv2 four fractional bits, i.e. 1/16-subpixel vertex precision.
    local = ((polygon - [x0, y0]) * s - 0.5) * 16.0
    cv2.fillPoly(canvas, [np.round(local).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    alpha = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return alpha.astype(np.float32) / 255.0, (x0, y0)


# ----------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours, float32 ``(size, size, 3)``."""
    c0 = rng.uniform(0.0, 255.0, 3).astype(np.float32)
    c1 = rng.uniform(0.0, 255.0, 3).astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    t = np.float32(np.cos(theta)) * coords[None, :] + np.float32(np.sin(theta)) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 + t[..., None] * (c1 - c0)


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Unannotated distractors: line segments and elongated ellipses (in place)."""
    size = image.shape[0]
    for _ in range(count):
        colour = tuple(float(c) for c in rng.uniform(0.0, 255.0, 3))
        if rng.random() < 0.5:
            p0 = np.round(rng.uniform(0, size, 2) * 16).astype(np.int32)
            p1 = np.round(rng.uniform(0, size, 2) * 16).astype(np.int32)
            thickness = int(rng.integers(1, 4))
            cv2.line(image, tuple(p0), tuple(p1), colour, thickness, cv2.LINE_AA, shift=4)
        else:
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            major = rng.uniform(3.0, max(0.12 * size, 4.0))
            # aspect <= 0.4 keeps blobs clearly unlike the "circle" class
            minor = max(1, round(major * rng.uniform(0.15, 0.4)))
            axes = (max(2, round(major)), minor)
            angle = float(rng.uniform(0.0, 180.0))
            cv2.ellipse(image, centre, axes, angle, 0.0, 360.0, colour, -1, cv2.LINE_AA)


def _pick_colour(rng: np.random.Generator, avoid: list[np.ndarray], tries: int = 24) -> np.ndarray:
    """A random RGB colour at distance >= ``_MIN_CONTRAST`` from all ``avoid`` colours.

    Falls back to the most distant of ``tries`` candidates (rare: needs a very busy spot).
    """
    best, best_dist = None, -1.0
    avoid_arr = np.asarray(avoid, dtype=np.float64).reshape(-1, 3)
    for _ in range(tries):
        colour = rng.uniform(0.0, 255.0, 3)
        dist = float(np.min(np.linalg.norm(avoid_arr - colour, axis=1))) if len(avoid) else 1e9
        if dist >= _MIN_CONTRAST:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def render_sample(
    rng: np.random.Generator,
    image_size: int = 256,
    max_objects: int = 8,
    *,
    min_objects: int = 1,
    min_size: float = 8.0,
    max_size_fraction: float = 0.8,
    max_occlusion: float = 0.5,
    max_clutter: int = 4,
    noise_std: float = 6.0,
    placement_tries: int = 20,
) -> tuple[np.ndarray, list[dict]]:
    """Draw one synthetic image and its annotations.

    Args:
        rng: the NumPy generator that drives every random choice (the sample is a pure
            function of its state and the arguments).
        image_size: side ``S`` of the square image in pixels.
        max_objects, min_objects: the number of objects attempted is uniform in
            ``[min_objects, max_objects]``; an object whose every placement would hide an earlier
            one by more than ``max_occlusion`` is skipped, so a few images have fewer (never fewer
            than one when ``min_objects >= 1``: the first object is always placed).
        min_size, max_size_fraction: object size (longer box side) is log-uniform in
            ``[min_size, max_size_fraction * S]`` (capped so it fits inside the margins).
        max_occlusion: largest hidden fraction of an object's area allowed.
        max_clutter: the number of distractors is uniform in ``[0, max_clutter]``.
        noise_std: standard deviation of the additive Gaussian pixel noise (0..255 scale).
        placement_tries: random positions tried per object before it is skipped.

    Returns:
        ``(image, objects)``: ``image`` uint8 ``(S, S, 3)`` RGB; ``objects`` a list in painting
        order (later objects on top) of dicts with

        * ``"label"``: int, index into :data:`CLASS_NAMES`; ``"name"``: the class name;
        * ``"polygon"``: float64 ``(V, 2)`` xy vertices (rounded to 1/100 px; circles have 32);
        * ``"box"``: float64 ``(4,)`` xyxy, the tight bounds of the polygon;
        * ``"area"``: the polygon's area in px²;
        * ``"keypoints"``: float64 ``(5, 3)`` rows ``(x, y, v)`` in :data:`KEYPOINT_NAMES`
          order, ``v = 2`` visible, ``v = 1`` covered by a later object.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(
            f"need 0 <= min_objects <= max_objects, got min_objects={min_objects}, "
            f"max_objects={max_objects}"
        )
    max_size = min(max_size_fraction * image_size, image_size - 2 * _MARGIN - 0.1)
    if not 0 < min_size <= max_size:
        raise ValueError(
            f"min_size={min_size} must be in (0, {max_size:.1f}] for image_size={image_size}"
        )

    canvas = _background(rng, image_size)
    bg_reference = canvas.copy()  # colours under each object, for the contrast test
    _draw_clutter(rng, canvas, int(rng.integers(0, max_clutter + 1)))

    num_wanted = int(rng.integers(min_objects, max_objects + 1))
    placed: list[dict] = []  # per object: polygon, mask (full image, bool), colour, ...
    covered = []  # per placed object: bool mask of its pixels hidden by later objects
    for _ in range(num_wanted):
        label = int(rng.integers(len(CLASS_NAMES)))
        size = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
        unit = _UNIT_POLYGONS[CLASS_NAMES[label]]
        if CLASS_NAMES[label] != "circle":
            theta = rng.uniform(0.0, 2.0 * np.pi)
            rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
            unit = unit @ rot.T
        extent = (unit.max(axis=0) - unit.min(axis=0)).max()
        shape = unit * (size / extent)
        lo, hi = shape.min(axis=0), shape.max(axis=0)
        for _try in range(placement_tries):
            # the centre range that keeps the whole polygon inside the margins (+0.01 px of
            # slack for the rounding to 1/100 px below)
            inner = _MARGIN + 0.01
            cx = rng.uniform(inner - lo[0], image_size - inner - hi[0])
            cy = rng.uniform(inner - lo[1], image_size - inner - hi[1])
            center = np.round(np.array([cx, cy]), 2)
            polygon = np.round(shape + center, 2)
            alpha, (x0, y0) = _coverage(polygon, image_size)
            mask = np.zeros((image_size, image_size), dtype=bool)
            mask[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]] = alpha >= 0.5
            if not mask.any():  # guard: a sliver that covers no pixel centre
                continue
            hidden_ok = all(
                np.count_nonzero(obj["mask"] & (cov | mask)) <= max_occlusion * obj["pixels"]
                for obj, cov in zip(placed, covered, strict=True)
            )
            if hidden_ok:
                break
        else:
            continue  # no acceptable position: skip this object

        # Contrast against the background under the object (the gradient is linear, so its
        # extreme colours under a polygon are at the vertices) and the objects it overlaps.
        vertex_px = np.clip(polygon.astype(np.int64), 0, image_size - 1)
        avoid = list(bg_reference[vertex_px[:, 1], vertex_px[:, 0]])
        avoid += [obj["colour"] for obj in placed if np.any(obj["mask"] & mask)]
        colour = _pick_colour(rng, avoid)
        region = canvas[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
        region += alpha[..., None] * (colour.astype(np.float32) - region)

        for cov in covered:
            cov |= mask
        covered.append(np.zeros_like(mask))
        placed.append(
            {
                "label": label,
                "polygon": polygon,
                "center": center,
                "mask": mask,
                "pixels": int(np.count_nonzero(mask)),
                "colour": colour,
            }
        )

    if noise_std > 0:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(noise_std)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

    objects = []
    for i, obj in enumerate(placed):
        polygon = obj["polygon"]
        points = _keypoints(polygon, obj["center"])
        visibility = np.full(len(points), 2.0)
        for later in placed[i + 1 :]:
            visibility[_points_in_polygon(points, later["polygon"])] = 1.0
        objects.append(
            {
                "label": obj["label"],
                "name": CLASS_NAMES[obj["label"]],
                "polygon": polygon,
                "box": np.concatenate([polygon.min(axis=0), polygon.max(axis=0)]),
                "area": _polygon_area(polygon),
                "keypoints": np.concatenate([points, visibility[:, None]], axis=1),
            }
        )
    return image, objects


# ----------------------------------------------------------------------------- data set files


def _categories() -> list[dict]:
    return [
        {
            "id": k + 1,
            "name": name,
            "supercategory": "shape",
            "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [list(edge) for edge in KEYPOINT_SKELETON],
        }
        for k, name in enumerate(CLASS_NAMES)
    ]


def _r2(value: float) -> float:
    """Round to 1/100 px and normalise -0.0 so the JSON text is stable."""
    return round(float(value), 2) + 0.0


def _annotation(ann_id: int, image_id: int, obj: dict) -> dict:
    x1, y1, x2, y2 = (float(v) for v in obj["box"])
    keypoints = []
    for x, y, v in obj["keypoints"]:
        keypoints += [_r2(x), _r2(y), int(v)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["label"] + 1,
        "bbox": [_r2(x1), _r2(y1), _r2(x2 - x1), _r2(y2 - y1)],
        "area": _r2(obj["area"]),
        "segmentation": [[_r2(v) for v in obj["polygon"].reshape(-1)]],
        "iscrowd": 0,
        "keypoints": keypoints,
        "num_keypoints": int(np.count_nonzero(obj["keypoints"][:, 2] > 0)),
    }


def _dump_json(obj: object) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def _write_bytes(path: Path, data: bytes) -> None:
    # write then rename, so an interrupted run never leaves a truncated file behind
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _variant(name: str) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown shapes variant {name!r}; expected one of {tuple(VARIANTS)}")
    return VARIANTS[name]


def _make_config(
    num_train: int,
    num_val: int,
    image_size: int | None,
    seed: int,
    max_objects: int | None,
    variant: str = "standard",
) -> dict:
    """The manifest's ``config``: everything the generated bytes depend on (``None`` sizes and
    counts take the variant's values)."""
    spec = _variant(variant)
    config = {
        "generator": "dlnotes.data.shapes",
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(spec["image_size"] if image_size is None else image_size),
        "seed": int(seed),
        "max_objects": int(spec["max_objects"] if max_objects is None else max_objects),
    }
    if variant != "standard":  # the standard data set's manifest predates the variants
        config["variant"] = variant
    return config


def _expected_paths(root: Path) -> dict[str, Path]:
    return {
        "root": root,
        "train_images": root / "train",
        "val_images": root / "val",
        "train_annotations": root / "annotations" / "instances_train.json",
        "val_annotations": root / "annotations" / "instances_val.json",
        "manifest": root / "manifest.json",
    }


def _image_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def _is_complete(paths: dict[str, Path], config: dict) -> bool:
    try:
        manifest = json.loads(paths["manifest"].read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("config") != config:
        return False
    for split in _SPLITS:
        if not paths[f"{split}_annotations"].is_file():
            return False
        folder = paths[f"{split}_images"]
        for image_id in range(1, config[f"num_{split}"] + 1):
            if not (folder / _image_name(image_id)).is_file():
                return False
    return True


def _remove_generated(paths: dict[str, Path]) -> None:
    """Delete only files this generator writes; anything else in ``out_dir`` is kept."""
    for split in _SPLITS:
        folder = paths[f"{split}_images"]
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_file() and _FILE_PATTERN.match(entry.name):
                    entry.unlink()
        paths[f"{split}_annotations"].unlink(missing_ok=True)
    paths["manifest"].unlink(missing_ok=True)


def generate_shapes_dataset(
    out_dir: str | os.PathLike,
    num_train: int = 800,
    num_val: int = 200,
    image_size: int | None = None,
    seed: int = 0,
    max_objects: int | None = None,
    overwrite: bool = False,
    variant: str = "standard",
) -> dict[str, Path]:
    """Write the synthetic shapes data set in COCO format (idempotent).

    Layout::

        out_dir/train/000001.png ...           RGB PNGs, file name = image id, 6 digits
        out_dir/val/000001.png ...
        out_dir/annotations/instances_train.json
        out_dir/annotations/instances_val.json
        out_dir/manifest.json                  the generation config, written last

    The JSON files are COCO "instances" with keypoints: ``images`` (id, file_name relative to
    the split folder, height, width), ``annotations`` (``bbox`` xywh, ``area`` = polygon area,
    ``segmentation`` polygon, ``iscrowd`` 0, ``keypoints`` flat ``[x, y, v] * 5``,
    ``num_keypoints``) and ``categories`` (ids 1..6 in :data:`CLASS_NAMES` order, with keypoint
    names and skeleton). Image ``i`` of a split is drawn with ``np.random.default_rng([seed,
    split, i])``: output is byte-for-byte deterministic.

    Args:
        out_dir: destination folder (created if missing).
        num_train, num_val: number of images per split.
        image_size: side of the square images in px (default: the variant's, 256 or 128).
        seed: the data set's seed.
        max_objects: most objects per image (see :func:`render_sample`; default: the variant's).
        overwrite: if ``out_dir`` holds anything other than this exact data set, ``False``
            raises :class:`FileExistsError`; ``True`` deletes the files this generator writes
            (``train/NNNNNN.png``, ``val/NNNNNN.png``, the two JSON files, the manifest),
            leaves every other file alone, and regenerates.
        variant: a name in :data:`VARIANTS`: the object sizes, clutter and noise of the images
            and the defaults of ``image_size`` and ``max_objects``.

    Returns:
        ``{"root", "train_images", "val_images", "train_annotations", "val_annotations",
        "manifest"}`` -> :class:`pathlib.Path`.

    Raises:
        FileExistsError: ``out_dir`` is not empty, is not this data set, and overwrite is False.
        ValueError: a bad argument (negative counts, image too small, ...).
    """
    num_train = integer(num_train, "num_train", minimum=0)
    num_val = integer(num_val, "num_val", minimum=0)
    if max_objects is not None:
        max_objects = positive_int(max_objects, "max_objects")
    config = _make_config(num_train, num_val, image_size, seed, max_objects, variant)
    spec = _variant(variant)
    style = {k: spec[k] for k in ("min_size", "max_clutter", "noise_std")}
    root = Path(out_dir)
    paths = _expected_paths(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if _is_complete(paths, config):
        return paths
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            if paths["manifest"].is_file():
                reason = "holds a shapes data set with a different config or missing files"
            else:
                reason = "is not empty and holds no dlnotes shapes manifest"
            raise FileExistsError(
                f"{root} {reason}; refusing to write into it. Choose another directory or pass "
                f"overwrite=True (CLI: --overwrite), which replaces only the generator's files."
            )
        _remove_generated(paths)

    for split_code, split in enumerate(_SPLITS):
        folder = paths[f"{split}_images"]
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(config[f"num_{split}"]):
            rng = np.random.default_rng([config["seed"], split_code, index])
            image, objects = render_sample(
                rng, config["image_size"], config["max_objects"], **style
            )
            image_id = index + 1
            file_name = _image_name(image_id)
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError(f"cv2 could not encode {folder / file_name}")
            _write_bytes(folder / file_name, png.tobytes())
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "height": config["image_size"],
                    "width": config["image_size"],
                }
            )
            for obj in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, obj))
        coco = {
            "info": {
                "description": f"dlnotes synthetic shapes, {split} split",
                "version": str(GENERATOR_VERSION),
                "seed": config["seed"],
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": _categories(),
        }
        paths[f"{split}_annotations"].parent.mkdir(parents=True, exist_ok=True)
        _write_bytes(paths[f"{split}_annotations"], _dump_json(coco))

    # the manifest goes last: its presence marks a complete data set
    manifest = {"config": config, "class_names": list(CLASS_NAMES)}
    if variant != "standard":
        manifest["render"] = style
    manifest["keypoint_names"] = list(KEYPOINT_NAMES)
    _write_bytes(paths["manifest"], _dump_json(manifest))
    return paths


DATA_ENV_VAR = "DLNOTES_DATA"
"""Environment variable naming the folder of the default data set (overrides the search)."""


def default_data_dir(variant: str = "standard") -> Path:
    """Where the book's data set of ``variant`` lives (``shapes``, or ``shapes_<variant>``).

    ``$DLNOTES_DATA`` if set (the standard data set; other variants sit beside it, e.g.
    ``$DLNOTES_DATA_easy``); otherwise ``data/shapes`` of the first folder, from the current
    working directory upwards, that holds a ``data/`` folder next to a ``pyproject.toml`` or a
    ``book/`` folder (the repository root, so a notebook running in ``book/`` finds
    ``../data/shapes``); otherwise ``./data/shapes`` (e.g. on Colab).
    """
    _variant(variant)
    suffix = "" if variant == "standard" else f"_{variant}"
    if os.environ.get(DATA_ENV_VAR):
        standard = Path(os.environ[DATA_ENV_VAR])
        return standard.with_name(standard.name + suffix)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        is_root = (folder / "pyproject.toml").is_file() or (folder / "book").is_dir()
        if is_root and (folder / "data").is_dir():
            return folder / "data" / f"shapes{suffix}"
    return here / "data" / f"shapes{suffix}"


def load_shapes(
    split: str = "train",
    root: str | os.PathLike | None = None,
    on_invalid="raise",
    variant: str = "standard",
):
    """The book's data set split as a :class:`dlnotes.data.coco.CocoDataset`.

    Generates the ``variant`` data set (:data:`VARIANTS`) into ``root`` (default
    :func:`default_data_dir` of the variant) first if its annotation file is missing; an existing
    data set (default or not) is loaded as it is, never regenerated or overwritten.
    """
    if split not in _SPLITS:
        raise ValueError(f"`split` must be one of {_SPLITS}, got {split!r}.")
    root = Path(root) if root is not None else default_data_dir(variant)
    annotations = root / "annotations" / f"instances_{split}.json"
    if not annotations.is_file():
        generate_shapes_dataset(root, variant=variant)
    from dlnotes.data.coco import CocoDataset  # lazy: keeps the CLI free of TensorFlow

    return CocoDataset(annotations, root / split, on_invalid=on_invalid)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python -m dlnotes.data.shapes --out DIR [...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m dlnotes.data.shapes",
        description="Generate the dlnotes synthetic shapes detection data set (COCO format).",
    )
    parser.add_argument("--out", required=True, help="output directory, e.g. data/shapes")
    parser.add_argument("--num-train", type=int, default=800)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument(
        "--variant", choices=tuple(VARIANTS), default="standard",
        help="object sizes, clutter, noise and the defaults below (standard: 256 px, 8 objects; "
        "easy: 128 px, 4 objects)",
    )  # fmt: skip
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=None)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different data set in --out"
    )
    args = parser.parse_args(argv)
    config = _make_config(
        args.num_train, args.num_val, args.image_size, args.seed, args.max_objects, args.variant
    )
    already = _is_complete(_expected_paths(Path(args.out)), config)
    try:
        paths = generate_shapes_dataset(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.seed,
            max_objects=args.max_objects,
            overwrite=args.overwrite,
            variant=args.variant,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    verb = "already up to date" if already else "written"
    print(f"shapes data set {verb}: {paths['root']} ({args.num_train} train, {args.num_val} val)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
