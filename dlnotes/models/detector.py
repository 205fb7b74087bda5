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

and says which part runs under XLA. Under ``jit_compile=True`` a step is graph ops around an XLA
core: the input checks and the optimizer update run as graph ops (where assertions work), the
core — forward pass, targets, loss and gradients — as one XLA function when
``step_compiles_with_xla = True`` (RetinaNet, YOLOv3). A model with ops that have no XLA kernel
inside its core (proposal NMS between two stages) sets it to False and wraps its compilable parts
with :meth:`~Detector.xla_part`. ``target_keys`` names the target entries the model needs (other
entries, such as ``"keypoints"`` for a box detector, are allowed).

The base class does the rest, once for all models:

* ``compile`` takes no ``loss`` / ``metrics`` (the detection loss is built in; mAP comes from
  :mod:`dlnotes.evaluation`);
* ``fit`` / ``evaluate`` log ``loss`` and every term as global-batch values (a term is divided by a
  global normaliser, e.g. :func:`~dlnotes.losses.global_normalizer`, so Keras' all-reduce SUM of
  the replicas' gradients is the gradient of the global-batch loss);
* bad input stops a step before it changes anything, in graph mode and under XLA alike: images
  that are not ``(B, H, W, 3)`` of the model's size (``ValueError`` at once), NaN / inf pixels,
  labels outside ``[-1, num_classes)``, target boxes that are not absolute-pixel ``xyxy``
  (:meth:`~Detector.input_assertions`); a non-finite loss or gradient stops ``fit`` before the
  optimizer update. The error (``InvalidArgumentError``) starts with the dlnotes message and
  names the batch, TensorFlow's report follows;
* ``CombinedNonMaxSuppression`` has no XLA kernel, so under ``jit_compile`` ``predict`` compiles
  only the network (``xla_part("network", ...)``) and runs decoding and NMS as ordinary
  TensorFlow ops;
* the optimizer's variables are created before the first step is traced (XLA and the checks'
  control dependencies cannot create variables inside the step).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from dlnotes.checks import (
    box_assertions,
    check_image_batch,
    check_num_classes,
    finite_assertions,
    image_assertions,
    label_assertions,
    reported_message,
)

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
    #: Whether the core of a train / test step (forward pass, targets, loss, gradients) compiles
    #: as one XLA function under ``jit_compile=True``; False for a model whose core holds ops
    #: without an XLA kernel, which then wraps its compilable parts with :meth:`xla_part`.
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
        a model compiled with ``jit_compile=True`` is traced; ``fn`` itself otherwise (eager
        calls, graph mode).

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
        """Graph assertions for labels outside ``[-1, num_classes)``
        (:func:`dlnotes.checks.label_assertions`)."""
        return label_assertions(labels, self.num_classes, type(self).__name__)

    def pyramid(self, images, training=False):
        """Images ``(B, H, W, 3)`` RGB in [0, 255] -> the feature levels the heads read, finest
        first: checked (:meth:`check_images`), preprocessed, through ``self.backbone`` and
        ``self.neck`` (the backbone's levels when ``self.neck`` is None)."""
        self.check_images(images)
        features = self.backbone(self.preprocessing(images), training=training)
        if getattr(self, "neck", None) is None:
            return list(features) if isinstance(features, (list, tuple)) else [features]
        return self.neck(features, training=training)

    def pyramid_spec(self, input_shape):
        """Builds the backbone's and the neck's weights for ``input_shape`` (a part deserialised
        from a saved config arrives built already) and returns the levels' ``KerasTensor``
        specs, as :meth:`pyramid` would give them."""
        features = self.backbone.compute_output_spec(keras.KerasTensor(tuple(input_shape)))
        if getattr(self, "neck", None) is None:
            return list(features) if isinstance(features, (list, tuple)) else [features]
        if not self.neck.built:
            self.neck.build([f.shape for f in features])
        return self.neck.compute_output_spec(features)

    def check_images(self, images):
        """Static checks of an image batch given to the model: ``(B, H, W, 3)`` RGB and, for a
        model built for a fixed ``image_size``, ``(H, W)`` equal to it; ``ValueError`` naming
        the shape (a grayscale, RGBA or resized batch never reaches the network)."""
        name = type(self).__name__
        check_image_batch(images, name)
        size, expected = tuple(images.shape[1:3]), getattr(self, "image_size", None)
        if expected is not None and None not in size and size != tuple(expected):
            raise ValueError(
                f"{name} was built for image_size={tuple(expected)} (its anchors / grids are "
                f"fixed); got images of shape {tuple(images.shape)}. Resize (letterbox) the "
                "images or build a model with another image_size."
            )

    def input_assertions(self, images, targets=None):
        """Graph assertions on a batch before anything is computed from it: finite pixels,
        labels in ``[-1, num_classes)``, target boxes that are absolute-pixel ``xyxy``
        (:mod:`dlnotes.checks`). Also checks statically that ``images`` are ``(B, H, W, 3)``."""
        owner = type(self).__name__
        self.check_images(images)
        checks = image_assertions(images, owner)
        if isinstance(targets, dict) and "labels" in targets:
            checks += self.label_assertions(targets["labels"])
            if "boxes" in targets:
                checks += box_assertions(targets["boxes"], targets["labels"], owner)
        return checks

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
        batch; updates the term trackers.

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
        return total

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The detection loss of head outputs ``y_pred`` (+ regularisation), this replica's
        share of the global batch (see :meth:`total_loss`)."""
        self._reject_sample_weight(sample_weight)
        return self.total_loss(self.loss_terms(y, y_pred), y)  # each detector checks y

    # ------------------------------------------------------------------ steps

    def _train_core(self, x, y, seed):
        """Forward pass, loss and gradients of a train step: ``(loss, gradients)``; Keras' loss
        tracker and the term trackers updated (global-batch values)."""
        with tf.GradientTape() as tape:
            _, terms = self.forward_with_loss(x, y, training=True, seed=seed)
            loss = self.total_loss(terms, y)
            scaled = self.optimizer.scale_loss(loss)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(loss * replicas, sample_weight=tf.shape(x)[0])
        return loss, tape.gradient(scaled, self.trainable_weights)

    def _test_core(self, x, y, seed):
        """Forward pass and loss of a test step (trackers updated); returns the loss."""
        _, terms = self.forward_with_loss(x, y, training=False, seed=seed)
        loss = self.total_loss(terms, y)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(loss * replicas, sample_weight=tf.shape(x)[0])
        return loss

    def _core(self, name, fn):
        """The step's core under XLA when the model says it compiles (one XLA function for the
        network, targets, loss and gradients); else as graph ops with its own XLA parts."""
        return self.xla_part(name, fn) if self.step_compiles_with_xla else fn

    def train_step(self, data):
        """One training step, in three parts:

        1. :meth:`input_assertions` on the batch (images, labels, boxes);
        2. the core — :meth:`forward_with_loss`, the weighted loss and its gradients — as one
           XLA function under ``jit_compile`` (or with its own :meth:`xla_part` s);
        3. an assertion that the loss and every gradient are finite, then the optimizer update.

        Every op of 2 and 3 (the forward pass, BN statistics, the update and the optimizer's
        iteration counter) waits for the checks of 1, and the update for those of 3, so bad
        input changes nothing and a non-finite loss or gradient never reaches the weights; the
        checks and the update run as graph ops, where assertions work, also under XLA.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._reject_sample_weight(sample_weight)
        with self._tracing_step():
            with tf.control_dependencies(self.input_assertions(x, y)):
                loss, grads = self._core("train_core", self._train_core)(x, y, self.step_seed())
            checks = self._finite_step_assertions(loss, grads)
            with tf.control_dependencies(checks):
                variables = self.trainable_weights
                self.optimizer.apply_gradients(zip(grads, variables, strict=True))
            return self.get_metrics_result()

    def _finite_step_assertions(self, loss, grads):
        """Graph assertions that the loss and the gradients of a train step are finite, so that
        the update that depends on them is never applied with NaN or inf."""
        name = type(self).__name__
        advice = (
            "the update was not applied. The inputs passed their checks, so this is numerical: "
            "lower the learning rate, clip the gradients (compile(optimizer=...(clipnorm=...)))"
            " or look for NaN weights; tensors"
        )
        checks = finite_assertions([loss], ["loss"], f"{name}: the training loss is not finite "
                                   f"(NaN or inf); {advice}")  # fmt: skip
        # A LossScaleOptimizer skips non-finite gradients itself (mixed precision).
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            names = [v.path for v in self.trainable_weights]
            with tf.control_dependencies(checks):  # a non-finite loss is reported as such
                checks = finite_assertions(
                    grads, names, f"{name}: non-finite gradients (NaN or inf); {advice}"
                )
        return checks

    def test_step(self, data):
        """One evaluation step: :meth:`input_assertions`, then :meth:`forward_with_loss` and the
        loss (``training=False``) as the core of :meth:`train_step`."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._reject_sample_weight(sample_weight)
        with self._tracing_step():
            with tf.control_dependencies(self.input_assertions(x, y)):
                self._core("test_core", self._test_core)(x, y, self.step_seed())
            return self.get_metrics_result()

    def predict_step(self, data):
        """:meth:`input_assertions` on the images, then :meth:`detect`."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with self._tracing_step():
            with tf.control_dependencies(self.input_assertions(x)):
                return self.detect(tf.identity(x))

    @contextlib.contextmanager
    def _tracing_step(self):
        """While a step's Python body runs (its trace), :meth:`xla_part` compiles its parts if
        the model runs with ``jit_compile``."""
        self._compile_parts = bool(self.jit_compile)
        try:
            yield
        finally:
            self._compile_parts = False

    def _reporting(self, function, what):
        """Wraps a train / test / predict function so that a failed check of the step raises
        with the dlnotes message first (TensorFlow's report, 25 lines of stack, after it) and
        names the batch."""
        batches = {"done": 0}

        def wrapped(iterator):
            try:
                logs = function(iterator)
            except tf.errors.InvalidArgumentError as err:
                message = reported_message(err)
                if message is None or not message.startswith(type(self).__name__):
                    raise
                where = f"{what} batch {batches['done']}"
                if what == "training" and getattr(self, "optimizer", None) is not None:
                    where += f" (optimizer step {int(self.optimizer.iterations)})"
                raise tf.errors.InvalidArgumentError(
                    err.node_def,
                    err.op,
                    f"{message} [{where}]\n\nTensorFlow's report:\n{err.message}",
                ) from None
            batches["done"] += int(self.steps_per_execution)
            return logs

        wrapped.reset = lambda: batches.update(done=0)
        return wrapped

    def _step_function(self, make, attribute, what):
        """Keras' ``make`` (train / test / predict function, stored in ``attribute``) built
        without Keras' whole-step XLA (the step's core compiles itself, see
        :meth:`train_step`), wrapped by :meth:`_reporting`."""
        jit_compile = self.jit_compile
        self.jit_compile = False
        try:
            make()
        finally:
            self.jit_compile = jit_compile
        return self._reporting(getattr(self, attribute), what)

    def make_train_function(self, force=False):
        """Keras' train function with the optimizer built first (:meth:`_step_function`)."""
        if self.train_function is not None and not force:
            return self.train_function
        if self.optimizer is not None and not self.optimizer.built:
            # Created here, not lazily inside the first traced step, where the checks'
            # control dependencies (and XLA) forbid creating variables.
            self.optimizer.build(self.trainable_variables)
        self.train_function = self._step_function(
            lambda: super(Detector, self).make_train_function(force), "train_function", "training"
        )
        return self.train_function

    def make_test_function(self, force=False):
        """Keras' test function (:meth:`_step_function`)."""
        if self.test_function is not None and not force:
            return self.test_function
        self.test_function = self._step_function(
            lambda: super(Detector, self).make_test_function(force), "test_function", "evaluation"
        )
        return self.test_function

    def make_predict_function(self, force=False):
        """Keras' predict function (:meth:`_step_function`): under ``jit_compile`` only the parts
        :meth:`detect` marks (:meth:`xla_part`) are compiled, and decoding / NMS run as
        TensorFlow graph ops (``CombinedNonMaxSuppression`` has no XLA kernel)."""
        if self.predict_function is not None and not force:
            return self.predict_function
        self.predict_function = self._step_function(
            lambda: super(Detector, self).make_predict_function(force),
            "predict_function",
            "predict",
        )
        return self.predict_function

    def fit(self, *args, **kwargs):
        self._reset_batch_count(self.train_function)
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._reset_batch_count(self.test_function)
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._reset_batch_count(self.predict_function)
        return super().predict(*args, **kwargs)

    @staticmethod
    def _reset_batch_count(function):
        if hasattr(function, "reset"):
            function.reset()
