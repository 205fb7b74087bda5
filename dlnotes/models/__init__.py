"""Detectors, each a Keras model that trains with ``fit`` on padded ``{"boxes", "labels"}`` targets
and returns padded detections from ``predict``.

* :class:`~dlnotes.models.detector.Detector` — the Keras contract they share (compile / fit /
  evaluate / predict, label checks, XLA);
* :class:`~dlnotes.models.retinanet.RetinaNet` — ResNet + FPN + focal loss (chapter 3);
* :class:`~dlnotes.models.yolov3.YOLOv3` — Darknet-53 + concat FPN + YOLO loss (chapter 4);
* :class:`~dlnotes.models.efficientdet.EfficientDet` — EfficientNet + BiFPN + shared separable
  heads, RetinaNet's family with other parts (chapter 5);
* :class:`~dlnotes.models.faster_rcnn.FasterRCNN` — VGG16 (or ResNet-FPN) + RPN + RoI pooling +
  the Fast R-CNN head, a two-stage detector (chapter 6); its parts in
  :mod:`dlnotes.models.rpn` and :mod:`dlnotes.models.roi_heads`;
* :class:`~dlnotes.models.keypoint.KeypointDetector` — the notes' anchor-free keypoint model:
  offset and point-class heads with a Gaussian centerness instead of objectness (chapter 7).
"""

from dlnotes.models.detector import Detector
from dlnotes.models.efficientdet import PRESETS as EFFICIENTDET_PRESETS
from dlnotes.models.efficientdet import EfficientDet, EfficientDetHead
from dlnotes.models.faster_rcnn import PRESETS as FASTER_RCNN_PRESETS
from dlnotes.models.faster_rcnn import FasterRCNN, train_alternating
from dlnotes.models.keypoint import PRESETS as KEYPOINT_PRESETS
from dlnotes.models.keypoint import KeypointDetector, evaluate_keypoints
from dlnotes.models.retinanet import PRESETS as RETINANET_PRESETS
from dlnotes.models.retinanet import RetinaNet, RetinaNetHead, flatten_levels, prior_bias
from dlnotes.models.yolov3 import PRESETS as YOLOV3_PRESETS
from dlnotes.models.yolov3 import YoloHead, YOLOv3

__all__ = [
    "Detector",
    "EFFICIENTDET_PRESETS",
    "EfficientDet",
    "EfficientDetHead",
    "FASTER_RCNN_PRESETS",
    "FasterRCNN",
    "KEYPOINT_PRESETS",
    "KeypointDetector",
    "RETINANET_PRESETS",
    "RetinaNet",
    "RetinaNetHead",
    "evaluate_keypoints",
    "flatten_levels",
    "prior_bias",
    "train_alternating",
    "YOLOV3_PRESETS",
    "YOLOv3",
    "YoloHead",
]
