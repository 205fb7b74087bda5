"""Tests of dlnotes.models.detector, the contract every detector shares: the training hook with
its per-step seed, the parts that run under XLA, and the target checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import assert_same_detections

from dlnotes.matching import sample_balanced
from dlnotes.models.detector import Detector, check_targets
from dlnotes.models.retinanet import RetinaNet

SIZE = (64, 64)
SLIM = dict(
    num_classes=3, image_size=SIZE, backbone="resnet_tiny", neck="fpn_bn", num_channels=16,
    head_depth=1, anchor_sizes=(16, 32, 64), anchor_strides=(8, 16, 32),
    neck_kwargs={"max_level": 5},
)  # fmt: skip


def _data(batch=4):
    rng = np.random.RandomState(1)
    x = rng.uniform(0, 255, (batch, *SIZE, 3)).astype(np.float32)
    boxes = -np.ones((batch, 3, 4), np.float32)
    labels = -np.ones((batch, 3), np.int32)
    boxes[0, :2] = [[8, 8, 40, 40], [30, 20, 60, 50]]
    labels[0, :2] = [0, 1]
    boxes[1, 0], labels[1, 0] = [4, 30, 24, 62], 2
    return x, {"boxes": boxes, "labels": labels}


class SampledRetinaNet(RetinaNet):
    """A RetinaNet whose loss counts only a balanced sample of anchors drawn with the step's seed,
    and that runs an op without an XLA kernel inside its step (NMS, as between the two stages of
    Faster R-CNN): the shape of a two-stage detector's training step."""

    step_compiles_with_xla = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seeds = []  # the seeds the step saw (eager only)

    def forward_with_loss(self, images, targets, training, seed):
        outputs = self.xla_part("network", lambda x: self(x, training=training))(images)
        if tf.executing_eagerly():
            self.seeds.append(seed.numpy().tolist())
        # No XLA kernel: this is why the whole step cannot be compiled.
        scores = tf.sigmoid(outputs["class_logits"])
        shape = [tf.shape(scores)[0], self.anchors.shape[0], 1, 4]
        boxes = tf.broadcast_to(self.anchors[None, :, None], shape)
        nms = tf.image.combined_non_max_suppression(boxes, scores, 10, 10, clip_boxes=False)
        _, box_loss = self.detection_losses(targets, outputs)
        targets = self.compute_targets(targets["boxes"], targets["labels"])
        sampled = sample_balanced(targets["states"], num_samples=64, seed=seed)
        weight = tf.cast(sampled >= 0, tf.float32)
        logits = outputs["class_logits"]
        ce = keras.losses.binary_crossentropy(targets["class_targets"], logits, from_logits=True)
        class_loss = tf.reduce_sum(ce * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)
        found = tf.cast(tf.reduce_sum(nms.valid_detections), tf.float32)
        return outputs, {"class_loss": class_loss + 0.0 * found, "box_loss": box_loss}


def test_forward_with_loss_gets_a_new_seed_every_step():
    model = SampledRetinaNet(**SLIM, sampling_seed=7)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), run_eagerly=True)
    x, y = _data()
    model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert model.seeds == [[7, 0], [7, 1], [7, 2], [7, 3]]  # (sampling_seed, iteration)
    model.seeds.clear()
    first = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    second = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert model.seeds == [[7, 4], [7, 4]]  # no update, same sample: evaluate is repeatable
    assert first == second


def test_default_hook_is_call_then_loss_terms():
    model = RetinaNet(**SLIM)
    x, y = _data(2)
    outputs, terms = model.forward_with_loss(x, y, training=False, seed=model.step_seed())
    assert set(terms) == {"class_loss", "box_loss"}
    direct = model.loss_terms(y, model(x, training=False))
    for key in terms:
        assert float(terms[key]) == pytest.approx(float(direct[key]), rel=1e-6)
    np.testing.assert_array_equal(model.step_seed(), [0, 0])  # not compiled: iteration 0


