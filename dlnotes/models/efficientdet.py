"""EfficientDet (Tan, Pang & Le 2020): RetinaNet's family with an EfficientNet backbone, a BiFPN
and shared separable-conv heads.

The notes' design (seed ``002``), as google/automl builds it:

* backbone EfficientNet-B\\ *x* C3-C5 (:mod:`dlnotes.backbones.efficientnet`, blocks only, no top
  conv) -> BiFPN P3-P7 (:class:`~dlnotes.necks.bifpn.BiFPN`: extra levels by 1x1 conv-BN and
  max pooling, weighted fusion, ``D_bifpn`` repeats of width ``W_bifpn``);
* class and box heads shared across levels (:class:`EfficientDetHead`): ``depth`` x (3x3
  separable conv with bias -> BatchNorm *of that level* -> swish), then a 3x3 separable output
  conv; the class output's bias is the prior ``-log((1 - 0.01) / 0.01)``;
* anchors of automl: scale 4 (``anchor size = 4 x stride``), 3 octave scales ``2^(k/3)`` and
  aspect ratios 1, 2, 0.5 given as ``w / h`` (:class:`~dlnotes.anchors.AnchorGenerator` takes
  ``h / w``: the same set); foreground / background only: an anchor is positive at IoU >= 0.5 and
  negative below, with no ignore band (:class:`~dlnotes.matching.AnchorLabelEncoder` ``(0.5,
  0.5)``), each GT's best anchor forced; deltas unnormalised (std 1) in automl's ``(ty, tx, th,
  tw)`` order (:class:`~dlnotes.boxes.BoxCoder` ``order="yx"``);
* sigmoid focal loss with alpha 0.25, gamma 1.5, Huber loss (delta 0.1) on the deltas weighted
  50, both normalised by the global number of positives (the box loss by 4 x positives, as
  automl), and optionally a box IoU loss (``iou_loss="giou"`` / ``"ciou"``).

Everything else — in-graph targets, the global loss normaliser, per-level top-k, NMS, padded
detections, the input checks and XLA — is :class:`~dlnotes.models.retinanet.RetinaNet`'s: an
EfficientDet *is* a RetinaNet whose parts are given as objects.

Two differences from automl, both documented where they live: anchors are ordered ratio-major per
location (automl: scale-major) — a permutation of the head's output channels; and the BiFPN
resamples odd sizes by repeat-and-crop (identical for inputs divisible by 128, which EfficientDet
requires).
"""

from __future__ import annotations

import keras
from keras import ops

from dlnotes.anchors import AnchorGenerator
from dlnotes.boxes import BoxCoder
from dlnotes.checks import check_num_classes, positive_int
from dlnotes.matching import AnchorLabelEncoder
from dlnotes.models.retinanet import RetinaNet, _part, prior_bias
from dlnotes.necks import build_neck
from dlnotes.necks.bifpn import EFFICIENTDET_SCALING, BiFPN

__all__ = ["PRESETS", "EfficientDet", "EfficientDetHead"]


def _separable(filters, bias_initializer, name, dtype):
    # automl: SeparableConv2D with depth multiplier 1, VarianceScaling on both kernels, a bias.
    return keras.layers.SeparableConv2D(
        filters, 3, padding="same", depthwise_initializer=keras.initializers.VarianceScaling(),
        pointwise_initializer=keras.initializers.VarianceScaling(),
        bias_initializer=bias_initializer, dtype=dtype, name=name,
    )  # fmt: skip


