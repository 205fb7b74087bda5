"""YOLOv3 (Redmon & Farhadi 2018): Darknet-53, the concatenation FPN, one shared head per level.

The notes' design (seed ``001``), end to end:

* images RGB in [0, 255] scaled to [0, 1] (darknet's input) -> Darknet-53 C3-C5
  (:func:`~dlnotes.backbones.darknet.build_darknet53`, the ``initial_filters`` knob) ->
  :class:`~dlnotes.necks.YoloFPN` (5-conv 1-3-1-3-1 blocks, 1x1 up branch, concat);
* per level a head: 3x3 conv-BN-leaky to ``2 f`` then a 1x1 conv with bias to
  ``A * (4 + 1 + C)``, reshaped to ``[B, H, W, A, 4 + 1 + C]``: raw offsets ``tx, ty, tw, th``,
  the objectness logit and ``C`` class logits. Outputs are in the notes' / darknet's order:
  stride 32 first, then 16 and 8, each using 3 of the 9 ``[w, h]`` anchors
  (:class:`~dlnotes.anchors.YoloAnchors`: the largest anchors on the coarsest grid);
* targets inside the training graph from padded ``{"boxes", "labels"}``
  (:func:`~dlnotes.matching.assign_yolo_targets`): the notes' rule (every level's best anchor,
  ``"per_level"``) or the original one (the best of all 9, ``"best_of_all"``);
* :func:`~dlnotes.losses.yolo_loss`: xy BCE and wh L2 on the raw offsets of positives, weighted
  by ``2 - w h``, objectness BCE with the **ignore mask** (a negative cell whose predicted box has
  IoU > 0.5 with a GT of the same image is not pushed to "no object"), class BCE on positives,
  summed over levels and divided by the global batch size; or a CIoU box loss;
* ``predict``: boxes by :func:`~dlnotes.boxes.yolo_decode`, score = sigmoid(objectness) x
  sigmoid(class), per-class NMS (:func:`~dlnotes.postprocess.batched_nms`).

The Keras contract (``compile`` without a loss, label checks under XLA, global-batch logs) is
:class:`~dlnotes.models.detector.Detector`'s. :meth:`YOLOv3.darknet_units` lists the convs in
darknet's ``yolov3.cfg`` order, so :mod:`dlnotes.darknet_io` reads and writes ``.weights`` files.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from dlnotes.anchors import YOLO_COCO_ANCHORS, YOLO_MASKS, YoloAnchors
from dlnotes.backbones import build_backbone, preprocess_for
from dlnotes.boxes import clip_boxes, yolo_decode
from dlnotes.darknet_io import darknet_units, load_darknet_weights, yolov3_config_from_cfg
from dlnotes.losses import yolo_loss
from dlnotes.matching import assign_yolo_targets
from dlnotes.models.detector import Detector
from dlnotes.necks import NeckConv, YoloFPN
from dlnotes.postprocess import batched_nms

__all__ = ["PRESETS", "YOLOv3", "YoloHead"]

PRESETS = {
    # The paper's YOLOv3-416: Darknet-53 (initial_filters 32), COCO anchors.
    "yolov3_darknet53_416": dict(image_size=(416, 416), initial_filters=32),
    # A CPU configuration for the book's data set (pass k-means anchors of your data): the same
    # architecture with a quarter of the widths (1/16 of the parameters). Not "YOLOv3-tiny",
    # which is another network.
    "yolov3_mini_256": dict(
        image_size=(256, 256), initial_filters=8, anchors=(YOLO_COCO_ANCHORS * 256 / 416).tolist(),
        objectness_prior=0.01,
    ),
}  # fmt: skip


@keras.saving.register_keras_serializable(package="dlnotes")
class YoloHead(keras.layers.Layer):
    """One YOLOv3 output: 3x3 conv-BN-leaky to ``2 f``, then a 1x1 conv with bias to
    ``A (5 + C)`` channels, reshaped to ``(B, H, W, A, 5 + C)``.

    Args:
        filters: ``f`` of the level (the head's 3x3 conv has ``2 f``).
        num_anchors: ``A`` anchors per cell.
        num_classes: ``C``.
        objectness_prior: None (darknet: zero bias) or ``pi``: the objectness bias starts at
            ``-log((1 - pi) / pi)`` so every cell first predicts "no object" with confidence
            ``1 - pi`` (RetinaNet's prior init applied to YOLO's objectness).
        negative_slope, norm_momentum, norm_epsilon: of the conv-BN-leaky unit.

    Input ``(B, H, W, f)`` -> output ``(B, H, W, A, 5 + C)``.
    """

    def __init__(
        self,
        filters,
        num_anchors,
        num_classes,
        objectness_prior=None,
        negative_slope=0.1,
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.num_anchors = int(num_anchors)
        self.num_classes = int(num_classes)
        self.objectness_prior = objectness_prior
        self.negative_slope = float(negative_slope)
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self.conv = NeckConv(
            2 * self.filters, 3, batch_norm=True, activation="leaky_relu",
            negative_slope=self.negative_slope, norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon, dtype=self.dtype_policy, name="conv",
        )  # fmt: skip
        self.output_conv = keras.layers.Conv2D(
            self.num_anchors * (5 + self.num_classes), 1, dtype=self.dtype_policy, name="output"
        )

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.output_conv.build((None, None, None, 2 * self.filters))
        if self.objectness_prior is not None:
            pi = float(self.objectness_prior)
            bias = np.zeros((self.num_anchors, 5 + self.num_classes), np.float32)
            bias[:, 4] = -math.log((1.0 - pi) / pi)
            self.output_conv.bias.assign(bias.reshape(-1))

    def call(self, x, training=None):
        y = self.output_conv(self.conv(x, training=training))
        shape = tf.shape(y)
        return tf.reshape(y, [shape[0], shape[1], shape[2], self.num_anchors, 5 + self.num_classes])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.num_anchors, 5 + self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            num_anchors=self.num_anchors,
            num_classes=self.num_classes,
            objectness_prior=self.objectness_prior,
            negative_slope=self.negative_slope,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="dlnotes")
class YOLOv3(Detector):
    """YOLOv3 detector: images ``(B, H, W, 3)`` RGB in [0, 255] -> three raw output grids.

    ``call`` returns a list of ``(B, H_l, W_l, A, 4 + 1 + C)`` tensors, stride 32 first
    (``H_l = H / stride``); ``predict`` returns padded detections ``{"boxes": (B, D, 4) xyxy,
    "scores": (B, D), "labels": (B, D), "num_detections": (B,)}``. ``fit`` / ``evaluate`` take
    ``(images, {"boxes": (B, M, 4) xyxy, "labels": (B, M)})`` padded with -1 and log ``loss``
    and its terms (``xy_loss``, ``wh_loss`` or ``box_loss``, ``objectness_loss``,
    ``class_loss``; global-batch values).

    Args:
        num_classes: ``C``.
        image_size: static ``(height, width)``, both divisible by 32.
        initial_filters: Darknet-53's first width ``f`` (32 in the paper); the stages have
            ``2f ... 32f`` channels and the FPN blocks ``16f, 8f, 4f`` unless ``neck_filters``.
        neck_filters: the FPN blocks' ``f_k``, stride 32 first.
        anchors: ``(9, 2)`` ``[w, h]`` in input pixels (sorted small to large); ``masks``: which
            3 each output uses (stride 32 first).
        assign_rule: ``"per_level"`` (the notes) or ``"best_of_all"`` (the paper).
        ignore_thresh: IoU above which a negative prediction is ignored (0.5).
        box_loss: ``"offset"`` (xy BCE + wh L2) or ``"ciou"``.
        objectness_prior: None (darknet) or ``pi`` for a prior-probability objectness bias.
        backbone_weights: None or a Darknet-53 weights file (see ``build_darknet53``); used at
            construction only.
        negative_slope: leaky ReLU slope (0.1).
        score_threshold, iou_threshold, max_detections: post-processing (darknet's mAP
            evaluation uses score 0.005, NMS 0.45; 100 detections as COCO counts).
    """

    presets = PRESETS

    def __init__(
        self,
        num_classes,
        image_size=(416, 416),
        initial_filters=32,
        neck_filters=None,
        anchors=YOLO_COCO_ANCHORS,
        masks=YOLO_MASKS,
        assign_rule="per_level",
        ignore_thresh=0.5,
        box_loss="offset",
        objectness_prior=None,
        backbone_weights=None,
        negative_slope=0.1,
        score_threshold=0.005,
        iou_threshold=0.45,
        max_detections=100,
        **kwargs,
    ):
        if box_loss not in ("offset", "ciou"):
            raise ValueError(f"box_loss must be 'offset' or 'ciou', got {box_loss!r}.")
        if assign_rule not in ("per_level", "best_of_all"):
            raise ValueError(
                f"assign_rule must be 'per_level' or 'best_of_all', got {assign_rule!r}."
            )
        terms = ("xy_loss", "wh_loss") if box_loss == "offset" else ("box_loss",)
        super().__init__(
            num_classes, loss_terms=(*terms, "objectness_loss", "class_loss"), **kwargs
        )
        self.image_size = tuple(int(v) for v in image_size)
        if (
            len(self.image_size) != 2
            or min(self.image_size) < 32
            or any(v % 32 for v in self.image_size)
        ):
            raise ValueError(
                f"YOLOv3: image_size must be (height, width) divisible by 32, got {image_size!r}."
            )
        self.initial_filters = int(initial_filters)
        if neck_filters is None:
            neck_filters = tuple(self.initial_filters * m for m in (16, 8, 4))
        self.neck_filters = tuple(int(f) for f in neck_filters)
        self.yolo_anchors = YoloAnchors(anchors, masks, strides=(32, 16, 8))
        if self.yolo_anchors.num_levels != 3:
            raise ValueError(f"YOLOv3 has 3 outputs; `masks` gives {len(masks)} levels.")
        self.assign_rule = assign_rule
        self.ignore_thresh = float(ignore_thresh)
        self.box_loss = box_loss
        self.objectness_prior = objectness_prior
        self.negative_slope = float(negative_slope)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)

        self.preprocessing = preprocess_for("darknet53")  # RGB / 255, darknet's input
        self.backbone = build_backbone(
            "darknet53",
            (*self.image_size, 3),
            initial_filters=self.initial_filters,
            negative_slope=self.negative_slope,
            weights=backbone_weights,
        )
        self.neck = YoloFPN(self.neck_filters, negative_slope=self.negative_slope, name="yolo_fpn")
        num_anchors = self.yolo_anchors.num_anchors_per_location
        self.heads = [
            YoloHead(
                f, num_anchors, self.num_classes, objectness_prior=objectness_prior,
                negative_slope=self.negative_slope, name=f"head{k}",
            )
            for k, f in enumerate(self.neck_filters)
        ]  # fmt: skip
        self.build((None, *self.image_size, 3))

    @classmethod
    def from_darknet_cfg(cls, cfg, weights=None, **overrides):
        """A model with the architecture of a darknet YOLOv3 cfg (e.g. darknet's ``yolov3.cfg``),
        optionally with its ``.weights`` loaded.

        Args:
            cfg: cfg text, a path or :func:`~dlnotes.darknet_io.parse_cfg` sections (see
                :func:`~dlnotes.darknet_io.yolov3_config_from_cfg`).
            weights: optional path of the matching darknet ``.weights`` file.
            **overrides: other constructor arguments (e.g. ``score_threshold``).
        """
        model = cls(**{**yolov3_config_from_cfg(cfg), **overrides})
        if weights is not None:
            load_darknet_weights(model, weights, cfg=cfg)
        return model

    def build(self, input_shape):
        images = keras.KerasTensor(tuple(input_shape))
        features = self.backbone.compute_output_spec(images)
        self.neck.build([f.shape for f in features])
        levels = self.neck.compute_output_spec(features)[::-1]  # stride 32 first
        for head, level in zip(self.heads, levels, strict=True):
            head.build(level.shape)
        self.built = True

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "initial_filters": self.initial_filters,
            "neck_filters": list(self.neck_filters),
            "anchors": self.yolo_anchors.anchors.tolist(),
            "masks": [list(m) for m in self.yolo_anchors.masks],
            "assign_rule": self.assign_rule,
            "ignore_thresh": self.ignore_thresh,
            "box_loss": self.box_loss,
            "objectness_prior": self.objectness_prior,
            "backbone_weights": None,  # a saved model restores its own weights
            "negative_slope": self.negative_slope,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ forward

    def call(self, images, training=False):
        levels = self.pyramid(images, training=training)[::-1]  # stride 32 first, as darknet
        return [head(x, training=training) for head, x in zip(self.heads, levels, strict=True)]

    def darknet_units(self):
        """``(conv, batch_norm or None)`` pairs in darknet ``yolov3.cfg`` order.

        The backbone's 52 convs, then per output (stride 32 first): the FPN block's 5 convs,
        the head's 3x3 conv, the 1x1 output conv (bias, no BN), and, for the first two
        outputs, the up branch's 1x1 conv (darknet's ``[route] -4`` comes back to the block).
        """
        units = list(darknet_units(self.backbone))
        for k, head in enumerate(self.heads):
            units += [(conv.conv, conv.norm) for conv in self.neck.blocks[k]]
            units += [(head.conv.conv, head.conv.norm), (head.output_conv, None)]
            if k < len(self.neck.up_convs):
                up = self.neck.up_convs[k]
                units.append((up.conv, up.norm))
        return units

    # ------------------------------------------------------------------ training

    def compute_targets(self, boxes, labels):
        """Per-level ``y_true`` ``(B, H_l, W_l, A, 4 + 1 + C)`` for padded GT (stride 32 first);
        :func:`~dlnotes.matching.assign_yolo_targets` clips the boxes to the image."""
        boxes = tf.cast(boxes, tf.float32)
        labels = self.checked_labels(labels)
        return assign_yolo_targets(
            boxes, labels, self.yolo_anchors, self.image_size, self.num_classes,
            rule=self.assign_rule,
        )  # fmt: skip

    def loss_terms(self, y, y_pred):
        """The YOLO loss terms, each summed over levels and divided by the global batch size."""
        self.check_targets(y)
        if not isinstance(y_pred, (list, tuple)) or len(y_pred) != 3:
            raise ValueError(
                "YOLOv3 predictions must be the list of 3 output grids of call(), got "
                f"{type(y_pred).__name__}."
            )
        boxes = tf.cast(y["boxes"], tf.float32)  # clipped by the assignment and the loss
        labels = tf.cast(y["labels"], tf.int32)
        y_true = self.compute_targets(boxes, labels)
        terms = yolo_loss(
            y_true, [tf.cast(p, tf.float32) for p in y_pred], self.yolo_anchors, self.image_size,
            boxes, labels, ignore_thresh=self.ignore_thresh, box_loss=self.box_loss,
        )  # fmt: skip
        names = ("xy", "wh") if self.box_loss == "offset" else ("box",)
        return {f"{k}_loss": terms[k] for k in (*names, "objectness", "class")}

    # ------------------------------------------------------------------ inference

    def decode(self, outputs):
        """Raw output grids -> padded detections.

        Boxes by :func:`~dlnotes.boxes.yolo_decode`, clipped to the image; score of a (box,
        class) pair = sigmoid(objectness) x sigmoid(class logit); per-class NMS.
        """
        boxes, scores = [], []
        for level, raw in enumerate(outputs):
            raw = tf.cast(raw, tf.float32)
            decoded = yolo_decode(
                raw[..., :4], self.yolo_anchors.level_anchors(level),
                self.yolo_anchors.strides[level],
            )  # fmt: skip
            score = tf.sigmoid(raw[..., 4:5]) * tf.sigmoid(raw[..., 5:])
            batch = tf.shape(raw)[0]
            boxes.append(tf.reshape(decoded, [batch, -1, 4]))
            scores.append(tf.reshape(score, [batch, -1, self.num_classes]))
        return batched_nms(
            clip_boxes(tf.concat(boxes, axis=1), self.image_size),
            tf.concat(scores, axis=1),
            iou_threshold=self.iou_threshold,
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
        )
