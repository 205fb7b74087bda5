"""The Region Proposal Network of Faster R-CNN (Ren et al. 2015), as parts of a training graph.

The notes' design (seed ``003``, section "RPN"), with torchvision's defaults where they are silent:

* :class:`RPNHead` — on every feature level (one level at stride 16 for the VGG16 trunk, five for
  an FPN), shared across levels: a 3x3 conv (512 channels for VGG, 256 for an FPN) + ReLU, then a
  1x1 box conv with ``4k`` outputs and a 1x1 objectness conv with ``k`` (sigmoid) or ``2k``
  (softmax, background / foreground) outputs; kernels N(0, 0.01), biases 0.
  :func:`flatten_rpn_outputs` puts the levels in the anchor order of
  :class:`~dlnotes.anchors.AnchorGenerator`, :func:`foreground_logits` /
  :func:`foreground_probabilities` read either objectness form.
* Anchors (:data:`RPN_ANCHORS`, :func:`rpn_anchor_generator`): the paper's ``k = 9`` (areas
  128², 256², 512², ratios 0.5 / 1 / 2) at stride 16, or torchvision's FPN set (one size
  32..512 per level P2..P6, strides 4..64, 3 ratios).
* :func:`rpn_targets` — anchor labels (IoU >= 0.7 or a GT's best anchor positive, < 0.3
  negative, cross-boundary anchors ignored) by :func:`~dlnotes.matching.match_anchors`, then
  256 anchors per image sampled 1:1 by :func:`~dlnotes.matching.sample_balanced`, and box
  targets by a :class:`~dlnotes.boxes.BoxCoder` (weights (1, 1, 1, 1), :func:`rpn_box_coder`).
* :func:`rpn_loss` — log loss over the sampled anchors, smooth-L1 (beta 1/9) over the sampled
  positives; torchvision's normalisation (both terms by the number of sampled anchors) or the
  paper's (``1/N_cls`` with ``N_cls = 256`` per image, ``lambda / N_reg`` with ``N_reg`` the
  anchor locations, ``lambda = 10``), always with global normalisers
  (:func:`~dlnotes.losses.global_normalizer`).
* :func:`generate_proposals` — the notes' post-processing: top-k anchors by objectness (per
  level for an FPN), decode, clip, remove small boxes and low scores (by masking: static
  shapes), NMS at 0.7 (per level for an FPN), keep the best ``post_nms_top_k``; padded
  proposals behind ``tf.stop_gradient``. Train / test presets in :data:`PROPOSAL_PRESETS`.

Everything is batched with static shapes and no Python loop over images or boxes (only over the
static pyramid levels), and runs inside ``tf.function``. :class:`RPNHead`, :func:`rpn_targets` and
:func:`rpn_loss` compile with ``jit_compile=True`` (XLA). :func:`generate_proposals` runs its NMS
through the class-agnostic path of :func:`dlnotes.postprocess.batched_nms`
(``tf.image.non_max_suppression_padded``, which TF 2.21 builds from ordinary ops): it compiles
with XLA too (tested on CPU only). The per-class path of ``batched_nms``
(``CombinedNonMaxSuppression``) has no XLA kernel, one reason why the per-level NMS here is one
class-agnostic NMS per level.

Boxes are absolute-pixel ``xyxy`` float32 throughout; ``image_size`` is ``(height, width)``.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dlnotes.anchors import AnchorGenerator
from dlnotes.boxes import BoxCoder, clip_boxes, remove_small_boxes
from dlnotes.checks import integer, positive_int
from dlnotes.losses import global_normalizer, smooth_l1
from dlnotes.matching import POSITIVE, gather_matched, match_anchors, sample_balanced
from dlnotes.models.retinanet import flatten_levels
from dlnotes.postprocess import batched_nms

__all__ = [
    "OBJECTNESS_FORMS",
    "PROPOSAL_PRESETS",
    "RPN_ANCHORS",
    "RPN_BOX_WEIGHTS",
    "RPN_LOSS_NORMALIZATIONS",
    "RPNHead",
    "RPNTargets",
    "flatten_rpn_outputs",
    "foreground_logits",
    "foreground_probabilities",
    "generate_proposals",
    "rpn_anchor_generator",
    "rpn_box_coder",
    "rpn_loss",
    "rpn_targets",
]

#: Objectness outputs of :class:`RPNHead`: ``k`` sigmoid logits or ``2k`` softmax logits
#: (background, foreground) per location.
OBJECTNESS_FORMS = ("sigmoid", "softmax")

#: Normalisations of :func:`rpn_loss`.
RPN_LOSS_NORMALIZATIONS = ("sampled", "paper")

#: Anchor configurations (:class:`~dlnotes.anchors.AnchorGenerator` arguments).
#:
#: * ``"vgg16"`` — the paper's 9 anchors on the stride-16 VGG16 trunk: base size 128 with scales
#:   1, 2, 4 (areas 128², 256², 512²) and ratios ``h / w`` of 0.5, 1, 2;
#: * ``"fpn"`` — torchvision's ``fasterrcnn_resnet50_fpn``: one size per level, 32 on P2 (stride
#:   4) to 512 on P6 (stride 64), 3 ratios, so ``k = 3``.
#:
#: Anchor centres are :class:`~dlnotes.anchors.AnchorGenerator`'s, ``((j + 0.5) * stride,
#: (i + 0.5) * stride)`` for cell row ``i``, column ``j``. The originals differ by a fraction of a
#: stride: py-faster-rcnn centres its (integer-rounded, ``+1``-pixel) anchors at
#: ``j * 16 + 7.5``, torchvision at ``j * stride``. A learned detector does not care; converted
#: weights see a constant shift of at most half a stride.
RPN_ANCHORS = {
    "vgg16": {
        "sizes": (128,),
        "strides": (16,),
        "ratios": (0.5, 1.0, 2.0),
        "scales": (1.0, 2.0, 4.0),
    },
    "fpn": {
        "sizes": (32, 64, 128, 256, 512),
        "strides": (4, 8, 16, 32, 64),
        "ratios": (0.5, 1.0, 2.0),
        "scales": (1.0,),
    },
}

#: torchvision's RPN box coder weights: deltas are the raw ``(tx, ty, tw, th)``.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)

#: torchvision's proposal settings, ``generate_proposals(..., **PROPOSAL_PRESETS["train"])``.
#: ``pre_nms_top_k`` is per pyramid level when ``level_sizes`` is given (FPN), ``post_nms_top_k``
#: per image.
PROPOSAL_PRESETS = {
    "train": {
        "pre_nms_top_k": 2000,
        "post_nms_top_k": 2000,
        "nms_threshold": 0.7,
        "min_size": 1e-3,
        "score_threshold": 0.0,
    },
    "test": {
        "pre_nms_top_k": 1000,
        "post_nms_top_k": 1000,
        "nms_threshold": 0.7,
        "min_size": 1e-3,
        "score_threshold": 0.0,
    },
}

# NMS ranks of masked-out proposals (small or low-scoring boxes): below any real logit, and the
# NMS score threshold, so the NMS drops them. Finite: -inf would pass a -inf threshold.
_LOWEST = float(np.finfo(np.float32).min)


def rpn_anchor_generator(config="vgg16"):
    """The :class:`~dlnotes.anchors.AnchorGenerator` of an :data:`RPN_ANCHORS` configuration.

    Anchors are ordered location-major (row-major over the cells of a level), then anchor
    (ratio-major, scale-minor: for ``"vgg16"`` index ``3 * ratio_index + scale_index``), level
    by level — the order of :func:`flatten_rpn_outputs`. The generator sizes a level
    ``ceil(H / stride) x ceil(W / stride)``; the VGG16 trunk's max pools give ``floor``, so use
    image sizes divisible by the coarsest stride (16 for VGG, 64 for the FPN's P6) or the head
    outputs will not match the anchors (:func:`rpn_loss` and :func:`generate_proposals` then
    raise).
    """
    if config not in RPN_ANCHORS:
        raise ValueError(
            f"rpn_anchor_generator: unknown config {config!r}; expected one of "
            f"{tuple(RPN_ANCHORS)}."
        )
    return AnchorGenerator(**RPN_ANCHORS[config])


def rpn_box_coder():
    """The RPN's :class:`~dlnotes.boxes.BoxCoder`: weights (1, 1, 1, 1) as torchvision (deltas
    clipped at ``log(1000 / 16)`` before ``exp`` when decoding)."""
    return BoxCoder.from_weights(RPN_BOX_WEIGHTS)


# ----------------------------------------------------------------------------- head


def _check_form(objectness, owner):
    if objectness not in OBJECTNESS_FORMS:
        raise ValueError(
            f"{owner}: objectness must be one of {OBJECTNESS_FORMS}, got {objectness!r}."
        )
    return objectness


@keras.saving.register_keras_serializable(package="dlnotes")
class RPNHead(keras.layers.Layer):
    """The RPN head, applied with the same weights to every feature level.

    A 3x3 conv with ``channels`` filters + ReLU, then two 1x1 convs on its output: the box conv
    with ``4 k`` outputs (output channel ``4 a + c`` is anchor ``a``, delta ``c`` of ``(tx, ty,
    tw, th)``, torchvision's layout) and the objectness conv with ``k`` outputs (``"sigmoid"``)
    or ``2 k`` (``"softmax"``, channel ``2 a + c`` with ``c = 0`` background and ``c = 1``
    foreground; py-faster-rcnn stores them class-major, ``c * k + a``: permute the channels when
    converting its weights). Kernels N(0, 0.01), biases 0 (the paper and torchvision); no
    normalisation layers.

    Parameters: ``9 C channels + channels`` (3x3 conv on ``C`` input channels) ``+
    channels k + k`` (sigmoid; ``2 channels k + 2 k`` for softmax) ``+ 4 channels k + 4 k``.
    The VGG16 configuration (C = channels = 512, k = 9) has 2,382,893 (sigmoid) or 2,387,510
    (softmax); torchvision's FPN head (256, k = 3) 593,935.

    Call on a list of levels ``[(B, H_l, W_l, C), ...]`` (a single tensor is one level) of static
    spatial size (a fixed input size, as :class:`~dlnotes.models.retinanet.RetinaNetHead`). Returns
    ``(objectness, deltas)``, two lists over the levels: objectness ``(B, H_l, W_l, k)``
    (sigmoid) or ``(B, H_l, W_l, k, 2)`` (softmax) logits, deltas ``(B, H_l, W_l, k, 4)``.
    :func:`flatten_rpn_outputs` turns them into ``(B, N)`` / ``(B, N, 2)`` and ``(B, N, 4)``.

    Args:
        num_anchors: ``k``, anchors per location (9 for VGG, 3 for the FPN).
        channels: filters of the 3x3 conv (512 for VGG, 256 for the FPN).
        objectness: ``"sigmoid"`` or ``"softmax"``.
    """

    def __init__(self, num_anchors=9, channels=512, objectness="sigmoid", **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = positive_int(num_anchors, "num_anchors", "RPNHead")
        self.channels = positive_int(channels, "channels", "RPNHead")
        self.objectness = _check_form(objectness, "RPNHead")
        init = keras.initializers.RandomNormal(mean=0.0, stddev=0.01)
        per_anchor = 1 if self.objectness == "sigmoid" else 2
        self.conv = keras.layers.Conv2D(
            self.channels, 3, padding="same", activation="relu", kernel_initializer=init,
            bias_initializer="zeros", dtype=self.dtype_policy, name="conv",
        )  # fmt: skip
        self.objectness_conv = keras.layers.Conv2D(
            self.num_anchors * per_anchor, 1, kernel_initializer=init, bias_initializer="zeros",
            dtype=self.dtype_policy, name="objectness",
        )  # fmt: skip
        self.box_conv = keras.layers.Conv2D(
            self.num_anchors * 4, 1, kernel_initializer=init, bias_initializer="zeros",
            dtype=self.dtype_policy, name="box",
        )  # fmt: skip

    @staticmethod
    def _shapes(input_shape):
        """Input shape(s) -> a list of per-level shapes (a single shape is one level)."""
        if len(input_shape) and isinstance(input_shape[0], (list, tuple)):
            return [tuple(s) for s in input_shape]
        return [tuple(input_shape)]

    def build(self, input_shape):
        shapes = self._shapes(input_shape)
        for shape in shapes:
            if len(shape) != 4:
                raise ValueError(
                    f"RPNHead: every level must be a feature map (B, H, W, C), got shape {shape}."
                )
        channels = {shape[-1] for shape in shapes}
        if len(channels) != 1 or None in channels:
            raise ValueError(
                "RPNHead: all levels must have the same, known number of channels (the head is "
                f"shared across levels), got shapes {shapes}."
            )
        self.conv.build((None, None, None, channels.pop()))
        self.objectness_conv.build((None, None, None, self.channels))
        self.box_conv.build((None, None, None, self.channels))
        self.built = True

    def call(self, levels):
        if not isinstance(levels, (list, tuple)):
            levels = [levels]
        objectness, deltas = [], []
        for x in levels:
            x = self.conv(x)
            height, width = x.shape[1], x.shape[2]
            logits = self.objectness_conv(x)
            if self.objectness == "softmax":
                logits = ops.reshape(logits, (-1, height, width, self.num_anchors, 2))
            objectness.append(logits)
            deltas.append(ops.reshape(self.box_conv(x), (-1, height, width, self.num_anchors, 4)))
        return objectness, deltas

    def compute_output_shape(self, input_shape):
        shapes = self._shapes(input_shape)
        k = self.num_anchors
        cls = (k,) if self.objectness == "sigmoid" else (k, 2)
        return [s[:3] + cls for s in shapes], [s[:3] + (k, 4) for s in shapes]

    def get_config(self):
        return {
            **super().get_config(),
            "num_anchors": self.num_anchors,
            "channels": self.channels,
            "objectness": self.objectness,
        }


def flatten_rpn_outputs(objectness_levels, delta_levels):
    """Per-level :class:`RPNHead` outputs -> ``(objectness, deltas)`` over all anchors.

    Each level is flattened row-major over ``(H_l, W_l, k)`` (location-major, anchor index
    fastest) and the levels are concatenated in the order given (finest first): the anchor order
    of :class:`~dlnotes.anchors.AnchorGenerator` (via
    :func:`dlnotes.models.retinanet.flatten_levels`). Spatial sizes must be static.

    Args:
        objectness_levels: list of ``(B, H_l, W_l, k)`` (sigmoid) or ``(B, H_l, W_l, k, 2)``
            (softmax) logits; one tensor is one level.
        delta_levels: list of ``(B, H_l, W_l, k, 4)`` deltas, same levels.

    Returns:
        ``objectness`` ``(B, N)`` or ``(B, N, 2)`` and ``deltas`` ``(B, N, 4)``,
        ``N = sum_l H_l W_l k``.
    """
    if not isinstance(objectness_levels, (list, tuple)):
        objectness_levels = [objectness_levels]
    if not isinstance(delta_levels, (list, tuple)):
        delta_levels = [delta_levels]
    if len(objectness_levels) != len(delta_levels) or not objectness_levels:
        raise ValueError(
            f"flatten_rpn_outputs: got {len(objectness_levels)} objectness levels and "
            f"{len(delta_levels)} delta levels; expected the same number (at least one)."
        )
    ranks = {len(o.shape) for o in objectness_levels}
    if ranks not in ({4}, {5}) or (
        ranks == {5} and any(o.shape[-1] != 2 for o in objectness_levels)
    ):
        raise ValueError(
            "flatten_rpn_outputs: objectness levels must all be (B, H, W, k) (sigmoid) or all "
            f"(B, H, W, k, 2) (softmax), got shapes {[tuple(o.shape) for o in objectness_levels]}."
        )
    for o, d in zip(objectness_levels, delta_levels, strict=True):
        if len(d.shape) != 5 or d.shape[-1] != 4 or tuple(d.shape[1:4]) != tuple(o.shape[1:4]):
            raise ValueError(
                "flatten_rpn_outputs: deltas must be (B, H, W, k, 4) matching their objectness "
                f"level, got deltas {tuple(d.shape)} for objectness {tuple(o.shape)}."
            )
    if ranks == {4}:
        objectness = flatten_levels([o[..., None] for o in objectness_levels])[..., 0]
    else:
        objectness = flatten_levels(objectness_levels)
    return objectness, flatten_levels(delta_levels)


def _infer_form(objectness, form, owner):
    """The objectness form: ``form`` if given, else from the rank of flattened outputs."""
    if form is not None:
        return _check_form(form, owner)
    rank = objectness.shape.rank
    if rank == 2:
        return "sigmoid"
    if rank == 3 and objectness.shape[-1] == 2:
        return "softmax"
    hint = "; for per-level outputs pass form=" if owner == "foreground_logits" else ""
    raise ValueError(
        f"{owner}: objectness must be flattened sigmoid logits (B, N) or softmax logits "
        f"(B, N, 2) (see flatten_rpn_outputs), got shape {objectness.shape}{hint}."
    )


def _foreground_logits(objectness, form, owner):
    objectness = tf.cast(tf.convert_to_tensor(objectness), tf.float32)
    form = _infer_form(objectness, form, owner)
    if form == "sigmoid":
        return objectness
    if objectness.shape.rank == 0 or objectness.shape[-1] not in (None, 2):
        raise ValueError(
            f"{owner}: softmax objectness must end in 2 (background, foreground), got shape "
            f"{objectness.shape}."
        )
    return objectness[..., 1] - objectness[..., 0]


def foreground_logits(objectness, form=None):
    """Foreground log-odds from either objectness form.

    Sigmoid logits are returned as they are; for softmax logits ``(..., 2)`` (background,
    foreground) it is ``l_fg - l_bg``, whose sigmoid is the softmax foreground probability (and
    whose binary cross entropy is the 2-class softmax cross entropy).

    Args:
        objectness: ``(B, N)`` (sigmoid) or ``(B, N, 2)`` (softmax) logits, or with ``form``
            any shape: ``(...)`` sigmoid / ``(..., 2)`` softmax (e.g. one level
            ``(B, H, W, k)`` / ``(B, H, W, k, 2)``).
        form: ``"sigmoid"``, ``"softmax"`` or None to infer it from the rank of flattened
            outputs (2: sigmoid, 3: softmax).

    Returns:
        float32 ``(B, N)`` (or the leading shape) logits.
    """
    return _foreground_logits(objectness, form, "foreground_logits")


def foreground_probabilities(objectness, form=None):
    """Foreground probabilities ``sigmoid(foreground_logits(objectness, form))``; for softmax
    logits this is the softmax probability of the foreground class."""
    return tf.sigmoid(foreground_logits(objectness, form))


# ----------------------------------------------------------------------------- targets


class RPNTargets(NamedTuple):
    """Result of :func:`rpn_targets`.

    Attributes:
        states: ``(B, N)`` int32: 1 sampled positive, 0 sampled negative, -1 not sampled
            (ignored, cross-boundary or left out by the sampling).
        box_targets: ``(B, N, 4)`` float32 encoded deltas of the sampled positives, zeros
            elsewhere.
    """

    states: tf.Tensor
    box_targets: tf.Tensor


def _check_anchors(anchors, owner):
    anchors = tf.cast(tf.convert_to_tensor(anchors), tf.float32)
    if anchors.shape.rank != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"{owner}: `anchors` must have shape (N, 4), got {anchors.shape}.")
    return anchors


def rpn_targets(
    anchors,
    gt_boxes,
    gt_labels,
    image_size,
    box_coder,
    seed,
    positive_threshold=0.7,
    negative_threshold=0.3,
    num_samples=256,
    positive_fraction=0.5,
    allowed_border=0.0,
):
    """Sampled RPN anchor states and box targets for a padded batch, inside the training graph.

    The paper's rules, via :func:`~dlnotes.matching.match_anchors` (``force_best="global"``):

    1. GT boxes are clipped to the image; padding (label < 0) and boxes of zero size are no GT;
    2. an anchor that is not inside the image (``[-b, W + b] x [-b, H + b]`` with
       ``b = allowed_border``) is ignored and never forced (the paper's cross-boundary rule;
       ``allowed_border=None`` keeps every anchor, as torchvision);
    3. an anchor whose best IoU with a GT is ``>= positive_threshold`` is positive, ``<
       negative_threshold`` negative, in between ignored; the best anchor of every GT is
       positive whatever its IoU (one per GT, the lowest index on exact ties; py-faster-rcnn and
       torchvision force every tied anchor);
    4. per image, :func:`~dlnotes.matching.sample_balanced` keeps at most ``num_samples *
       positive_fraction`` random positives and fills the ``num_samples`` budget with random
       negatives (fewer when there are not enough).

    Images without GT have only negatives: ``num_samples`` of them are sampled, box targets are
    zeros. Runs inside ``tf.function(jit_compile=True)``.

    Args:
        anchors: ``(N, 4)`` xyxy anchors (e.g. ``rpn_anchor_generator()(image_size)``).
        gt_boxes: ``(B, G, 4)`` xyxy GT boxes, padded (``G == 0`` allowed).
        gt_labels: ``(B, G)`` integer labels, -1 for padding (the class is not used: the RPN is
            class-agnostic).
        image_size: ``(height, width)`` of the (padded) input, or per-image ``(B, 2)`` real
            sizes.
        box_coder: the :class:`~dlnotes.boxes.BoxCoder` of the deltas (:func:`rpn_box_coder`).
        seed: shape-``[2]`` integer seed of the sampling (vary it per step, e.g. ``(step, 0)``);
            the result is a deterministic function of the inputs and the seed. Under XLA a seed
            passed as a tensor draws another (equally valid) sample than eager / graph mode
            (TF 2.21: XLA's Philox stream differs; a constant seed is folded and agrees).
        positive_threshold, negative_threshold: IoU thresholds (0.7, 0.3).
        num_samples: anchors sampled per image (256).
        positive_fraction: largest share of positives (0.5).
        allowed_border: pixels an anchor may stick out of the image (0), or None for no
            cross-boundary rule.

    Returns:
        :class:`RPNTargets` ``(states (B, N) int32, box_targets (B, N, 4) float32)``, both
        without gradient.
    """
    owner = "rpn_targets"
    anchors = _check_anchors(anchors, owner)
    gt_boxes = tf.cast(tf.convert_to_tensor(gt_boxes), tf.float32)
    gt_labels = tf.convert_to_tensor(gt_labels)
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"{owner}: `gt_boxes` must have shape (B, G, 4), got {gt_boxes.shape}.")
    if gt_labels.shape.rank != 2 or not gt_labels.shape.is_compatible_with(gt_boxes.shape[:2]):
        raise ValueError(
            f"{owner}: `gt_labels` must have shape (B, G) matching `gt_boxes` {gt_boxes.shape}, "
            f"got {gt_labels.shape}."
        )
    if not 0.0 <= negative_threshold <= positive_threshold <= 1.0:
        raise ValueError(
            f"{owner}: need 0 <= negative_threshold <= positive_threshold <= 1, got "
            f"{negative_threshold!r} and {positive_threshold!r}."
        )
    num_samples = integer(num_samples, "num_samples", owner, minimum=0)
    if allowed_border is not None and not float(allowed_border) >= 0.0:
        raise ValueError(f"{owner}: allowed_border must be >= 0 or None, got {allowed_border!r}.")

    gt_boxes = clip_boxes(gt_boxes, image_size)
    matches = match_anchors(
        anchors,
        gt_boxes,
        gt_labels,
        positive_threshold=positive_threshold,
        negative_threshold=negative_threshold,
        force_best="global",
        image_shape=None if allowed_border is None else image_size,
        allowed_border=0.0 if allowed_border is None else float(allowed_border),
    )
    states = sample_balanced(matches.states, num_samples, positive_fraction, seed)
    positive = tf.equal(states, POSITIVE)
    encoded = box_coder.encode(anchors, gather_matched(gt_boxes, matches.matched_gt))
    box_targets = tf.where(positive[..., None], encoded, 0.0)
    return RPNTargets(tf.stop_gradient(states), tf.stop_gradient(box_targets))


# ----------------------------------------------------------------------------- loss


def rpn_loss(
    states,
    box_targets,
    objectness,
    deltas,
    normalization="sampled",
    box_loss_weight=None,
    smooth_l1_beta=1.0 / 9.0,
    num_samples=256,
    num_locations=None,
):
    """The RPN loss ``(objectness_loss, box_loss)``; their sum is the RPN's part of the total.

    * objectness: binary cross entropy with logits (sigmoid form) or the 2-class softmax cross
      entropy (softmax form), summed over the sampled anchors (``states != -1``);
    * box: smooth-L1 (``smooth_l1_beta``, torchvision's 1/9) of the deltas against the targets,
      summed over coordinates and over the sampled positives, times ``box_loss_weight``.

    Normalisation (``normalization``):

    * ``"sampled"`` (torchvision): both sums divided by the number of sampled anchors of the
      batch; ``box_loss_weight`` defaults to 1;
    * ``"paper"`` (the notes): the objectness sum divided by ``N_cls = num_samples`` per image
      (the mini-batch of 256, whether or not an image filled it), the box sum by
      ``N_reg = num_locations`` per image (anchor locations, ~2400 for a 600x1000 image at
      stride 16) and weighted ``lambda = 10`` (``box_loss_weight`` default).

    Normalisers are global (:func:`~dlnotes.losses.global_normalizer`): under ``tf.distribute``
    counts and batch sizes are summed over the replicas, so each replica returns its share of
    the global-batch loss and the summed gradients equal one device's. They are at least 1, so
    a batch without sampled anchors or positives (no GT, all padding) gives finite losses (the
    box loss 0) with finite gradients; logits of +-100 stay finite (stable cross entropies).
    Runs inside ``tf.function(jit_compile=True)``.

    Args:
        states: ``(B, N)`` sampled states from :func:`rpn_targets`.
        box_targets: ``(B, N, 4)`` encoded targets from :func:`rpn_targets`.
        objectness: ``(B, N)`` sigmoid or ``(B, N, 2)`` softmax logits
            (:func:`flatten_rpn_outputs`).
        deltas: ``(B, N, 4)`` predicted deltas.
        normalization: ``"sampled"`` or ``"paper"``.
        box_loss_weight: weight of the box loss (default 1 for ``"sampled"``, 10 for
            ``"paper"``).
        smooth_l1_beta: smooth-L1 transition point.
        num_samples: ``N_cls`` per image for ``"paper"``.
        num_locations: ``N_reg`` per image for ``"paper"`` (required there): the anchor
            locations, ``sum(h * w for h, w in generator.level_shapes(image_size))``.

    Returns:
        ``(objectness_loss, box_loss)`` float32 scalars (``box_loss`` already weighted).
    """
    owner = "rpn_loss"
    if normalization not in RPN_LOSS_NORMALIZATIONS:
        raise ValueError(
            f"{owner}: normalization must be one of {RPN_LOSS_NORMALIZATIONS}, got "
            f"{normalization!r}."
        )
    if normalization == "paper":
        num_samples = positive_int(num_samples, "num_samples", owner)
        if num_locations is None:
            raise ValueError(
                f'{owner}: normalization="paper" needs num_locations (N_reg, the anchor '
                "locations per image, e.g. sum(h * w for h, w in "
                "generator.level_shapes(image_size)))."
            )
        num_locations = positive_int(num_locations, "num_locations", owner)
    if box_loss_weight is None:
        box_loss_weight = 10.0 if normalization == "paper" else 1.0
    states = tf.convert_to_tensor(states)
    box_targets = tf.cast(tf.convert_to_tensor(box_targets), tf.float32)
    objectness = tf.cast(tf.convert_to_tensor(objectness), tf.float32)
    deltas = tf.cast(tf.convert_to_tensor(deltas), tf.float32)
    if states.shape.rank != 2:
        raise ValueError(f"{owner}: `states` must have shape (B, N), got {states.shape}.")
    form = _infer_form(objectness, None, owner)
    for name, value, tail in (
        ("box_targets", box_targets, (4,)),
        ("deltas", deltas, (4,)),
        ("objectness", objectness, () if form == "sigmoid" else (2,)),
    ):
        if not value.shape.is_compatible_with(states.shape.concatenate(tail)):
            raise ValueError(
                f"{owner}: `{name}` must have shape {('B', 'N', *tail)} matching `states` "
                f"{states.shape}, got {value.shape}."
            )

    states = tf.cast(states, tf.int32)
    sampled = tf.not_equal(states, -1)
    positive = tf.equal(states, POSITIVE)
    if form == "sigmoid":
        cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.cast(positive, tf.float32), logits=objectness
        )
    else:
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(positive, tf.int32), logits=objectness
        )
    objectness_sum = tf.reduce_sum(tf.where(sampled, cross_entropy, 0.0))
    box = tf.reduce_sum(smooth_l1(box_targets, deltas, smooth_l1_beta), axis=-1)
    box_sum = tf.reduce_sum(tf.where(positive, box, 0.0))

    if normalization == "sampled":
        objectness_norm = box_norm = global_normalizer(tf.cast(sampled, tf.float32))
    else:
        batch = tf.cast(tf.shape(states)[0], tf.float32)
        objectness_norm = global_normalizer(batch * num_samples)
        box_norm = global_normalizer(batch * num_locations)
    return objectness_sum / objectness_norm, float(box_loss_weight) * box_sum / box_norm


# ----------------------------------------------------------------------------- proposals


def generate_proposals(
    anchors,
    objectness,
    deltas,
    image_size,
    box_coder,
    pre_nms_top_k=2000,
    post_nms_top_k=2000,
    nms_threshold=0.7,
    min_size=1e-3,
    score_threshold=0.0,
    level_sizes=None,
):
    """RPN outputs -> padded proposals (the notes' post-processing, torchvision's
    ``RegionProposalNetwork.filter_proposals``), batched with static shapes.

    Per image, and per pyramid level when ``level_sizes`` is given (FPN; otherwise all anchors
    form one group):

    1. keep the ``pre_nms_top_k`` anchors with the highest foreground logit (all of a level
       with fewer anchors);
    2. decode their deltas with ``box_coder`` and clip the boxes to the image;
    3. mask out boxes narrower or shorter than ``min_size`` and boxes whose foreground
       probability is below ``score_threshold`` (masks, not gathers: shapes stay static);
    4. class-agnostic NMS at ``nms_threshold`` (a box is suppressed by a better one of the same
       level at IoU >= the threshold; torchvision: >, a difference of measure zero), ranked by
       logit so that saturated probabilities do not tie;

    then the best ``post_nms_top_k`` survivors of all levels, by score. The NMS is
    :func:`dlnotes.postprocess.batched_nms` (``class_agnostic=True``) once per level; the
    survivors of the levels are merged by one ``top_k``, which is torchvision's NMS per level
    (``batched_nms`` keyed by level) followed by ``keep[:post_nms_top_n]``.

    Everything is behind ``tf.stop_gradient``: no gradient flows through the proposals (as in
    torchvision, which detaches the objectness and deltas). Works in ``tf.function`` and, in
    TF 2.21, with ``jit_compile=True`` (see the module docstring).

    Args:
        anchors: ``(N, 4)`` xyxy anchors, in the order of the outputs.
        objectness: ``(B, N)`` sigmoid or ``(B, N, 2)`` softmax logits.
        deltas: ``(B, N, 4)`` predicted deltas.
        image_size: ``(height, width)`` to clip to, or per-image ``(B, 2)`` real sizes.
        box_coder: the :class:`~dlnotes.boxes.BoxCoder` of the deltas (:func:`rpn_box_coder`).
        pre_nms_top_k: anchors kept before NMS, per level with ``level_sizes`` (2000 train /
            1000 test, :data:`PROPOSAL_PRESETS`).
        post_nms_top_k: ``P``, proposals kept per image (2000 train / 1000 test).
        nms_threshold: NMS IoU threshold (0.7).
        min_size: smallest width and height kept, pixels (1e-3); must be > 0.
        score_threshold: smallest foreground probability kept (0.0).
        level_sizes: anchors per pyramid level (Python ints summing to ``N``, e.g.
            ``AnchorGenerator.level_sizes(image_size)``) for per-level top-k and NMS, or None.

    Returns:
        dict of ``"boxes"`` ``(B, P, 4)`` float32 xyxy, ``"scores"`` ``(B, P)`` float32
        foreground probabilities and ``"num_proposals"`` ``(B,)`` int32, sorted by score within
        each image. Entries past ``num_proposals`` are padding: all-zero boxes with score 0 —
        mask them with ``tf.range(P) < num_proposals[:, None]`` before matching proposals to
        GT (a zero box has IoU 0 with every GT and would otherwise become a negative).
    """
    owner = "generate_proposals"
    anchors = _check_anchors(anchors, owner)
    objectness = tf.stop_gradient(tf.cast(tf.convert_to_tensor(objectness), tf.float32))
    deltas = tf.stop_gradient(tf.cast(tf.convert_to_tensor(deltas), tf.float32))
    logits = _foreground_logits(objectness, None, owner)  # (B, N); checks the form
    if deltas.shape.rank != 3 or deltas.shape[-1] != 4:
        raise ValueError(f"{owner}: `deltas` must have shape (B, N, 4), got {deltas.shape}.")
    if not deltas.shape[:2].is_compatible_with(logits.shape):
        raise ValueError(
            f"{owner}: `deltas` {deltas.shape} and `objectness` {objectness.shape} must have the "
            "same (B, N)."
        )
    num_anchors = anchors.shape[0]
    if num_anchors is not None and logits.shape[1] is not None and logits.shape[1] != num_anchors:
        raise ValueError(
            f"{owner}: the outputs cover {logits.shape[1]} anchors but there are {num_anchors} "
            "anchors: the head's feature maps do not match the anchor generator's level shapes "
            "(ceil(size / stride); use image sizes divisible by the coarsest stride)."
        )
    pre_nms_top_k = positive_int(pre_nms_top_k, "pre_nms_top_k", owner)
    post_nms_top_k = positive_int(post_nms_top_k, "post_nms_top_k", owner)
    if not 0.0 <= nms_threshold <= 1.0:
        raise ValueError(f"{owner}: nms_threshold must be in [0, 1], got {nms_threshold!r}.")
    if not float(min_size) > 0.0:
        # The NMS treats a box without a positive coordinate as removed; min_size > 0 removes
        # the only such clipped boxes (empty ones in the corner) consistently beforehand.
        raise ValueError(f"{owner}: min_size must be > 0, got {min_size!r}.")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"{owner}: score_threshold must be in [0, 1], got {score_threshold!r}.")
    if level_sizes is None:
        if num_anchors is None:
            raise ValueError(f"{owner}: the number of anchors must be static.")
        level_sizes = [num_anchors]
    else:
        level_sizes = [positive_int(n, "level_sizes entries", owner) for n in level_sizes]
        if num_anchors is not None and sum(level_sizes) != num_anchors:
            raise ValueError(
                f"{owner}: level_sizes {level_sizes} sum to {sum(level_sizes)}, but there are "
                f"{num_anchors} anchors."
            )

    batch = tf.shape(logits)[0]
    boxes_out, ranks_out = [], []
    start = 0
    for size in level_sizes:  # a static loop over the pyramid levels
        k = min(pre_nms_top_k, size)
        level_logits = logits[:, start : start + size]
        if k < size:
            top_logits, index = tf.math.top_k(level_logits, k=k)  # (B, k)
        else:
            top_logits = level_logits
            index = tf.broadcast_to(tf.range(size)[None], [batch, size])
        index += start
        boxes = box_coder.decode(
            tf.gather(anchors, index), tf.gather(deltas, index, axis=1, batch_dims=1)
        )
        boxes = clip_boxes(boxes, image_size)
        keep = tf.logical_and(
            remove_small_boxes(boxes, min_size), tf.sigmoid(top_logits) >= score_threshold
        )
        ranks = tf.where(keep, top_logits, _LOWEST)
        kept = batched_nms(
            boxes,
            ranks[..., None],
            iou_threshold=nms_threshold,
            score_threshold=_LOWEST,  # drops exactly the masked boxes
            max_detections=min(post_nms_top_k, k),
            class_agnostic=True,
        )
        valid = tf.range(min(post_nms_top_k, k))[None, :] < kept["num_detections"][:, None]
        boxes_out.append(kept["boxes"])
        ranks_out.append(tf.where(valid, kept["scores"], _LOWEST))
        start += size

    boxes = tf.concat(boxes_out, axis=1)  # (B, M), each level sorted, padding ranked lowest
    ranks = tf.concat(ranks_out, axis=1)
    total = boxes.shape[1]
    if len(level_sizes) > 1:
        k = min(post_nms_top_k, total)
        ranks, best = tf.math.top_k(ranks, k=k)
        boxes = tf.gather(boxes, best, axis=1, batch_dims=1)
        total = k
    if total < post_nms_top_k:  # fewer candidates than proposals: pad to the static P
        ranks = tf.pad(ranks, [[0, 0], [0, post_nms_top_k - total]], constant_values=_LOWEST)
        boxes = tf.pad(boxes, [[0, 0], [0, post_nms_top_k - total], [0, 0]])
    valid = ranks > _LOWEST
    num_proposals = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
    return {
        "boxes": tf.stop_gradient(tf.where(valid[..., None], boxes, 0.0)),
        "scores": tf.stop_gradient(tf.where(valid, tf.sigmoid(ranks), 0.0)),
        "num_proposals": tf.stop_gradient(num_proposals),
    }