@keras.saving.register_keras_serializable(package="dlnotes")
class EfficientDetHead(keras.layers.Layer):
    """EfficientDet's class / box net, shared across pyramid levels (automl's ``ClassNet`` /
    ``BoxNet``).

    ``depth`` x (3x3 separable conv with bias -> BatchNorm -> swish), then a 3x3 separable conv to
    ``num_anchors * num_outputs`` channels reshaped to ``(B, H, W, num_anchors, num_outputs)``.
    The convs are shared by every level, the BatchNorms are not: each level has its own
    (``num_levels`` x ``depth`` of them), because the statistics of P3 and P7 differ. With
    ``survival_prob`` (automl's ``None`` by default) every conv block after the first adds its
    input back after drop-connect, as automl's heads do then.

    Parameters: per block ``9 c_in + c_in c + c`` (depthwise, pointwise, bias) and
    ``4 c`` per level for the BatchNorms (2 trainable); the output ``9 c + c A K + A K``.

    Args:
        num_anchors, num_outputs: ``A`` and ``K`` (classes, or 4 deltas).
        channels: ``c``, the BiFPN width; depth: the head depth.
        num_levels: pyramid levels the head is applied to (one BN set each).
        prior_probability: pi of the output bias (the class net); None for a zero bias.
        survival_prob: None, or the probability of keeping a block's residual branch.
        norm_momentum, norm_epsilon: of the BatchNorms (automl's 0.99 / 1e-3).

    Call on the list of levels ``(B, H_l, W_l, F)``; returns the list of
    ``(B, H_l, W_l, num_anchors, num_outputs)`` outputs.
    """

    def __init__(
        self,
        num_anchors,
        num_outputs,
        channels=64,
        depth=3,
        num_levels=5,
        prior_probability=None,
        survival_prob=None,
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.num_anchors = positive_int(num_anchors, "num_anchors", owner)
        self.num_outputs = positive_int(num_outputs, "num_outputs", owner)
        self.channels = positive_int(channels, "channels", owner)
        self.depth = positive_int(depth, "depth", owner)
        self.num_levels = positive_int(num_levels, "num_levels", owner)
        self.prior_probability = prior_probability
        if survival_prob is not None and not 0.0 < float(survival_prob) <= 1.0:
            raise ValueError(f"{owner}: survival_prob must be in (0, 1], got {survival_prob!r}.")
        self.survival_prob = survival_prob
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        zeros = keras.initializers.Zeros()
        self.convs = [
            _separable(self.channels, zeros, f"conv{i + 1}", self.dtype_policy)
            for i in range(self.depth)
        ]
        self.norms = [
            [
                keras.layers.BatchNormalization(
                    momentum=self.norm_momentum,
                    epsilon=self.norm_epsilon,
                    dtype=self.dtype_policy,
                    name=f"bn{i + 1}_level{level}",
                )  # fmt: skip
                for i in range(self.depth)
            ]
            for level in range(self.num_levels)
        ]
        self.drops = []
        if survival_prob is not None:
            rate = 1.0 - float(survival_prob)
            self.drops = [
                keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"drop{i + 1}")
                for i in range(self.depth)
            ]
        bias = 0.0 if prior_probability is None else prior_bias(prior_probability)
        self.output_conv = _separable(
            self.num_anchors * self.num_outputs, keras.initializers.Constant(bias), "output",
            self.dtype_policy,
        )  # fmt: skip

    def build(self, input_shape):
        if len(input_shape) != self.num_levels:
            raise ValueError(
                f"{type(self).__name__}: built for {self.num_levels} levels, got "
                f"{len(input_shape)} inputs."
            )
        channels = input_shape[0][-1]
        for conv in self.convs:
            conv.build((None, None, None, channels))
            channels = self.channels
        for level_norms in self.norms:
            for norm in level_norms:
                norm.build((None, None, None, self.channels))
        self.output_conv.build((None, None, None, channels))

    def call(self, levels, training=None):
        outputs = []
        for level, x in enumerate(levels):
            for i, conv in enumerate(self.convs):
                y = ops.silu(self.norms[level][i](conv(x), training=training))
                if self.drops and i > 0:
                    y = self.drops[i](y, training=training) + x
                x = y
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
            "num_levels": self.num_levels,
            "prior_probability": self.prior_probability,
            "survival_prob": self.survival_prob,
            "norm_momentum": self.norm_momentum,
            "norm_epsilon": self.norm_epsilon,
        }


