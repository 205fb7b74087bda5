"""COCO mAP with pycocotools, and the NumPy pieces that show how COCO's AP is computed.

Two halves:

* :func:`coco_evaluate` runs ``COCOeval`` (boxes or keypoints) on a ground truth given as a
  ``COCO`` object, a JSON path or a dict, and returns an :class:`EvalResult` with named metrics;
  :func:`predictions_to_coco` turns the padded prediction dict of the post-processing into COCO
  result dicts; :func:`evaluate_detector` does both for a detector on a data set; :func:`precision_recall_curve` reads a PR curve out of the evaluated ``COCOeval``.
* :func:`box_versus_class` splits a detector's misses into "no box" and "box found, class wrong",
  with a confusion matrix.
* :func:`match_detections` and :func:`average_precision` reproduce, for one class and one IoU
  threshold, exactly what ``COCOeval.evaluateImg`` and ``COCOeval.accumulate`` do (greedy matching
  in descending score order, 101-point interpolated precision). Chapter 0 uses them to show that
  AP is nothing more than that, and checks them against ``COCOeval``.

COCO boxes are ``xywh`` (top-left corner, width, height) in pixels of the original image; the
rest of dlnotes uses ``xyxy``. COCO result dicts are
``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``, and for keypoints
``{"image_id", "category_id", "keypoints": [x1, y1, v1, ..., xK, yK, vK], "score"}``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

__all__ = [
    "BBOX_METRICS",
    "COCO_KEYPOINT_SIGMAS",
    "DEFAULT_KEYPOINT_SIGMA",
    "DetectorEvaluation",
    "EvalResult",
    "KEYPOINT_METRICS",
    "BoxVersusClass",
    "average_precision",
    "box_versus_class",
    "coco_evaluate",
    "evaluate_detector",
    "match_dataset",
    "match_detections",
    "precision_recall_curve",
    "predictions_to_coco",
    "simulate_detections",
]

#: Names of ``COCOeval.stats`` for ``iou_type="bbox"``, in pycocotools' order.
BBOX_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
#: Names of ``COCOeval.stats`` for ``iou_type="keypoints"``, in pycocotools' order.
KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

#: pycocotools' per-keypoint OKS sigmas of the 17 COCO person keypoints.
COCO_KEYPOINT_SIGMAS = (
    np.array(
        [
            0.26,
            0.25,
            0.25,
            0.35,
            0.35,
            0.79,
            0.79,
            0.72,
            0.72,
            0.62,
            0.62,
            1.07,
            1.07,
            0.87,
            0.87,
            0.89,
            0.89,
        ]
    )
    / 10.0
)
#: OKS sigma used for every keypoint of a category that does not have COCO's 17 keypoints. A
#: single object point (e.g. a centre) is localised about as loosely as COCO's hips (0.107).
DEFAULT_KEYPOINT_SIGMA = 0.1

_IOU_TYPES = ("bbox", "keypoints")


# --------------------------------------------------------------------------------------------
# COCOeval wrapper
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """The outcome of :func:`coco_evaluate`.

    Attributes:
        stats: metric name -> value, the 12 :data:`BBOX_METRICS` or the 10
            :data:`KEYPOINT_METRICS`. As in pycocotools, ``-1.0`` means "undefined": no ground truth
            in that area range.
        cocoeval: the evaluated ``COCOeval`` (``.eval["precision"]`` has shape
            ``(T=10 IoUs, R=101 recalls, K categories, A areas, M max-dets)``).
        iou_type: ``"bbox"`` or ``"keypoints"``.
        text: the table pycocotools printed in ``summarize()`` (see :meth:`summary`).
    """

    stats: dict[str, float]
    cocoeval: COCOeval = field(repr=False)
    iou_type: str = "bbox"
    text: str = field(default="", repr=False)

    def summary(self) -> str:
        """The text table pycocotools prints in ``COCOeval.summarize()``."""
        return self.text

    def __getitem__(self, name: str) -> float:
        if name not in self.stats:
            raise KeyError(f"Unknown metric {name!r}; available: {tuple(self.stats)}.")
        return self.stats[name]


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Swallows pycocotools' prints unless ``verbose``."""
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _coco_from_dataset(dataset: dict) -> COCO:
    """A COCO object from an in-memory dataset dict, without the 'creating index' print."""
    coco = COCO()
    coco.dataset = dataset
    with _quiet(False):
        coco.createIndex()
    return coco


def _num_keypoints(keypoints) -> int:
    return int(np.count_nonzero(np.asarray(keypoints, dtype=np.float64)[2::3] > 0))


def _prepare_dataset(dataset: Mapping, source: str) -> dict:
    """Validates a COCO dataset dict and fills the fields COCOeval needs but COCO files may omit.

    ``area`` (box area), ``iscrowd`` (0) and ``num_keypoints`` (visible keypoints) are filled in
    when missing: COCOeval reads them without checking. Returns a new dict (the input is not
    modified).
    """
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"COCO ground truth {source} has no {key!r} list.")
    dataset = copy.deepcopy(dict(dataset))
    for i, ann in enumerate(dataset["annotations"]):
        name = f"annotation id {ann.get('id', f'#{i}')!r} in {source}"
        for key in ("id", "image_id", "category_id"):
            if key not in ann:
                raise ValueError(f"{name} has no {key!r}.")
        if "bbox" in ann:
            bbox = np.asarray(ann["bbox"], dtype=np.float64)
            if bbox.shape != (4,) or not np.all(np.isfinite(bbox)):
                raise ValueError(
                    f"{name} has an invalid bbox {ann['bbox']!r} (need 4 finite xywh)."
                )
            ann.setdefault("area", float(bbox[2] * bbox[3]))
        ann.setdefault("iscrowd", 0)
        if "keypoints" in ann:
            ann.setdefault("num_keypoints", _num_keypoints(ann["keypoints"]))
    return dataset


