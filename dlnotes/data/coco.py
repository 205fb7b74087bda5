"""COCO-format detection data -> validated records -> a static-shape ``tf.data`` pipeline.

:class:`CocoDataset` reads a COCO "instances" JSON (optionally with keypoints), checks every image
and annotation once at load time, and turns the data set into a ``tf.data.Dataset`` of padded,
fixed-shape batches that a Keras ``fit`` or a ``tf.function(jit_compile=True)`` step can consume::

    ds = CocoDataset("data/shapes/annotations/instances_train.json")
    train = ds.to_tf_dataset(batch_size=8, image_size=256, horizontal_flip=True, shuffle=True)
    images, targets = next(iter(train))
    # images (8, 256, 256, 3) float32 in [0, 255]
    # targets["boxes"] (8, M, 4) xyxy pixels, targets["labels"] (8, M) int32, padding -1

Labels are contiguous ``0..C-1`` in sorted category-id order; :meth:`CocoDataset.label_to_category`
maps predictions back to COCO ids for ``pycocotools`` evaluation against :attr:`CocoDataset.coco`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from dlnotes.checks import positive_int
from dlnotes.data import transforms

__all__ = ["CocoDataset", "CocoDataWarning", "image_file_problem"]


class CocoDataWarning(UserWarning):
    """Issued when annotations or images are dropped or skipped while loading a data set."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    """An integer id; ``True`` is an int to Python (``True == 1``) but not an id."""
    return isinstance(value, int) and not isinstance(value, bool)


# Formats tf.io.decode_image reads, by their first bytes, and how a complete file ends.
_IMAGE_FORMATS = (
    ("PNG", b"\x89PNG\r\n\x1a\n", lambda tail: b"IEND\xaeB`\x82" in tail),
    ("JPEG", b"\xff\xd8\xff", lambda tail: b"\xff\xd9" in tail),
    ("GIF", b"GIF8", lambda tail: tail.rstrip(b"\x00").endswith(b";")),
    ("BMP", b"BM", None),
)


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a complete PNG / JPEG / GIF / BMP image, or None.

    Reads the first and last bytes only (no decoding): an empty file, a file of another kind
    (a text or HTML file named ``.png``), or a PNG / JPEG / GIF whose end marker is missing (a
    truncated download or copy). BMP files are checked against the size in their header.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(32)
        f.seek(max(0, size - 1024))
        tail = f.read()
    for name, magic, complete in _IMAGE_FORMATS:
        if head.startswith(magic):
            if name == "BMP":
                declared = int.from_bytes(head[2:6], "little")  # 0: not filled in
                ok = declared <= size
            else:
                ok = complete(tail)
            return None if ok else f"the {name} data is truncated (its end marker is missing)"
    return f"not a PNG, JPEG, GIF or BMP image (the file starts with {head[:8]!r})"


class CocoDataset:
    """A validated COCO detection data set.

    Args:
        annotation_file: path to a COCO "instances" JSON (``images``, ``annotations``,
            ``categories``; ``keypoints`` optional).
        image_dir: folder that ``file_name`` is relative to. Default: the first of
            ``<json dir>/<split>``, ``<json dir>/../<split>``, ``<json dir>``, ``<json dir>/..``
            that holds the first image, where ``<split>`` comes from a file named
            ``instances_<split>.json`` (the layout of COCO and of :mod:`dlnotes.data.shapes`).
        on_invalid: ``"raise"``: the first invalid image or annotation raises ``ValueError``
            naming the file, the annotation id, the image and the reason. ``"drop"``: invalid
            items are dropped, counted in :attr:`dropped` by reason, and a
            :class:`CocoDataWarning` reports the counts.

    Checks (reasons, as counted in :attr:`dropped`): ``missing_image_file``, ``malformed_image``
    (missing keys, non-positive size), ``unknown_image_id``, ``image_dropped`` (the annotation's
    image was dropped), ``unknown_category_id``, ``malformed_bbox`` (not four numbers),
    ``nonfinite_bbox``, ``nonpositive_size`` (w or h <= 0), ``outside_image`` (no overlap with the
    image), ``malformed_keypoints``, ``malformed_annotation`` (not a JSON object). Boxes partly
    outside the image are clipped to it (counted in :attr:`clipped`). ``iscrowd`` annotations
    are valid COCO but are not training targets: they are left out of :attr:`records`, counted
    under ``"iscrowd"`` in :attr:`dropped` (and in the warning) and kept in :attr:`coco`, where
    COCOeval uses them as ignore regions. A broken JSON structure (not JSON, missing
    ``images``/``categories``, duplicate ids) always raises.

    Attributes:
        annotation_file, image_dir: resolved :class:`pathlib.Path` objects.
        category_ids: sorted COCO category ids; label ``k`` is ``category_ids[k]``.
        class_names: category names in label order. ``num_classes``: their number.
        keypoint_names: tuple of ``K`` names, or ``None`` if the categories have no keypoints;
            ``num_keypoints`` is ``K`` (0 without keypoints); ``flip_pairs`` the index pairs
            that swap under a horizontal flip (from "left"/"right" in the names).
        image_ids: ids of the kept images, in file order.
        records: one dict per kept image: ``image_id`` (int), ``path`` (str), ``height``,
            ``width`` (int), ``boxes`` float32 ``(n, 4)`` xyxy pixels, ``labels`` int32 ``(n,)``,
            ``keypoints`` float32 ``(n, K, 3)`` (x, y, v) or ``None``, ``annotation_ids``.
        dropped: :class:`collections.Counter` of dropped / skipped items by reason.
        clipped: number of boxes clipped to their image.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike | None = None,
        on_invalid: str = "raise",
    ) -> None:
        if on_invalid not in ("raise", "drop"):
            raise ValueError(f'on_invalid must be "raise" or "drop", got {on_invalid!r}')
        self.annotation_file = Path(annotation_file).resolve()
        self.on_invalid = on_invalid
        self.dropped: Counter[str] = Counter()
        self.clipped = 0
        self._coco = None

        data = self._load_json()
        self._parse_categories(data["categories"])
        images = data["images"]
        self.image_dir = self._resolve_image_dir(image_dir, images)
        kept_images = self._parse_images(images)
        self._parse_annotations(data.get("annotations", []), kept_images)
        self._info = data.get("info", {})
        self._licenses = data.get("licenses", [])

        if self.dropped:
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items()))
            warnings.warn(
                f"{self.annotation_file}: dropped or skipped items ({counts})",
                CocoDataWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ loading & validation

    def _load_json(self) -> dict:
        path = self.annotation_file
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a valid JSON file: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object at the top level")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f'{path}: missing or non-list "{key}" (not a COCO file?)')
        if not isinstance(data.get("annotations", []), list):
            raise ValueError(f'{path}: "annotations" must be a list')
        return data

    def _problem(self, reason: str, message: str) -> None:
        """Raise (``on_invalid="raise"``) or count (``"drop"``) one invalid item."""
        if self.on_invalid == "raise":
            raise ValueError(f"{self.annotation_file}: {message} [{reason}]")
        self.dropped[reason] += 1

    def _parse_categories(self, categories: list) -> None:
        by_id: dict[int, dict] = {}
        for cat in categories:
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise ValueError(f"{self.annotation_file}: category without an integer id: {cat}")
            if cat["id"] in by_id:
                raise ValueError(f"{self.annotation_file}: duplicate category id {cat['id']}")
            by_id[cat["id"]] = cat
        if not by_id:
            raise ValueError(f"{self.annotation_file}: no categories")
        self.category_ids: list[int] = sorted(by_id)
        self.class_names: list[str] = [str(by_id[i].get("name", i)) for i in self.category_ids]
        self._label_of = {cid: k for k, cid in enumerate(self.category_ids)}

        names = {tuple(cat["keypoints"]) for cat in by_id.values() if cat.get("keypoints")}
        if len({len(n) for n in names}) > 1:
            raise ValueError(
                f"{self.annotation_file}: categories have different numbers of keypoints "
                f"({sorted(len(n) for n in names)}); one K per data set is supported"
            )
        first = next((cat for cat in by_id.values() if cat.get("keypoints")), None)
        self.keypoint_names: tuple[str, ...] | None = (
            tuple(str(n) for n in first["keypoints"]) if first else None
        )
        self.flip_pairs = transforms.keypoint_flip_pairs(self.keypoint_names or ())

    def _resolve_image_dir(self, image_dir, images: list) -> Path:
        if image_dir is not None:
            path = Path(image_dir).resolve()
            if not path.is_dir():
                raise FileNotFoundError(f"image_dir {path} does not exist or is not a directory")
            return path
        json_dir = self.annotation_file.parent
        candidates = []
        match = re.fullmatch(r"instances_(.+)\.json", self.annotation_file.name)
        if match:
            candidates += [json_dir / match.group(1), json_dir.parent / match.group(1)]
        candidates += [json_dir, json_dir.parent]
        # a folder qualifies if it holds any of the first few images (one may be missing)
        probes = [
            str(img["file_name"])
            for img in images[:10]
            if isinstance(img, dict) and isinstance(img.get("file_name"), str)
        ]
        if not probes:  # no images: nothing to resolve; keep the JSON's folder
            return json_dir
        for folder in candidates:
            if any((folder / name).is_file() for name in probes):
                return folder
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"{self.annotation_file}: cannot find image {probes[0]!r} in any of: {tried}; "
            f"pass image_dir= explicitly"
        )

    def _parse_images(self, images: list) -> dict[int, dict]:
        kept: dict[int, dict] = {}
        seen: set = set()
        for img in images:
            image_id = img.get("id") if isinstance(img, dict) else None
            if not _is_int(image_id):
                raise ValueError(f"{self.annotation_file}: image entry without integer id: {img}")
            if image_id in seen:
                raise ValueError(f"{self.annotation_file}: duplicate image id {image_id}")
            seen.add(image_id)
            height, width = img.get("height"), img.get("width")
            file_name = img.get("file_name")
            if not isinstance(file_name, str) or not all(
                _is_number(v) and v > 0 for v in (height, width)
            ):
                self._problem(
                    "malformed_image",
                    f"image id {image_id}: needs a file_name and positive height/width, "
                    f"got file_name={file_name!r} height={height!r} width={width!r}",
                )
                continue
            path = self.image_dir / file_name
            if not path.is_file():
                self._problem(
                    "missing_image_file", f"image id {image_id}: image file not found: {path}"
                )
                continue
            problem = image_file_problem(path)
            if problem:
                self._problem("unreadable_image_file", f"image id {image_id}: {path}: {problem}")
                continue
            kept[image_id] = {
                "image_id": image_id,
                "path": str(path),
                "height": int(height),
                "width": int(width),
            }
        self._all_image_ids = seen
        return kept

    def _check_bbox(self, ann: dict, where: str, image: dict) -> list[float] | None:
        """Validated, clipped ``[x1, y1, x2, y2]``, or ``None`` after reporting the problem."""
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(_is_number(v) for v in bbox)
        ):
            self._problem(
                "malformed_bbox", f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}"
            )
            return None
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            self._problem("nonfinite_bbox", f"{where}: bbox has a non-finite value: {bbox}")
            return None
        if w <= 0 or h <= 0:
            self._problem(
                "nonpositive_size", f"{where}: bbox width and height must be > 0, got {bbox}"
            )
            return None
        W, H = image["width"], image["height"]
        x1, y1 = min(max(x, 0.0), W), min(max(y, 0.0), H)
        x2, y2 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
        if x2 <= x1 or y2 <= y1:
            self._problem(
                "outside_image",
                f"{where}: bbox {bbox} lies outside the {W}x{H} image (width x height)",
            )
            return None
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            self.clipped += 1
        return [x1, y1, x2, y2]

    def _check_keypoints(self, ann: dict, where: str) -> np.ndarray | None:
        """``(K, 3)`` float32 keypoints (zeros if absent), or ``None`` after reporting."""
        k = len(self.keypoint_names)
        values = ann.get("keypoints")
        if values is None:
            return np.zeros((k, 3), np.float32)
        if (
            not isinstance(values, (list, tuple))
            or len(values) != 3 * k
            or not all(_is_number(v) and math.isfinite(v) for v in values)
        ):
            n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            self._problem(
                "malformed_keypoints",
                f"{where}: keypoints must be {3 * k} finite numbers [x, y, v] * {k}, got {n}",
            )
            return None
        return np.asarray(values, np.float32).reshape(k, 3)

    def _parse_annotations(self, annotations: list, kept_images: dict[int, dict]) -> None:
        per_image: dict[int, list] = {image_id: [] for image_id in kept_images}
        self._coco_annotations = []  # validated, for pycocotools (crowd ones included)
        for index, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                self._problem("malformed_annotation", f"annotation #{index} is not an object")
                continue
            ann_id = ann.get("id", f"#{index}")
            image_id = ann.get("image_id")
            where = f"annotation id {ann_id} (image id {image_id})"
            if not _is_int(image_id) or image_id not in kept_images:
                if _is_int(image_id) and image_id in self._all_image_ids:
                    self.dropped["image_dropped"] += 1  # its image was already reported
                else:
                    self._problem(
                        "unknown_image_id", f"{where}: image id {image_id} is not in images"
                    )
                continue
            image = kept_images[image_id]
            where += f" [{Path(image['path']).name}]"
            category_id = ann.get("category_id")
            if not _is_int(category_id) or category_id not in self._label_of:
                self._problem(
                    "unknown_category_id",
                    f"{where}: category id {category_id!r} is not one of the categories' "
                    f"integer ids {self.category_ids}",
                )
                continue
            box = self._check_bbox(ann, where, image)
            if box is None:
                continue
            keypoints = None
            if self.keypoint_names is not None:
                keypoints = self._check_keypoints(ann, where)
                if keypoints is None:
                    continue
            x1, y1, x2, y2 = box
            crowd = bool(ann.get("iscrowd", 0))
            clean = dict(ann)
            clean.update(
                id=ann.get("id", index + 1),
                bbox=[x1, y1, x2 - x1, y2 - y1],
                iscrowd=int(crowd),
                area=float(ann["area"]) if _is_number(ann.get("area")) else (x2 - x1) * (y2 - y1),
            )
            if keypoints is not None:  # COCOeval's keypoint mode reads both fields
                clean["keypoints"] = [float(v) for v in keypoints.reshape(-1)]
                clean["num_keypoints"] = int(np.count_nonzero(keypoints[:, 2] > 0))
            self._coco_annotations.append(clean)
            if crowd:
                self.dropped["iscrowd"] += 1
                continue
            per_image[image_id].append((clean["id"], box, self._label_of[category_id], keypoints))

        k = self.num_keypoints
        self.records: list[dict] = []
        for image_id, image in kept_images.items():
            anns = per_image[image_id]
            record = dict(image)
            record["annotation_ids"] = [a[0] for a in anns]
            record["boxes"] = np.asarray([a[1] for a in anns], np.float32).reshape(-1, 4)
            record["labels"] = np.asarray([a[2] for a in anns], np.int32).reshape(-1)
            record["keypoints"] = (
                np.asarray([a[3] for a in anns], np.float32).reshape(-1, k, 3) if k else None
            )
            self.records.append(record)
        self.image_ids: list[int] = [r["image_id"] for r in self.records]
        self._kept_image_entries = kept_images

    # ------------------------------------------------------------------ label mapping

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names) if self.keypoint_names else 0

    def label_to_category(self, label):
        """Contiguous label(s) ``0..C-1`` -> COCO category id(s); int or integer array."""
        labels = np.asarray(label)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"label {label} out of range [0, {self.num_classes - 1}]")
        ids = np.asarray(self.category_ids, np.int64)[labels.astype(np.int64)]
        return int(ids) if ids.ndim == 0 else ids

    def category_to_label(self, category_id):
        """COCO category id(s) -> contiguous label(s); int or integer array."""
        ids = np.asarray(category_id)
        flat = [int(v) for v in ids.reshape(-1)]
        unknown = [v for v in flat if v not in self._label_of]
        if unknown:
            raise ValueError(f"unknown category id(s) {unknown}; known: {self.category_ids}")
        labels = np.asarray([self._label_of[v] for v in flat], np.int64).reshape(ids.shape)
        return int(labels) if labels.ndim == 0 else labels

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> np.ndarray:
        """The image of ``records[index]`` as uint8 ``(H, W, 3)`` RGB (for drawing and inspection)."""
        record = self.records[index]
        try:
            data = tf.io.read_file(str(record["path"]))
            return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as err:
            raise ValueError(
                f"cannot read image {record['path']} (image id {record['image_id']}): {err.message}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"CocoDataset({str(self.annotation_file)!r}, images={len(self)}, "
            f"classes={self.num_classes}, keypoints={self.num_keypoints})"
        )

    # ------------------------------------------------------------------ evaluation

    @property
    def coco(self):
        """A ``pycocotools.coco.COCO`` of the validated data (kept images; valid annotations,
        boxes clipped, crowd annotations included), built once and quietly, for COCOeval."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = {
                "info": self._info,
                "licenses": self._licenses,
                "images": [
                    {
                        "id": r["image_id"],
                        "file_name": os.path.relpath(r["path"], self.image_dir),
                        "height": r["height"],
                        "width": r["width"],
                    }
                    for r in self.records
                ],
                "annotations": self._coco_annotations,
                "categories": self._categories_json(),
            }
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def _categories_json(self) -> list[dict]:
        cats = []
        for cid, name in zip(self.category_ids, self.class_names, strict=True):
            cat = {"id": cid, "name": name}
            if self.keypoint_names:
                cat["keypoints"] = list(self.keypoint_names)
            cats.append(cat)
        return cats

    # ------------------------------------------------------------------ tf.data

    def padded_targets(self, max_boxes: int | None = None, with_keypoints: bool = False) -> dict:
        """The whole data set's targets as padded NumPy arrays, without reading any image.

        Args:
            max_boxes: ``M``, boxes per image after padding; default the largest count in the set.
                An image with more boxes raises (boxes are never silently dropped).
            with_keypoints: also return ``"keypoints"``.

        Returns:
            ``{"boxes": (N, M, 4) float32 xyxy, "labels": (N, M) int32[, "keypoints": (N, M, K, 3)
            float32]}`` in record order, padded with -1 (the convention of :meth:`to_tf_dataset`).
        """
        if with_keypoints and not self.num_keypoints:
            raise ValueError(
                f"{self.annotation_file}: with_keypoints=True, but no category defines keypoints"
            )
        counts = [len(r["labels"]) for r in self.records]
        largest = max(counts, default=0)
        if max_boxes is None:
            max_boxes = max(1, largest)
        else:
            max_boxes = positive_int(max_boxes, "max_boxes")
        for record, count in zip(self.records, counts, strict=True):
            if count > max_boxes:
                raise ValueError(
                    f"image id {record['image_id']} ({record['path']}) has {count} boxes, more "
                    f"than max_boxes={max_boxes}; raise max_boxes (the largest count in this data "
                    f"set is {largest}); boxes are never silently dropped"
                )
        n, k = len(self.records), self.num_keypoints
        out = {
            "boxes": np.full((n, max_boxes, 4), -1.0, np.float32),
            "labels": np.full((n, max_boxes), -1, np.int32),
        }
        if with_keypoints:
            out["keypoints"] = np.full((n, max_boxes, k, 3), -1.0, np.float32)
        for i, (record, count) in enumerate(zip(self.records, counts, strict=True)):
            out["boxes"][i, :count] = record["boxes"]
            out["labels"][i, :count] = record["labels"]
            if with_keypoints:
                out["keypoints"][i, :count] = record["keypoints"]
        return out

    def to_tf_dataset(
        self,
        batch_size: int = 8,
        image_size: int | Sequence[int] | None = None,
        resize: str = "letterbox",
        horizontal_flip: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        max_boxes: int | None = None,
        with_keypoints: bool = False,
        with_meta: bool = False,
        repeat: bool = False,
        drop_remainder: bool = False,
    ) -> tf.data.Dataset:
        """A batched ``tf.data.Dataset`` of ``(images, targets)`` or ``(images, targets, meta)``.

        Per element, in this order: the file is read and decoded with ``tf.io`` (RGB, 3
        channels); optionally flipped left-right (probability 1/2, a stateless RNG fed by a
        seeded stream that is redrawn every epoch: reproducible given ``seed``, different each
        epoch); resized to ``image_size`` by ``"letterbox"`` (aspect kept,
        grey 114 padding bottom/right, see :func:`dlnotes.data.transforms.letterbox`) or
        ``"stretch"``; batched.

        Args:
            batch_size: images per batch.
            image_size: ``S`` or ``(height, width)``; ``None`` keeps the original size, which
                requires every image to have the same size (static shapes).
            resize: ``"letterbox"`` or ``"stretch"``.
            horizontal_flip: random left-right flips (keypoint pairs swap, see
                :attr:`flip_pairs`).
            shuffle: shuffle the whole data set each epoch (deterministic given ``seed``).
            seed: seed of the shuffle and the flips.
            max_boxes: ``M``, boxes per image after padding; default the largest count in the
                data set (at least 1). An image with more boxes raises ``ValueError``: boxes are
                never silently truncated.
            with_keypoints: add ``targets["keypoints"]``.
            with_meta: add the ``meta`` dict.
            repeat: repeat forever.
            drop_remainder: drop the last incomplete batch (static batch dimension).

        Returns:
            ``images``: float32 ``(B, H, W, 3)`` in [0, 255] (letterbox padding 114).
            ``targets``: ``"boxes"`` float32 ``(B, M, 4)`` xyxy pixels of the output images,
            ``"labels"`` int32 ``(B, M)``, and with ``with_keypoints`` ``"keypoints"`` float32
            ``(B, M, K, 3)``; **every padded entry is -1** (boxes, labels and keypoints), and
            unlabelled keypoints are ``(0, 0, 0)``.
            ``meta``: ``"image_id"`` int64 ``(B,)``; ``"scale"``, ``"offset"`` float32 ``(B, 2)``
            in ``(x, y)`` order with ``output = original * scale + offset`` (invert with
            :func:`dlnotes.data.transforms.undo_letterbox`); ``"original_size"`` int32
            ``(B, 2)`` ``(height, width)``; ``"flipped"`` bool ``(B,)`` (the scale/offset map
            refers to the flipped original when it is True).

        Raises:
            ValueError: empty data set, differing image sizes without ``image_size``, too many
                boxes for ``max_boxes``, keypoints requested but absent, bad arguments.
        """
        if not self.records:
            raise ValueError(f"{self.annotation_file}: no images to build a dataset from")
        if resize not in ("letterbox", "stretch"):
            raise ValueError(f'resize must be "letterbox" or "stretch", got {resize!r}')
        batch_size = positive_int(batch_size, "batch_size")
        if with_keypoints and not self.num_keypoints:
            raise ValueError(
                f"{self.annotation_file}: with_keypoints=True, but no category defines keypoints"
            )
        if image_size is None:
            sizes = {(r["height"], r["width"]): r for r in self.records}
            if len(sizes) > 1:
                (a, ra), (b, rb) = list(sizes.items())[:2]
                raise ValueError(
                    f"images differ in size (image id {ra['image_id']} is {a[0]}x{a[1]}, image id "
                    f"{rb['image_id']} is {b[0]}x{b[1]}, height x width); pass image_size= to "
                    f"resize them to one static shape"
                )
            out_h, out_w = next(iter(sizes))
        else:
            out_h, out_w = transforms._target_size(image_size)

        targets = self.padded_targets(max_boxes, with_keypoints)
        boxes, labels = targets["boxes"], targets["labels"]
        keypoints = targets.get("keypoints")
        columns = {
            "path": np.asarray([r["path"] for r in self.records]),
            "image_id": np.asarray(self.image_ids, np.int64),
            "size": np.asarray([[r["height"], r["width"]] for r in self.records], np.int32),
            "boxes": boxes,
            "labels": labels,
        }
        if keypoints is not None:
            columns["keypoints"] = keypoints

        flip_pairs = self.flip_pairs
        seed_value = int(seed)

        def load(random_value: tf.Tensor, item: dict):
            image = tf.io.decode_image(
                tf.io.read_file(item["path"]), channels=3, expand_animations=False
            )
            # a JSON height/width that disagrees with the file would silently misplace boxes;
            # everything downstream (resize, ensure_shape) waits for the check, so it is this
            # message, naming the file, that the user sees
            size_check = tf.debugging.Assert(
                tf.reduce_all(tf.equal(tf.shape(image)[:2], item["size"])),
                [
                    "decoded image size (height, width) differs from the JSON:",
                    item["path"],
                    tf.shape(image)[:2],
                    item["size"],
                ],
            )
            with tf.control_dependencies([size_check]):
                image = tf.identity(image)
            size = None if image_size is None else (out_h, out_w)
            image, image_boxes, image_kps, scale, offset, flipped = transforms.flip_and_resize(
                image, item["boxes"], item.get("keypoints"), random_value, seed=seed_value,
                horizontal_flip=horizontal_flip, size=size, resize_mode=resize,
                flip_pairs=flip_pairs,
            )  # fmt: skip
            image = tf.ensure_shape(image, [out_h, out_w, 3])
            targets = {"boxes": image_boxes, "labels": item["labels"]}
            if image_kps is not None:
                targets["keypoints"] = image_kps
            if not with_meta:
                return image, targets
            meta = {
                "image_id": item["image_id"],
                "scale": scale,
                "offset": offset,
                "original_size": item["size"],
                "flipped": flipped,
            }
            return image, targets, meta

        ds = tf.data.Dataset.from_tensor_slices(columns)
        if shuffle:
            ds = ds.shuffle(len(self.records), seed=seed_value, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        return transforms.seeded_batches(ds, load, seed_value, batch_size, drop_remainder)