def test_a_step_with_ops_xla_cannot_compile_trains_with_its_parts_under_xla():
    x, y = _data()
    graph, xla = SampledRetinaNet(**SLIM), SampledRetinaNet(**SLIM)
    xla.set_weights(graph.get_weights())
    graph.compile(optimizer=keras.optimizers.SGD(0.05))
    xla.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=True)
    h_graph = graph.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    h_xla = xla.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    assert xla.xla_parts_compiled == {"network"} and not graph.xla_parts_compiled
    assert h_xla["loss"][0] == pytest.approx(h_graph["loss"][0], rel=1e-4)
    for a, b in zip(graph.get_weights(), xla.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # The step is a graph: the label assertions work and stop the step before its update.
    before = [w.numpy() for w in xla.weights]
    bad = {"boxes": y["boxes"], "labels": np.where(y["labels"] >= 0, 5, -1).astype(np.int32)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is >= num_classes"):
        xla.fit(x, bad, batch_size=2, epochs=1, shuffle=False, verbose=0)
    for a, w in zip(before, xla.weights, strict=True):
        np.testing.assert_array_equal(a, w.numpy())
    # predict: the network under XLA, NMS outside.
    bias = xla.class_head.output_conv.bias
    bias.assign(tf.zeros_like(bias))
    assert_same_detections(xla.predict(x, batch_size=2, verbose=0), xla.decode(xla(x)))


def test_whole_step_under_xla_would_fail_for_such_a_model():
    # What step_compiles_with_xla = False avoids: XLA has no kernel for the NMS in the step.
    x, y = _data(2)
    model = SampledRetinaNet(**SLIM)
    model.step_compiles_with_xla = True
    model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=True)
    with pytest.raises(Exception, match="CombinedNonMaxSuppression"):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0)


def test_check_targets_accepts_other_entries_and_names_bad_shapes():
    boxes, labels = np.zeros((2, 5, 4)), np.zeros((2, 5))
    keypoints = np.zeros((2, 5, 7, 3))
    check_targets("M", {"boxes": boxes, "labels": labels, "keypoints": keypoints})
    check_targets("M", {"keypoints": keypoints, "labels": labels}, keys=("keypoints", "labels"))
    with pytest.raises(ValueError, match=r'"keypoints": \(B, M, K, 3\)'):
        check_targets("M", {"labels": labels}, keys=("keypoints", "labels"))
    with pytest.raises(ValueError, match=r"M targets must be a dict.*got list"):
        check_targets("M", [boxes, labels])
    with pytest.raises(ValueError, match=r'"boxes" must have shape \(B, M, 4\), got \(2, 5, 5\)'):
        check_targets("M", {"boxes": np.zeros((2, 5, 5)), "labels": labels})
    with pytest.raises(ValueError, match=r'"keypoints" must have shape \(B, M, K, 3\)'):
        check_targets("M", {"boxes": boxes, "labels": labels, "keypoints": np.zeros((2, 5, 3))})
    with pytest.raises(ValueError, match=r"disagree on M.*\(2, 5\).*\(2, 6\)"):
        check_targets("M", {"boxes": boxes, "labels": np.zeros((2, 6))})


def test_a_detector_passes_keypoints_through_fit():
    # Targets from a data set with keypoints train a box detector unchanged.
    model = RetinaNet(**SLIM)
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    x, y = _data(2)
    y = {**y, "keypoints": np.zeros((2, 3, 5, 3), np.float32)}
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()


def test_base_class_hooks_say_what_is_missing():
    class Bare(Detector):
        pass

    bare = Bare(num_classes=2, loss_terms=("loss_a",))
    with pytest.raises(NotImplementedError):
        bare.loss_terms({}, None)
    with pytest.raises(NotImplementedError):
        bare.decode(None)
    with pytest.raises(ValueError, match="Bare: num_classes must be a positive integer, got 0"):
        Bare(num_classes=0, loss_terms=())


# ----------------------------------------------------------------------------- bad input
def _retinanet():
    return RetinaNet(**SLIM)


def _yolov3():
    from dlnotes.anchors import YOLO_COCO_ANCHORS
    from dlnotes.models.yolov3 import YOLOv3

    return YOLOv3(
        num_classes=3,
        image_size=SIZE,
        initial_filters=4,
        anchors=(YOLO_COCO_ANCHORS / 6.5).tolist(),
    )


MODELS = pytest.mark.parametrize("build", [_retinanet, _yolov3], ids=["retinanet", "yolov3"])
# The checks of the training step live in the shared Detector: RetinaNet runs them in graph mode
# and under XLA, YOLOv3 (whose 75-conv graph takes minutes to trace and compile per test) in graph
# mode; test_yolov3 compares its XLA and graph training.
STEP_PATHS = pytest.mark.parametrize(
    "build, jit_compile",
    [(_retinanet, False), (_retinanet, True), (_yolov3, False)],
    ids=["graph-retinanet", "xla-retinanet", "graph-yolov3"],
)


def _state(model):
    """Every variable a step could change: weights, BN statistics, the optimizer's state."""
    return [v.numpy().copy() for v in model.weights + model.optimizer.variables]


def _assert_unchanged(before, model):
    for a, v in zip(before, model.weights + model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)