def _load_ground_truth(coco_gt) -> COCO:
    """``COCO`` / path / dict -> a ``COCO`` whose annotations have every field COCOeval reads."""
    if isinstance(coco_gt, COCO):
        anns = coco_gt.dataset.get("annotations", [])
        complete = all(
            "area" in a and "iscrowd" in a and ("keypoints" not in a or "num_keypoints" in a)
            for a in anns
        )
        if complete:
            return coco_gt
        return _coco_from_dataset(_prepare_dataset(coco_gt.dataset, "(COCO object)"))
    if isinstance(coco_gt, (str, os.PathLike)):
        path = os.fspath(coco_gt)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"COCO ground-truth file not found: {path}")
        with open(path) as f:
            try:
                dataset = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"COCO ground-truth file {path} is not valid JSON: {err}") from err
        return _coco_from_dataset(_prepare_dataset(dataset, path))
    if isinstance(coco_gt, Mapping):
        return _coco_from_dataset(_prepare_dataset(coco_gt, "(dict)"))
    raise TypeError(
        f"`coco_gt` must be a pycocotools COCO, a path to a COCO JSON or a dict, got {type(coco_gt)}."
    )


def _keypoint_categories(coco_gt: COCO) -> list[int]:
    """Category ids that carry keypoints (in their definition or in an annotation)."""
    ids = {c["id"] for c in coco_gt.dataset["categories"] if c.get("keypoints")}
    ids |= {a["category_id"] for a in coco_gt.dataset["annotations"] if "keypoints" in a}
    return sorted(ids)


