"""dlnotes: the package behind the runnable book on object detection in TensorFlow / Keras 3.

One module per idea, each used by every model of the book:

* :mod:`dlnotes.boxes` — box formats, IoU / GIoU / DIoU / CIoU, clipping, the box coder
* :mod:`dlnotes.anchors` — multi-level anchors, YOLO anchors, k-means anchors
* :mod:`dlnotes.matching` — anchor assignment to ground truth, balanced sampling
* :mod:`dlnotes.postprocess` — decoding and batched, per-class NMS
* :mod:`dlnotes.roi` — RoI pooling and RoIAlign (single and multi-level), for two-stage heads
* :mod:`dlnotes.centerness` — FCOS / PolarMask centerness and CenterNet's Gaussian heatmaps
* :mod:`dlnotes.losses` — focal, smooth-L1 / Huber and IoU losses, the cross-replica normaliser
* :mod:`dlnotes.backbones` — ResNet / ResNeXt, Darknet-53, EfficientNet and VGG16 feature extractors
* :mod:`dlnotes.darknet_io` — darknet ``.cfg`` / ``.weights`` files to and from Keras models
* :mod:`dlnotes.necks` — FPN variants (original, BN / post-activation, PANet, YOLO's concat FPN, BiFPN)
* :mod:`dlnotes.models` — the detectors (RetinaNet, YOLOv3, EfficientDet, Faster R-CNN, the keypoint model)
* :mod:`dlnotes.data` — the synthetic shapes data set, COCO JSON to ``tf.data``, transforms
* :mod:`dlnotes.evaluation` — COCO mAP with pycocotools, and AP spelled out
* :mod:`dlnotes.training` — the book's one training recipe (AdamW, warm-up, cosine decay, clipping)
* :mod:`dlnotes.pretraining` — a backbone pre-trained to classify the shapes (``weights="shapes"``)
* :mod:`dlnotes.comparison` — the five detectors side by side: the line-up and their anatomy
* :mod:`dlnotes.flops` — multiply-adds of a forward pass, and the machine's matmul rate
* :mod:`dlnotes.saving` — saving / loading models without overwriting, with clear file errors
* :mod:`dlnotes.checks` — argument checks and the in-graph input checks of the detectors
* :mod:`dlnotes.viz` — matplotlib drawing of boxes, anchors, assignments, heatmaps, curves
"""

import importlib

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "anchors",
    "backbones",
    "boxes",
    "centerness",
    "comparison",
    "darknet_io",
    "data",
    "evaluation",
    "flops",
    "losses",
    "matching",
    "models",
    "necks",
    "postprocess",
    "pretraining",
    "roi",
    "saving",
    "training",
    "viz",
]

# The submodules load on first use (``dlnotes.viz``, ``from dlnotes import viz``), so that
# ``import dlnotes`` and ``python -m dlnotes.<module>`` do not start TensorFlow before they need it.
_SUBMODULES = frozenset(__all__) - {"__version__"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"dlnotes.{name}")
    raise AttributeError(f"module 'dlnotes' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
