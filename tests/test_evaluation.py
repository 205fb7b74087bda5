"""Tests of dlnotes.evaluation: the COCOeval wrapper, predictions -> COCO results, PR curves, and
the NumPy re-implementation of COCO's AP (checked against COCOeval itself)."""

import copy
import json

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO

from dlnotes.evaluation import (
    BBOX_METRICS,
    DEFAULT_KEYPOINT_SIGMA,
    KEYPOINT_METRICS,
    EvalResult,
    average_precision,
    box_versus_class,
    coco_evaluate,
    match_dataset,
    match_detections,
    precision_recall_curve,
    predictions_to_coco,
    simulate_detections,
)

IMAGE_IDS = (10, 20, 30)
SQUARE, CIRCLE, POINT = 1, 7, 3  # non-contiguous category ids on purpose


def _ann(ann_id, image_id, category_id, bbox, keypoints=None):
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(v) for v in bbox],
        "area": float(bbox[2] * bbox[3]),
        "iscrowd": 0,
    }
    if keypoints is not None:
        ann["keypoints"] = [float(v) for v in keypoints]
        ann["num_keypoints"] = int(np.count_nonzero(np.asarray(keypoints)[2::3] > 0))
    return ann


def make_gt():
    """Three images, boxes of every COCO size, and a 2-keypoint category.

    Areas: small < 32^2 = 1024 <= medium < 96^2 = 9216 <= large.
    """
    annotations = [
        _ann(1, 10, SQUARE, [10, 10, 20, 20]),  # small
        _ann(2, 10, SQUARE, [100, 100, 50, 50]),  # medium
        _ann(3, 10, CIRCLE, [200, 50, 150, 120]),  # large
        _ann(4, 20, CIRCLE, [30, 40, 25, 30]),  # small
        _ann(5, 20, SQUARE, [300, 200, 120, 110]),  # large
        _ann(6, 30, CIRCLE, [50, 60, 60, 60]),  # medium
        # Keypoint instances: (x, y, v) for "top" and "center"; v=1 labelled but occluded.
        _ann(7, 20, POINT, [100, 300, 60, 60], [130, 300, 2, 130, 330, 2]),  # medium
        _ann(8, 30, POINT, [200, 200, 100, 120], [250, 200, 1, 250, 260, 2]),  # large
    ]
    return {
        "images": [
            {"id": i, "width": 640, "height": 480, "file_name": f"{i}.png"} for i in IMAGE_IDS
        ],
        "categories": [
            {"id": SQUARE, "name": "square"},
            {"id": CIRCLE, "name": "circle"},
            {"id": POINT, "name": "point", "keypoints": ["top", "center"], "skeleton": [[1, 2]]},
        ],
        "annotations": annotations,
    }


def perfect_box_detections(gt, score=0.9):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "score": score,
        }
        for a in gt["annotations"]
    ]


def perfect_keypoint_detections(gt, score=0.9):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "keypoints": list(a["keypoints"]),
            "score": score,
        }
        for a in gt["annotations"]
        if "keypoints" in a
    ]


# ------------------------------------------------------------------------------------------------
# coco_evaluate
# ------------------------------------------------------------------------------------------------