def _preset(variant):
    scaling = EFFICIENTDET_SCALING[variant]
    size = scaling["image_size"]
    return dict(
        image_size=(size, size),
        backbone="efficientnet_b" + scaling["backbone"].rsplit("b", 1)[-1],
        bifpn_width=scaling["bifpn_width"],
        bifpn_repeats=scaling["bifpn_depth"],
        head_depth=scaling["head_depth"],
        fusion=scaling["fusion"],
        anchor_scale=scaling["anchor_scale"],
    )


#: Named configurations for :meth:`EfficientDet.from_preset`: automl's D0-D7 and a CPU-sized one
#: for the book's data set (EfficientNet-tiny, a narrow two-repeat BiFPN, 256-pixel input).
PRESETS = {f"efficientdet_{v}": _preset(v) for v in EFFICIENTDET_SCALING}
PRESETS["efficientdet_tiny_256"] = dict(
    image_size=(256, 256), backbone="efficientnet_tiny", bifpn_width=32, bifpn_repeats=2,
    head_depth=2, fusion="fast_normalized", anchor_scale=2.0,
)  # fmt: skip


@keras.saving.register_keras_serializable(package="dlnotes")
class EfficientDet(RetinaNet):
    """EfficientDet detector: images ``(B, H, W, 3)`` RGB in [0, 255] -> class logits and box
    deltas, with RetinaNet's outputs, training, ``predict`` and checks (see the module docstring).

    Args:
        num_classes: number of object classes (sigmoid per class, no background class).
        image_size: static ``(height, width)``, both divisible by 128 (P7's stride).
        backbone: an EfficientNet name of :data:`dlnotes.backbones.BACKBONES`
            (``"efficientnet_b0"`` .. ``"efficientnet_b7"``, ``"efficientnet_tiny"``);
            ``backbone_kwargs`` its knobs, ``backbone_weights`` None / ``"imagenet"``.
        bifpn_width, bifpn_repeats, fusion: the BiFPN (:class:`~dlnotes.necks.bifpn.BiFPN`).
        neck: None for that BiFPN; or, to compare necks on the same detector, a name of
            :data:`dlnotes.necks.NECKS` with levels P3-P7 (built with ``bifpn_width`` channels:
            ``"fpn"``, ``"fpn_bn"``, ``"panet"``) or a neck layer returning P3-P7 of
            ``bifpn_width`` channels.
        head_depth: separable conv blocks per head before the output conv.
        anchor_scale, num_scales, aspect_ratios: anchors of size ``anchor_scale x stride x
            2^(k / num_scales)``, ``k = 0 .. num_scales - 1``, for each aspect ratio ``w / h``.
        prior_probability: pi of the class output's bias.
        survival_prob: drop-connect residuals in the heads (automl's None: plain heads).
        focal_alpha, focal_gamma, huber_delta, box_loss_weight: the loss (automl's 0.25, 1.5,
            0.1, 50).
        iou_loss, iou_loss_weight: optional box IoU loss (``"giou"``, ``"diou"``, ``"ciou"``).
        score_threshold, iou_threshold, max_detections, pre_nms_top_k: post-processing, as
            RetinaNet's (score 0.05, per-class NMS 0.5, the 1000 best anchors per level) with
            COCO's 100 detections.
    """

    presets = PRESETS

    def __init__(
        self,
        num_classes,
        image_size=(512, 512),
        backbone="efficientnet_b0",
        backbone_kwargs=None,
        backbone_weights=None,
        bifpn_width=64,
        bifpn_repeats=3,
        fusion="fast_normalized",
        head_depth=3,
        anchor_scale=4.0,
        num_scales=3,
        aspect_ratios=(1.0, 2.0, 0.5),
        prior_probability=0.01,
        survival_prob=None,
        focal_alpha=0.25,
        focal_gamma=1.5,
        huber_delta=0.1,
        box_loss_weight=50.0,
        iou_loss=None,
        iou_loss_weight=1.0,
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=100,
        pre_nms_top_k=1000,
        neck=None,
        **kwargs,
    ):
        num_classes = check_num_classes(num_classes, "EfficientDet")
        size = tuple(int(v) for v in image_size)
        if len(size) != 2 or min(size) < 128 or any(v % 128 for v in size):
            raise ValueError(
                f"EfficientDet: image_size must be (height, width) divisible by 128 (P7's "
                f"stride; automl's sizes are 512 ... 1536), got {image_size!r}. Letterbox the "
                "images to such a size (CocoDataset.to_tf_dataset(image_size=...))."
            )
        config = {
            "image_size": list(size), "backbone": backbone,
            "backbone_kwargs": dict(backbone_kwargs or {}), "bifpn_width": int(bifpn_width),
            "bifpn_repeats": int(bifpn_repeats), "fusion": fusion, "head_depth": int(head_depth),
            "anchor_scale": float(anchor_scale), "num_scales": int(num_scales),
            "aspect_ratios": [float(a) for a in aspect_ratios],
            "prior_probability": prior_probability, "survival_prob": survival_prob,
            "focal_alpha": focal_alpha, "focal_gamma": float(focal_gamma),
            "huber_delta": float(huber_delta), "box_loss_weight": float(box_loss_weight),
            "iou_loss": iou_loss, "iou_loss_weight": float(iou_loss_weight),
            "score_threshold": float(score_threshold), "iou_threshold": float(iou_threshold),
            "max_detections": int(max_detections), "pre_nms_top_k": pre_nms_top_k,
        }  # fmt: skip
        neck = _part(neck)
        if neck is None:
            neck_layer = BiFPN(
                num_channels=bifpn_width, repeats=bifpn_repeats, fusion=fusion, name="bifpn"
            )
        elif isinstance(neck, str):
            neck_layer = build_neck(neck, num_channels=int(bifpn_width))
        else:
            neck_layer = neck
        if neck is not None:  # a name stays a name; a layer is serialised with its config
            config["neck"] = (
                neck if isinstance(neck, str) else keras.saving.serialize_keras_object(neck)
            )
        strides = (8, 16, 32, 64, 128)
        num_scales = positive_int(num_scales, "num_scales", "EfficientDet")
        generator = AnchorGenerator(
            sizes=[anchor_scale * s for s in strides],
            strides=strides,
            ratios=[1.0 / float(a) for a in aspect_ratios],  # automl's w / h -> h / w
            scales=[2 ** (k / num_scales) for k in range(num_scales)],
        )
        anchors = generator.num_anchors_per_location
        heads = {
            "class_head": EfficientDetHead(
                anchors, num_classes, bifpn_width, head_depth, prior_probability=prior_probability,
                survival_prob=survival_prob, name="class_net",
            ),
            "box_head": EfficientDetHead(
                anchors, 4, bifpn_width, head_depth, survival_prob=survival_prob, name="box_net"
            ),
        }  # fmt: skip
        super().__init__(
            num_classes,
            image_size=size,
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            backbone_weights=backbone_weights,
            neck=neck_layer,
            anchor_generator=generator,
            box_coder=BoxCoder(order="yx"),
            label_encoder=AnchorLabelEncoder(0.5, 0.5, "global"),
            prior_probability=prior_probability,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            box_loss="huber",
            huber_delta=huber_delta,
            box_loss_weight=box_loss_weight,
            iou_loss=iou_loss,
            iou_loss_weight=iou_loss_weight,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            max_detections=max_detections,
            pre_nms_top_k=pre_nms_top_k,
            **heads,
            **kwargs,
        )
        self._efficientdet_config = config

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "backbone_weights": None,  # a saved model restores its own weights
            **self._efficientdet_config,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
