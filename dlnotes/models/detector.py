"""The Keras contract every dlnotes detector shares: ``compile`` / ``fit`` / ``evaluate`` /
``predict`` on padded targets, label checks, global-batch loss logs, XLA.

A detector subclasses :class:`Detector` and provides

* ``call(images, training)`` — the raw head outputs (any nest of tensors);
* ``loss_terms(y, y_pred)`` — a dict of named scalar loss terms, e.g. ``{"class_loss",
  "box_loss"}``, each this replica's share of the global-batch value; the loss is their sum
  weighted by ``term_weights`` (1 for a term it does not name);
* ``decode(outputs)`` — head outputs -> padded detections
  ``{"boxes": (B, D, 4) xyxy, "scores": (B, D), "labels": (B, D), "num_detections": (B,)}``.

The base class does the rest, once for all models:

* ``compile`` takes no ``loss`` / ``metrics`` (the detection loss is built in; mAP comes from
  :mod:`dlnotes.evaluation`);
* ``fit`` / ``evaluate`` log ``loss`` and every term as global-batch values (a term is divided by a
  global normaliser, e.g. :func:`~dlnotes.losses.global_normalizer`, so Keras' all-reduce SUM of
  the replicas' gradients is the gradient of the global-batch loss);
* labels outside ``[-1, num_classes)`` stop a graph-mode step before it changes anything (graph
  assertions); XLA drops assertions, so every step also counts invalid labels in a hidden metric,
  and under ``jit_compile`` ``fit`` / ``evaluate`` raise ``InvalidArgumentError`` after the step;
* ``CombinedNonMaxSuppression`` has no XLA kernel, so under ``jit_compile`` ``predict`` compiles
  only the network with XLA and runs decoding and NMS as ordinary TensorFlow ops;
* the optimizer's variables are created before the first step is traced (XLA and the label
  assertions' control dependencies cannot create variables inside the step).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dlnotes.checks import check_num_classes

__all__ = ["Detector", "check_targets"]

# compile() arguments that do not apply: the detection loss is built in, and Keras metrics would
# receive the raw targets and head outputs (use dlnotes.evaluation for mAP).
_UNSUPPORTED_COMPILE_ARGS = ("loss", "loss_weights", "metrics", "weighted_metrics")


def check_targets(owner, y):
    """Raises ``ValueError`` unless ``y`` is the padded target dict ``{"boxes", "labels"}``."""
    if not isinstance(y, dict) or "boxes" not in y or "labels" not in y:
        raise ValueError(
            f'{owner} targets must be a dict {{"boxes": (B, M, 4), "labels": (B, M)}}, '
            f"got {type(y).__name__}."
        )


class Detector(keras.Model):
    """Base class of the dlnotes detectors (see the module docstring for the contract).

    Args:
        num_classes: number of object classes.
        loss_terms: names of the scalar terms :meth:`loss_terms` returns; each gets a
            ``keras.metrics.Mean`` so that ``fit`` logs it.
        term_weights: weight of a term in the total loss (1 for the terms it does not name).
    """

    #: Named constructor settings of the subclass (``from_preset``); set by each detector.
    presets: dict = {}

    @classmethod
    def from_preset(cls, preset, num_classes, **overrides):
        """A model from the class's presets (e.g. ``RetinaNet.from_preset("retinanet_resnet50_fpn",
        80)``), ``overrides`` on top."""
        if preset not in cls.presets:
            raise ValueError(f"Unknown preset {preset!r}; expected one of {sorted(cls.presets)}.")
        return cls(num_classes=num_classes, **{**cls.presets[preset], **overrides})

    def __init__(self, num_classes, loss_terms, term_weights=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes)
        self.term_weights = dict(term_weights or {})
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in loss_terms}
        # Counts labels outside [-1, num_classes) seen by compute_loss; read after each step
        # under jit_compile (see make_train_function) and left out of the reported logs.
        self.invalid_label_counter = keras.metrics.Sum(name="invalid_labels")
        self._xla_network = None  # the XLA-compiled forward pass of predict

    # ------------------------------------------------------------------ compile

    def compile(self, optimizer="rmsprop", **kwargs):
        """``keras.Model.compile`` without ``loss`` / ``metrics`` (the detection loss is built in).

        Raises:
            ValueError: a ``loss``, ``loss_weights``, ``metrics`` or ``weighted_metrics`` other
                than None.
        """
        given = [name for name in _UNSUPPORTED_COMPILE_ARGS if kwargs.get(name) is not None]
        if given:
            raise ValueError(
                f"{type(self).__name__}.compile() got {given}: the detection loss is built into "
                "the model (compute_loss) and Keras metrics would only see raw targets and head "
                "outputs; evaluate detections with dlnotes.evaluation (COCO mAP) instead."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        # Keras skips models that override compile() when loading; this one only rejects
        # loss / metrics (saved as None), so the saved compile arguments apply unchanged.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)  # so that its saved state can load

    # ------------------------------------------------------------------ training

    def loss_terms(self, y, y_pred):
        """Named scalar loss terms for padded targets ``y``; implemented by each detector."""
        raise NotImplementedError

    def label_assertions(self, labels):
        """Graph assertions for labels outside ``[-1, num_classes)`` (dropped by XLA)."""
        name, n = type(self).__name__, self.num_classes
        return [
            tf.debugging.assert_less(
                labels, n,
                message=f"{name}(num_classes={n}): a target label is >= num_classes (labels "
                f"must be 0..{n - 1}, padding -1); check the data set's classes or the model's "
                "num_classes",
            ),
            tf.debugging.assert_greater_equal(
                labels, -1,
                message=f"{name}(num_classes={n}): a target label is < -1 (labels must be "
                f"0..{n - 1}, padding -1)",
            ),
        ]  # fmt: skip

    def checked_labels(self, labels):
        """``labels`` as int32, after the :meth:`label_assertions` (use it to build targets)."""
        labels = tf.cast(labels, tf.int32)
        with tf.control_dependencies(self.label_assertions(labels)):
            return tf.identity(labels)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The detection loss (+ regularisation), this replica's share of the global batch.

        Keras sums gradients over replicas (all-reduce SUM), and every term is already a share of
        the global-batch loss, so it is returned unscaled; only ``self.losses`` get Keras' usual
        ``1 / num_replicas``.
        """
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} does not support sample_weight / class_weight: its loss "
                "already weights and normalises the anchors / cells."
            )
        terms = self.loss_terms(y, y_pred)  # each detector checks its targets
        total = tf.add_n([self.term_weights.get(k, 1.0) * v for k, v in terms.items()])
        replicas = tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, tf.float32)
        for loss in self.losses:  # regularisers, if a user adds some: Keras' per-replica scaling
            total = total + tf.cast(loss, tf.float32) / replicas
        # The trackers see what Keras' loss tracker sees: the global-batch value (share times
        # replicas), weighted by the batch size, so that the logged terms add up to the loss.
        batch = tf.shape(y["labels"])[0]
        for name, value in terms.items():
            self.loss_trackers[name].update_state(value * replicas, sample_weight=batch)
        labels = tf.cast(y["labels"], tf.int32)
        invalid = tf.logical_or(labels >= self.num_classes, labels < -1)
        self.invalid_label_counter.update_state(tf.reduce_sum(tf.cast(invalid, tf.float32)))
        return total

    def get_metrics_result(self):
        # The invalid-label counter is a safety check, not a training metric.
        logs = super().get_metrics_result()
        logs.pop(self.invalid_label_counter.name, None)
        return logs

    def _checked_step(self, step, data):
        """Runs Keras' ``step`` after the label assertions: every op of the step (forward pass,
        BN statistics, optimizer update and its iteration counter) waits for them, so a bad
        label changes nothing (graph mode; eager raises at once; XLA drops them)."""
        _, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        checks = []
        if isinstance(y, dict) and "labels" in y:
            checks = self.label_assertions(tf.cast(y["labels"], tf.int32))
        with tf.control_dependencies(checks):
            return step(data)

    def train_step(self, data):
        return self._checked_step(super().train_step, data)

    def test_step(self, data):
        return self._checked_step(super().test_step, data)

    def _raise_on_invalid_labels(self, step_function):
        """Wraps an XLA-compiled train / test function: raise once it has seen a bad label."""

        def function(iterator):
            logs = step_function(iterator)
            count = int(self.invalid_label_counter.result())
            if count:
                self.invalid_label_counter.reset_state()
                n = self.num_classes
                raise tf.errors.InvalidArgumentError(
                    None,
                    None,
                    f"{type(self).__name__}(num_classes={n}): {count} target label(s) outside "
                    f"[-1, {n}) (labels must be 0..{n - 1}, padding -1); check the data set's "
                    "classes or the model's num_classes. The step ran under jit_compile=True, "
                    "where XLA drops assertions, so this is raised after the step (its update "
                    "is already applied).",
                )
            return logs

        return function

    def make_train_function(self, force=False):
        """Keras' train function, with the optimizer built first and, under ``jit_compile``, a
        check for invalid labels after each call (one scalar read back from the device)."""
        if self.train_function is not None and not force:
            return self.train_function
        if self.optimizer is not None and not self.optimizer.built:
            # Created here, not lazily inside the first traced step, where the label checks'
            # control dependencies (and XLA) forbid creating variables.
            self.optimizer.build(self.trainable_variables)
        super().make_train_function(force=force)
        if self.jit_compile:
            self.train_function = self._raise_on_invalid_labels(self.train_function)
        return self.train_function

    def make_test_function(self, force=False):
        """Keras' test function, with the invalid-label check of :meth:`make_train_function`."""
        if self.test_function is not None and not force:
            return self.test_function
        super().make_test_function(force=force)
        if self.jit_compile:
            self.test_function = self._raise_on_invalid_labels(self.test_function)
        return self.test_function

    # ------------------------------------------------------------------ inference

    def decode(self, outputs):
        """Head outputs -> padded detections; implemented by each detector."""
        raise NotImplementedError

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        network = self._xla_network or (lambda images: self(images, training=False))
        return self.decode(network(x))

    def make_predict_function(self, force=False):
        """Keras' predict function. ``CombinedNonMaxSuppression`` has no XLA kernel, so under
        ``jit_compile`` only the network is XLA-compiled (a nested ``tf.function``) and decoding
        / NMS run as TensorFlow graph ops."""
        if self.predict_function is not None and not force:
            return self.predict_function
        jit_compile = self.jit_compile
        self._xla_network = None
        if jit_compile:
            self._xla_network = tf.function(
                lambda images: self(images, training=False), jit_compile=True
            )
        self.jit_compile = False  # Keras would XLA-compile the whole predict_step
        try:
            super().make_predict_function(force=force)
        finally:
            self.jit_compile = jit_compile
        return self.predict_function