def test_perfect_box_detections_give_one_everywhere(capsys):
    result = coco_evaluate(make_gt(), perfect_box_detections(make_gt()))
    assert isinstance(result, EvalResult)
    assert tuple(result.stats) == BBOX_METRICS
    for name in BBOX_METRICS:
        if name != "AR1":
            assert result[name] == pytest.approx(1.0), name
    # One detection per image finds 2 of the 3 squares (image 10 has two), every circle and point.
    assert result["AR1"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed
    text = result.summary()
    assert text.count("Average Precision") == 6 and text.count("Average Recall") == 6
    assert "= 1.000" in text


def test_perfect_keypoint_detections_give_one_everywhere():
    gt = make_gt()
    result = coco_evaluate(gt, perfect_keypoint_detections(gt), iou_type="keypoints")
    assert tuple(result.stats) == KEYPOINT_METRICS
    for name in KEYPOINT_METRICS:
        assert result[name] == pytest.approx(1.0), name
    # Only the keypoint category is evaluated.
    assert list(result.cocoeval.params.catIds) == [POINT]
    np.testing.assert_allclose(result.cocoeval.params.kpt_oks_sigmas, [DEFAULT_KEYPOINT_SIGMA] * 2)


def test_keypoint_ap_follows_oks():
    """One GT, one detection shifted by d pixels: OKS = exp(-d^2 / (2 area (2 sigma)^2))."""
    area, shift = 2500.0, 9.0  # medium
    gt = {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "categories": [{"id": 5, "name": "p", "keypoints": ["a", "b"]}],
        "annotations": [_ann(1, 1, 5, [50, 50, 50, 50], [60, 60, 2, 80, 90, 2])],
    }
    det = {
        "image_id": 1,
        "category_id": 5,
        "keypoints": [60 + shift, 60, 1, 80 + shift, 90, 1],
        "score": 1,
    }
    oks = np.exp(-(shift**2) / (2 * area * (2 * DEFAULT_KEYPOINT_SIGMA) ** 2))
    thresholds = np.linspace(0.5, 0.95, 10)
    assert np.min(np.abs(thresholds - oks)) > 0.01  # not borderline
    result = coco_evaluate(gt, [det], iou_type="keypoints")
    assert result["AP"] == pytest.approx(np.mean(thresholds <= oks))
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP75"] == pytest.approx(0.0)
    assert result["APm"] == pytest.approx(result["AP"])
    assert result["APl"] == -1.0  # no large GT: undefined, as in pycocotools
    # Explicit sigmas: twice as large a sigma makes the same shift 4x more tolerable.
    loose = coco_evaluate(gt, [det], iou_type="keypoints", kpt_oks_sigmas=[0.2, 0.2])
    assert loose["AP"] == pytest.approx(np.mean(thresholds <= oks**0.25))
    with pytest.raises(ValueError, match="kpt_oks_sigmas"):
        coco_evaluate(gt, [det], iou_type="keypoints", kpt_oks_sigmas=[0.1, 0.1, 0.1])


@pytest.mark.parametrize("iou_type", ["bbox", "keypoints"])
def test_no_detections_give_zero(iou_type):
    result = coco_evaluate(make_gt(), [], iou_type=iou_type)
    assert set(result.stats.values()) == {0.0}


def test_ground_truth_as_path_coco_object_and_without_optional_fields(tmp_path):
    gt = make_gt()
    reference = coco_evaluate(gt, perfect_box_detections(gt)[:4]).stats
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert coco_evaluate(str(path), perfect_box_detections(gt)[:4]).stats == reference
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    assert coco_evaluate(coco, perfect_box_detections(gt)[:4]).stats == reference
    # COCO files may omit area / iscrowd / num_keypoints: they are filled in (bbox area).
    bare = copy.deepcopy(gt)
    for ann in bare["annotations"]:
        del ann["area"], ann["iscrowd"]
        ann.pop("num_keypoints", None)
    assert coco_evaluate(bare, perfect_box_detections(gt)[:4]).stats == reference
    assert "area" not in bare["annotations"][0]  # the caller's dict is left alone
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_evaluate(str(tmp_path / "missing.json"), [])


def test_detections_are_not_modified():
    gt = make_gt()
    dets = perfect_box_detections(gt)
    before = copy.deepcopy(dets)
    coco_evaluate(gt, dets)
    assert dets == before


@pytest.mark.parametrize(
    ("perfect_score", "shifted_score", "square_ap"),
    [
        # TP then FP: recall 0.5 at precision 1 -> recall thresholds 0..0.50 (51 of 101) at 1.
        (0.9, 0.8, 51 / 101),
        # FP then TP: the envelope is 0.5 up to recall 0.5.
        (0.8, 0.9, 51 * 0.5 / 101),
    ],
)
def test_shifted_box_below_iou_half_lowers_ap50(perfect_score, shifted_score, square_ap):
    gt = make_gt()
    dets = perfect_box_detections(gt)
    # Annotation 2 (square, 50x50 at (100, 100)) shifted 20 px: IoU = 30*50 / (2*2500 - 1500) = 0.43.
    for det in dets:
        if det["image_id"] == 10 and det["category_id"] == SQUARE:
            det["score"] = perfect_score
            if det["bbox"] == [100.0, 100.0, 50.0, 50.0]:
                det["bbox"] = [120.0, 100.0, 50.0, 50.0]
                det["score"] = shifted_score
    result = coco_evaluate(gt, dets, image_ids=[10])
    # Image 10 only: square (2 GT: one matched, one missed), circle perfect; point has no GT there.
    assert result["AP50"] == pytest.approx((square_ap + 1.0) / 2, abs=1e-12)
    _, square_curve = precision_recall_curve(result, 0.5, category_id=SQUARE)
    assert square_curve.mean() == pytest.approx(square_ap, abs=1e-12)


def test_image_ids_restrict_the_evaluation():
    gt = make_gt()
    dets = [d for d in perfect_box_detections(gt) if d["image_id"] != 20]
    assert coco_evaluate(gt, dets)["AP"] < 1.0
    assert coco_evaluate(gt, dets, image_ids=[10, 30])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="99"):
        coco_evaluate(gt, dets, image_ids=[10, 99])