def _num_keypoints_of(coco_gt: COCO, cat_ids: Sequence[int]) -> int:
    """The common number K of keypoints of the keypoint categories (ValueError if they differ)."""
    counts = {}
    for cat in coco_gt.dataset["categories"]:
        if cat["id"] in cat_ids and cat.get("keypoints"):
            counts[len(cat["keypoints"])] = f"category {cat['id']}"
    for ann in coco_gt.dataset["annotations"]:
        if ann["category_id"] in cat_ids and "keypoints" in ann:
            n = len(ann["keypoints"])
            if n % 3:
                raise ValueError(
                    f"Ground-truth annotation id {ann['id']} has {n} keypoint values, "
                    "not a multiple of 3 (x, y, v)."
                )
            counts.setdefault(n // 3, f"annotation id {ann['id']}")
    if len(counts) > 1:
        detail = ", ".join(f"{k} in {where}" for k, where in counts.items())
        raise ValueError(f"Keypoint categories have different numbers of keypoints: {detail}.")
    if not counts:
        raise ValueError("The ground truth has no keypoints (no category or annotation has any).")
    return next(iter(counts))


def _clean_detections(detections, coco_gt: COCO, iou_type: str, num_keypoints: int | None):
    """Validated copies of the result dicts with plain Python numbers.

    pycocotools' ``loadRes`` mutates its input (adds ids, areas) and asserts instead of raising;
    working on copies and checking ids first gives clear errors and leaves the caller's list alone.
    """
    image_ids = set(coco_gt.getImgIds())
    cat_ids = set(coco_gt.getCatIds())
    clean = []
    for i, det in enumerate(detections):
        if not isinstance(det, Mapping):
            raise ValueError(f"Detection #{i} is a {type(det).__name__}, not a dict.")
        geometry = "bbox" if iou_type == "bbox" else "keypoints"
        for key in ("image_id", "category_id", "score", geometry):
            if key not in det:
                raise ValueError(f"Detection #{i} has no {key!r} (keys: {sorted(det)}).")
        image_id, category_id = int(det["image_id"]), int(det["category_id"])
        if image_id not in image_ids:
            raise ValueError(
                f"Detection #{i} names image_id {image_id}, which is not in the ground truth."
            )
        if category_id not in cat_ids:
            raise ValueError(
                f"Detection #{i} names category_id {category_id}, which is not in the ground "
                f"truth (categories: {sorted(cat_ids)})."
            )
        score = float(det["score"])
        if not np.isfinite(score):
            raise ValueError(f"Detection #{i} has a non-finite score {score}.")
        values = np.asarray(det[geometry], dtype=np.float64).ravel()
        expected = 4 if iou_type == "bbox" else 3 * num_keypoints
        if values.size != expected or not np.all(np.isfinite(values)):
            raise ValueError(
                f"Detection #{i} has {geometry} {det[geometry]!r}; expected {expected} finite values."
            )
        clean.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "score": score,
                geometry: [float(v) for v in values],
            }
        )
    return clean


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO with no annotations (``loadRes`` cannot build one: it reads ``anns[0]``)."""
    return _coco_from_dataset(
        {
            "images": list(coco_gt.dataset["images"]),
            "categories": copy.deepcopy(coco_gt.dataset["categories"]),
            "annotations": [],
        }
    )


def coco_evaluate(
    coco_gt,
    detections,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
    kpt_oks_sigmas=None,
    class_agnostic: bool = False,
) -> EvalResult:
    """COCO mAP of ``detections`` against ``coco_gt`` with pycocotools' ``COCOeval``.

    Runs ``evaluate``, ``accumulate`` and ``summarize`` with pycocotools' defaults (IoU 0.50:0.95,
    101 recall points; boxes: max 1/10/100 detections, areas all/small/medium/large; keypoints:
    OKS, max 20 detections, areas all/medium/large).

    Args:
        coco_gt: a pycocotools ``COCO``, a path to a COCO JSON file, or a COCO dataset dict
            (``images``, ``annotations``, ``categories``). Missing ``area`` (taken as the bbox
            area), ``iscrowd`` (0) and ``num_keypoints`` fields are filled in on a copy.
        detections: list of COCO result dicts, ``bbox`` ``[x, y, w, h]`` for ``"bbox"``,
            ``keypoints`` ``[x, y, v] * K`` for ``"keypoints"`` (e.g. from
            :func:`predictions_to_coco`). May be empty: every metric with ground truth is then 0.
        iou_type: ``"bbox"`` or ``"keypoints"``. Keypoints are evaluated over the categories that
            have keypoints.
        image_ids: evaluate only these images (default: all images of ``coco_gt``).
        verbose: let pycocotools print its progress and table.
        kpt_oks_sigmas: per-keypoint OKS sigmas ``(K,)`` for ``"keypoints"``. Default: COCO's
            person sigmas when K = 17, else :data:`DEFAULT_KEYPOINT_SIGMA` for every keypoint.
        class_agnostic: boxes only: ignore the categories (``COCOeval.params.useCats = 0``), so
            a detection may match a ground-truth box of any class. The gap to the usual AP is
            what wrong classes cost.

    Returns:
        :class:`EvalResult`. Metrics are ``-1`` where pycocotools finds no ground truth (e.g. no
        small objects).

    Raises:
        ValueError: unknown ``iou_type``; a detection with an unknown image or category id, a
            missing key, or a wrong number of values; ``image_ids`` not in the ground truth.
    """
    if iou_type not in _IOU_TYPES:
        raise ValueError(f"Unknown iou_type {iou_type!r}; expected one of {_IOU_TYPES}.")
    if class_agnostic and iou_type != "bbox":
        raise ValueError("class_agnostic=True is for iou_type='bbox' only.")
    gt = _load_ground_truth(coco_gt)

    num_keypoints = None
    cat_ids = sorted(gt.getCatIds())
    if iou_type == "keypoints":
        cat_ids = _keypoint_categories(gt)
        num_keypoints = _num_keypoints_of(gt, cat_ids)
    if detections is None:
        detections = []
    clean = _clean_detections(detections, gt, iou_type, num_keypoints)
    if iou_type == "keypoints":
        wrong = {d["category_id"] for d in clean} - set(cat_ids)
        if wrong:
            raise ValueError(
                f"Keypoint detections name categories without keypoints: {sorted(wrong)} "
                f"(keypoint categories: {cat_ids})."
            )

    with _quiet(verbose):
        dt = gt.loadRes(clean) if clean else _empty_results(gt)
    evaluator = COCOeval(gt, dt, iouType=iou_type)
    evaluator.params.catIds = cat_ids
    evaluator.params.useCats = 0 if class_agnostic else 1
    if image_ids is not None:
        image_ids = [int(i) for i in np.asarray(image_ids).ravel()]
        unknown = sorted(set(image_ids) - set(gt.getImgIds()))
        if unknown:
            raise ValueError(f"`image_ids` {unknown} are not in the ground truth.")
        evaluator.params.imgIds = sorted(set(image_ids))
    if iou_type == "keypoints":
        if kpt_oks_sigmas is None:
            kpt_oks_sigmas = (
                COCO_KEYPOINT_SIGMAS
                if num_keypoints == 17
                else np.full((num_keypoints,), DEFAULT_KEYPOINT_SIGMA)
            )
        sigmas = np.asarray(kpt_oks_sigmas, dtype=np.float64).ravel()
        if sigmas.shape != (num_keypoints,) or not np.all(sigmas > 0):
            raise ValueError(
                f"`kpt_oks_sigmas` must be {num_keypoints} positive values, got {kpt_oks_sigmas!r}."
            )
        evaluator.params.kpt_oks_sigmas = sigmas

    with _quiet(verbose):
        evaluator.evaluate()
        evaluator.accumulate()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.summarize()
    text = buffer.getvalue()
    if verbose:
        print(text, end="")

    names = BBOX_METRICS if iou_type == "bbox" else KEYPOINT_METRICS
    stats = {name: float(v) for name, v in zip(names, evaluator.stats, strict=True)}
    return EvalResult(stats=stats, cocoeval=evaluator, iou_type=iou_type, text=text)


# --------------------------------------------------------------------------------------------
# Predictions -> COCO results
# --------------------------------------------------------------------------------------------


def _numpy(x, name: str, dtype=None) -> np.ndarray:
    """Tensor / array / list -> NumPy array."""
    if hasattr(x, "numpy"):
        x = x.numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`{name}` cannot be converted to a {dtype or 'numeric'} array: {err}"
        ) from err


def _category_lookup(label_to_category) -> Callable[[int], int]:
    """A callable label -> COCO category id from a callable, mapping or sequence."""
    if callable(label_to_category):
        return lambda label: int(label_to_category(label))
    table = label_to_category
    if hasattr(table, "numpy"):
        table = table.numpy()
    if isinstance(table, Mapping):

        def lookup(label):
            if label not in table:
                raise ValueError(f"Label {label} has no entry in `label_to_category`.")
            return int(table[label])

        return lookup
    table = [int(c) for c in np.asarray(table).ravel()]

    def lookup(label):
        if not 0 <= label < len(table):
            raise ValueError(
                f"Label {label} has no category: `label_to_category` has {len(table)} entries."
            )
        return table[label]

    return lookup


def _per_image_pairs(values, batch: int, default: float, name: str) -> np.ndarray:
    """``scale`` / ``offset`` -> float64 ``(B, 2)`` (broadcasting a single pair)."""
    if values is None:
        return np.full((batch, 2), default)
    array = _numpy(values, name, np.float64)
    try:
        array = np.broadcast_to(array, (batch, 2))
    except ValueError as err:
        raise ValueError(
            f"`{name}` must have shape (B={batch}, 2) or (2,), got {array.shape}."
        ) from err
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` has non-finite values.")
    return array


def predictions_to_coco(
    predictions: Mapping[str, Any],
    image_ids,
    label_to_category,
    scale=None,
    offset=None,
    decimals: int | None = None,
) -> list[dict]:
    """Padded model predictions -> a list of COCO result dicts.

    Args:
        predictions: the post-processing dict: ``"boxes"`` ``(B, D, 4)`` xyxy, ``"scores"``
            ``(B, D)``, ``"labels"`` ``(B, D)`` int (padding -1), optionally ``"num_detections"``
            ``(B,)`` (default: every entry with a label >= 0) and ``"keypoints"`` ``(B, D, K, 3)``
            (x, y, visibility or score). Tensors or arrays.
        image_ids: ``(B,)`` COCO image ids.
        label_to_category: contiguous label -> COCO category id: a callable, a mapping or a
            sequence (``label_to_category[label]``).
        scale: ``(B, 2)`` or ``(2,)`` resize factors ``(sx, sy)`` from the original image to the
            model input; default 1.
        offset: ``(B, 2)`` or ``(2,)`` padding offsets ``(ox, oy)`` in model-input pixels;
            default 0. Coordinates map back as ``original = (model - offset) / scale``.
        decimals: round coordinates to this many decimals (smaller JSON); default: no rounding.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with Python numbers
        in original-image pixels, plus ``"keypoints": [x, y, v] * K`` when predicted.

    Raises:
        ValueError: inconsistent shapes, a non-positive scale, a label without a category, or a
            non-finite box among the valid detections.
    """
    for key in ("boxes", "scores", "labels"):
        if key not in predictions:
            raise ValueError(f"`predictions` has no {key!r} (keys: {sorted(predictions)}).")
    boxes = _numpy(predictions["boxes"], "boxes", np.float64)
    scores = _numpy(predictions["scores"], "scores", np.float64)
    labels = _numpy(predictions["labels"], "labels")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"predictions['boxes'] must have shape (B, D, 4), got {boxes.shape}.")
    batch, max_dets = boxes.shape[:2]
    for name, array in (("scores", scores), ("labels", labels)):
        if array.shape != (batch, max_dets):
            raise ValueError(
                f"predictions[{name!r}] must have shape (B, D) = {(batch, max_dets)}, "
                f"got {array.shape}."
            )
    labels = labels.astype(np.int64)
    if predictions.get("num_detections") is not None:
        num = _numpy(predictions["num_detections"], "num_detections").astype(np.int64).ravel()
        if num.shape != (batch,) or np.any(num < 0) or np.any(num > max_dets):
            raise ValueError(
                f"predictions['num_detections'] must be (B={batch},) ints in [0, {max_dets}], "
                f"got {num!r}."
            )
    else:
        num = np.full((batch,), max_dets)
    keypoints = None
    if predictions.get("keypoints") is not None:
        keypoints = _numpy(predictions["keypoints"], "keypoints", np.float64)
        if (
            keypoints.ndim != 4
            or keypoints.shape[:2] != (batch, max_dets)
            or keypoints.shape[-1] != 3
        ):
            raise ValueError(
                f"predictions['keypoints'] must have shape (B, D, K, 3) with (B, D) = "
                f"{(batch, max_dets)}, got {keypoints.shape}."
            )
    image_ids = _numpy(image_ids, "image_ids").ravel()
    if image_ids.shape != (batch,):
        raise ValueError(f"`image_ids` must have B={batch} entries, got shape {image_ids.shape}.")
    scale = _per_image_pairs(scale, batch, 1.0, "scale")
    offset = _per_image_pairs(offset, batch, 0.0, "offset")
    if np.any(scale <= 0):
        raise ValueError(f"`scale` must be positive, got {scale.tolist()}.")
    category_of = _category_lookup(label_to_category)

    def rounded(values):
        values = np.round(values, decimals) if decimals is not None else values
        return [float(v) for v in values]

    results = []
    for b in range(batch):
        # (x, y) -> original image: subtract the padding offset, undo the resize.
        xy_offset = np.tile(offset[b], 2)
        xy_scale = np.tile(scale[b], 2)
        for d in range(int(num[b])):
            label = int(labels[b, d])
            if label < 0:  # padding inside num_detections (defensive; NMS pads at the end)
                continue
            x1, y1, x2, y2 = (boxes[b, d] - xy_offset) / xy_scale
            if not np.all(np.isfinite([x1, y1, x2, y2, scores[b, d]])):
                raise ValueError(
                    f"Detection {d} of image {b} has a non-finite box or score: "
                    f"{boxes[b, d].tolist()}, {scores[b, d]}."
                )
            result = {
                "image_id": int(image_ids[b]),
                "category_id": category_of(label),
                "bbox": rounded(np.array([x1, y1, x2 - x1, y2 - y1])),
                "score": float(scores[b, d]),
            }
            if keypoints is not None:
                kps = keypoints[b, d].copy()
                kps[:, :2] = (kps[:, :2] - offset[b]) / scale[b]
                result["keypoints"] = rounded(kps.ravel())
            results.append(result)
    return results


# --------------------------------------------------------------------------------------------
# Reading curves out of COCOeval
# --------------------------------------------------------------------------------------------


def precision_recall_curve(
    result_or_cocoeval,
    iou_threshold: float = 0.5,
    category_id: int | None = None,
    area: str = "all",
    max_dets: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The interpolated PR curve that COCO averages into AP.

    Args:
        result_or_cocoeval: an :class:`EvalResult` or an accumulated ``COCOeval``.
        iou_threshold: one of the evaluated IoU (OKS) thresholds (0.5, 0.55, ..., 0.95).
        category_id: a COCO category id; ``None`` averages the categories that have ground truth.
        area: an area label (``"all"``, ``"small"``, ``"medium"``, ``"large"``).
        max_dets: one of ``params.maxDets``; default the largest (100 for boxes, 20 for keypoints).

    Returns:
        ``(recall, precision)``, each float64 ``(101,)``: recall thresholds 0, 0.01, ..., 1 and
        the interpolated precision there (0 beyond the highest recall reached). The mean of
        ``precision`` is the AP at that threshold.

    Raises:
        ValueError: the evaluation was not accumulated, a threshold/category/area/max_dets that
            was not evaluated, or no ground truth for the selection.
    """
    evaluator = getattr(result_or_cocoeval, "cocoeval", result_or_cocoeval)
    if not isinstance(evaluator, COCOeval):
        raise TypeError(f"Expected an EvalResult or a COCOeval, got {type(result_or_cocoeval)}.")
    if not evaluator.eval or "precision" not in evaluator.eval:
        raise ValueError("The COCOeval has not been accumulated: call evaluate() and accumulate().")
    params = evaluator.params
    precision = evaluator.eval["precision"]  # (T, R, K, A, M)

    t = np.flatnonzero(np.isclose(params.iouThrs, iou_threshold))
    if t.size == 0:
        raise ValueError(
            f"IoU threshold {iou_threshold} was not evaluated; thresholds: "
            f"{np.round(params.iouThrs, 2).tolist()}."
        )
    if area not in params.areaRngLbl:
        raise ValueError(f"Unknown area {area!r}; evaluated areas: {params.areaRngLbl}.")
    a = params.areaRngLbl.index(area)
    if max_dets is None:
        max_dets = max(params.maxDets)
    if max_dets not in params.maxDets:
        raise ValueError(f"max_dets={max_dets} was not evaluated; maxDets: {params.maxDets}.")
    m = list(params.maxDets).index(max_dets)

    curves = precision[t[0], :, :, a, m]  # (R, K)
    if category_id is not None:
        cat_ids = list(params.catIds)
        if category_id not in cat_ids:
            raise ValueError(f"category_id {category_id} was not evaluated; categories: {cat_ids}.")
        curves = curves[:, [cat_ids.index(category_id)]]
    # -1 marks a category without ground truth in this area range: leave it out of the mean.
    valid = np.all(curves > -1, axis=0)
    if not np.any(valid):
        raise ValueError(
            f"No ground truth for category {category_id if category_id is not None else 'any'} "
            f"in area {area!r}: the PR curve is undefined."
        )
    return np.asarray(params.recThrs, dtype=np.float64).copy(), curves[:, valid].mean(axis=1)


