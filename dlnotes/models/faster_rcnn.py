"""Faster R-CNN (Ren, He, Girshick & Sun 2015): a region proposal network and the Fast R-CNN
detector on one shared trunk, trained end to end in one graph.

The notes' design (seed ``003``), batched and in-graph:

* images RGB in [0, 255] -> the backbone's preprocessing -> the **trunk**: VGG16's 13 convs
  without the last max pool (:func:`~dlnotes.backbones.vgg.build_vgg16`, one level C4 at stride
  16), or a ResNet + FPN (``neck="fpn"``: C2-C5 -> P2-P6, P6 a stride-2 subsample of P5, as
  torchvision's ``fasterrcnn_resnet50_fpn``);
* the **RPN** (:mod:`dlnotes.models.rpn`): a 3x3 conv + ReLU and two 1x1 convs shared by the
  levels, ``k`` objectness logits (sigmoid) or ``2k`` (softmax) and ``4k`` deltas per location;
  anchor labels in the graph (IoU >= 0.7 or a GT's best anchor positive, < 0.3 negative,
  cross-boundary anchors ignored, 256 sampled per image, at most half positive);
* **proposals** (:func:`~dlnotes.models.rpn.generate_proposals`): top-k by objectness, decode,
  clip, remove small boxes, NMS 0.7, top-k (2000 / 2000 while training, 1000 / 1000 at test),
  static shapes, no gradient;
* **proposal targets** (:func:`~dlnotes.models.roi_heads.proposal_targets`): the GT boxes
  appended, foreground at IoU >= 0.5, 512 RoIs sampled per image with 25 % foreground, deltas
  with weights (10, 10, 5, 5);
* **RoI pooling** (:mod:`dlnotes.roi`): ``roi_pool`` to 7 x 7 at the trunk's stride (the paper),
  ``roi_align``, or FPN's multi-level RoIAlign on P2-P5;
* the **detector head** (:class:`~dlnotes.models.roi_heads.FastRCNNHead`): fc-ReLU-fc-ReLU,
  softmax over ``N + 1`` classes (0 the background), per-class deltas; cross entropy + smooth-L1
  on the true class's deltas;
* at test time: softmax scores, per-class decoding, score 0.05, min size 1e-2, per-class NMS 0.5,
  100 detections (:func:`~dlnotes.models.roi_heads.detect_from_rois`).

Training is approximate joint training by default (the four losses summed, no gradient through
the proposals' coordinates). :func:`train_alternating` runs the paper's 4-step alternating
training instead. The Keras contract — ``compile`` without a loss, ``fit`` / ``evaluate`` on padded
``{"boxes", "labels"}``, ``predict`` to padded detections, the input checks — is
:class:`~dlnotes.models.detector.Detector`'s.

**XLA.** NMS has no XLA kernel on every device, so a step does not compile as one XLA function
(``step_compiles_with_xla = False``). With ``jit_compile=True`` the parts around the proposals
compile: the trunk, the RPN head, its targets and loss (``"trunk_rpn"``), and the proposal
targets, RoI pooling, the detector head and its loss (``"roi_head"``); the proposals (their NMS)
and, in ``predict``, the final NMS run as ordinary TensorFlow ops. The RoI gathers of
:mod:`dlnotes.roi` are XLA-compiled in every mode.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dlnotes.anchors import AnchorGenerator
from dlnotes.backbones import ImagePreprocessing, build_backbone, output_strides, preprocess_for
from dlnotes.boxes import BoxCoder
from dlnotes.checks import positive_int
from dlnotes.models.detector import Detector
from dlnotes.models.roi_heads import (
    ROI_BOX_WEIGHTS,
    FastRCNNHead,
    detect_from_rois,
    fast_rcnn_loss,
    proposal_targets,
)
from dlnotes.models.rpn import (
    RPNHead,
    flatten_rpn_outputs,
    generate_proposals,
    rpn_box_coder,
    rpn_loss,
    rpn_targets,
)
from dlnotes.necks import FPN
from dlnotes.roi import multiscale_roi_align, roi_align, roi_pool

__all__ = [
    "ALTERNATING_PLAN",
    "PRESETS",
    "ROI_POOLINGS",
    "STAGES",
    "FasterRCNN",
    "train_alternating",
]

#: RoI feature extraction: ``"pool"`` (RoIPool, the paper), ``"align"`` (RoIAlign on one
#: level), ``"multiscale_align"`` (RoIAlign of each RoI on its FPN level).
ROI_POOLINGS = ("pool", "align", "multiscale_align")

#: Training stages: ``"joint"`` (all four losses), ``"rpn"`` (the RPN's losses only) and
#: ``"detector"`` (the detector head's losses only, on the current RPN's proposals).
STAGES = ("joint", "rpn", "detector")

_VGG_ANCHORS = dict(
    anchor_sizes=(128,), anchor_strides=(16,), anchor_ratios=(0.5, 1.0, 2.0),
    anchor_scales=(1.0, 2.0, 4.0),
)  # fmt: skip
_FPN_ANCHORS = dict(
    anchor_sizes=(32, 64, 128, 256, 512), anchor_strides=(4, 8, 16, 32, 64),
    anchor_ratios=(0.5, 1.0, 2.0), anchor_scales=(1.0,),
)  # fmt: skip

#: Named configurations for :meth:`FasterRCNN.from_preset`.
PRESETS = {
    # The paper's VGG16 model: fc6 / fc7 of 4096, RoIPool, conv1-conv2 frozen. The paper
    # rescales the shorter side to 600 (longer at most 1000); here images are letterboxed into a
    # fixed 608 x 1008 canvas (multiples of the stride 16).
    "faster_rcnn_vgg16": dict(
        image_size=(608, 1008), backbone="vgg16", backbone_kwargs={"frozen_blocks": 2},
        head_hidden=4096, **_VGG_ANCHORS,
    ),
    # torchvision's fasterrcnn_resnet50_fpn: ResNet-50 C2-C5, FPN P2-P6 (256), 3 anchors per
    # location (32-512 px, one size per level), multi-level RoIAlign on P2-P5, a 1024-wide
    # head with a box per class including the background. Shorter side 800, longer 1333.
    "faster_rcnn_resnet50_fpn": dict(
        image_size=(800, 1344), backbone="resnet50", backbone_kwargs={"levels": (2, 3, 4, 5)},
        neck="fpn", rpn_channels=256, roi_pooling="multiscale_align", sampling_ratio=2,
        head_hidden=1024, box_per_background=True, **_FPN_ANCHORS,
    ),
    # A CPU-sized model for the book's data set: the VGG16 layout at a quarter of the widths
    # (C4 of 128 channels), 12 anchors of 16-128 px at stride 16, fewer proposals and RoIs.
    "faster_rcnn_tiny_256": dict(
        image_size=(256, 256), backbone="vgg16", backbone_kwargs={"base_filters": 16},
        rpn_channels=128, anchor_sizes=(16,), anchor_strides=(16,),
        anchor_ratios=(0.5, 1.0, 2.0), anchor_scales=(1.0, 2.0, 4.0, 8.0), head_hidden=512,
        train_proposals=(600, 300), test_proposals=(600, 300), roi_num_samples=128,
    ),
}  # fmt: skip


def _pair_of_ints(value, name, owner):
    try:
        pre, post = (positive_int(v, name, owner) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: {name} must be (pre_nms_top_k, post_nms_top_k), two positive ints; got "
            f"{value!r}."
        ) from None
    return pre, post


@keras.saving.register_keras_serializable(package="dlnotes")
class FasterRCNN(Detector):
    """Faster R-CNN: images ``(B, H, W, 3)`` RGB in [0, 255] -> padded detections (see the module
    docstring for the parts).

    ``fit`` / ``evaluate`` take ``(images, {"boxes": (B, M, 4) xyxy, "labels": (B, M)})`` padded
    with -1 and log ``loss``, ``rpn_objectness_loss``, ``rpn_box_loss``, ``class_loss`` and
    ``box_loss`` (global-batch values). ``predict`` returns ``{"boxes": (B, D, 4) xyxy, "scores":
    (B, D), "labels": (B, D), "num_detections": (B,)}`` with ``D = max_detections``.
    ``call(images)`` returns the detector head's outputs on the test proposals:
    ``{"rois": (B, P, 4), "roi_mask": (B, P), "class_logits": (B, P, N + 1), "box_deltas": (B, P,
    N, 4)}`` (``N + 1`` box classes with ``box_per_background``), which :meth:`decode` turns into
    detections.

    Args:
        num_classes: ``N``, object classes (the head adds the background class 0).
        image_size: static ``(height, width)``; for a VGG trunk divisible by 16 (its max pools
            round down, the anchor grid up).
        backbone: a name of :data:`dlnotes.backbones.BACKBONES` (``backbone_kwargs`` its knobs,
            e.g. ``{"frozen_blocks": 2}`` for VGG16, ``{"levels": (2, 3, 4, 5)}`` for a ResNet
            under an FPN); ``backbone_weights`` None / ``"imagenet"`` / a weights file.
        preprocessing: an :class:`~dlnotes.backbones.ImagePreprocessing` mode; default the
            backbone's.
        neck: None (the backbone's levels feed the RPN and the RoI pooling directly: VGG16's
            C4) or ``"fpn"``: an FPN of ``num_channels`` from the backbone's first level to one
            extra level made by subsampling (P2-P6 on C2-C5).
        num_channels: the FPN's width.
        rpn_channels: filters of the RPN's 3x3 conv (512 on VGG16, 256 on the FPN).
        objectness: ``"sigmoid"`` (k logits) or ``"softmax"`` (2k logits) in the RPN.
        anchor_sizes, anchor_strides, anchor_ratios, anchor_scales: the
            :class:`~dlnotes.anchors.AnchorGenerator` (one size and stride per level; ratios are
            ``h / w``). Default: the paper's 9 anchors (128-512 px) at stride 16.
        rpn_positive_threshold, rpn_negative_threshold, rpn_num_samples,
            rpn_positive_fraction, allowed_border: the RPN's anchor labels and sampling
            (0.7, 0.3, 256, 0.5, 0; ``allowed_border=None`` keeps cross-boundary anchors).
        rpn_loss_normalization: ``"sampled"`` (torchvision) or ``"paper"``
            (:func:`~dlnotes.models.rpn.rpn_loss`).
        train_proposals, test_proposals: ``(pre_nms_top_k, post_nms_top_k)`` of the proposals
            in training (2000, 2000) and at test time (1000, 1000); per level for an FPN.
        proposal_nms_threshold, proposal_min_size: the proposals' NMS IoU (0.7) and smallest
            side (1e-3 px).
        roi_pooling: one of :data:`ROI_POOLINGS`; default ``"pool"`` (``"multiscale_align"``
            needs the FPN).
        roi_output_size: the pooled grid (7).
        sampling_ratio: RoIAlign's samples per bin and axis (2; <= 0 adaptive).
        head_hidden: width of the detector's two fc layers (2048, the notes; 4096 the paper's
            VGG16; 1024 torchvision's FPN model).
        box_per_background: the head also predicts a box for the background (torchvision's
            layout, ``4 (N + 1)`` box outputs).
        roi_num_samples, roi_positive_fraction, roi_fg_threshold, roi_bg_threshold: the proposal
            targets (512, 0.25, 0.5, 0.5).
        score_threshold, detection_nms_threshold, max_detections, min_size: test-time
            post-processing (0.05, 0.5 per class, 100, 1e-2 px).
        smooth_l1_beta: of the detector's box loss (torchvision's 1/9).
    """

    presets = PRESETS
    step_compiles_with_xla = False

    def __init__(
        self,
        num_classes,
        image_size=(608, 1008),
        backbone="vgg16",
        backbone_kwargs=None,
        backbone_weights=None,
        preprocessing=None,
        neck=None,
        num_channels=256,
        rpn_channels=512,
        objectness="sigmoid",
        anchor_sizes=(128,),
        anchor_strides=(16,),
        anchor_ratios=(0.5, 1.0, 2.0),
        anchor_scales=(1.0, 2.0, 4.0),
        rpn_positive_threshold=0.7,
        rpn_negative_threshold=0.3,
        rpn_num_samples=256,
        rpn_positive_fraction=0.5,
        allowed_border=0.0,
        rpn_loss_normalization="sampled",
        train_proposals=(2000, 2000),
        test_proposals=(1000, 1000),
        proposal_nms_threshold=0.7,
        proposal_min_size=1e-3,
        roi_pooling="pool",
        roi_output_size=7,
        sampling_ratio=2,
        head_hidden=2048,
        box_per_background=False,
        roi_num_samples=512,
        roi_positive_fraction=0.25,
        roi_fg_threshold=0.5,
        roi_bg_threshold=0.5,
        score_threshold=0.05,
        detection_nms_threshold=0.5,
        max_detections=100,
        min_size=1e-2,
        smooth_l1_beta=1.0 / 9.0,
        **kwargs,
    ):
        owner = "FasterRCNN"
        super().__init__(
            num_classes,
            loss_terms=("rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss"),
            **kwargs,
        )
        self.image_size = tuple(int(v) for v in image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"{owner}: image_size must be (height, width), got {image_size!r}.")
        if neck not in (None, "fpn"):
            raise ValueError(f"{owner}: neck must be None or 'fpn', got {neck!r}.")
        if roi_pooling not in ROI_POOLINGS:
            raise ValueError(
                f"{owner}: roi_pooling must be one of {ROI_POOLINGS}, got {roi_pooling!r}."
            )
        if roi_pooling == "multiscale_align" and neck != "fpn":
            raise ValueError(f"{owner}: roi_pooling='multiscale_align' needs neck='fpn'.")
        self.train_proposals = _pair_of_ints(train_proposals, "train_proposals", owner)
        self.test_proposals = _pair_of_ints(test_proposals, "test_proposals", owner)
        self._config = {
            "image_size": list(self.image_size), "backbone": backbone,
            "backbone_kwargs": dict(backbone_kwargs or {}), "preprocessing": preprocessing,
            "neck": neck, "num_channels": int(num_channels), "rpn_channels": int(rpn_channels),
            "objectness": objectness, "anchor_sizes": [float(s) for s in anchor_sizes],
            "anchor_strides": [int(s) for s in anchor_strides],
            "anchor_ratios": [float(r) for r in anchor_ratios],
            "anchor_scales": [float(s) for s in anchor_scales],
            "rpn_positive_threshold": float(rpn_positive_threshold),
            "rpn_negative_threshold": float(rpn_negative_threshold),
            "rpn_num_samples": int(rpn_num_samples),
            "rpn_positive_fraction": float(rpn_positive_fraction),
            "allowed_border": None if allowed_border is None else float(allowed_border),
            "rpn_loss_normalization": rpn_loss_normalization,
            "train_proposals": list(self.train_proposals),
            "test_proposals": list(self.test_proposals),
            "proposal_nms_threshold": float(proposal_nms_threshold),
            "proposal_min_size": float(proposal_min_size), "roi_pooling": roi_pooling,
            "roi_output_size": int(roi_output_size), "sampling_ratio": int(sampling_ratio),
            "head_hidden": int(head_hidden), "box_per_background": bool(box_per_background),
            "roi_num_samples": int(roi_num_samples),
            "roi_positive_fraction": float(roi_positive_fraction),
            "roi_fg_threshold": float(roi_fg_threshold),
            "roi_bg_threshold": float(roi_bg_threshold),
            "score_threshold": float(score_threshold),
            "detection_nms_threshold": float(detection_nms_threshold),
            "max_detections": int(max_detections), "min_size": float(min_size),
            "smooth_l1_beta": float(smooth_l1_beta),
        }  # fmt: skip
        c = self._config
        #: The current training stage (:data:`STAGES`); :func:`train_alternating` sets it.
        self.training_stage = "joint"

        # ------------------------------------------------------------------ parts
        if preprocessing is None:
            self.preprocessing = preprocess_for(backbone, backbone_weights)
        else:
            self.preprocessing = ImagePreprocessing(preprocessing, name="preprocessing")
        self.backbone = build_backbone(
            backbone, (*self.image_size, 3), weights=backbone_weights, **c["backbone_kwargs"]
        )
        backbone_strides = output_strides(self.backbone)
        first_level = backbone_strides[0].bit_length() - 1
        if neck == "fpn":
            self.neck = FPN(
                num_channels=c["num_channels"], min_level=first_level,
                max_level=first_level + len(backbone_strides), extra_from="pool", name="fpn",
            )  # fmt: skip
            self.level_strides = (*backbone_strides, 2 * backbone_strides[-1])
        else:
            self.neck = None
            self.level_strides = tuple(backbone_strides)
        self.anchor_generator = AnchorGenerator(
            c["anchor_sizes"], c["anchor_strides"], c["anchor_ratios"], c["anchor_scales"]
        )
        if tuple(self.anchor_generator.strides) != self.level_strides:
            raise ValueError(
                f"{owner}: the feature levels have strides {self.level_strides} but the anchors "
                f"{tuple(self.anchor_generator.strides)}: give one anchor size and stride per "
                "level."
            )
        self.rpn_head = RPNHead(
            self.anchor_generator.num_anchors_per_location, c["rpn_channels"], objectness,
            name="rpn_head",
        )  # fmt: skip
        self.box_head = FastRCNNHead(
            self.num_classes, c["head_hidden"], c["box_per_background"], name="box_head"
        )
        self.rpn_box_coder = rpn_box_coder()
        self.roi_box_coder = BoxCoder.from_weights(ROI_BOX_WEIGHTS)
        #: ``(N, 4)`` float32 xyxy anchors of ``image_size``, in the RPN's output order.
        self.anchors = self.anchor_generator(self.image_size)
        #: Anchors per level, Python ints.
        self.level_sizes = self.anchor_generator.level_sizes(self.image_size)
        self.build((None, *self.image_size, 3))

    # ------------------------------------------------------------------ construction

    def build(self, input_shape):
        levels = self.pyramid_spec(input_shape)
        shapes = [tuple(level.shape[1:3]) for level in levels]
        expected = [tuple(s) for s in self.anchor_generator.level_shapes(self.image_size)]
        if shapes != expected:
            raise ValueError(
                f"FasterRCNN: image_size {self.image_size} gives feature maps of {shapes} cells "
                f"but anchor grids of {expected} (ceil(size / stride)); a VGG trunk rounds down: "
                f"use an image size divisible by {max(self.level_strides)}."
            )
        if not self.rpn_head.built:
            self.rpn_head.build([level.shape for level in levels])
        if not self.box_head.built:
            size = self._config["roi_output_size"]
            channels = levels[0].shape[-1]
            self.box_head.build((None, size, size, channels))
        self.built = True

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "backbone_weights": None,  # a saved model restores its own weights
            **self._config,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ the network

    def trunk(self, images, training=False):
        """Images -> the feature levels of the RPN (VGG16: ``[C4]``; FPN: ``[P2, ..., P6]``)."""
        return self.pyramid(images, training=training)

    def rpn_outputs(self, levels):
        """Feature levels -> flattened RPN outputs: objectness ``(B, N)`` (or ``(B, N, 2)``) and
        deltas ``(B, N, 4)`` in the order of :attr:`anchors`."""
        objectness, deltas = self.rpn_head(levels)
        return flatten_rpn_outputs(objectness, deltas)

    def proposals(self, objectness, deltas, training=False):
        """RPN outputs -> padded proposals ``{"boxes": (B, P, 4), "scores": (B, P),
        "num_proposals": (B,)}`` with the train or test settings; no gradient."""
        pre, post = self.train_proposals if training else self.test_proposals
        return generate_proposals(
            self.anchors, objectness, deltas, self.image_size, self.rpn_box_coder,
            pre_nms_top_k=pre, post_nms_top_k=post,
            nms_threshold=self._config["proposal_nms_threshold"],
            min_size=self._config["proposal_min_size"],
            level_sizes=self.level_sizes if len(self.level_sizes) > 1 else None,
        )  # fmt: skip

    def pool_rois(self, levels, rois):
        """Padded RoIs ``(B, R, 4)`` xyxy -> pooled features ``(B, R, S, S, C)``."""
        c = self._config
        size, pooling = c["roi_output_size"], c["roi_pooling"]
        if pooling == "multiscale_align":
            roi_levels = [lv for lv, s in zip(levels, self.level_strides, strict=True) if s <= 32]
            first = self.level_strides[0].bit_length() - 1
            pooled = multiscale_roi_align(
                roi_levels, rois, None, output_size=size, sampling_ratio=c["sampling_ratio"],
                min_level=first, max_level=first + len(roi_levels) - 1,
            )  # fmt: skip
        elif pooling == "pool":
            pooled = roi_pool(
                levels[0], rois, None, output_size=size, spatial_scale=1.0 / self.level_strides[0]
            )
        else:
            pooled = roi_align(
                levels[0], rois, None, output_size=size, spatial_scale=1.0 / self.level_strides[0],
                sampling_ratio=c["sampling_ratio"],
            )  # fmt: skip
        # R is static (the proposal / sample count): keep it for the head's static shapes.
        return tf.reshape(pooled, (-1, rois.shape[1], size, size, levels[0].shape[-1]))

    def roi_head(self, levels, rois, training=False):
        """RoIs ``(B, R, 4)`` -> the detector head's class logits ``(B, R, N + 1)`` and box
        deltas ``(B, R, N, 4)``."""
        return self.box_head(self.pool_rois(levels, rois), training=training)

    def call(self, images, training=False):
        levels = self.trunk(images, training=training)
        objectness, deltas = self.rpn_outputs(levels)
        proposals = self.proposals(objectness, deltas, training=False)
        rois = proposals["boxes"]
        class_logits, box_deltas = self.roi_head(levels, rois, training=training)
        count = tf.shape(rois)[1]
        return {
            "rois": rois,
            "roi_mask": tf.range(count)[None, :] < proposals["num_proposals"][:, None],
            "class_logits": class_logits,
            "box_deltas": box_deltas,
        }

    # ------------------------------------------------------------------ training

    def _rpn_terms(self, levels, boxes, labels, seed):
        c = self._config
        objectness, deltas = self.rpn_outputs(levels)
        targets = rpn_targets(
            self.anchors, boxes, labels, self.image_size, self.rpn_box_coder, seed,
            positive_threshold=c["rpn_positive_threshold"],
            negative_threshold=c["rpn_negative_threshold"], num_samples=c["rpn_num_samples"],
            positive_fraction=c["rpn_positive_fraction"], allowed_border=c["allowed_border"],
        )  # fmt: skip
        locations = sum(h * w for h, w in self.anchor_generator.level_shapes(self.image_size))
        objectness_loss, box_loss = rpn_loss(
            targets.states, targets.box_targets, objectness, deltas,
            normalization=c["rpn_loss_normalization"], num_samples=c["rpn_num_samples"],
            num_locations=locations,
        )  # fmt: skip
        return objectness, deltas, objectness_loss, box_loss

    def _detector_terms(self, levels, proposals, boxes, labels, seed, training):
        c = self._config
        count = tf.shape(proposals["boxes"])[1]
        mask = tf.range(count)[None, :] < proposals["num_proposals"][:, None]
        targets = proposal_targets(
            proposals["boxes"], mask, boxes, labels, seed, self.num_classes, self.roi_box_coder,
            num_samples=c["roi_num_samples"], positive_fraction=c["roi_positive_fraction"],
            fg_threshold=c["roi_fg_threshold"], bg_threshold=c["roi_bg_threshold"],
        )  # fmt: skip
        class_logits, box_deltas = self.roi_head(levels, targets.rois, training=training)
        losses = fast_rcnn_loss(
            targets.class_targets, targets.box_targets, targets.valid, class_logits, box_deltas,
            beta=c["smooth_l1_beta"],
        )  # fmt: skip
        return losses["class_loss"], losses["box_loss"]

    def forward_with_loss(self, images, targets, training, seed):
        """Both stages and their four loss terms (see the module docstring); in the ``"rpn"``
        stage the detector is not run and its terms are 0, in the ``"detector"`` stage the RPN's
        terms are 0 (its outputs still give the proposals)."""
        if self.training_stage not in STAGES:
            raise ValueError(
                f"FasterRCNN.training_stage must be one of {STAGES}, got {self.training_stage!r}."
            )
        self.check_targets(targets)
        labels = self.checked_labels(targets["labels"])
        boxes = tf.cast(targets["boxes"], tf.float32)
        seed = tf.cast(seed, tf.int64)
        roi_seed = tf.stack([seed[0] + 1, seed[1]])  # another draw than the RPN's sampling
        zero = tf.zeros((), tf.float32)

        def trunk_rpn(images, boxes, labels, seed):
            levels = self.trunk(images, training=training)
            if self.training_stage == "detector":  # the RPN only proposes
                return (*self.rpn_outputs(levels), zero, zero, levels)
            return (*self._rpn_terms(levels, boxes, labels, seed), levels)

        objectness, deltas, rpn_objectness, rpn_box, levels = self.xla_part("trunk_rpn", trunk_rpn)(
            images, boxes, labels, seed
        )
        terms = {"rpn_objectness_loss": rpn_objectness, "rpn_box_loss": rpn_box}
        if self.training_stage == "rpn":
            terms.update(class_loss=zero, box_loss=zero)
            return None, terms
        proposals = self.proposals(objectness, deltas, training=True)

        def detector(levels, proposals, boxes, labels, seed):
            return self._detector_terms(levels, proposals, boxes, labels, seed, training)

        class_loss, box_loss = self.xla_part("roi_head", detector)(
            levels, proposals, boxes, labels, roi_seed
        )
        terms.update(class_loss=class_loss, box_loss=box_loss)
        return None, terms

    def loss_terms(self, y, y_pred):
        raise NotImplementedError(
            "FasterRCNN samples between its two stages: its loss is computed by "
            "forward_with_loss(images, targets, training, seed), not from call()'s outputs."
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The loss of a batch, ``x`` the images (``y_pred`` is not used: the detector samples
        its RoIs from the targets between the stages)."""
        self._reject_sample_weight(sample_weight)
        _, terms = self.forward_with_loss(x, y, training=training, seed=self.step_seed())
        return self.total_loss(terms, y)

    # ------------------------------------------------------------------ inference

    def detect(self, images):
        """Images -> padded detections: the trunk and RPN head (an XLA part under
        ``jit_compile``), the test proposals, the detector head (an XLA part), then per-class
        decoding and NMS."""
        levels_and_rpn = self.xla_part(
            "trunk_rpn_head",
            lambda x: (lambda lv: (lv, *self.rpn_outputs(lv)))(self.trunk(x, training=False)),
        )
        levels, objectness, deltas = levels_and_rpn(images)
        proposals = self.proposals(objectness, deltas, training=False)
        head = self.xla_part("roi_head", lambda lv, rois: self.roi_head(lv, rois, False))
        class_logits, box_deltas = head(levels, proposals["boxes"])
        count = tf.shape(proposals["boxes"])[1]
        return self.decode(
            {
                "rois": proposals["boxes"],
                "roi_mask": tf.range(count)[None, :] < proposals["num_proposals"][:, None],
                "class_logits": class_logits,
                "box_deltas": box_deltas,
            }
        )

    def decode(self, outputs):
        """``call``'s outputs -> padded detections (:func:`~dlnotes.models.roi_heads.
        detect_from_rois`: softmax, per-class boxes, clip, score and size thresholds, per-class
        NMS)."""
        c = self._config
        return detect_from_rois(
            outputs["rois"], outputs["roi_mask"], outputs["class_logits"],
            outputs["box_deltas"], self.image_size, self.roi_box_coder,
            score_threshold=c["score_threshold"], min_size=c["min_size"],
            nms_threshold=c["detection_nms_threshold"], max_detections=c["max_detections"],
        )  # fmt: skip