def test_unknown_ids_and_bad_detections_raise():
    gt = make_gt()
    good = {"image_id": 10, "category_id": SQUARE, "bbox": [1, 2, 3, 4], "score": 0.5}
    with pytest.raises(ValueError, match="image_id 999"):
        coco_evaluate(gt, [good, dict(good, image_id=999)])
    with pytest.raises(ValueError, match="category_id 2"):
        coco_evaluate(gt, [dict(good, category_id=2)])
    with pytest.raises(ValueError, match="'score'"):
        coco_evaluate(gt, [{k: v for k, v in good.items() if k != "score"}])
    with pytest.raises(ValueError, match="expected 4"):
        coco_evaluate(gt, [dict(good, bbox=[1, 2, 3])])
    with pytest.raises(ValueError, match="non-finite"):
        coco_evaluate(gt, [dict(good, score=float("nan"))])
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt, [good], iou_type="segm")
    kp = {"image_id": 20, "category_id": POINT, "keypoints": [1, 2, 2, 3, 4, 2], "score": 1.0}
    with pytest.raises(ValueError, match="expected 6"):
        coco_evaluate(gt, [dict(kp, keypoints=[1, 2, 2])], iou_type="keypoints")
    with pytest.raises(ValueError, match="without keypoints"):
        coco_evaluate(gt, [dict(kp, category_id=SQUARE)], iou_type="keypoints")
    with pytest.raises(ValueError, match="'annotations'"):
        coco_evaluate({"images": [], "categories": []}, [])


# ------------------------------------------------------------------------------------------------
# predictions_to_coco
# ------------------------------------------------------------------------------------------------


def _predictions():
    boxes = np.array(
        [
            [[10, 20, 50, 80], [0, 0, 4, 4], [-1, -1, -1, -1]],
            [[100, 40, 140, 60], [-1, -1, -1, -1], [-1, -1, -1, -1]],
        ],
        np.float32,
    )
    return {
        "boxes": boxes,
        "scores": np.array([[0.9, 0.5, -1], [0.7, -1, -1]], np.float32),
        "labels": np.array([[1, 0, -1], [1, -1, -1]], np.int32),
        "num_detections": np.array([2, 1], np.int32),
        "keypoints": np.arange(2 * 3 * 2 * 3, dtype=np.float32).reshape(2, 3, 2, 3),
    }


def test_predictions_to_coco_maps_labels_and_undoes_resize():
    preds = _predictions()
    scale = np.array([[2.0, 2.0], [0.5, 0.25]])
    offset = np.array([[10.0, 0.0], [0.0, 4.0]])
    results = predictions_to_coco(
        {k: tf.constant(v) for k, v in preds.items()}, tf.constant([10, 30]), [1, 7], scale, offset
    )
    assert len(results) == 3  # padding and entries beyond num_detections are dropped
    assert [r["image_id"] for r in results] == [10, 10, 30]
    assert [r["category_id"] for r in results] == [7, 1, 7]
    np.testing.assert_allclose([r["score"] for r in results], [0.9, 0.5, 0.7], rtol=1e-6)
    # original = (box - offset) / scale, then xyxy -> xywh.
    expected = [
        [(10 - 10) / 2, 20 / 2, 40 / 2, 60 / 2],
        [(0 - 10) / 2, 0.0, 4 / 2, 4 / 2],
        [100 / 0.5, (40 - 4) / 0.25, 40 / 0.5, 20 / 0.25],
    ]
    np.testing.assert_allclose([r["bbox"] for r in results], expected, rtol=1e-12)
    kps = preds["keypoints"].astype(np.float64)
    first = kps[0, 0].copy()
    first[:, 0] = (first[:, 0] - 10) / 2
    first[:, 1] = first[:, 1] / 2
    np.testing.assert_allclose(results[0]["keypoints"], first.ravel())
    assert all(isinstance(v, float) for r in results for v in r["bbox"] + [r["score"]])
    assert json.loads(json.dumps(results)) == results  # plain Python types


