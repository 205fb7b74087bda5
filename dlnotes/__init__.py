"""dlnotes: the package behind the runnable book on object detection in TensorFlow / Keras 3.

One module per idea, each used by every model of the book:

* :mod:`dlnotes.boxes` — box formats, IoU / GIoU / DIoU / CIoU, clipping, the box coder
* :mod:`dlnotes.anchors` — multi-level anchors, YOLO anchors, k-means anchors
* :mod:`dlnotes.matching` — anchor assignment to ground truth, balanced sampling
* :mod:`dlnotes.postprocess` — decoding and batched, per-class NMS
* :mod:`dlnotes.losses` — focal, smooth-L1 / Huber and IoU losses, the cross-replica normaliser
* :mod:`dlnotes.backbones` — ResNet / ResNeXt and Darknet-53 feature extractors (C3-C5)
* :mod:`dlnotes.darknet_io` — darknet ``.cfg`` / ``.weights`` files to and from Keras models
* :mod:`dlnotes.necks` — FPN variants (original, BN / post-activation, PANet, YOLO's concat FPN)
* :mod:`dlnotes.models` — the detectors (RetinaNet, YOLOv3)
* :mod:`dlnotes.data` — the synthetic shapes data set, COCO JSON to ``tf.data``, transforms
* :mod:`dlnotes.evaluation` — COCO mAP with pycocotools, and AP spelled out
* :mod:`dlnotes.flops` — multiply-adds of a forward pass, and the machine's matmul rate
* :mod:`dlnotes.saving` — saving / loading models without overwriting, with clear file errors
* :mod:`dlnotes.checks` — argument checks and the in-graph input checks of the detectors
* :mod:`dlnotes.viz` — matplotlib drawing of boxes, anchors, assignments, heatmaps, curves
"""

from dlnotes import (
    anchors,
    backbones,
    boxes,
    darknet_io,
    data,
    evaluation,
    flops,
    losses,
    matching,
    models,
    necks,
    postprocess,
    saving,
    viz,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "anchors",
    "backbones",
    "boxes",
    "darknet_io",
    "data",
    "evaluation",
    "flops",
    "losses",
    "matching",
    "models",
    "necks",
    "postprocess",
    "saving",
    "viz",
]
