"""The book's five detectors side by side: the line-up, how each is built, and what it is made of.

Chapter 8 compares the detectors of chapters 3-7 trained the same way (:mod:`dlnotes.training`)
on the same data. :data:`LINEUP` names them with the preset and overrides of their chapter's CPU
profile; :func:`build_detector` builds one for a data set at an input size (anchor sizes in
pixels scale with the input, the presets' are for 256 px); :func:`anatomy` reads the "variable
parts" of a detector from the model itself: backbone, neck, the heads (shared across levels or
not), the last layer and the losses; :func:`inference_time` times ``predict_on_batch``;
:func:`first_reaching` finds where a learning curve first reaches an AP50.

Shapes: images are ``(B, H, W, 3)`` RGB in ``[0, 255]``; boxes xyxy pixels, as everywhere.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from dlnotes import models

__all__ = ["LINEUP", "build_detector", "anatomy", "inference_time", "first_reaching"]

LINEUP: dict[str, tuple[str, str, dict]] = {
    "RetinaNet": ("RetinaNet", "retinanet_tiny_256", {}),
    "YOLOv3": ("YOLOv3", "yolov3_mini_256", {"initial_filters": 4, "assign_rule": "best_of_all"}),
    "EfficientDet": ("EfficientDet", "efficientdet_tiny_256", {}),
    "Faster R-CNN": (
        "FasterRCNN", "faster_rcnn_tiny_256",
        {"backbone": "resnet_tiny", "backbone_kwargs": {"levels": (4,)}},
    ),
    "Keypoint": ("KeypointDetector", "keypoint_tiny_256", {}),
}  # fmt: skip
"""Name -> (class name in :mod:`dlnotes.models`, preset, overrides): the models of the CPU
profiles of chapters 3 (RetinaNet), 4 (YOLOv3, half width, the paper's best-of-all assignment),
5 (EfficientDet), 6 (Faster R-CNN on ``resnet_tiny``'s stride-16 map) and 7 (the keypoint
model), each built from scratch (random initial weights): chapters 3, 6 and 7 (and chapter 2's
comparison of necks) start their backbone from the shapes weights (``backbone_weights="shapes"``,
frozen), which chapter 8 compares on its own for RetinaNet."""


def build_detector(name: str, dataset, image_size: int = 256, **overrides):
    """The detector ``name`` of :data:`LINEUP` for ``dataset``'s classes at ``image_size`` px.

    Args:
        name: a key of :data:`LINEUP`.
        dataset: a :class:`~dlnotes.data.CocoDataset` (its ``num_classes``, and
            ``num_keypoints`` for the keypoint model).
        image_size: side of the square input; anchor sizes in pixels (RetinaNet, YOLOv3,
            Faster R-CNN) are scaled by ``image_size / 256``; EfficientDet's anchors follow its
            strides already.
        overrides: more constructor arguments, on top of the line-up's.

    Raises:
        ValueError: an unknown name.
    """
    if name not in LINEUP:
        raise ValueError(f"unknown detector {name!r}; expected one of {tuple(LINEUP)}")
    family, preset, lineup_overrides = LINEUP[name]
    cls = getattr(models, family)
    config = {**cls.presets[preset], **lineup_overrides}
    scale = image_size / 256
    extra = {"image_size": (image_size, image_size)}
    if "anchor_sizes" in config:  # RetinaNet, Faster R-CNN
        extra["anchor_sizes"] = tuple(float(s) * scale for s in config["anchor_sizes"])
    if family == "YOLOv3":
        extra["anchors"] = (np.asarray(config["anchors"], np.float64) * scale).tolist()
    if family == "KeypointDetector":
        extra["num_keypoints"] = dataset.num_keypoints
    return cls.from_preset(
        preset, num_classes=dataset.num_classes, **{**lineup_overrides, **extra, **overrides}
    )


def anatomy(detector) -> dict[str, str]:
    """The seed's "variable parts" of ``detector``, read from the built model.

    Returns:
        ``{"stages", "backbone", "neck", "heads", "last layer", "class loss", "box loss"}``:
        short descriptions (e.g. heads "class + box, shared by 5 levels, depth 2, 64 ch").
    """
    kind = type(detector).__name__
    reader = {
        "RetinaNet": _retinanet,
        "EfficientDet": _retinanet,
        "YOLOv3": _yolo,
        "FasterRCNN": _faster_rcnn,
        "KeypointDetector": _keypoint,
    }.get(kind)
    if reader is None:
        raise ValueError(f"anatomy: not a dlnotes detector: {kind}")
    return reader(detector)


def inference_time(detector, batch_size: int = 1, repeats: int = 5, seed: int = 0) -> float:
    """Median wall seconds of ``detector.predict_on_batch`` on ``batch_size`` images.

    The images are seeded uniform noise ``(batch_size, H, W, 3)`` in ``[0, 255]`` at the
    detector's ``image_size``; one untimed call first traces the function. Post-processing (NMS,
    decoding, grouping) is included, as a user of ``predict`` pays for it.
    """
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size}, {repeats}")
    height, width = detector.image_size
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch_size, height, width, 3)).astype(np.float32)
    detector.predict_on_batch(images)  # trace
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.predict_on_batch(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_reaching(rows, level: float, metric: str = "AP50"):
    """The first row of a learning curve whose ``metric`` is at least ``level``, or None.

    ``rows``: dicts in step order, as ``benchmarks/time_to_ap50.py`` stores them (``step``,
    ``seconds``, ``AP50``, ...).
    """
    return next((row for row in rows if row[metric] >= level), None)


def _retinanet(m) -> dict[str, str]:
    head = m.class_head
    levels = len(m.anchor_generator.strides)
    per_level_bn = type(head).__name__ == "EfficientDetHead"
    return {
        "stages": "one",
        "backbone": getattr(m, "backbone_name", None) or m.backbone.name,
        "neck": getattr(m, "neck_name", None) or m.neck.name,
        "heads": (
            f"class + box subnets, shared by {levels} levels, depth {head.depth}, "
            f"{head.channels} ch" + (", BN per level" if per_level_bn else "")
        ),
        "last layer": (
            f"3x3 conv: {m.anchor_generator.num_anchors_per_location} anchors x "
            f"{m.num_classes} sigmoids + 4 deltas"
        ),
        "class loss": f"focal (alpha {m.focal_alpha}, gamma {m.focal_gamma})",
        "box loss": m.box_loss.replace("_", "-"),
    }


def _yolo(m) -> dict[str, str]:
    levels = len(m.heads)
    anchors = m.heads[0].num_anchors
    return {
        "stages": "one",
        "backbone": f"darknet53 (width {m.initial_filters})",
        "neck": "YOLO concat FPN",
        "heads": f"one per level ({levels}), not shared",
        "last layer": f"1x1 conv: {anchors} anchors x (4 + objectness + {m.num_classes} sigmoids)",
        "class loss": "BCE on objectness and classes",
        "box loss": "xy BCE + wh L2" if m.box_loss == "offset" else m.box_loss.upper(),
    }


def _faster_rcnn(m) -> dict[str, str]:
    config = m._config
    levels = len(m.level_strides)
    rpn = "BCE" if config["objectness"] == "sigmoid" else "softmax CE"
    return {
        "stages": "two",
        "backbone": m.backbone.name,
        "neck": m.neck.name if m.neck is not None else "none (one feature map)",
        "heads": (
            f"RPN ({'shared by ' + str(levels) + ' levels' if levels > 1 else 'one level'}) + "
            f"RoI head ({config['roi_pooling']}, 2 fc of {config['head_hidden']})"
        ),
        "last layer": f"fc: {m.num_classes} + 1 softmax + per-class deltas",
        "class loss": f"RPN {rpn} objectness; RoI softmax CE",
        "box loss": "smooth-L1 (RPN and RoI)",
    }


def _keypoint(m) -> dict[str, str]:
    levels = len(m.strides)
    return {
        "stages": "one, anchor-free",
        "backbone": m.backbone_name or m.backbone.name,
        "neck": m.neck_name or m.neck.name,
        "heads": f"centerness + class + offset maps, {levels} levels, depth {m.head_depth}",
        "last layer": f"3x3 conv: {m.num_point_classes} point-class heatmaps + offsets",
        "class loss": "CenterNet focal on Gaussian heatmaps",
        "box loss": f"none (boxes from grouped keypoints); offsets {m.xy_loss.upper()}",
    }