# ----------------------------------------------------------------------------- 4-step training

#: The paper's 4-step alternating training (:func:`train_alternating`): ``(stage, trunk
#: trainable)`` per step; the stage's own head is trained, the other head is frozen.
ALTERNATING_PLAN = (("rpn", True), ("detector", False), ("rpn", False), ("detector", False))


def train_alternating(
    model, dataset, steps, optimizer, jit_compile=False, verbose=0, callbacks=None
):
    """The paper's 4-step alternating training of a :class:`FasterRCNN`.

    1. the trunk and the RPN, on the RPN's losses;
    2. the detector head on the proposals of that RPN, trunk and RPN frozen;
    3. the RPN head fine-tuned, trunk and detector frozen;
    4. the detector head fine-tuned on the new proposals, trunk and RPN frozen.

    (In the paper, step 2 trains a separate detector with its own ImageNet-initialised trunk and
    step 3 takes that trunk over; here the trunk is shared from the start, so step 2 freezes it,
    as the notes prescribe: the detector needs stable, fixed proposals.) Each step compiles the
    model again with a fresh optimizer and runs ``fit`` for its number of steps. Layers the
    model had frozen (e.g. VGG16's first blocks) stay frozen; at the end every layer has its
    original ``trainable`` flag back and the model is in the ``"joint"`` stage.

    Args:
        model: a :class:`FasterRCNN`.
        dataset: a repeating ``tf.data.Dataset`` of ``(images, targets)`` batches.
        steps: four step counts, one per stage.
        optimizer: a function of no arguments returning a new Keras optimizer.
        jit_compile: passed to ``compile``.
        verbose, callbacks: passed to ``fit``.

    Returns:
        The four ``History.history`` dicts.
    """
    if not isinstance(model, FasterRCNN):
        raise ValueError(f"train_alternating: expected a FasterRCNN, got {type(model).__name__}.")
    steps = [positive_int(s, "steps", "train_alternating") for s in steps]
    if len(steps) != 4:
        raise ValueError(f"train_alternating: steps must be 4 step counts, got {steps}.")
    trunk = [model.backbone] + ([model.neck] if model.neck is not None else [])
    # Every layer's own flag (Keras' _flatten_layers walks the nested layers), to restore it.
    flags = {id(layer): layer.trainable for layer in model._flatten_layers()}
    histories = []
    try:
        for (stage, trunk_trainable), count in zip(ALTERNATING_PLAN, steps, strict=True):
            for part in trunk:
                for layer in part._flatten_layers():
                    layer.trainable = trunk_trainable and flags[id(layer)]
            for part, trainable in ((model.rpn_head, stage == "rpn"), (model.box_head, stage == "detector")):  # fmt: skip
                for layer in part._flatten_layers():
                    layer.trainable = trainable and flags[id(layer)]
            model.training_stage = stage
            model.compile(optimizer=optimizer(), jit_compile=jit_compile)
            history = model.fit(
                dataset, steps_per_epoch=count, epochs=1, verbose=verbose, callbacks=callbacks
            )
            histories.append(history.history)
    finally:
        for layer in model._flatten_layers():
            layer.trainable = flags[id(layer)]
        model.training_stage = "joint"
    return histories