@STEP_PATHS
def test_a_nan_pixel_stops_the_step_before_it_changes_anything(build, jit_compile):
    model = build()
    name = type(model).__name__
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    x, y = _data()
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    before = _state(model)
    bad = x.copy()
    bad[1, 5, 7, 1] = np.nan  # one pixel of the first batch's second image
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=rf"^{name}: NaN or inf pixel values in the images at batch positions 1 .*"
        r"\[training batch 0 \(optimizer step 2\)\]",
    ):
        model.fit(bad, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    _assert_unchanged(before, model)
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history  # clean data trains on
    assert np.isfinite(history["loss"]).all() and int(model.optimizer.iterations) == 4


@MODELS
def test_predict_and_evaluate_refuse_nan_and_inf_images(build):
    model = build()
    name = type(model).__name__
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    x, y = _data()
    x[2, 0, 0, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"^{name}: NaN or inf .* 0 .*"
                       r"\[predict batch 1\]"):  # fmt: skip
        model.predict(x, batch_size=2, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"^{name}: NaN or inf .*"
                       r"\[evaluation batch 1\]"):  # fmt: skip
        model.evaluate(x, y, batch_size=2, verbose=0)


_INVERTED = (
    lambda b: b[0, 1].__setitem__(slice(None), [30, 20, 25, 50]),
    r"not absolute-pixel xyxy.* at \(image, slot\) 0 1 ",
)  # x2 < x1: xywh as xyxy
_NAN = (lambda b: b[1, 0].__setitem__(0, np.nan), r"not absolute-pixel xyxy.* 1 0 ")
_NORMALISED = (lambda b: b.__setitem__(slice(None), np.where(b >= 0, b / 64.0, b)),
               "look normalised")  # fmt: skip


# Every kind of bad box on RetinaNet; YOLOv3 (slow to trace, see STEP_PATHS) shows that its step
# runs the same shared check.
@pytest.mark.parametrize(
    "build, change, match",
    [(_retinanet, *_INVERTED), (_retinanet, *_NAN), (_retinanet, *_NORMALISED),
     (_yolov3, *_INVERTED)],
    ids=["inverted-retinanet", "nan-retinanet", "normalised-retinanet", "inverted-yolov3"],
)  # fmt: skip
def test_target_boxes_in_another_format_are_refused(build, change, match):
    model = build()
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    model.optimizer.build(model.trainable_variables)
    before = _state(model)
    x, y = _data(2)
    boxes = y["boxes"].copy()
    change(boxes)
    bad = {"boxes": boxes, "labels": y["labels"]}
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=rf"^{type(model).__name__}: .*{match}"
    ):
        model.fit(x, bad, batch_size=2, epochs=1, shuffle=False, verbose=0)
    _assert_unchanged(before, model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        model.evaluate(x, bad, batch_size=2, verbose=0)
    # Padded slots (label -1) are not boxes: any value there is ignored, as before.
    y["boxes"][1, 2] = [5, 5, 1, 1]
    assert np.isfinite(model.evaluate(x, y, batch_size=2, verbose=0)).all()


@STEP_PATHS
def test_a_non_finite_loss_stops_training_before_the_update(build, jit_compile):
    model = build()
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=jit_compile)
    model.optimizer.build(model.trainable_variables)
    kernel = next(v for v in model.trainable_weights if len(v.shape) == 4)
    value = kernel.numpy()
    value.flat[0] = np.nan  # a NaN weight: the inputs are fine, the loss is not
    kernel.assign(value)
    trainable = [v.numpy().copy() for v in model.trainable_weights + model.optimizer.variables]
    x, y = _data(2)
    # TensorFlow's CPU graph optimisations may keep the loss finite with a NaN weight (the issue's
    # "plausible finite loss"); the gradients are not, and either check stops the step.
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=rf"^{type(model).__name__}: (the training loss is not finite|non-finite gradients)"
        r" \(NaN or inf\); the update was not applied.* (loss|conv)",
    ):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    for a, v in zip(trainable, model.trainable_weights + model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)  # NaN == NaN here


@MODELS
def test_images_must_be_rgb_batches_of_the_model_size(build):
    model = build()
    name = type(model).__name__
    model(np.zeros((1, *SIZE, 3), np.float32))  # called once: the channel check still holds
    for channels in (1, 2, 4):
        with pytest.raises(ValueError, match=rf"{name}: images must be RGB batches .*"
                           rf"\(1, 64, 64, {channels}\)"):  # fmt: skip
            model(np.zeros((1, *SIZE, channels), np.float32))
    with pytest.raises(ValueError, match=r"\(64, 64, 3\)"):
        model(np.zeros((64, 64, 3), np.float32))  # one image without the batch axis
    with pytest.raises(ValueError, match=r"built for image_size=\(64, 64\)"):
        model.predict(np.zeros((1, 96, 96, 3), np.float32), verbose=0)
    with pytest.raises(ValueError, match="images must be RGB batches"):
        model.predict(np.zeros((2, *SIZE, 1), np.float32), verbose=0)
