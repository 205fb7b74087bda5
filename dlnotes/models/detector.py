"""The Keras contract every dlnotes detector shares: ``compile`` / ``fit`` / ``evaluate`` /
``predict`` on padded targets, label checks, global-batch loss logs, XLA.

A detector subclasses :class:`Detector` and provides

* ``call(images, training)`` — the raw head outputs (any nest of tensors);
* ``loss_terms(y, y_pred)`` — a dict of named scalar loss terms, e.g. ``{"class_loss",
  "box_loss"}``, each this replica's share of the global-batch value; the loss is their sum
  weighted by ``term_weights`` (1 for a term it does not name);
* ``decode(outputs)`` — head outputs -> padded detections
  ``{"boxes": (B, D, 4) xyxy, "scores": (B, D), "labels": (B, D), "num_detections": (B,)}``.

and, where one forward pass followed by a loss does not describe it (a two-stage detector samples
proposals between its stages, with the targets), overrides the hooks

* :meth:`~Detector.forward_with_loss` ``(images, targets, training, seed) -> (outputs, terms)``
  — the training / evaluation forward pass and its loss terms; ``seed`` is a per-step
  ``(2,)`` int64 seed for stateless sampling (:func:`~dlnotes.matching.sample_balanced`), made
  from the optimizer's iteration count by :meth:`~Detector.step_seed`, so every training step
  draws a new sample and a step is repeatable;
* :meth:`~Detector.detect` ``(images) -> detections`` — inference;

and says which part runs under XLA: ``step_compiles_with_xla = True`` (RetinaNet, YOLOv3) lets
Keras compile the whole train / test step; a model with ops that have no XLA kernel inside its
step (proposal NMS between two stages) sets it to False and wraps its compilable parts with
:meth:`~Detector.xla_part`, which compiles them when the model runs with ``jit_compile=True``.
``target_keys`` names the target entries the model needs (other entries, such as
``"keypoints"`` for a box detector, are allowed).

The base class does the rest, once for all models:

* ``compile`` takes no ``loss`` / ``metrics`` (the detection loss is built in; mAP comes from
  :mod:`dlnotes.evaluation`);
* ``fit`` / ``evaluate`` log ``loss`` and every term as global-batch values (a term is divided by a
  global normaliser, e.g. :func:`~dlnotes.losses.global_normalizer`, so Keras' all-reduce SUM of
  the replicas' gradients is the gradient of the global-batch loss);
* labels outside ``[-1, num_classes)`` stop a graph-mode step before it changes anything (graph
  assertions); XLA drops assertions, so every step also counts invalid labels in a hidden metric,
  and when the whole step runs under XLA ``fit`` / ``evaluate`` raise ``InvalidArgumentError``
  after the step;
* ``CombinedNonMaxSuppression`` has no XLA kernel, so under ``jit_compile`` ``predict`` compiles
  only the network (``xla_part("network", ...)``) and runs decoding and NMS as ordinary
  TensorFlow ops;
* the optimizer's variables are created before the first step is traced (XLA and the label
  assertions' control dependencies cannot create variables inside the step).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from dlnotes.checks import check_num_classes

__all__ = ["Detector", "check_targets"]

# compile() arguments that do not apply: the detection loss is built in, and Keras metrics would
# receive the raw targets and head outputs (use dlnotes.evaluation for mAP).
_UNSUPPORTED_COMPILE_ARGS = ("loss", "loss_weights", "metrics", "weighted_metrics")

#: Rank and last dimension of each known target entry (None: any size); ``M`` is shared.
_TARGET_SHAPES = {
    "boxes": ("(B, M, 4)", 3, 4),
    "labels": ("(B, M)", 2, None),
    "keypoints": ("(B, M, K, 3)", 4, 3),
}


def check_targets(owner, y, keys=("boxes", "labels")):
    """Raises ``ValueError`` unless ``y`` is a dict of padded targets holding ``keys``.

    ``y`` may hold other entries (``"keypoints"`` beside the boxes of a box detector). The known
    entries (``"boxes"`` ``(B, M, 4)``, ``"labels"`` ``(B, M)``, ``"keypoints"``
    ``(B, M, K, 3)``) are checked for their rank, last dimension and a common ``B`` and ``M``
    where the shapes are static; the message names the entry and its shape.
    """
    expected = ", ".join(
        f'"{k}": {_TARGET_SHAPES[k][0]}' if k in _TARGET_SHAPES else f'"{k}"' for k in keys
    )
    if not isinstance(y, dict) or any(k not in y for k in keys):
        got = sorted(y) if isinstance(y, dict) else type(y).__name__
        raise ValueError(f"{owner} targets must be a dict {{{expected}}}, got {got}.")
    leading = {}
    for key, (form, rank, last) in _TARGET_SHAPES.items():
        if key not in y or not hasattr(y[key], "shape"):
            continue
        shape = tuple(y[key].shape)
        if len(shape) != rank or (last is not None and shape[-1] not in (None, last)):
            raise ValueError(f'{owner} targets: "{key}" must have shape {form}, got {shape}.')
        leading[key] = shape[:2]
    for axis, name in ((0, "B"), (1, "M")):
        sizes = {k: v[axis] for k, v in leading.items() if v[axis] is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"{owner} targets disagree on {name} (axis {axis}): "
                + ", ".join(f'"{k}" {leading[k]}' for k in sizes)
                + "; every entry pads the same M objects of the same B images."
            )


class Detector(keras.Model):
    """Base class of the dlnotes detectors (see the module docstring for the contract).

    Args:
        num_classes: number of object classes.
        loss_terms: names of the scalar terms :meth:`loss_terms` returns; each gets a
            ``keras.metrics.Mean`` so that ``fit`` logs it.
        term_weights: weight of a term in the total loss (1 for the terms it does not name).
        sampling_seed: base of :meth:`step_seed`, for models that sample during training.
    """

    #: Named constructor settings of the subclass (``from_preset``); set by each detector.
    presets: dict = {}
    #: Target entries the model needs (:func:`check_targets`); others are allowed.
    target_keys: tuple = ("boxes", "labels")
    #: Whether Keras may compile the whole train / test step with XLA (``jit_compile=True``);
    #: False for a model whose step holds ops without an XLA kernel, which then wraps its
    #: compilable parts with :meth:`xla_part`.
    step_compiles_with_xla: bool = True

    @classmethod
    def from_preset(cls, preset, num_classes, **overrides):
        """A model from the class's presets (e.g. ``RetinaNet.from_preset("retinanet_resnet50_fpn",
        80)``), ``overrides`` on top."""
        if preset not in cls.presets:
            raise ValueError(f"Unknown preset {preset!r}; expected one of {sorted(cls.presets)}.")
        return cls(num_classes=num_classes, **{**cls.presets[preset], **overrides})

    def __init__(self, num_classes, loss_terms, term_weights=None, sampling_seed=0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes, type(self).__name__)
        self.term_weights = dict(term_weights or {})
        self.sampling_seed = int(sampling_seed)
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in loss_terms}
        # Counts labels outside [-1, num_classes) seen by the loss; read after each step when
        # XLA compiles the whole step (see make_train_function), left out of the reported logs.
        self.invalid_label_counter = keras.metrics.Sum(name="invalid_labels")
        #: Names of the parts :meth:`xla_part` has compiled with XLA (for inspection).
        self.xla_parts_compiled = set()
        self._compile_parts = False  # whether xla_part compiles: only while a step is traced

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

    # ------------------------------------------------------------------ hooks

    def loss_terms(self, y, y_pred):
        """Named scalar loss terms for padded targets ``y``; implemented by each detector."""
        raise NotImplementedError

    def forward_with_loss(self, images, targets, training, seed):
        """The forward pass of a train / test step and its loss terms.

        Args:
            images: ``(B, H, W, 3)`` images.
            targets: the padded target dict (:attr:`target_keys`, padded with -1).
            training: True in ``fit``'s step, False in ``evaluate``'s.
            seed: ``(2,)`` int64 seed of this step (:meth:`step_seed`) for stateless sampling.

        Returns:
            ``(outputs, terms)``: the head outputs and the dict of named scalar loss terms, each
            this replica's share of the global-batch value. By default ``self(images)`` and
            :meth:`loss_terms`; a two-stage detector overrides it to sample between its stages.
        """
        del seed  # one forward pass draws nothing at random
        outputs = self(images, training=training)
        return outputs, self.loss_terms(targets, outputs)

    def step_seed(self):
        """``(2,)`` int64 seed ``(sampling_seed, optimizer iterations)``: a new one every
        training step, the same for every batch of one ``evaluate`` (so it is repeatable),
        ``(sampling_seed, 0)`` before ``compile``."""
        step = tf.constant(0, tf.int64)
        if getattr(self, "optimizer", None) is not None:  # set by compile()
            step = tf.cast(self.optimizer.iterations, tf.int64)
        return tf.stack([tf.constant(self.sampling_seed, tf.int64), step])

    def xla_part(self, name, fn):
        """``fn`` as ``tf.function(fn, jit_compile=True)`` while a train / test / predict step of
        a model compiled with ``jit_compile=True`` is traced and Keras does not already compile
        the whole step; ``fn`` itself otherwise (eager calls, graph mode, whole-step XLA).

        Use it for the parts of a step that have XLA kernels (the network, targets, the loss),
        not for NMS. A new function is made at each trace of the step (a step is traced once),
        so ``fn`` may close over the values of that trace (``training``, the targets). ``name``
        is recorded in :attr:`xla_parts_compiled`.
        """
        if not self._compile_parts:
            return fn
        self.xla_parts_compiled.add(name)
        return tf.function(fn, jit_compile=True)

    def detect(self, images):
        """Images -> padded detections (``predict``'s step): the network, as one XLA part under
        ``jit_compile``, then :meth:`decode` (NMS) as ordinary TensorFlow ops."""
        network = self.xla_part("network", lambda x: self(x, training=False))
        return self.decode(network(images))

    def decode(self, outputs):
        """Head outputs -> padded detections; implemented by each detector."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loss

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

    def check_targets(self, y):
        """:func:`check_targets` for this model's :attr:`target_keys`."""
        check_targets(type(self).__name__, y, self.target_keys)

    def _reject_sample_weight(self, sample_weight):
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} does not support sample_weight / class_weight: its loss "
                "already weights and normalises the anchors / cells."
            )

    def total_loss(self, terms, y):
        """The weighted sum of ``terms`` (+ regularisation), this replica's share of the global
        batch; updates the term trackers and the invalid-label counter.

        Keras sums gradients over replicas (all-reduce SUM), and every term is already a share of
        the global-batch loss, so it is returned unscaled; only ``self.losses`` get Keras' usual
        ``1 / num_replicas``.
        """
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

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The detection loss of head outputs ``y_pred`` (+ regularisation), this replica's
        share of the global batch (see :meth:`total_loss`)."""
        self._reject_sample_weight(sample_weight)
        return self.total_loss(self.loss_terms(y, y_pred), y)  # each detector checks y

    def get_metrics_result(self):
        # The invalid-label counter is a safety check, not a training metric.
        logs = super().get_metrics_result()
        logs.pop(self.invalid_label_counter.name, None)
        return logs

    # ------------------------------------------------------------------ steps

    def _label_checks(self, y):
        if isinstance(y, dict) and "labels" in y:
            return self.label_assertions(tf.cast(y["labels"], tf.int32))
        return []

    def _step_loss(self, x, y, sample_weight, training):
        """(outputs, loss) of one step, Keras' loss tracker updated (global-batch value)."""
        self._reject_sample_weight(sample_weight)
        outputs, terms = self.forward_with_loss(x, y, training=training, seed=self.step_seed())
        loss = self.total_loss(terms, y)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(loss * replicas, sample_weight=tf.shape(x)[0])
        return outputs, loss

    def train_step(self, data):
        """Keras' train step on :meth:`forward_with_loss`. Every op of the step (forward pass,
        BN statistics, optimizer update and its iteration counter) waits for the label
        assertions, so a bad label changes nothing (graph mode; eager raises at once; XLA
        drops them, see :meth:`make_train_function`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with self._tracing_step(whole_step_xla=self.step_compiles_with_xla):
            with tf.control_dependencies(self._label_checks(y)):
                with tf.GradientTape() as tape:
                    outputs, loss = self._step_loss(x, y, sample_weight, training=True)
                    scaled = self.optimizer.scale_loss(loss)
                variables = self.trainable_weights
                grads = tape.gradient(scaled, variables)
                self.optimizer.apply_gradients(zip(grads, variables, strict=True))
                return self.compute_metrics(x, y, outputs)

    def test_step(self, data):
        """Keras' test step on :meth:`forward_with_loss` (``training=False``), label-checked."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with self._tracing_step(whole_step_xla=self.step_compiles_with_xla):
            with tf.control_dependencies(self._label_checks(y)):
                outputs, _ = self._step_loss(x, y, sample_weight, training=False)
                return self.compute_metrics(x, y, outputs)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with self._tracing_step(whole_step_xla=False):  # NMS has no XLA kernel
            return self.detect(x)

    @contextlib.contextmanager
    def _tracing_step(self, whole_step_xla):
        """While a step's Python body runs (its trace), :meth:`xla_part` compiles its parts if
        the model runs with ``jit_compile`` and Keras does not compile the whole step."""
        self._compile_parts = bool(self.jit_compile) and not whole_step_xla
        try:
            yield
        finally:
            self._compile_parts = False

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

    def _make_step_function(self, make, whole_step_xla):
        """Keras' ``make`` (train / test / predict function) with XLA for the whole step only
        when ``whole_step_xla``; otherwise the step is a graph and :meth:`xla_part` compiles
        its parts."""
        jit_compile = self.jit_compile
        if jit_compile and not whole_step_xla:
            self.jit_compile = False  # Keras would XLA-compile the whole step
        try:
            make()
        finally:
            self.jit_compile = jit_compile

    def make_train_function(self, force=False):
        """Keras' train function, with the optimizer built first and, when XLA compiles the
        whole step, a check for invalid labels after each call (one scalar read back from the
        device)."""
        if self.train_function is not None and not force:
            return self.train_function
        if self.optimizer is not None and not self.optimizer.built:
            # Created here, not lazily inside the first traced step, where the label checks'
            # control dependencies (and XLA) forbid creating variables.
            self.optimizer.build(self.trainable_variables)
        whole = self.step_compiles_with_xla
        self._make_step_function(lambda: super(Detector, self).make_train_function(force), whole)
        if self.jit_compile and whole:
            self.train_function = self._raise_on_invalid_labels(self.train_function)
        return self.train_function

    def make_test_function(self, force=False):
        """Keras' test function, with the invalid-label check of :meth:`make_train_function`."""
        if self.test_function is not None and not force:
            return self.test_function
        whole = self.step_compiles_with_xla
        self._make_step_function(lambda: super(Detector, self).make_test_function(force), whole)
        if self.jit_compile and whole:
            self.test_function = self._raise_on_invalid_labels(self.test_function)
        return self.test_function

    def make_predict_function(self, force=False):
        """Keras' predict function. ``CombinedNonMaxSuppression`` has no XLA kernel, so under
        ``jit_compile`` only the parts :meth:`detect` marks (:meth:`xla_part`) are compiled and
        decoding / NMS run as TensorFlow graph ops."""
        if self.predict_function is not None and not force:
            return self.predict_function
        self._make_step_function(
            lambda: super(Detector, self).make_predict_function(force), whole_step_xla=False
        )
        return self.predict_function
