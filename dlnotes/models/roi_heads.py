"""Faster R-CNN's second stage: the Fast R-CNN detector on proposals (the notes' "Detector").

The parts a Faster R-CNN model calls between its RPN and its output, each with static shapes and
vectorised over the batch (no Python loop over images or RoIs):

* :func:`proposal_targets` — training targets of the box head: the valid GT boxes are appended
  to the proposals (every GT gets a perfect proposal), every candidate is matched to its
  highest-IoU GT (:func:`~dlnotes.matching.match_anchors`, foreground IoU ``>= 0.5``, background
  ``< 0.5``, no forced matches), and ``num_samples = 512`` RoIs are drawn per image with at most
  25 % foreground (:func:`~dlnotes.matching.sample_balanced`); fixed-size ``(B, S, ...)`` RoIs,
  class targets, box targets and a validity mask;
* :class:`FastRCNNHead` — pooled RoI features ``(K, 7, 7, C)`` -> flatten -> fc6 -> fc7 (ReLU)
  -> class logits ``(K, num_classes + 1)`` and per-class box deltas ``(K, num_classes, 4)``;
* :func:`fast_rcnn_loss` — softmax cross entropy over the sampled RoIs plus smooth-L1 on the
  deltas of the true class of the foreground RoIs, both divided by the global number of sampled
  RoIs (torchvision's ``fastrcnn_loss``);
* :func:`detect_from_rois` — inference: softmax, background column dropped, per-class boxes
  decoded from each RoI, clipped, tiny boxes and padded RoIs removed, per-class NMS 0.5 and 100
  detections per image (:func:`~dlnotes.postprocess.decode_detections` /
  :func:`~dlnotes.postprocess.batched_nms`).

**Label convention.** The data set's labels are object classes ``0 .. num_classes - 1`` (padding
-1), as everywhere in dlnotes. The box head classifies among ``num_classes + 1`` classes where
**index 0 is the background** and object class ``l`` is index ``l + 1`` (torchvision's layout, in
which the data set's labels already start at 1). So ``class_targets`` of :func:`proposal_targets`
and the columns of the head's ``class_logits`` are ``0 = background, l + 1 = class l``, while the
detections of :func:`detect_from_rois` carry the data set's labels ``l`` again (background
removed).

Box deltas are the centre-size deltas of :class:`~dlnotes.boxes.BoxCoder` with torchvision's
weights ``(10, 10, 5, 5)`` (:data:`ROI_BOX_WEIGHTS`, ``BoxCoder.from_weights(ROI_BOX_WEIGHTS)``;
decoding clips ``tw, th`` at ``log(1000 / 16)``), relative to each RoI. Boxes are absolute-pixel
``xyxy`` float32 everywhere.

A training step, sketched (``roi_align`` from :mod:`dlnotes.roi` takes the padded ``(B, S, 4)``
RoIs directly)::

    targets = proposal_targets(proposals, proposal_mask, gt_boxes, gt_labels, seed,
                               num_classes, box_coder)
    pooled = roi_align(features, targets.rois, None, output_size=7, spatial_scale=1 / 16)
    class_logits, box_deltas = head(pooled)                    # (B, S, N + 1), (B, S, N, 4)
    terms = fast_rcnn_loss(targets.class_targets, targets.box_targets, targets.valid,
                           class_logits, box_deltas)

**XLA.** :func:`proposal_targets`, :class:`FastRCNNHead` and :func:`fast_rcnn_loss` are graph code
with static shapes that compiles under ``tf.function(jit_compile=True)`` (XLA drops the label
assertion of :func:`proposal_targets`: check labels upstream, as
:class:`~dlnotes.models.detector.Detector` does). :func:`detect_from_rois` ends in
``tf.image.combined_non_max_suppression``, which has no XLA kernel: run it in a plain
``tf.function`` (or compile only the network, as ``Detector.predict`` does).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
import tensorflow as tf
from keras import ops

from dlnotes.boxes import BoxCoder
from dlnotes.checks import check_num_classes, positive_int
from dlnotes.losses import global_normalizer, smooth_l1
from dlnotes.matching import IGNORE, POSITIVE, gather_matched, match_anchors, sample_balanced
from dlnotes.postprocess import decode_detections

__all__ = [
    "BACKGROUND",
    "ROI_BOX_WEIGHTS",
    "FastRCNNHead",
    "ProposalTargets",
    "detect_from_rois",
    "fast_rcnn_loss",
    "proposal_targets",
]

#: Class index of the background in the box head's ``num_classes + 1`` classes; object class
#: ``l`` of the data set is index ``l + 1``.
BACKGROUND = 0

#: torchvision's box-head coder weights ``(wx, wy, ww, wh)``: ``deltas = weights * t``, i.e.
#: ``BoxCoder.from_weights(ROI_BOX_WEIGHTS)`` (the notes: "位移是10长宽是5").
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

# torchvision's nn.Linear default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), +...).
_LINEAR_INIT = {"scale": 1.0 / 3.0, "mode": "fan_in", "distribution": "uniform"}


class ProposalTargets(NamedTuple):
    """Result of :func:`proposal_targets`: ``S = num_samples`` slots per image.

    Attributes:
        rois: ``(B, S, 4)`` float32 xyxy sampled RoIs (proposals or appended GT boxes); zeros in
            padded slots.
        class_targets: ``(B, S)`` int32 in ``0 .. num_classes``: 0 for background RoIs (and
            padded slots), ``l + 1`` for a foreground RoI matched to a GT of label ``l``.
        box_targets: ``(B, S, 4)`` float32 deltas of the matched GT box relative to the RoI,
            encoded with the given coder (weights ``(10, 10, 5, 5)``); zeros for background RoIs
            and padded slots.
        valid: ``(B, S)`` bool, False for padded slots (an image with fewer foreground +
            background candidates than ``S``); they must contribute nothing to the loss.
        matched_iou: ``(B, S)`` float32 IoU of each RoI with its best GT (0 for padded slots and
            images without GT), for diagnostics.
    """

    rois: tf.Tensor
    class_targets: tf.Tensor
    box_targets: tf.Tensor
    valid: tf.Tensor
    matched_iou: tf.Tensor


def _check_box_coder(box_coder, owner):
    if not isinstance(box_coder, BoxCoder):
        raise ValueError(
            f"{owner}: box_coder must be a dlnotes.boxes.BoxCoder (e.g. "
            f"BoxCoder.from_weights({ROI_BOX_WEIGHTS})), got {box_coder!r}."
        )


def _check_rank(tensor, rank, name, layout, owner, last=None):
    """ValueError naming ``name`` and its expected ``layout`` unless rank (and last dim) fit."""
    shape = tensor.shape
    if shape.rank != rank or (last is not None and shape[-1] not in (None, last)):
        raise ValueError(f"{owner}: `{name}` must have shape {layout}, got shape {shape}.")


def _valid_gt(gt_boxes, gt_labels):
    """``(B, G)`` bool: a real GT box. The rule of :func:`~dlnotes.matching.match_anchors`
    (label ``>= 0`` and positive width and height), so the appended boxes are exactly the GTs
    that matching sees."""
    x1, y1, x2, y2 = tf.unstack(gt_boxes, num=4, axis=-1)
    return tf.logical_and(gt_labels >= 0, tf.logical_and(x2 > x1, y2 > y1))


def proposal_targets(
    proposals,
    proposal_mask,
    gt_boxes,
    gt_labels,
    seed,
    num_classes,
    box_coder,
    num_samples=512,
    positive_fraction=0.25,
    fg_threshold=0.5,
    bg_threshold=0.5,
):
    """Samples the RoIs of the box head and their targets, for a padded batch.

    torchvision's ``RoIHeads.select_training_samples`` with static shapes:

    1. the valid GT boxes of each image are appended to its proposals: candidates
       ``(B, P + G, 4)``, so every GT has a perfect (IoU 1) proposal;
    2. every candidate takes its highest-IoU GT (:func:`~dlnotes.matching.match_anchors` with the
       candidates as per-image anchors and ``force_best=None``: torchvision's
       ``allow_low_quality_matches=False``): foreground when the IoU is ``>= fg_threshold``,
       background when it is ``< bg_threshold``, ignored in between (no band with the default
       0.5 / 0.5). Padded proposals and padded GT slots are never candidates. An image without
       GT has only background candidates;
    3. :func:`~dlnotes.matching.sample_balanced` draws at most
       ``int(num_samples * positive_fraction)`` foreground candidates (128 of 512) and fills the
       ``num_samples`` budget with background ones, at random with the stateless ``seed``;
    4. the sampled candidates are gathered into ``S = num_samples`` slots per image, in
       candidate order (proposals first, then the appended GTs, as torchvision's
       ``nonzero(pos | neg)``), by one ``top_k`` over a per-candidate key (sampled first); an
       image with fewer sampled candidates than ``S`` gets padded slots (``valid`` False).

    The proposals and GT boxes are constants of the targets (``tf.stop_gradient``), as the
    RPN's detached proposals in torchvision. GT boxes are used as given: clip them to the image
    first if they may stick out (a degenerate box -- zero width or height -- is no GT).

    Graph code with static output shapes (``P`` and ``G`` may be unknown when traced): runs in
    ``tf.function`` and compiles under ``jit_compile=True`` (where XLA drops the label
    assertion).

    Args:
        proposals: ``(B, P, 4)`` xyxy proposals (e.g. the RPN's top 2000 after NMS), padded.
        proposal_mask: ``(B, P)`` bool, False for padding proposals.
        gt_boxes: ``(B, G, 4)`` xyxy GT boxes, padded (with -1); ``G == 0`` is allowed.
        gt_labels: ``(B, G)`` integer labels ``0 .. num_classes - 1``, -1 for padding.
        seed: shape-``(2,)`` integer seed of the sampling; vary it per step
            (``Detector.step_seed``). The result is a deterministic function of the inputs and
            the seed; eager and graph mode agree, but under XLA TensorFlow 2.21's Philox stream
            for a seed *tensor* differs from the eager one (tensorflow/tensorflow#121243), so a
            compiled step draws another -- equally valid, equally repeatable -- sample.
        num_classes: number of object classes ``N`` (without background).
        box_coder: the :class:`~dlnotes.boxes.BoxCoder` of the box head,
            ``BoxCoder.from_weights(ROI_BOX_WEIGHTS)`` for torchvision's ``(10, 10, 5, 5)``.
        num_samples: ``S``, RoIs per image (512 in torchvision; the notes' Fast R-CNN view with
            2 images of 128 RoIs would be 128).
        positive_fraction: largest share of foreground RoIs (0.25).
        fg_threshold: IoU from which a candidate is foreground (0.5).
        bg_threshold: IoU below which a candidate is background (0.5; py-faster-rcnn's
            background band [0.1, 0.5) has no lower bound here, as in torchvision).

    Returns:
        :class:`ProposalTargets` of ``(B, S, ...)`` tensors: ``rois`` ``(B, S, 4)``,
        ``class_targets`` ``(B, S)`` int32 (**0 = background, GT label l -> l + 1**),
        ``box_targets`` ``(B, S, 4)``, ``valid`` ``(B, S)`` bool and ``matched_iou`` ``(B, S)``.

    Raises:
        ValueError: tensors of the wrong rank / shape, a bad ``seed`` shape, ``num_classes`` or
            ``num_samples`` not positive integers, fractions or thresholds out of range, or
            ``box_coder`` not a ``BoxCoder``.
        tf.errors.InvalidArgumentError: (when run, not under XLA) a GT label ``>= num_classes``.
    """
    owner = "proposal_targets"
    num_classes = check_num_classes(num_classes, owner)
    num_samples = positive_int(num_samples, "num_samples", owner)
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"{owner}: positive_fraction must be in [0, 1], got {positive_fraction!r}."
        )
    if not 0.0 <= bg_threshold <= fg_threshold <= 1.0:
        raise ValueError(
            f"{owner}: need 0 <= bg_threshold <= fg_threshold <= 1, got bg_threshold="
            f"{bg_threshold!r} and fg_threshold={fg_threshold!r}."
        )
    _check_box_coder(box_coder, owner)

    proposals = tf.stop_gradient(tf.cast(tf.convert_to_tensor(proposals), tf.float32))
    proposal_mask = tf.cast(tf.convert_to_tensor(proposal_mask), tf.bool)
    gt_boxes = tf.stop_gradient(tf.cast(tf.convert_to_tensor(gt_boxes), tf.float32))
    gt_labels = tf.cast(tf.convert_to_tensor(gt_labels), tf.int32)
    seed = tf.convert_to_tensor(seed)
    _check_rank(proposals, 3, "proposals", "(B, P, 4)", owner, last=4)
    _check_rank(proposal_mask, 2, "proposal_mask", "(B, P)", owner)
    _check_rank(gt_boxes, 3, "gt_boxes", "(B, G, 4)", owner, last=4)
    _check_rank(gt_labels, 2, "gt_labels", "(B, G)", owner)
    if not proposal_mask.shape.is_compatible_with(proposals.shape[:2]):
        raise ValueError(
            f"{owner}: `proposal_mask` {proposal_mask.shape} does not match `proposals` "
            f"{proposals.shape} (expected (B, P))."
        )
    if not gt_labels.shape.is_compatible_with(gt_boxes.shape[:2]):
        raise ValueError(
            f"{owner}: `gt_labels` {gt_labels.shape} does not match `gt_boxes` {gt_boxes.shape} "
            "(expected (B, G))."
        )
    if not proposals.shape[:1].is_compatible_with(gt_boxes.shape[:1]):
        raise ValueError(
            f"{owner}: `proposals` {proposals.shape} and `gt_boxes` {gt_boxes.shape} have "
            "different batch sizes."
        )
    if seed.shape.rank != 1 or seed.shape[0] not in (None, 2):
        raise ValueError(f"{owner}: `seed` must have shape (2,), got shape {seed.shape}.")

    check = tf.debugging.assert_less(
        gt_labels,
        num_classes,
        message=f"{owner}: a GT label is >= num_classes={num_classes} (labels must be "
        f"0..{num_classes - 1}, padding -1)",
    )
    with tf.control_dependencies([check]):
        gt_labels = tf.identity(gt_labels)

    # 1. Candidates: proposals, then the GT boxes (padding GT slots masked out).
    candidates = tf.concat([proposals, gt_boxes], axis=1)  # (B, P + G, 4)
    candidate_mask = tf.concat([proposal_mask, _valid_gt(gt_boxes, gt_labels)], axis=1)

    # 2. Foreground / background by the best IoU; non-candidates ignored (never sampled).
    matches = match_anchors(
        candidates, gt_boxes, gt_labels,
        positive_threshold=fg_threshold, negative_threshold=bg_threshold, force_best=None,
    )  # fmt: skip
    states = tf.where(candidate_mask, matches.states, IGNORE)

    # 3. Balanced random sample: (B, P + G) states, -1 where not sampled.
    sampled = sample_balanced(states, num_samples, positive_fraction, seed)

    # 4. Gather the sampled candidates into S slots. Pad the candidate axis to at least S first
    # (top_k needs k <= length); the padding is never sampled.
    matched_gt, matched_iou = matches.matched_gt, matches.matched_iou
    length = candidates.shape[1]
    if length is None:
        pad = tf.maximum(num_samples - tf.shape(candidates)[1], 0)
    else:
        pad = max(num_samples - length, 0)
    if length is None or pad > 0:
        candidates = tf.pad(candidates, [[0, 0], [0, pad], [0, 0]])
        sampled = tf.pad(sampled, [[0, 0], [0, pad]], constant_values=IGNORE)
        matched_gt = tf.pad(matched_gt, [[0, 0], [0, pad]])
        matched_iou = tf.pad(matched_iou, [[0, 0], [0, pad]])
    # Unique integer keys: sampled candidates (2n - i) above the others (n - i), each group in
    # candidate order; top_k of them is the static-shape "boolean_mask + pad".
    n = tf.shape(sampled)[1]
    index = tf.range(n)[None, :]
    key = tf.where(sampled != IGNORE, 2 * n - index, n - index)
    _, order = tf.math.top_k(key, k=num_samples, sorted=True)  # (B, S)

    slot_state = tf.gather(sampled, order, axis=1, batch_dims=1)
    valid = slot_state != IGNORE
    foreground = tf.equal(slot_state, POSITIVE)
    rois = tf.where(valid[..., None], tf.gather(candidates, order, axis=1, batch_dims=1), 0.0)
    slot_gt = tf.gather(matched_gt, order, axis=1, batch_dims=1)
    labels = gather_matched(gt_labels, slot_gt)  # (B, S)
    class_targets = tf.where(foreground, labels + 1, BACKGROUND)
    matched_boxes = gather_matched(gt_boxes, slot_gt)  # (B, S, 4)
    box_targets = tf.where(foreground[..., None], box_coder.encode(rois, matched_boxes), 0.0)
    slot_iou = tf.where(valid, tf.gather(matched_iou, order, axis=1, batch_dims=1), 0.0)
    return ProposalTargets(
        rois=rois,
        class_targets=tf.cast(class_targets, tf.int32),
        box_targets=box_targets,
        valid=valid,
        matched_iou=slot_iou,
    )


@keras.saving.register_keras_serializable(package="dlnotes")
class FastRCNNHead(keras.layers.Layer):
    """Fast R-CNN's box head and predictor: two shared fc layers, then class and box outputs.

    ``(K, ph, pw, C)`` pooled RoI features -> flatten -> ``fc6`` (``hidden``, ReLU) -> ``fc7``
    (``hidden``, ReLU) -> ``cls_score``: logits ``(K, num_classes + 1)`` (softmax over the
    ``N + 1`` classes, **index 0 the background**, class ``l`` at ``l + 1``) and ``bbox_pred``:
    per-class box deltas ``(K, num_classes, 4)`` (deltas of class ``l`` at ``[:, l]``), or
    ``(K, num_classes + 1, 4)`` with ``box_per_background=True`` (torchvision's and
    py-faster-rcnn's layout, ``4 (N + 1)`` outputs including an unused background box: class
    ``l`` at ``[:, l + 1]``). :func:`fast_rcnn_loss` and :func:`detect_from_rois` accept both.

    Widths: ``hidden=2048`` is the notes' choice; 4096 gives VGG16's fc6 / fc7 of the paper
    (fc6 ``25088 * 4096 + 4096`` parameters on 7 x 7 x 512 pooled features); 1024 is
    torchvision's ``TwoMLPHead`` of ``fasterrcnn_resnet50_fpn``.

    Initialisation: ``cls_score`` N(0, 0.01) and ``bbox_pred`` N(0, 0.001) with zero biases
    (py-faster-rcnn / Detectron; torchvision's ``FastRCNNPredictor`` keeps ``nn.Linear``'s
    default). ``fc6`` / ``fc7`` kernels as torchvision's ``nn.Linear``, uniform in
    ``+-1 / sqrt(fan_in)`` (``VarianceScaling(1/3, "fan_in", "uniform")``), biases zero
    (torchvision draws them from the same uniform; the difference is immaterial). With a
    pretrained VGG16, fc6 / fc7 are loaded from its classifier instead.

    Parameters: ``(ph pw C + 1) hidden + (hidden + 1) hidden`` for fc6 / fc7,
    ``(hidden + 1)(N + 1)`` for ``cls_score`` and ``(hidden + 1) 4 N`` (or ``4 (N + 1)``) for
    ``bbox_pred``.

    Call on pooled features ``(K, ph, pw, C)`` or ``(B, R, ph, pw, C)`` (any leading dims, all but
    the first static; ``ph, pw, C`` static); returns the tuple ``(class_logits, box_deltas)``
    with the same leading dims. Plain dense layers: compiles under XLA.

    Args:
        num_classes: ``N``, object classes without the background.
        hidden: width of fc6 and fc7.
        box_per_background: also predict a (never trained) box for the background class.
    """

    def __init__(self, num_classes, hidden=2048, box_per_background=False, **kwargs):
        super().__init__(**kwargs)
        owner = "FastRCNNHead"
        self.num_classes = check_num_classes(num_classes, owner)
        self.hidden = positive_int(hidden, "hidden", owner)
        if not isinstance(box_per_background, bool):
            raise ValueError(
                f"{owner}: box_per_background must be a bool, got {box_per_background!r}."
            )
        self.box_per_background = box_per_background
        self.num_box_classes = self.num_classes + int(box_per_background)
        self.fc6 = keras.layers.Dense(
            self.hidden, activation="relu", name="fc6",
            kernel_initializer=keras.initializers.VarianceScaling(**_LINEAR_INIT),
        )  # fmt: skip
        self.fc7 = keras.layers.Dense(
            self.hidden, activation="relu", name="fc7",
            kernel_initializer=keras.initializers.VarianceScaling(**_LINEAR_INIT),
        )  # fmt: skip
        self.cls_score = keras.layers.Dense(
            self.num_classes + 1, name="cls_score",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        )  # fmt: skip
        self.bbox_pred = keras.layers.Dense(
            4 * self.num_box_classes, name="bbox_pred",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
        )  # fmt: skip

    def _feature_size(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 4 or any(d is None for d in input_shape[-3:]):
            raise ValueError(
                "FastRCNNHead: pooled features must have shape (K, ph, pw, C) or (B, R, ph, pw, C) "
                f"with static ph, pw and C, got shape {input_shape}."
            )
        if any(d is None for d in input_shape[1:-3]):
            raise ValueError(
                "FastRCNNHead: only the first dimension of the pooled features may be unknown, "
                f"got shape {input_shape}."
            )
        return math.prod(input_shape[-3:])

    def build(self, input_shape):
        features = self._feature_size(input_shape)
        self.fc6.build((None, features))
        self.fc7.build((None, self.hidden))
        self.cls_score.build((None, self.hidden))
        self.bbox_pred.build((None, self.hidden))

    def call(self, features):
        shape = tuple(features.shape)
        leading = shape[1:-3]  # static dims after the first
        x = ops.reshape(features, (-1, self._feature_size(shape)))
        x = self.fc7(self.fc6(x))
        class_logits = ops.reshape(self.cls_score(x), (-1, *leading, self.num_classes + 1))
        box_deltas = ops.reshape(self.bbox_pred(x), (-1, *leading, self.num_box_classes, 4))
        return class_logits, box_deltas

    def compute_output_shape(self, input_shape):
        self._feature_size(input_shape)
        leading = tuple(input_shape)[:-3]
        return leading + (self.num_classes + 1,), leading + (self.num_box_classes, 4)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "box_per_background": self.box_per_background,
        }


def _class_layout(box_deltas, num_logits, owner):
    """Whether ``box_deltas`` ``(..., n, 4)`` hold a background box (``n = num_logits``) or not
    (``n = num_logits - 1``); ValueError otherwise."""
    n = box_deltas.shape[-2]
    if n == num_logits:
        return True
    if n == num_logits - 1:
        return False
    raise ValueError(
        f"{owner}: `box_deltas` {box_deltas.shape} must hold num_classes or num_classes + 1 boxes "
        f"per RoI for class logits of num_classes + 1 = {num_logits} columns, i.e. shape "
        f"(..., {num_logits - 1}, 4) or (..., {num_logits}, 4)."
    )


def _static_logits(class_logits, owner):
    if class_logits.shape.rank not in (2, 3) or class_logits.shape[-1] is None:
        raise ValueError(
            f"{owner}: `class_logits` must have shape (K, num_classes + 1) or (B, R, num_classes "
            f"+ 1) with a static last dimension, got shape {class_logits.shape}."
        )
    num_logits = int(class_logits.shape[-1])
    if num_logits < 2:
        raise ValueError(
            f"{owner}: `class_logits` need num_classes + 1 >= 2 columns (background first), got "
            f"shape {class_logits.shape}."
        )
    return num_logits


def fast_rcnn_loss(class_targets, box_targets, valid, class_logits, box_deltas, beta=1.0 / 9.0):
    """The Fast R-CNN loss of the sampled RoIs: softmax cross entropy + smooth-L1.

    torchvision's ``roi_heads.fastrcnn_loss``, over the valid slots only::

        class_loss = sum_valid CE(softmax(logits), class_target) / n
        box_loss   = sum_foreground smooth_l1(deltas[true class] - box_target, beta) / n

    with ``n = global_normalizer(number of valid sampled RoIs)``: the RoIs of the whole global
    batch, summed across replicas (torchvision's ``F.cross_entropy`` mean and
    ``box_loss / labels.numel()``: both divide by the number of sampled RoIs, not the number
    of foreground ones), at least 1. The box term uses only the deltas predicted for the RoI's
    true class (one of the ``N`` or ``N + 1`` boxes of :class:`FastRCNNHead`), summed over the
    4 coordinates, and only for foreground RoIs (``class_targets > 0``). ``beta = 1/9`` is
    torchvision's (``F.smooth_l1_loss(..., beta=1 / 9, reduction="sum")``; the Fast R-CNN paper
    and py-faster-rcnn use ``beta = 1``).

    Finite for any finite logits (a log-sum-exp cross entropy), for batches without foreground
    (box loss 0) and for all-padding batches (both terms 0, zero gradients). Padded slots get no
    gradient. Compiles under XLA.

    Args:
        class_targets: ``(B, S)`` int in ``0 .. N`` (0 background) from
            :func:`proposal_targets`.
        box_targets: ``(B, S, 4)`` encoded deltas (zero for background).
        valid: ``(B, S)`` bool, False for padded slots.
        class_logits: ``(B, S, N + 1)`` or flat ``(B * S, N + 1)`` logits of the head.
        box_deltas: ``(B, S, n, 4)`` or ``(B * S, n, 4)`` per-class deltas, ``n = N`` or
            ``N + 1`` (with a background box, torchvision's layout).
        beta: smooth-L1 transition point.

    Returns:
        dict of float scalars ``{"class_loss", "box_loss"}`` (torchvision's ``loss_classifier``
        and ``loss_box_reg``), float64 for float64 logits, float32 otherwise: this replica's
        share of the global-batch value.

    Raises:
        ValueError: shapes that do not fit together.
    """
    owner = "fast_rcnn_loss"
    class_logits = tf.convert_to_tensor(class_logits)
    dtype = tf.float64 if class_logits.dtype == tf.float64 else tf.float32
    class_logits = tf.cast(class_logits, dtype)
    box_deltas = tf.cast(tf.convert_to_tensor(box_deltas), dtype)
    box_targets = tf.cast(tf.convert_to_tensor(box_targets), dtype)
    class_targets = tf.cast(tf.convert_to_tensor(class_targets), tf.int32)
    valid = tf.cast(tf.convert_to_tensor(valid), tf.bool)
    num_logits = _static_logits(class_logits, owner)
    _check_rank(class_targets, 2, "class_targets", "(B, S)", owner)
    _check_rank(box_targets, 3, "box_targets", "(B, S, 4)", owner, last=4)
    _check_rank(valid, 2, "valid", "(B, S)", owner)
    if box_deltas.shape.rank not in (3, 4) or box_deltas.shape[-1] not in (None, 4):
        raise ValueError(
            f"{owner}: `box_deltas` must have shape (B, S, n, 4) or (B * S, n, 4), got shape "
            f"{box_deltas.shape}."
        )
    with_background = _class_layout(box_deltas, num_logits, owner)
    for name, t in (("box_targets", box_targets), ("valid", valid)):
        if not t.shape[:2].is_compatible_with(class_targets.shape):
            raise ValueError(
                f"{owner}: `{name}` {t.shape} does not match `class_targets` "
                f"{class_targets.shape} (B, S)."
            )
    count = class_targets.shape.num_elements()
    for name, t, lead in (("class_logits", class_logits, 1), ("box_deltas", box_deltas, 2)):
        rows = t.shape[:-lead].num_elements()
        if count is not None and rows is not None and rows != count:
            raise ValueError(
                f"{owner}: `{name}` {t.shape} has {rows} RoIs but `class_targets` "
                f"{class_targets.shape} has {count}."
            )

    targets = tf.reshape(class_targets, [-1])
    slots = tf.reshape(valid, [-1])
    logits = tf.reshape(class_logits, [-1, num_logits])
    deltas = tf.reshape(box_deltas, [-1, box_deltas.shape[-2], 4])
    box_targets = tf.reshape(box_targets, [-1, 4])

    normalizer = tf.cast(global_normalizer(tf.cast(slots, tf.float32)), dtype)
    safe_targets = tf.where(slots, targets, BACKGROUND)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_targets, logits=logits)
    class_loss = tf.reduce_sum(tf.where(slots, ce, 0.0)) / normalizer

    foreground = tf.logical_and(slots, targets > BACKGROUND)
    column = safe_targets if with_background else tf.maximum(safe_targets - 1, 0)
    true_deltas = tf.gather(deltas, column, axis=1, batch_dims=1)  # (K, 4)
    box = smooth_l1(box_targets, true_deltas, beta=beta)
    box_loss = tf.reduce_sum(tf.where(foreground[:, None], box, 0.0)) / normalizer
    return {"class_loss": class_loss, "box_loss": box_loss}


def detect_from_rois(
    rois,
    roi_mask,
    class_logits,
    box_deltas,
    image_size,
    box_coder,
    score_threshold=0.05,
    min_size=1e-2,
    nms_threshold=0.5,
    max_detections=100,
):
    """Box-head outputs on the RoIs -> padded detections (torchvision's
    ``RoIHeads.postprocess_detections``).

    Per image: softmax over the ``N + 1`` classes and the background column dropped; the box of
    every (RoI, class) decoded from the class's deltas relative to the RoI; boxes clipped to the
    image; (RoI, class) pairs whose clipped box is narrower or shorter than ``min_size`` and
    every class of a padded RoI get score 0, so the strict ``score > score_threshold`` test of
    NMS drops them; then per-class NMS and the best ``max_detections`` through
    :func:`~dlnotes.postprocess.decode_detections` / :func:`~dlnotes.postprocess.batched_nms`
    (``(B, R, N, 4)`` per-class boxes).

    Runs in ``tf.function`` but not under XLA (``CombinedNonMaxSuppression`` has no XLA kernel).

    Args:
        rois: ``(B, R, 4)`` xyxy RoIs (the proposals at test time), padded.
        roi_mask: ``(B, R)`` bool, False for padded RoIs; None when all are valid.
        class_logits: ``(B, R, N + 1)`` or flat ``(B * R, N + 1)`` logits, background first.
        box_deltas: ``(B, R, n, 4)`` or ``(B * R, n, 4)``, ``n = N`` or ``N + 1`` (a background
            box, dropped).
        image_size: ``(height, width)`` of the (resized) input images, or per-image ``(B, 2)``.
        box_coder: the :class:`~dlnotes.boxes.BoxCoder` of the training targets
            (``BoxCoder.from_weights(ROI_BOX_WEIGHTS)``).
        score_threshold: ``>= 0``; a (box, class) is kept when its probability is above it
            (0.05).
        min_size: boxes smaller than this (pixels, after clipping) are removed (1e-2); None
            keeps them.
        nms_threshold: per-class NMS IoU threshold (0.5).
        max_detections: ``D``, detections per image (100).

    Returns:
        dict ``{"boxes": (B, D, 4) xyxy, "scores": (B, D), "labels": (B, D) int32 object classes
        0 .. N - 1 (background removed: the data set's labels), "num_detections": (B,)}``,
        sorted by score, padded with -1.

    Raises:
        ValueError: shapes that do not fit together, ``score_threshold < 0`` or a
            ``box_coder`` that is not a ``BoxCoder``.
    """
    owner = "detect_from_rois"
    _check_box_coder(box_coder, owner)
    if not float(score_threshold) >= 0.0:
        raise ValueError(
            f"{owner}: score_threshold must be >= 0 (removed boxes get score 0), got "
            f"{score_threshold!r}."
        )
    rois = tf.cast(tf.convert_to_tensor(rois), tf.float32)
    class_logits = tf.cast(tf.convert_to_tensor(class_logits), tf.float32)
    box_deltas = tf.cast(tf.convert_to_tensor(box_deltas), tf.float32)
    _check_rank(rois, 3, "rois", "(B, R, 4)", owner, last=4)
    num_logits = _static_logits(class_logits, owner)
    if box_deltas.shape.rank not in (3, 4) or box_deltas.shape[-1] not in (None, 4):
        raise ValueError(
            f"{owner}: `box_deltas` must have shape (B, R, n, 4) or (B * R, n, 4), got shape "
            f"{box_deltas.shape}."
        )
    with_background = _class_layout(box_deltas, num_logits, owner)
    count = rois.shape[:2].num_elements()
    for name, t, lead in (("class_logits", class_logits, 1), ("box_deltas", box_deltas, 2)):
        rows = t.shape[:-lead].num_elements()
        if count is not None and rows is not None and rows != count:
            raise ValueError(
                f"{owner}: `{name}` {t.shape} has {rows} RoIs but `rois` {rois.shape} has {count}."
            )
    if roi_mask is not None:
        roi_mask = tf.cast(tf.convert_to_tensor(roi_mask), tf.bool)
        if not roi_mask.shape.is_compatible_with(rois.shape[:2]):
            raise ValueError(
                f"{owner}: `roi_mask` {roi_mask.shape} does not match `rois` {rois.shape} "
                "(expected (B, R))."
            )

    batch, num_rois = tf.shape(rois)[0], tf.shape(rois)[1]
    class_logits = tf.reshape(class_logits, [batch, num_rois, num_logits])
    box_deltas = tf.reshape(box_deltas, [batch, num_rois, box_deltas.shape[-2], 4])
    if with_background:
        box_deltas = box_deltas[:, :, 1:]
    scores = tf.nn.softmax(class_logits, axis=-1)[..., 1:]  # (B, R, N): background dropped
    if roi_mask is not None:
        scores = tf.where(roi_mask[..., None], scores, 0.0)
    return decode_detections(
        rois,
        box_deltas,
        scores,
        box_coder,
        image_shape=image_size,
        activation=None,
        min_size=min_size,
        iou_threshold=nms_threshold,
        score_threshold=score_threshold,
        max_detections=max_detections,
    )