# --------------------------------------------------------------------------------------------
# How COCOeval computes AP, in NumPy (one class, one IoU threshold)
# --------------------------------------------------------------------------------------------


def match_detections(
    det_boxes, det_scores, gt_boxes, iou_threshold: float = 0.5, max_dets: int | None = 100
) -> np.ndarray:
    """Greedy matching of one image's detections of one class to its GT, as ``COCOeval`` does.

    Detections are visited in descending score order (a stable mergesort, so ties keep their
    input order), keeping at most ``max_dets``. Each one takes, among the GT boxes not yet taken,
    the one with the highest IoU if that IoU is ``>= iou_threshold`` (on equal IoUs the later GT
    wins, as in ``COCOeval.evaluateImg``); otherwise it is a false positive. This is
    ``COCOeval`` with area range "all" and no crowd / ignored GT boxes.

    IoUs come from :func:`dlnotes.boxes.pairwise_iou` (float32, like every IoU in dlnotes), while
    pycocotools uses float64: the two agree except for an IoU within ~1e-7 of the threshold.

    Args:
        det_boxes: ``(D, 4)`` xyxy detection boxes.
        det_scores: ``(D,)`` scores.
        gt_boxes: ``(G, 4)`` xyxy ground-truth boxes.
        iou_threshold: matching threshold (COCO uses 0.5, 0.55, ..., 0.95).
        max_dets: keep only the highest-scoring ``max_dets`` detections (COCO: 100); ``None``
            keeps all.

    Returns:
        bool ``(min(D, max_dets),)``: ``tp[i]`` is True when the ``i``-th detection *in
        descending score order* matched a GT box. The matching scores are
        ``np.sort(det_scores)[::-1][:max_dets]`` (equivalently
        ``det_scores[np.argsort(-det_scores, kind="mergesort")][:max_dets]``).
    """
    from dlnotes.boxes import pairwise_iou  # TensorFlow is only needed here

    det_boxes = _numpy(det_boxes, "det_boxes", np.float64).reshape(-1, 4)
    det_scores = _numpy(det_scores, "det_scores", np.float64).ravel()
    gt_boxes = _numpy(gt_boxes, "gt_boxes", np.float64).reshape(-1, 4)
    if det_scores.shape[0] != det_boxes.shape[0]:
        raise ValueError(f"{det_boxes.shape[0]} detection boxes but {det_scores.shape[0]} scores.")
    order = np.argsort(-det_scores, kind="mergesort")
    if max_dets is not None:
        order = order[:max_dets]
    num_dets, num_gt = order.size, gt_boxes.shape[0]
    tp = np.zeros((num_dets,), dtype=bool)
    if num_dets == 0 or num_gt == 0:
        return tp
    ious = np.asarray(pairwise_iou(det_boxes[order], gt_boxes).numpy(), dtype=np.float64)
    # COCOeval caps the threshold just below 1 so that a perfect box still matches at "IoU 1".
    threshold = min(iou_threshold, 1 - 1e-10)
    taken = np.zeros((num_gt,), dtype=bool)
    for d in range(num_dets):
        candidates = np.where(taken, -np.inf, ious[d])
        best = candidates.max()
        if best < threshold:
            continue
        g = num_gt - 1 - int(np.argmax(candidates[::-1] == best))  # the last GT with the best IoU
        taken[g] = True
        tp[d] = True
    return tp


