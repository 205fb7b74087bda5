"""RetinaNet (Lin et al. 2017): a backbone, an FPN, shared class / box subnets and the focal loss.

The notes' design (seed ``000``), end to end:

* backbone C3-C5 (:mod:`dlnotes.backbones`) -> FPN P3-P7 (:mod:`dlnotes.necks`);
* two subnets shared across levels but separate from each other, each ``depth`` x (3x3 conv,
  ``channels``, ReLU) then a 3x3 output conv; per level they give class logits ``[B, H, W, A, C]``
  and box deltas ``[B, H, W, A, 4]`` (``tx, ty, tw, th``), flattened over levels (anchor order of
  :class:`~dlnotes.anchors.AnchorGenerator`) to ``(B, N, C)`` / ``(B, N, 4)`` for the loss;
* weights N(0, 0.01), the class output's bias ``-log((1 - pi) / pi)`` with ``pi = 0.01`` (the
  prior probability: every anchor starts out predicting "background" with confidence 0.99);
* targets built inside the training graph from padded ``{"boxes", "labels"}``: GT boxes clipped
  to the image, then :func:`~dlnotes.matching.match_anchors` (positive >= 0.5, negative < 0.4,
  each GT's best anchor forced; padding and zero-size boxes are not GTs), deltas by
  :class:`~dlnotes.boxes.BoxCoder` with std 0.2, one-hot class targets;
* sigmoid focal loss (alpha 0.25, gamma 2) over positive and negative anchors plus smooth-L1 over
  positives, both divided by ``max(1, positives in the global batch)``
  (:func:`~dlnotes.losses.global_normalizer`, summed across replicas);
* ``predict`` keeps the 1000 top-scoring anchors of every pyramid level (the paper's "at most 1k
  top-scoring predictions per FPN level"), decodes them and runs per-class NMS (score 0.05,
  IoU 0.5, up to 300 detections) through :func:`~dlnotes.postprocess.decode_detections`,
  returning padded detections.

Everything has static shapes (fixed ``image_size``, padded targets), so ``compile(jit_compile=True)``
compiles the whole training step with XLA. The Keras contract (no ``loss`` in ``compile``, label
checks that also work under XLA, global-batch loss logs, ``predict`` with NMS outside XLA) is
:class:`~dlnotes.models.detector.Detector`'s, shared by every detector of the book.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from dlnotes.anchors import AnchorGenerator
from dlnotes.backbones import ImagePreprocessing, build_backbone, preprocess_for
from dlnotes.boxes import IOU_KINDS, BoxCoder
from dlnotes.losses import global_normalizer, huber, iou_loss, sigmoid_focal_loss, smooth_l1
from dlnotes.matching import POSITIVE, AnchorLabelEncoder
from dlnotes.models.detector import Detector
from dlnotes.necks import build_neck
from dlnotes.postprocess import decode_detections

__all__ = ["BOX_LOSSES", "PRESETS", "RetinaNet", "RetinaNetHead", "flatten_levels", "prior_bias"]

#: Box regression losses of :class:`RetinaNet` (``box_loss=``).
BOX_LOSSES = ("smooth_l1", "huber")


def prior_bias(prior_probability):
    """The class-output bias ``-log((1 - pi) / pi)``: sigmoid(bias) = ``pi`` at initialisation."""
    if not 0.0 < prior_probability < 1.0:
        raise ValueError(f"prior_probability must be in (0, 1), got {prior_probability!r}.")
    return -math.log((1.0 - prior_probability) / prior_probability)


def flatten_levels(level_outputs):
    """Per-level head outputs ``[(B, H_l, W_l, A, K), ...]`` -> ``(B, N, K)``, ``N = sum H_l W_l A``.

    Each level is flattened row-major over ``(H_l, W_l, A)`` and the levels are concatenated from
    the finest (P3) to the coarsest: exactly the anchor order of
    :class:`~dlnotes.anchors.AnchorGenerator` (cell ``(i, j)`` row-major, anchor index fastest).
    Spatial sizes must be static.
    """
    flat = []
    for o in level_outputs:
        height, width, anchors, k = o.shape[1:]
        flat.append(ops.reshape(o, (-1, height * width * anchors, k)))
    return ops.concatenate(flat, axis=1)


@keras.saving.register_keras_serializable(package="dlnotes")
class RetinaNetHead(keras.layers.Layer):
    """One RetinaNet subnet, applied with the same weights to every pyramid level.

    ``depth`` x (3x3 conv with ``channels`` filters + ReLU), then a 3x3 conv to
    ``num_anchors * num_outputs`` channels, reshaped to ``(B, H, W, num_anchors, num_outputs)``
    (output channel ``a * num_outputs + k`` is anchor ``a``, output ``k``). Kernels N(0, 0.01),
    biases 0, except the output bias ``prior_bias(prior_probability)`` when ``prior_probability``
    is given (the classification subnet). No normalisation layers (the paper's heads; GroupNorm
    heads are torchvision's later "v2").

    Parameters: ``depth * (9 * c_in * channels + channels)`` (with ``c_in = channels`` after the
    first conv) plus ``9 * channels * A * K + A * K`` for the output conv.

    Call on a list of levels ``(B, H_l, W_l, F)``; returns the list of
    ``(B, H_l, W_l, num_anchors, num_outputs)`` outputs.
    """

    def __init__(
        self, num_anchors, num_outputs, channels=256, depth=4, prior_probability=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.num_outputs = int(num_outputs)
        self.channels = int(channels)
        self.depth = int(depth)
        self.prior_probability = prior_probability
        init = keras.initializers.RandomNormal(mean=0.0, stddev=0.01)
        self.convs = [
            keras.layers.Conv2D(
                self.channels, 3, padding="same", activation="relu", kernel_initializer=init,
                name=f"conv{i + 1}",
            )
            for i in range(self.depth)
        ]  # fmt: skip
        bias = 0.0 if prior_probability is None else prior_bias(prior_probability)
        self.output_conv = keras.layers.Conv2D(
            self.num_anchors * self.num_outputs, 3, padding="same", kernel_initializer=init,
            bias_initializer=keras.initializers.Constant(bias), name="output",
        )  # fmt: skip

    def build(self, input_shape):
        channels = input_shape[0][-1]
        for conv in self.convs:
            conv.build((None, None, None, channels))
            channels = self.channels
        self.output_conv.build((None, None, None, channels))

    def call(self, levels):
        outputs = []
        for x in levels:
            for conv in self.convs:
                x = conv(x)
            x = self.output_conv(x)
            height, width = x.shape[1], x.shape[2]
            outputs.append(ops.reshape(x, (-1, height, width, self.num_anchors, self.num_outputs)))
        return outputs

    def compute_output_shape(self, input_shape):
        return [tuple(s[:3]) + (self.num_anchors, self.num_outputs) for s in input_shape]

    def get_config(self):
        return {
            **super().get_config(),
            "num_anchors": self.num_anchors,
            "num_outputs": self.num_outputs,
            "channels": self.channels,
            "depth": self.depth,
            "prior_probability": self.prior_probability,
        }


#: Named configurations for :meth:`RetinaNet.from_preset`. The paper's model and small ones that
#: train on a CPU; anchor sizes follow the input size (32-512 for ~512 px inputs, halved at 256).
PRESETS = {
    "retinanet_resnet50_fpn": dict(
        backbone="resnet50", neck="fpn", num_channels=256, head_depth=4, image_size=(512, 512)
    ),
    "retinanet_resnet18_fpn": dict(
        backbone="resnet18", neck="fpn", num_channels=256, head_depth=4, image_size=(512, 512)
    ),
    "retinanet_resnet18_fpn_bn_256": dict(
        backbone="resnet18", neck="fpn_bn", num_channels=128, head_depth=2, image_size=(256, 256),
        anchor_sizes=(16, 32, 64, 128, 256),
    ),
    "retinanet_tiny_256": dict(
        backbone="resnet_tiny", neck="fpn_bn", num_channels=64, head_depth=2, image_size=(256, 256),
        anchor_sizes=(16, 32, 64, 128, 256),
    ),
}  # fmt: skip


def _part(value):
    """A part given as a serialised config (from ``get_config``) -> the object."""
    if isinstance(value, dict) and "class_name" in value:
        return keras.saving.deserialize_keras_object(value)
    return value


@keras.saving.register_keras_serializable(package="dlnotes")
class RetinaNet(Detector):
    """RetinaNet detector: images ``(B, H, W, 3)`` RGB in [0, 255] -> class logits and box deltas.

    ``call`` returns ``{"class_logits": (B, N, C), "box_deltas": (B, N, 4)}`` over the ``N``
    anchors of ``image_size`` (:attr:`anchors`, xyxy pixels); ``predict`` returns padded detections
    ``{"boxes": (B, D, 4) xyxy, "scores": (B, D), "labels": (B, D), "num_detections": (B,)}``.
    ``fit`` / ``evaluate`` take ``(images, {"boxes": (B, M, 4) xyxy, "labels": (B, M)})`` padded
    with -1 and report ``loss``, ``class_loss`` and ``box_loss`` (global-batch values, so
    ``loss = class_loss + box_loss_weight * box_loss`` plus any regularisation); ``compile``
    takes no ``loss`` or ``metrics`` (the detection loss is built in; mAP comes from
    :mod:`dlnotes.evaluation`). ``sample_weight`` / ``class_weight`` are not supported.

    **Parts.** The model is a backbone, a neck, a class head and a box head, an anchor
    generator, a box coder and a label encoder (the target assigner). Each can be given as an
    object — a Keras model / layer, an :class:`~dlnotes.anchors.AnchorGenerator`, a
    :class:`~dlnotes.boxes.BoxCoder`, an :class:`~dlnotes.matching.AnchorLabelEncoder` — which
    ``get_config`` serialises; the flat arguments below build the default parts and stay in the
    config when they did. EfficientDet (:mod:`dlnotes.models.efficientdet`) is this model with
    other parts.

    Args:
        num_classes: number of object classes (no background class: sigmoid per class).
        image_size: static input ``(height, width)``; anchors are fixed for it.
        backbone: a name of :data:`dlnotes.backbones.BACKBONES` (``backbone_kwargs`` its knobs),
            or a backbone model returning ``[C3, C4, C5]`` (then give ``preprocessing``).
        backbone_weights: None, ``"imagenet"`` (downloads) or a weights file, for a backbone
            name. Only used at construction: a saved model restores its own weights.
        preprocessing: an :class:`~dlnotes.backbones.ImagePreprocessing` mode; default the
            backbone's (:func:`~dlnotes.backbones.preprocess_for`).
        neck: a name of :data:`dlnotes.necks.NECKS` with levels P3-P7 (``neck_kwargs`` for its
            options, e.g. ``{"extra_from": "p5"}``) or a neck layer; ``num_channels`` is the
            named neck's width and the default subnets' width.
        class_head, box_head: layers mapping the list of levels to per-level
            ``(B, H_l, W_l, A, C)`` / ``(B, H_l, W_l, A, 4)`` outputs; default
            :class:`RetinaNetHead` with ``head_depth`` 3x3 convs (4 in the paper).
        anchor_generator: default :class:`~dlnotes.anchors.AnchorGenerator` of ``anchor_sizes``,
            ``anchor_strides``, ``anchor_ratios``, ``anchor_scales`` (keras-retinanet's).
        box_coder: default :class:`~dlnotes.boxes.BoxCoder` with std ``box_std`` (0.2, the
            notes' COCO normalisation).
        label_encoder: default :class:`~dlnotes.matching.AnchorLabelEncoder` of
            ``positive_threshold``, ``negative_threshold``, ``force_best``.
        prior_probability: pi of the default class head's output bias; None for a zero bias.
        focal_alpha, focal_gamma: the sigmoid focal loss.
        box_loss: ``"smooth_l1"`` (``smooth_l1_beta``, the paper's) or ``"huber"`` (``huber_delta``,
            automl's EfficientDet loss, which divides by 4 x positives: the mean over coordinates),
            summed over positive anchors, divided by the global number of positives.
        box_loss_weight: weight of the box loss in the total.
        iou_loss, iou_loss_weight: an optional extra box loss on decoded boxes, ``"giou"`` /
            ``"diou"`` / ``"ciou"`` (:func:`~dlnotes.losses.iou_loss`) over positives, logged as
            ``iou_loss``.
        score_threshold, iou_threshold, max_detections: post-processing (per-class NMS).
        pre_nms_top_k: anchors kept per pyramid level, by their best class score, before NMS
            (the paper's 1000); None keeps all.
    """

    presets = PRESETS

    def __init__(
        self,
        num_classes,
        image_size=(512, 512),
        backbone="resnet50",
        backbone_kwargs=None,
        backbone_weights=None,
        neck="fpn",
        num_channels=256,
        head_depth=4,
        anchor_sizes=(32, 64, 128, 256, 512),
        anchor_strides=(8, 16, 32, 64, 128),
        anchor_ratios=(0.5, 1.0, 2.0),
        anchor_scales=(2**0, 2 ** (1 / 3), 2 ** (2 / 3)),
        prior_probability=0.01,
        positive_threshold=0.5,
        negative_threshold=0.4,
        force_best="global",
        box_std=(0.2, 0.2, 0.2, 0.2),
        focal_alpha=0.25,
        focal_gamma=2.0,
        smooth_l1_beta=1.0 / 9.0,
        box_loss_weight=1.0,
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=300,
        pre_nms_top_k=1000,
        neck_kwargs=None,
        preprocessing=None,
        class_head=None,
        box_head=None,
        anchor_generator=None,
        box_coder=None,
        label_encoder=None,
        box_loss="smooth_l1",
        huber_delta=0.1,
        iou_loss=None,
        iou_loss_weight=1.0,
        **kwargs,
    ):
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}.")
        if iou_loss not in (None, *IOU_KINDS):
            raise ValueError(f"iou_loss must be None or one of {IOU_KINDS}, got {iou_loss!r}.")
        terms = ("class_loss", "box_loss") + (("iou_loss",) if iou_loss else ())
        super().__init__(
            num_classes,
            loss_terms=terms,
            term_weights={"box_loss": float(box_loss_weight), "iou_loss": float(iou_loss_weight)},
            **kwargs,
        )
        self.image_size = tuple(int(v) for v in image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width), got {image_size!r}.")
        # Parts given as objects are serialised by get_config; the others by their arguments.
        self._given_parts = {}
        parts = {
            "backbone": backbone, "neck": neck, "class_head": class_head, "box_head": box_head,
            "anchor_generator": anchor_generator, "box_coder": box_coder,
            "label_encoder": label_encoder,
        }  # fmt: skip
        for name, value in parts.items():
            value = _part(value)
            parts[name] = value
            if value is not None and not isinstance(value, str):
                self._given_parts[name] = value
        self.backbone_name = parts["backbone"] if isinstance(parts["backbone"], str) else None
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.neck_name = parts["neck"] if isinstance(parts["neck"], str) else None
        self.neck_kwargs = dict(neck_kwargs or {})
        self.num_channels = int(num_channels)
        self.head_depth = int(head_depth)
        self.anchor_generator = parts["anchor_generator"] or AnchorGenerator(
            anchor_sizes, anchor_strides, anchor_ratios, anchor_scales
        )
        self.prior_probability = prior_probability
        self.label_encoder = parts["label_encoder"] or AnchorLabelEncoder(
            positive_threshold, negative_threshold, force_best
        )
        self.box_coder = parts["box_coder"] or BoxCoder(std=box_std)
        self.focal_alpha = focal_alpha
        self.focal_gamma = float(focal_gamma)
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.huber_delta = float(huber_delta)
        self.box_loss_weight = float(box_loss_weight)
        self.iou_loss = iou_loss
        self.iou_loss_weight = float(iou_loss_weight)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        if pre_nms_top_k is not None and int(pre_nms_top_k) < 1:
            raise ValueError(
                f"pre_nms_top_k must be a positive integer or None, got {pre_nms_top_k!r}."
            )
        self.pre_nms_top_k = None if pre_nms_top_k is None else int(pre_nms_top_k)

        if self.backbone_name is not None:
            self.preprocessing = (
                preprocess_for(self.backbone_name, backbone_weights)
                if preprocessing is None
                else ImagePreprocessing(preprocessing, name=f"{self.backbone_name}_preprocessing")
            )
            self.backbone = build_backbone(
                self.backbone_name, (*self.image_size, 3), weights=backbone_weights,
                **self.backbone_kwargs,
            )  # fmt: skip
        else:
            if preprocessing is None:
                raise ValueError(
                    "RetinaNet: a backbone given as a model needs preprocessing= (an "
                    f"ImagePreprocessing mode, one of {ImagePreprocessing.MODES})."
                )
            self.preprocessing = ImagePreprocessing(preprocessing, name="preprocessing")
            self.backbone = parts["backbone"]
        self._preprocessing_mode = preprocessing
        if self.neck_name is not None:
            self.neck = build_neck(
                self.neck_name, num_channels=self.num_channels, **self.neck_kwargs
            )
        else:
            self.neck = parts["neck"]
        strides = tuple(2**level for level in self.neck.levels)
        if strides != tuple(self.anchor_generator.strides):
            raise ValueError(
                f"neck {self.neck_name or type(self.neck).__name__!r} gives levels of strides "
                f"{strides}, but the anchors have strides {tuple(self.anchor_generator.strides)}."
            )
        num_anchors = self.anchor_generator.num_anchors_per_location
        self.class_head = parts["class_head"] or RetinaNetHead(
            num_anchors, self.num_classes, self.num_channels, self.head_depth,
            prior_probability=prior_probability, name="class_subnet",
        )  # fmt: skip
        self.box_head = parts["box_head"] or RetinaNetHead(
            num_anchors, 4, self.num_channels, self.head_depth, name="box_subnet"
        )
        #: ``(N, 4)`` float32 xyxy anchors of ``image_size``, in the order of the outputs.
        self.anchors = self.anchor_generator(self.image_size)
        #: Anchors per pyramid level (P3 first), Python ints summing to ``N``.
        self.level_sizes = self.anchor_generator.level_sizes(self.image_size)
        self.build((None, *self.image_size, 3))
        self._check_head_outputs(num_anchors)

    # ------------------------------------------------------------------ construction

    def _check_head_outputs(self, num_anchors):
        """The heads must give ``A`` anchors of ``C`` classes / 4 deltas per cell."""
        levels = self.neck.compute_output_spec(
            self.backbone.compute_output_spec(keras.KerasTensor((1, *self.image_size, 3)))
        )
        for head, k in ((self.class_head, self.num_classes), (self.box_head, 4)):
            shapes = [tuple(o.shape[-2:]) for o in head.compute_output_spec(levels)]
            if any(shape != (num_anchors, k) for shape in shapes):
                raise ValueError(
                    f"RetinaNet: head {head.name!r} gives per-cell outputs {shapes}, expected "
                    f"{(num_anchors, k)} (anchors per location, outputs) on every level."
                )

    def build(self, input_shape):
        levels = self.pyramid_spec(input_shape)
        for head in (self.class_head, self.box_head):
            if not head.built:
                head.build([level.shape for level in levels])
        self.built = True

    def get_config(self):
        generator = self.anchor_generator
        encoder = self.label_encoder
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "backbone": self.backbone_name,
            "backbone_kwargs": self.backbone_kwargs,
            "backbone_weights": None,  # a saved model restores its own weights
            "neck": self.neck_name,
            "num_channels": self.num_channels,
            "head_depth": self.head_depth,
            "anchor_sizes": list(generator.sizes),
            "anchor_strides": list(generator.strides),
            "anchor_ratios": list(generator.ratios),
            "anchor_scales": list(generator.scales),
            "prior_probability": self.prior_probability,
            "positive_threshold": encoder.positive_threshold,
            "negative_threshold": encoder.negative_threshold,
            "force_best": encoder.force_best,
            "box_std": list(self.box_coder.std),
            "focal_alpha": self.focal_alpha,
            "focal_gamma": self.focal_gamma,
            "smooth_l1_beta": self.smooth_l1_beta,
            "box_loss_weight": self.box_loss_weight,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "pre_nms_top_k": self.pre_nms_top_k,
            "neck_kwargs": self.neck_kwargs,
        }
        # Arguments beyond the paper's model: in the config only when they differ from it, so
        # that the configuration of a plain RetinaNet reads as it always has.
        extras = {
            "preprocessing": (self._preprocessing_mode, None),
            "box_loss": (self.box_loss, "smooth_l1"),
            "huber_delta": (self.huber_delta, 0.1),
            "iou_loss": (self.iou_loss, None),
            "iou_loss_weight": (self.iou_loss_weight, 1.0),
        }
        config.update({k: v for k, (v, default) in extras.items() if v != default})
        for name, part in self._given_parts.items():
            config[name] = keras.saving.serialize_keras_object(part)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ forward

    def head_outputs(self, images, training=False):
        """Per-level outputs in the notes' layout: lists of class logits ``(B, H, W, A, C)`` and
        box deltas ``(B, H, W, A, 4)``, one entry per pyramid level P3..P7."""
        levels = self.pyramid(images, training=training)
        return self.class_head(levels), self.box_head(levels)

    def call(self, images, training=False):
        class_levels, box_levels = self.head_outputs(images, training=training)
        return {
            "class_logits": flatten_levels(class_levels),
            "box_deltas": flatten_levels(box_levels),
        }

    # ------------------------------------------------------------------ training

    def compute_targets(self, boxes, labels):
        """Anchor states and regression / class targets for padded GT, inside the graph, by the
        model's :attr:`label_encoder` (:class:`~dlnotes.matching.AnchorLabelEncoder`).

        GT boxes are clipped to the image first: a box partly outside is matched on its visible
        part, a box fully outside (or of zero size, or with label -1) is no GT at all. Labels
        outside ``[-1, num_classes)`` raise ``InvalidArgumentError`` through graph assertions
        that the targets depend on; XLA drops assertions, so inside your own
        ``tf.function(jit_compile=True)`` validate the labels beforehand (``fit`` and
        ``evaluate`` do it for you, see the module docstring).

        Args:
            boxes: ``(B, M, 4)`` xyxy GT boxes padded with -1; labels ``(B, M)``, padding -1.

        Returns:
            dict of ``states`` ``(B, N)`` int32 {-1, 0, 1}, ``class_targets`` ``(B, N, C)``
            one-hot (zero rows for negatives and ignored anchors), ``box_targets`` ``(B, N, 4)``
            normalised deltas (zero except on positives) and ``matched_iou`` ``(B, N)``.
        """
        return self.label_encoder(
            self.anchors, boxes, self.checked_labels(labels), self.num_classes, self.box_coder,
            self.image_size, self.level_sizes,
        )  # fmt: skip

    def detection_losses(self, y, y_pred):
        """``(class_loss, box_loss)``: summed focal / smooth-L1 losses over the replica's batch,
        divided by the number of positive anchors of the global batch (at least 1).

        ``y`` is ``{"boxes": (B, M, 4), "labels": (B, M)}``, ``y_pred`` the dict of ``call``.
        Under ``tf.distribute`` each replica returns its share: the sum over replicas is the
        global-batch loss.
        """
        self.check_targets(y)
        if not isinstance(y_pred, dict) or not {"class_logits", "box_deltas"} <= set(y_pred):
            raise ValueError(
                'RetinaNet predictions must be the dict of call(): {"class_logits", '
                f'"box_deltas"}}, got {type(y_pred).__name__}.'
            )
        targets = self.compute_targets(y["boxes"], y["labels"])
        states = targets["states"]
        positive = tf.cast(tf.equal(states, POSITIVE), tf.float32)
        counted = tf.cast(tf.not_equal(states, -1), tf.float32)  # positives and negatives
        class_logits = tf.cast(y_pred["class_logits"], tf.float32)
        box_deltas = tf.cast(y_pred["box_deltas"], tf.float32)
        focal = sigmoid_focal_loss(
            targets["class_targets"], class_logits, self.focal_alpha, self.focal_gamma,
            hard_labels=True,
        )  # fmt: skip
        class_sum = tf.reduce_sum(tf.reduce_sum(focal, axis=-1) * counted)
        box_sum = tf.reduce_sum(
            tf.reduce_sum(self.box_regression_loss(targets["box_targets"], box_deltas), -1)
            * positive
        )
        normalizer = global_normalizer(tf.reduce_sum(positive))
        return class_sum / normalizer, box_sum / normalizer

    def box_regression_loss(self, box_targets, box_deltas):
        """Elementwise loss of the deltas: smooth-L1 (the paper) or Huber / 4 (automl's
        EfficientDet, whose box loss is divided by 4 x positives)."""
        if self.box_loss == "huber":
            return huber(box_targets, box_deltas, self.huber_delta) / 4.0
        return smooth_l1(box_targets, box_deltas, self.smooth_l1_beta)

    def box_iou_loss(self, y, y_pred):
        """``iou_loss`` term: the IoU loss of the decoded boxes of the positive anchors against
        their GT boxes, summed and divided by the global number of positives."""
        targets = self.compute_targets(y["boxes"], y["labels"])
        positive = tf.cast(tf.equal(targets["states"], POSITIVE), tf.float32)
        deltas = tf.cast(y_pred["box_deltas"], tf.float32)
        boxes = self.box_coder.decode(self.anchors, deltas)
        # Decoding the targets gives each positive anchor its (clipped) GT box back.
        gt = self.box_coder.decode(self.anchors, targets["box_targets"])
        losses = iou_loss(tf.stop_gradient(gt), boxes, kind=self.iou_loss)
        losses = tf.where(positive > 0, losses, 0.0)
        return tf.reduce_sum(losses) / global_normalizer(tf.reduce_sum(positive))

    def loss_terms(self, y, y_pred):
        class_loss, box_loss = self.detection_losses(y, y_pred)
        terms = {"class_loss": class_loss, "box_loss": box_loss}
        if self.iou_loss:
            terms["iou_loss"] = self.box_iou_loss(y, y_pred)
        return terms

    # ------------------------------------------------------------------ inference

    def decode(self, outputs):
        """Head outputs (``call``'s dict) -> padded detections.

        Keeps the ``pre_nms_top_k`` anchors of every pyramid level with the highest best-class
        logit (the paper's per-level 1k), decodes their deltas, clips to the image and runs
        per-class NMS. Returns ``{"boxes": (B, D, 4) xyxy, "scores": (B, D), "labels": (B, D),
        "num_detections": (B,)}``, ``D = max_detections``, padded with -1.
        """
        class_logits = tf.cast(outputs["class_logits"], tf.float32)
        box_deltas = tf.cast(outputs["box_deltas"], tf.float32)
        anchors = self.anchors
        if self.pre_nms_top_k is not None and self.pre_nms_top_k < max(self.level_sizes):
            best = tf.reduce_max(class_logits, axis=-1)  # sigmoid is monotonic: rank by logits
            batch = tf.shape(best)[0]
            keep, start = [], 0
            for size in self.level_sizes:  # a static loop over the pyramid levels
                if size > self.pre_nms_top_k:
                    _, top = tf.math.top_k(best[:, start : start + size], k=self.pre_nms_top_k)
                    keep.append(top + start)
                else:
                    keep.append(tf.broadcast_to(tf.range(start, start + size)[None], [batch, size]))
                start += size
            keep = tf.concat(keep, axis=1)  # (B, K)
            class_logits = tf.gather(class_logits, keep, axis=1, batch_dims=1)
            box_deltas = tf.gather(box_deltas, keep, axis=1, batch_dims=1)
            anchors = tf.gather(self.anchors, keep)  # (B, K, 4): per-image anchors
        return decode_detections(
            anchors,
            box_deltas,
            class_logits,
            self.box_coder,
            image_shape=self.image_size,
            activation="sigmoid",
            score_threshold=self.score_threshold,
            iou_threshold=self.iou_threshold,
            max_detections=self.max_detections,
        )