def test_predictions_to_coco_without_num_detections_callable_and_rounding():
    preds = _predictions()
    del preds["num_detections"], preds["keypoints"]
    results = predictions_to_coco(preds, [1, 2], lambda label: 100 + label, decimals=0)
    # Without num_detections every label >= 0 counts.
    assert [(r["image_id"], r["category_id"]) for r in results] == [(1, 101), (1, 100), (2, 101)]
    assert results[0]["bbox"] == [10.0, 20.0, 40.0, 60.0]
    assert "keypoints" not in results[0]
    empty = {k: v[:, :0] for k, v in preds.items()}
    assert predictions_to_coco(empty, [1, 2], [1]) == []


def test_predictions_to_coco_errors():
    preds = _predictions()
    with pytest.raises(ValueError, match="has no category"):
        predictions_to_coco(preds, [1, 2], [5])
    with pytest.raises(ValueError, match="image_ids"):
        predictions_to_coco(preds, [1], [1, 7])
    with pytest.raises(ValueError, match="scale"):
        predictions_to_coco(preds, [1, 2], [1, 7], scale=[[1, 0], [1, 1]])
    with pytest.raises(ValueError, match="boxes"):
        predictions_to_coco(dict(preds, boxes=preds["boxes"][..., :3]), [1, 2], [1, 7])
    with pytest.raises(ValueError, match="num_detections"):
        predictions_to_coco(dict(preds, num_detections=np.array([4, 0])), [1, 2], [1, 7])


def test_predictions_round_trip_through_coco_evaluate():
    """Perfect predictions in model-input pixels give AP 1 once mapped back to the original."""
    gt = make_gt()
    anns = [a for a in gt["annotations"] if a["image_id"] == 10]
    xywh = np.array([a["bbox"] for a in anns])
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    scale, offset = np.array([0.8, 0.6]), np.array([3.0, 7.0])
    model_boxes = xyxy * np.tile(scale, 2) + np.tile(offset, 2)
    categories = [SQUARE, CIRCLE, POINT]
    preds = {
        "boxes": model_boxes[None],
        "scores": np.full((1, len(anns)), 0.9),
        "labels": np.array([[categories.index(a["category_id"]) for a in anns]]),
        "num_detections": np.array([len(anns)]),
    }
    results = predictions_to_coco(preds, [10], categories, scale[None], offset[None])
    assert coco_evaluate(gt, results, image_ids=[10])["AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# The NumPy AP against COCOeval
# ------------------------------------------------------------------------------------------------


def test_match_detections_is_greedy_by_score():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 12]], np.float64)
    # d0, d1, d2 are identical to gt1 (IoU 1) and overlap gt0 with IoU 100/120 = 0.833. In score
    # order the first (d1) takes gt1, the second (d2) falls back to the still free gt0, d0 is a
    # duplicate (FP). A matcher that let each detection take its best GT regardless would differ.
    dets = np.array([[0, 0, 10, 12], [0, 0, 10, 12], [0, 0, 10, 12], [50, 50, 60, 60]], np.float64)
    scores = np.array([0.3, 0.9, 0.5, 0.95])
    tp = match_detections(dets, scores, gt, 0.5)
    # Sorted by score: d3 (0.95, no overlap), d1, d2, d0.
    np.testing.assert_array_equal(tp, [False, True, True, False])
    # At 0.9 the 0.833 overlap no longer counts: only the first of the identical boxes matches.
    np.testing.assert_array_equal(
        match_detections(dets, scores, gt, 0.9), [False, True, False, False]
    )
    # A perfect box matches even at threshold 1 (COCOeval caps it at 1 - 1e-10).
    np.testing.assert_array_equal(match_detections(gt[:1], [1.0], gt[:1], 1.0), [True])
    assert match_detections(dets, scores, gt, 0.5, max_dets=2).shape == (2,)
    assert match_detections(np.zeros((0, 4)), [], gt, 0.5).shape == (0,)
    assert not match_detections(dets, scores, np.zeros((0, 4)), 0.5).any()