def average_precision(
    tp, scores, num_gt: int, points: int = 101
) -> tuple[float, np.ndarray, np.ndarray]:
    """COCO's interpolated average precision from matched detections, as ``COCOeval.accumulate``.

    The detections of all images (each image's :func:`match_detections` output, concatenated
    in increasing image id order) are sorted by score with a stable mergesort; cumulative TP/FP
    counts give ``recall = TP / num_gt`` and ``precision = TP / (TP + FP)``; precision is made
    monotone from the right (``p[i] = max(p[i:])``) and sampled at ``points`` recall thresholds
    0, 1/(points-1), ..., 1 at the first detection reaching that recall (``searchsorted`` left);
    thresholds never reached count as precision 0. AP is the mean of the samples.

    Args:
        tp: bool ``(N,)`` match flags.
        scores: ``(N,)`` scores aligned with ``tp``.
        num_gt: number of (non-ignored) ground-truth boxes of the class over all images.
        points: number of recall thresholds (COCO: 101).

    Returns:
        ``(ap, recall, precision)``: float ``ap`` and float64 ``(points,)`` recall thresholds and
        interpolated precision. With ``num_gt == 0`` AP is undefined and, as in pycocotools,
        ``ap`` and ``precision`` are -1.

    Raises:
        ValueError: mismatched lengths, negative ``num_gt``, more true positives than GT boxes,
            or ``points < 2``.
    """
    tp = _numpy(tp, "tp").astype(bool).ravel()
    scores = _numpy(scores, "scores", np.float64).ravel()
    if tp.shape != scores.shape:
        raise ValueError(f"`tp` has {tp.size} entries but `scores` has {scores.size}.")
    num_gt = int(num_gt)
    if num_gt < 0:
        raise ValueError(f"`num_gt` must be >= 0, got {num_gt}.")
    if int(tp.sum()) > num_gt:
        raise ValueError(f"{int(tp.sum())} true positives but only num_gt={num_gt} GT boxes.")
    if points < 2:
        raise ValueError(f"`points` must be >= 2, got {points}.")
    recall_thresholds = np.linspace(0.0, 1.0, points)
    if num_gt == 0:
        return -1.0, recall_thresholds, -np.ones((points,))

    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order]
    tp_sum = np.cumsum(tp).astype(np.float64)
    fp_sum = np.cumsum(~tp).astype(np.float64)
    recall = tp_sum / num_gt
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    # The precision envelope: best precision at this recall or any higher one.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, recall_thresholds, side="left")
    reached = index < precision.size
    sampled = np.zeros((points,))
    sampled[reached] = precision[index[reached]]
    return float(np.mean(sampled)), recall_thresholds, sampled


def match_dataset(
    predictions, records, label: int, iou_threshold: float = 0.5, max_dets=100, return_iou=False
):
    """:func:`match_detections` for one class over a whole data set, pooled as ``COCOeval`` does.

    Args:
        predictions: padded detections ``{"boxes": (B, D, 4) xyxy, "scores": (B, D), "labels":
            (B, D), "num_detections": (B,)}`` aligned with ``records`` (image ``b`` is
            ``records[b]``); padding entries (label -1) are ignored.
        records: ``CocoDataset.records`` (dicts with ``"boxes"`` xyxy and ``"labels"``), in
            increasing image id order, the order in which ``COCOeval`` concatenates images.
        label: the contiguous class label to evaluate.
        iou_threshold, max_dets: as in :func:`match_detections`; like ``COCOeval``, each image
            keeps its best ``max_dets`` detections of the class.
        return_iou: also return each detection's best IoU with a GT box of its class in its image
            (a false positive with a best IoU above the threshold is a duplicate).

    Returns:
        ``(tp, scores, num_gt)``: bool ``(N,)`` flags and float ``(N,)`` scores of the class's
        detections, each image's in descending score order, images concatenated; and the number
        of ground-truth boxes of the class. ``average_precision(tp, scores, num_gt)`` is then
        COCO's AP for this class and threshold. With ``return_iou``, ``(tp, scores, num_gt,
        best_iou)`` with ``best_iou`` float ``(N,)`` (0 where the image has no GT of the class).
    """
    from dlnotes.boxes import pairwise_iou  # TensorFlow is only needed here

    boxes = _numpy(predictions["boxes"], "boxes", np.float64)
    scores = _numpy(predictions["scores"], "scores", np.float64)
    labels = _numpy(predictions["labels"], "labels").astype(np.int64)
    if len(records) != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} prediction rows but {len(records)} records.")
    if "num_detections" in predictions:
        count = _numpy(predictions["num_detections"], "num_detections").astype(np.int64)
        valid = np.arange(labels.shape[1])[None, :] < count[:, None]
    else:
        valid = labels >= 0
    flags, kept_scores, best_ious, num_gt = [], [], [], 0
    for b, record in enumerate(records):
        mine = valid[b] & (labels[b] == label)
        gt = np.asarray(record["boxes"], np.float64).reshape(-1, 4)[
            np.asarray(record["labels"]) == label
        ]
        num_gt += len(gt)
        flags.append(match_detections(boxes[b][mine], scores[b][mine], gt, iou_threshold, max_dets))
        order = np.argsort(-scores[b][mine], kind="mergesort")[: len(flags[-1])]
        kept_scores.append(scores[b][mine][order])
        if return_iou:
            iou = pairwise_iou(boxes[b][mine][order], gt).numpy() if len(gt) else None
            best_ious.append(iou.max(axis=1) if iou is not None else np.zeros(len(order)))
    tp, kept = np.concatenate(flags), np.concatenate(kept_scores)
    if return_iou:
        return tp, kept, num_gt, np.concatenate(best_ious).astype(np.float64)
    return tp, kept, num_gt


# --------------------------------------------------------------------------------------------
# Box found, class wrong
# --------------------------------------------------------------------------------------------

#: COCO's box area ranges in px² by label ("all", "small" < 32², "medium" < 96², "large"), from
#: pycocotools' own ``Params``.
_BOX_PARAMS = Params(iouType="bbox")
_AREA_RANGES = dict(zip(_BOX_PARAMS.areaRngLbl, map(tuple, _BOX_PARAMS.areaRng), strict=True))