def test_average_precision_hand_computed():
    # Sorted: TP, FP, TP with 4 GT: recall (.25, .25, .5), precision (1, .5, .667) -> envelope
    # (1, .667, .667): thresholds 0..0.25 (26) at 1, 0.26..0.50 (25) at 2/3, the rest 0.
    ap, recall, precision = average_precision([True, True, False], [0.9, 0.7, 0.8], num_gt=4)
    assert ap == pytest.approx((26 + 25 * 2 / 3) / 101, abs=1e-12)
    assert recall.shape == precision.shape == (101,)
    np.testing.assert_allclose(precision[:26], 1.0)
    np.testing.assert_allclose(precision[26:51], 2 / 3)
    np.testing.assert_allclose(precision[51:], 0.0)
    assert average_precision([], [], num_gt=3)[0] == 0.0
    assert average_precision([], [], num_gt=0)[0] == -1.0  # undefined, as in pycocotools
    with pytest.raises(ValueError, match="true positives"):
        average_precision([True, True], [0.5, 0.4], num_gt=1)
    with pytest.raises(ValueError, match="entries"):
        average_precision([True], [0.5, 0.4], num_gt=1)


def _random_problem(seed, category=7, num_images=6):
    """Random GT and detections for one category (plus a distractor category)."""
    rng = np.random.default_rng(seed)
    images, anns, gt_xyxy, det_xyxy, det_scores = [], [], {}, {}, {}
    ann_id = 1
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 640})
        num_gt = int(rng.integers(0, 6)) if image_id > 1 else 4
        xy = rng.uniform(0, 400, (num_gt, 2))
        wh = rng.uniform(5, 150, (num_gt, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        gt_xyxy[image_id] = boxes
        for box in boxes:
            anns.append(
                _ann(ann_id, image_id, category, [box[0], box[1], box[2] - box[0], box[3] - box[1]])
            )
            ann_id += 1
        # Distractor class with a box on top of the first GT: it must not influence category 7.
        anns.append(_ann(ann_id, image_id, 1, [0, 0, 50, 50]))
        ann_id += 1
        # Detections: jittered copies of the GT (duplicates on image 1 push it past 100 dets)
        # and random false positives.
        copies = 40 if image_id == 1 else 1
        src = np.repeat(boxes, copies, axis=0)
        keep = rng.uniform(size=len(src)) < 0.85
        jitter = rng.normal(0, 0.12, src.shape) * np.tile(src[:, 2:] - src[:, :2], 2)
        jittered = (src + jitter)[keep]
        fxy = rng.uniform(0, 500, (int(rng.integers(0, 5)), 2))
        false = np.concatenate([fxy, fxy + rng.uniform(5, 100, fxy.shape)], axis=1)
        dets = np.concatenate([jittered, false]).reshape(-1, 4)
        dets[:, 2:] = np.maximum(dets[:, 2:], dets[:, :2] + 1)
        det_xyxy[image_id] = dets
        det_scores[image_id] = rng.uniform(size=len(dets))
    gt = {"images": images, "categories": [{"id": 1}, {"id": category}], "annotations": anns}
    results = [
        {
            "image_id": image_id,
            "category_id": category,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
        }
        for image_id in det_xyxy
        for b, s in zip(det_xyxy[image_id], det_scores[image_id], strict=True)
    ]
    return gt, results, gt_xyxy, det_xyxy, det_scores


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_numpy_ap_equals_cocoeval(seed):
    gt, results, gt_xyxy, det_xyxy, det_scores = _random_problem(seed)
    assert len(det_xyxy[1]) > 100  # max_dets=100 truncation is exercised
    result = coco_evaluate(gt, results)
    for iou_threshold in (0.5, 0.75):
        tps, scores = [], []
        for image_id in sorted(gt_xyxy):  # COCOeval concatenates images in increasing id order
            tps.append(
                match_detections(
                    det_xyxy[image_id], det_scores[image_id], gt_xyxy[image_id], iou_threshold
                )
            )
            scores.append(np.sort(det_scores[image_id])[::-1][:100])
        num_gt = sum(len(b) for b in gt_xyxy.values())
        ap, recall, precision = average_precision(
            np.concatenate(tps), np.concatenate(scores), num_gt
        )
        coco_recall, coco_precision = precision_recall_curve(result, iou_threshold, category_id=7)
        np.testing.assert_allclose(recall, coco_recall, atol=0)
        np.testing.assert_allclose(precision, coco_precision, atol=1e-6)
        assert abs(ap - coco_precision.mean()) < 1e-6
        assert 0 < ap < 1  # a non-trivial case: true and false positives
    # The distractor class (GT but no detections: AP 0) and category 7 average into COCO's AP50.
    _, p7 = precision_recall_curve(result, 0.5, category_id=7)
    _, p1 = precision_recall_curve(result, 0.5, category_id=1)
    assert result["AP50"] == pytest.approx((p7.mean() + p1.mean()) / 2, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# precision_recall_curve
# ------------------------------------------------------------------------------------------------


def test_precision_recall_curve_shapes_and_monotonicity():
    gt, results, *_ = _random_problem(7)
    result = coco_evaluate(gt, results)
    recall, precision = precision_recall_curve(result.cocoeval, 0.5, category_id=7, max_dets=100)
    assert recall.shape == precision.shape == (101,)
    np.testing.assert_allclose(recall, np.linspace(0, 1, 101))
    assert np.all(np.diff(precision) <= 0)  # interpolated precision never increases
    assert np.all((precision >= 0) & (precision <= 1))
    # category_id=None averages the categories that have GT (1 and 7 here).
    _, p1 = precision_recall_curve(result, 0.5, category_id=1)
    _, mean = precision_recall_curve(result, 0.5)
    np.testing.assert_allclose(mean, (p1 + precision) / 2)
    # A stricter IoU can only lower precision.
    _, strict = precision_recall_curve(result, 0.75, category_id=7)
    assert np.all(strict <= precision + 1e-12)
    with pytest.raises(ValueError, match="0.52"):
        precision_recall_curve(result, 0.52)
    with pytest.raises(ValueError, match="category_id 3"):
        precision_recall_curve(result, category_id=3)
    with pytest.raises(ValueError, match="maxDets"):
        precision_recall_curve(result, max_dets=50)
    with pytest.raises(ValueError, match="area"):
        precision_recall_curve(result, area="huge")


def test_precision_recall_curve_without_ground_truth_raises():
    gt = make_gt()
    result = coco_evaluate(gt, perfect_box_detections(gt), image_ids=[10])
    with pytest.raises(ValueError, match="No ground truth"):
        precision_recall_curve(result, category_id=POINT)  # no point instance on image 10
    kp = coco_evaluate(gt, perfect_keypoint_detections(gt), iou_type="keypoints")
    recall, precision = precision_recall_curve(kp)  # keypoints: max_dets defaults to 20
    np.testing.assert_allclose(precision, 1.0)


def _shapes_records(tmp_path):
    from dlnotes.data import CocoDataset, generate_shapes_dataset

    paths = generate_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=12, image_size=96)
    return CocoDataset(paths["val_annotations"])


def test_simulated_detections_format_determinism_and_perfect_case(tmp_path):
    ds = _shapes_records(tmp_path)
    kwargs = dict(records=ds.records, num_classes=ds.num_classes, image_size=(96, 96))
    a = simulate_detections(**kwargs, seed=3)
    b = simulate_detections(**kwargs, seed=3)
    for key in ("boxes", "scores", "labels", "num_detections"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["boxes"].shape[:2] == a["scores"].shape == a["labels"].shape
    for i, n in enumerate(a["num_detections"]):
        assert np.all(a["labels"][i, :n] >= 0) and np.all(a["labels"][i, n:] == -1)
        assert np.all(np.diff(a["scores"][i, :n]) <= 0)  # sorted by score
        assert np.all(a["boxes"][i, :n] >= 0) and np.all(a["boxes"][i, :n] <= 96)
    perfect = simulate_detections(
        **kwargs, jitter=0, pixel_noise=0, miss_rate=0, duplicate_rate=0, fp_per_image=0
    )
    coco_dets = predictions_to_coco(perfect, ds.image_ids, ds.label_to_category)
    assert coco_evaluate(ds.coco, coco_dets)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("iou_threshold", [0.5, 0.75])
def test_match_dataset_gives_cocoeval_ap_per_class(tmp_path, iou_threshold):
    ds = _shapes_records(tmp_path)
    predictions = simulate_detections(
        ds.records, ds.num_classes, (96, 96), jitter=0.1, miss_rate=0.2, fp_per_image=2, seed=1
    )
    result = coco_evaluate(
        ds.coco, predictions_to_coco(predictions, ds.image_ids, ds.label_to_category)
    )
    t = int(np.argmin(np.abs(result.cocoeval.params.iouThrs - iou_threshold)))
    checked = 0
    for label in range(ds.num_classes):
        tp, scores, num_gt = match_dataset(predictions, ds.records, label, iou_threshold)
        ap, _, _ = average_precision(tp, scores, num_gt)
        k = result.cocoeval.params.catIds.index(ds.label_to_category(label))
        reference = result.cocoeval.eval["precision"][t, :, k, 0, -1]
        expected = float(np.mean(reference)) if num_gt else -1.0
        assert ap == pytest.approx(expected, abs=1e-6)
        checked += num_gt > 0
    assert checked >= 3


def test_match_dataset_rejects_misaligned_records(tmp_path):
    ds = _shapes_records(tmp_path)
    predictions = simulate_detections(ds.records, ds.num_classes, (96, 96))
    with pytest.raises(ValueError, match="records"):
        match_dataset(predictions, ds.records[:-1], 0)


def test_match_dataset_best_iou_tells_duplicates_from_poor_boxes(tmp_path):
    ds = _shapes_records(tmp_path)
    predictions = simulate_detections(
        ds.records, ds.num_classes, (96, 96), miss_rate=0, duplicate_rate=1, fp_per_image=0, seed=2
    )
    for label in range(ds.num_classes):
        tp, scores, num_gt, best = match_dataset(
            predictions, ds.records, label, 0.5, return_iou=True
        )
        assert best.shape == tp.shape and np.all((best >= 0) & (best <= 1 + 1e-6))
        assert np.all(best[tp] >= 0.5 - 1e-6)  # a true positive overlaps its GT enough
        tp2, scores2, _ = match_dataset(predictions, ds.records, label, 0.5)
        np.testing.assert_array_equal(tp, tp2)
        np.testing.assert_array_equal(scores, scores2)


def test_evaluate_detector_maps_letterboxed_predictions_back(tmp_path):
    from dlnotes.evaluation import evaluate_detector

    ds = _shapes_records(tmp_path)  # 96x96 images, evaluated at 64x64: boxes scaled by 2/3
    targets = ds.padded_targets()

    class Oracle:
        """Returns each batch's ground truth in model-input pixels, score 1, in data-set order."""

        image_size = (64, 64)

        def __init__(self):
            self.seen = 0

        def predict_on_batch(self, images):
            assert images.shape[1:3] == (64, 64)
            n, start = images.shape[0], self.seen
            self.seen += n
            labels = targets["labels"][start : start + n]
            boxes = np.where(
                labels[..., None] >= 0, targets["boxes"][start : start + n] * 2 / 3, -1
            )
            return {
                "boxes": boxes.astype(np.float32),
                "scores": np.where(labels >= 0, 1.0, -1.0).astype(np.float32),
                "labels": labels,
                "num_detections": (labels >= 0).sum(-1),
            }

    out = evaluate_detector(Oracle(), ds, batch_size=5, keep=7)
    assert out.result["AP"] == pytest.approx(1.0)
    assert len(out.detections) == int((targets["labels"] >= 0).sum())
    images, kept_targets, predictions = out.samples
    assert images.shape == (7, 64, 64, 3) and predictions["boxes"].shape[0] == 7
    np.testing.assert_array_equal(kept_targets["labels"], targets["labels"][:7])
    assert evaluate_detector(Oracle(), ds, batch_size=5).samples is None

    # A model of another class count is refused before any image is read (not only once a
    # detection happens to carry a label the data set lacks).
    wrong = Oracle()
    wrong.num_classes = ds.num_classes + 2
    with pytest.raises(ValueError, match=rf"predicts {ds.num_classes + 2} classes but .* has "
                       rf"{ds.num_classes} categories"):  # fmt: skip
        evaluate_detector(wrong, ds)
    assert wrong.seen == 0


# ------------------------------------------------------------------------------------------------
# box_versus_class
# ------------------------------------------------------------------------------------------------


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_box_versus_class_separates_missed_boxes_from_wrong_classes():
    gt = make_gt()
    detections = [
        _det(10, SQUARE, [10, 10, 20, 20], 0.9),  # ann 1: right
        _det(10, CIRCLE, [100, 100, 50, 50], 0.8),  # ann 2: wrong class, outscores ...
        _det(10, SQUARE, [102, 100, 50, 50], 0.3),  # ... the right one
        _det(10, CIRCLE, [200, 50, 150, 50], 0.9),  # ann 3: IoU 50*150/(150*120) = 0.42 < 0.5
        _det(20, SQUARE, [300, 200, 120, 110], 0.2),  # ann 5: right, low score still counts
        _det(30, CIRCLE, [65, 60, 60, 60], 0.7),  # ann 6: IoU 45/75 = 0.6, right
    ]
    report = box_versus_class(gt, detections)
    ids = [a["id"] for a in gt["annotations"]]
    flags = zip(report.found, report.predicted, report.class_right, strict=True)
    outcome = dict(zip(ids, flags, strict=True))
    assert outcome[1] == (True, SQUARE, True)
    assert outcome[2] == (True, CIRCLE, False)
    assert outcome[3][0] is np.False_ and outcome[3][1] == 0
    assert outcome[4][0] is np.False_  # no detection in its image near it
    assert outcome[5] == (True, SQUARE, True)
    assert outcome[6] == (True, CIRCLE, True)
    assert report.score[ids.index(5)] == pytest.approx(0.2)

    # a higher threshold loses the 0.6-IoU box
    assert not box_versus_class(gt, detections, iou_threshold=0.7).found[ids.index(6)]

    # rows: true square (1), point (3), circle (7); columns the same + missed
    assert report.category_names == ["square", "point", "circle"]
    np.testing.assert_array_equal(report.confusion(), [[2, 0, 1, 0], [0, 0, 0, 2], [0, 0, 1, 2]])
    table = report.by_size()
    assert table["all"] == {"objects": 8, "found": 4 / 8, "class right": 3 / 4}
    assert table["small"] == {"objects": 2, "found": 0.5, "class right": 1.0}
    assert table["medium"]["objects"] == 3 and table["medium"]["class right"] == 0.5
    assert table["large"]["found"] == pytest.approx(1 / 3)


def test_box_versus_class_without_detections_and_bad_input():
    gt = make_gt()
    report = box_versus_class(gt, [])
    assert not report.found.any() and np.isnan(report.by_size()["all"]["class right"])
    assert report.confusion()[:, -1].tolist() == [3, 2, 3]  # square, point, circle
    with pytest.raises(ValueError, match="image_id 99"):
        box_versus_class(gt, [_det(99, SQUARE, [0, 0, 1, 1], 0.5)])
    with pytest.raises(ValueError, match="iou_threshold"):
        box_versus_class(gt, [], iou_threshold=0)


def test_class_agnostic_ap_forgives_wrong_classes():
    gt = make_gt()
    swapped = {SQUARE: CIRCLE, CIRCLE: SQUARE, POINT: POINT}
    detections = [
        {**d, "category_id": swapped[d["category_id"]]} for d in perfect_box_detections(gt)
    ]
    assert coco_evaluate(gt, detections)["AP50"] < 0.5
    assert coco_evaluate(gt, detections, class_agnostic=True)["AP50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class_agnostic"):
        coco_evaluate(gt, [], iou_type="keypoints", class_agnostic=True)