@dataclass
class BoxVersusClass:
    """What became of every ground-truth box (the outcome of :func:`box_versus_class`).

    Attributes (``G`` ground-truth boxes, in the order of the ground truth's annotations):
        category_ids: ``(C,)`` the ground truth's category ids, sorted.
        category_names: their names.
        gt_category: ``(G,)`` each box's category id.
        gt_area: ``(G,)`` each annotation's ``area`` (COCO's size ranges read it).
        found: bool ``(G,)``: some detection of *any* class overlaps the box with IoU >= the
            threshold.
        predicted: ``(G,)`` the category id of the highest-scoring such detection (0 if none).
        score: ``(G,)`` its score (0 if none).
    """

    category_ids: np.ndarray
    category_names: list
    gt_category: np.ndarray
    gt_area: np.ndarray
    found: np.ndarray
    predicted: np.ndarray
    score: np.ndarray

    @property
    def class_right(self) -> np.ndarray:
        """bool ``(G,)``: found, and the best-scoring covering detection has the right class."""
        return self.found & (self.predicted == self.gt_category)

    def confusion(self) -> np.ndarray:
        """int ``(C, C + 1)``: row = true category, column = the category of the best-scoring
        covering detection, in ``category_ids`` order; the last column counts boxes not found."""
        index = {int(c): i for i, c in enumerate(self.category_ids)}
        matrix = np.zeros((len(index), len(index) + 1), dtype=np.int64)
        for true, found, predicted in zip(
            self.gt_category, self.found, self.predicted, strict=True
        ):
            matrix[index[int(true)], index[int(predicted)] if found else len(index)] += 1
        return matrix

    def by_size(self) -> dict[str, dict[str, float]]:
        """``{"all" | "small" | "medium" | "large": {"objects", "found", "class right"}}``:
        the number of boxes, the fraction found, and the fraction of the *found* ones whose
        best-scoring covering detection has the right class (NaN when none is found)."""
        table = {}
        for name, (lo, hi) in _AREA_RANGES.items():
            keep = (self.gt_area >= lo) & (self.gt_area < hi)
            found = self.found[keep]
            right = self.class_right[keep]
            table[name] = {
                "objects": int(keep.sum()),
                "found": float(found.mean()) if keep.any() else float("nan"),
                "class right": float(right.sum() / found.sum()) if found.any() else float("nan"),
            }
        return table


def box_versus_class(coco_gt, detections, iou_threshold: float = 0.5) -> BoxVersusClass:
    """Did the detector miss the *box* or the *class*? Per ground-truth box, regardless of class.

    For every ground-truth box, every detection of the same image whose box overlaps it with
    IoU >= ``iou_threshold`` counts, whatever its class and score; the box is *found* when there
    is one, and the class of the highest-scoring one is what the detector "says" the object is.
    Unlike COCO's matching this is not one-to-one (one detection may cover two overlapping
    boxes): it asks whether any box is there, not whether AP would count it. Crowd annotations
    are left out. IoUs come from :func:`dlnotes.boxes.pairwise_iou` (float32, as everywhere in
    dlnotes).

    Args:
        coco_gt: as in :func:`coco_evaluate` (``COCO``, path or dict).
        detections: COCO box result dicts (``image_id``, ``category_id``, ``bbox`` xywh,
            ``score``), e.g. :attr:`DetectorEvaluation.detections`.
        iou_threshold: the overlap that counts as "found" (COCO's AP50 uses 0.5).

    Returns:
        :class:`BoxVersusClass`.

    Raises:
        ValueError: a detection with an unknown image or category id, a missing key or a
            non-finite value (as :func:`coco_evaluate`); a threshold outside ``(0, 1]``.
    """
    from dlnotes.boxes import convert_format, pairwise_iou  # TensorFlow is only needed here

    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    gt = _load_ground_truth(coco_gt)
    clean = _clean_detections(detections or [], gt, "bbox", None)
    per_image: dict[int, list] = {}
    for det in clean:
        per_image.setdefault(det["image_id"], []).append(det)
    anns = [a for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)]
    found = np.zeros(len(anns), dtype=bool)
    predicted = np.zeros(len(anns), dtype=np.int64)
    score = np.zeros(len(anns), dtype=np.float64)
    gt_rows: dict[int, list] = {}
    for i, a in enumerate(anns):
        gt_rows.setdefault(a["image_id"], []).append(i)
    for image_id, rows in gt_rows.items():
        dets = per_image.get(image_id, [])
        if not dets:
            continue
        gt_boxes = convert_format([anns[i]["bbox"] for i in rows], "xywh", "xyxy")
        det_boxes = convert_format([d["bbox"] for d in dets], "xywh", "xyxy")
        det_scores = np.array([d["score"] for d in dets])
        covers = pairwise_iou(gt_boxes, det_boxes).numpy() >= iou_threshold  # (g, d)
        ranked = np.where(covers, det_scores[None, :], -np.inf)
        best = np.argmax(ranked, axis=1)
        for row, i in enumerate(rows):
            if covers[row].any():
                found[i] = True
                predicted[i] = dets[best[row]]["category_id"]
                score[i] = det_scores[best[row]]
    category_ids = np.array(sorted(gt.getCatIds()), dtype=np.int64)
    return BoxVersusClass(
        category_ids=category_ids,
        category_names=[gt.cats[int(c)]["name"] for c in category_ids],
        gt_category=np.array([a["category_id"] for a in anns], dtype=np.int64),
        gt_area=np.array([a["area"] for a in anns], dtype=np.float64),
        found=found,
        predicted=predicted,
        score=score,
    )


def simulate_detections(
    records,
    num_classes: int,
    image_size,
    jitter: float = 0.05,
    pixel_noise: float = 1.0,
    miss_rate: float = 0.1,
    duplicate_rate: float = 0.1,
    fp_per_image: float = 1.0,
    seed: int = 0,
):
    """A detector of controllable quality, made from the ground truth (for teaching and tests).

    Each ground-truth object is found with probability ``1 - miss_rate``; its box is the GT box
    with its centre moved and its size scaled by Gaussian noise of relative size ``jitter`` plus
    ``pixel_noise`` pixels, scored ``0.6 * IoU(box, GT) + 0.4 * u`` (better boxes score higher,
    with some randomness). A fraction ``duplicate_rate`` of the found objects gets a second, worse
    box scored lower; each image gets ``Poisson(fp_per_image)`` false positives of random class
    and size, scored ``u ** 3``. ``u`` is uniform in [0, 1).

    Args:
        records: ``CocoDataset.records`` (``"boxes"`` xyxy, ``"labels"``).
        num_classes: number of classes (labels of false positives are drawn from it).
        image_size: ``(height, width)``; boxes are clipped to the image.
        seed: the result is a deterministic function of the arguments.

    Returns:
        Padded predictions in the format every dlnotes detector returns: ``{"boxes": (B, D, 4)
        xyxy float32, "scores": (B, D) float32, "labels": (B, D) int32, "num_detections":
        (B,) int32}`` sorted by score within an image, padding -1.
    """
    from dlnotes.boxes import aligned_iou, clip_boxes  # TensorFlow is only needed here

    height, width = (int(v) for v in np.asarray(image_size).reshape(-1)[:2])
    rng = np.random.default_rng(seed)
    counts = [len(r["labels"]) for r in records]
    gt = np.concatenate([np.asarray(r["boxes"], np.float64).reshape(-1, 4) for r in records])
    gt_labels = np.concatenate([np.asarray(r["labels"], np.int64).ravel() for r in records])
    gt_image = np.repeat(np.arange(len(records)), counts)

    def jittered(boxes, rel):
        size = boxes[:, 2:] - boxes[:, :2]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        centre = centre + (rel * size + pixel_noise) * rng.standard_normal(size.shape)
        size = size * np.exp(rel * rng.standard_normal(size.shape))
        size = np.maximum(size + pixel_noise * rng.standard_normal(size.shape), 1.0)
        return np.concatenate([centre - size / 2, centre + size / 2], axis=1)

    found = rng.random(len(gt)) >= miss_rate
    boxes, labels, image = jittered(gt[found], jitter), gt_labels[found], gt_image[found]
    scores = 0.6 * aligned_iou(boxes, gt[found]).numpy() + 0.4 * rng.random(len(boxes))
    twice = rng.random(len(boxes)) < duplicate_rate
    duplicates = jittered(gt[found][twice], 2 * jitter + 0.05)
    fp_image = np.repeat(np.arange(len(records)), rng.poisson(fp_per_image, len(records)))
    fp_size = np.exp(rng.uniform(np.log(8), np.log(0.6 * min(height, width)), (len(fp_image), 1)))
    fp_corner = rng.uniform(0, 1, (len(fp_image), 2)) * (np.array([width, height]) - fp_size)

    boxes = np.concatenate([boxes, duplicates, np.hstack([fp_corner, fp_corner + fp_size])])
    scores = np.concatenate([scores, 0.7 * scores[twice], rng.random(len(fp_image)) ** 3])
    labels = np.concatenate([labels, labels[twice], rng.integers(0, num_classes, len(fp_image))])
    image = np.concatenate([image, image[twice], fp_image])
    boxes = clip_boxes(boxes, (height, width)).numpy()

    num = np.bincount(image, minlength=len(records))
    size = max(int(num.max(initial=0)), 1)
    out = {
        "boxes": np.full((len(records), size, 4), -1, np.float32),
        "scores": np.full((len(records), size), -1, np.float32),
        "labels": np.full((len(records), size), -1, np.int32),
        "num_detections": num.astype(np.int32),
    }
    for b in range(len(records)):  # a NumPy simulation, not graph code: one image at a time
        mine = np.flatnonzero(image == b)
        mine = mine[np.argsort(-scores[mine], kind="stable")]
        out["boxes"][b, : len(mine)] = boxes[mine]
        out["scores"][b, : len(mine)] = scores[mine]
        out["labels"][b, : len(mine)] = labels[mine]
    return out


@dataclass
class DetectorEvaluation:
    """The outcome of :func:`evaluate_detector`.

    Attributes:
        result: the :class:`EvalResult` of ``COCOeval`` (``result.stats["AP50"]`` ...).
        detections: the COCO result dicts, in original-image pixels.
        samples: ``(images, targets, predictions)`` of the first ``keep`` images as NumPy
            arrays in model-input pixels (for drawing), or None when ``keep=0``.
    """

    result: EvalResult
    detections: list
    samples: tuple | None = None


def evaluate_detector(model, dataset, batch_size: int = 50, image_size=None, keep: int = 0):
    """COCO box mAP of a dlnotes detector on a :class:`~dlnotes.data.CocoDataset`.

    Every image is letterboxed to the model's input size (as in training), run through
    ``model.predict_on_batch`` (padded detections), mapped back to original-image pixels by
    :func:`predictions_to_coco` and evaluated with :func:`coco_evaluate`.

    Args:
        model: a detector whose ``predict_on_batch`` returns the padded detection dict and,
            unless ``image_size`` is given, with an ``image_size`` attribute.
        dataset: a :class:`~dlnotes.data.CocoDataset`.
        batch_size: images per ``predict_on_batch`` call.
        image_size: model input ``(height, width)``; default ``model.image_size``.
        keep: how many images (from the start) to return in ``samples`` for drawing.

    Returns:
        A :class:`DetectorEvaluation`.

    Raises:
        ValueError: the model's ``num_classes`` differs from the data set's category count
            (checked before any image is read).
    """
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and model_classes != dataset.num_classes:
        raise ValueError(
            f"evaluate_detector: the model predicts {model_classes} classes but "
            f"{dataset.annotation_file} has {dataset.num_classes} categories "
            f"({dataset.class_names}); evaluate a model trained on this data set's categories"
        )
    size = tuple(image_size or model.image_size)
    batches = dataset.to_tf_dataset(batch_size=batch_size, image_size=size, with_meta=True)
    detections, kept = [], []
    for images, targets, meta in batches:
        predictions = {k: np.asarray(v) for k, v in model.predict_on_batch(images).items()}
        detections += predictions_to_coco(
            predictions,
            meta["image_id"],
            dataset.label_to_category,
            scale=meta["scale"],
            offset=meta["offset"],
        )
        if sum(len(k[0]) for k in kept) < keep:
            targets = {k: np.asarray(v) for k, v in targets.items()}
            kept.append((np.asarray(images), targets, predictions))
    samples = None
    if keep:
        images = np.concatenate([k[0] for k in kept])[:keep]
        targets = {key: np.concatenate([k[1][key] for k in kept])[:keep] for key in kept[0][1]}
        predictions = {key: np.concatenate([k[2][key] for k in kept])[:keep] for key in kept[0][2]}
        samples = (images, targets, predictions)
    return DetectorEvaluation(coco_evaluate(dataset.coco, detections), detections, samples)
