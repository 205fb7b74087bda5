"""The book's one training recipe: AdamW, linear warm-up then cosine decay, clipped gradients.

Every chapter (and the ``dlnotes`` command line) trains its detector the same way, so the
detectors can be compared on equal terms (chapter 8):

* **AdamW** (decoupled weight decay ``1e-4``): robust to the very different gradient scales of
  class and box losses on freshly initialised heads;
* **linear warm-up** from 0 to the peak rate over ``warmup_steps``, then **cosine decay** to 0 at
  ``steps``: the first updates of a randomly initialised detector are the largest and least
  reliable (the focal loss at the prior, the RPN's empty proposals), so they are damped;
* **global gradient-norm clipping** (``clipnorm``): one batch with an unusual box never throws
  the weights away.

:class:`Recipe` holds those numbers plus the batch size, the input size and whether XLA
compiles the training step; :func:`train` builds the optimizer, the seeded input pipeline
(shuffled, flipped, repeated: ``steps`` counts batches, not epochs) and runs ``fit`` with a
compact log line instead of progress bars.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import keras

from dlnotes.checks import positive_int

__all__ = ["Recipe", "EpochLog", "warmup_cosine", "make_optimizer", "training_batches", "train"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a detector is trained: ``steps`` batches of ``batch_size`` images at ``image_size``.

    Attributes:
        steps: optimizer steps (batches), warm-up included.
        batch_size: images per batch.
        learning_rate: the peak learning rate, reached at the end of the warm-up.
        warmup_steps: length of the linear warm-up from 0.
        weight_decay: AdamW's decoupled weight decay.
        clipnorm: global gradient-norm clipping threshold.
        image_size: ``(height, width)`` of the letterboxed training images; ``None`` uses the
            detector's ``image_size``.
        jit_compile: compile the training step with XLA (every detector's step has static shapes).
        log_every: steps per Keras "epoch", i.e. per log line and per ``history`` entry.
        horizontal_flip: random left-right flips of the training images.
        seed: seed of the shuffle and the flips (the weights are seeded by the caller, before the
            detector is built).
    """

    steps: int
    batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    clipnorm: float = 5.0
    image_size: Sequence[int] | None = None
    jit_compile: bool = False
    log_every: int = 100
    horizontal_flip: bool = True
    seed: int = 0

    def __post_init__(self):
        positive_int(self.steps, "steps")
        positive_int(self.batch_size, "batch_size")
        positive_int(self.log_every, "log_every")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.steps % self.log_every:
            raise ValueError(
                f"steps={self.steps} must be a multiple of log_every={self.log_every} "
                f"(every log line covers the same number of steps)"
            )

    def replace(self, **changes) -> Recipe:
        """A copy with some fields changed (``recipe.replace(steps=2000)``)."""
        return dataclasses.replace(self, **changes)


def warmup_cosine(learning_rate: float, steps: int, warmup_steps: int):
    """Learning rate at step ``t``: ``lr * t / warmup`` up to ``warmup_steps``, then cosine to 0.

    Returns a ``keras.optimizers.schedules.LearningRateSchedule`` (call it with a step number).
    """
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=steps - warmup_steps,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )


def make_optimizer(recipe: Recipe) -> keras.optimizers.Optimizer:
    """AdamW on :func:`warmup_cosine`, clipped to ``recipe.clipnorm`` (global norm)."""
    schedule = warmup_cosine(recipe.learning_rate, recipe.steps, recipe.warmup_steps)
    return keras.optimizers.AdamW(
        schedule, weight_decay=recipe.weight_decay, global_clipnorm=recipe.clipnorm
    )


class EpochLog(keras.callbacks.Callback):
    """One short line per Keras epoch (``step 200: loss 1.234 (class 0.9, box 0.3), 41 s``).

    Args:
        steps_per_epoch: steps in one Keras epoch, to print the step count.
        keys: the logged metrics to show after ``loss`` (default: every ``*_loss`` metric).
        print_fn: where the lines go.
    """

    def __init__(self, steps_per_epoch: int, keys: Sequence[str] | None = None, print_fn=print):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.keys = keys
        self.print_fn = print_fn
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        keys = self.keys or [k for k in logs if k.endswith("_loss") and not k.startswith("val_")]
        parts = ", ".join(f"{k.removesuffix('_loss')} {logs[k]:.3f}" for k in keys if k in logs)
        elapsed = time.time() - self._start
        step = (epoch + 1) * self.steps_per_epoch
        self.print_fn(f"step {step:5d}: loss {logs.get('loss', float('nan')):.3f} ({parts}), "
                      f"{elapsed:.0f} s")  # fmt: skip


def training_batches(dataset, recipe: Recipe, detector):
    """The seeded, shuffled, flipped, repeated ``tf.data`` pipeline of ``recipe`` for ``detector``.

    ``dataset`` is a :class:`~dlnotes.data.CocoDataset`; batches are ``(images (B, H, W, 3),
    {"boxes": (B, M, 4) xyxy, "labels": (B, M)[, "keypoints": (B, M, K, 3)]})`` at
    ``recipe.image_size`` (default the detector's ``image_size``), with keypoints when the
    detector's ``target_keys`` ask for them.
    """
    return dataset.to_tf_dataset(
        batch_size=recipe.batch_size,
        image_size=tuple(recipe.image_size or detector.image_size),
        horizontal_flip=recipe.horizontal_flip,
        shuffle=True,
        seed=recipe.seed,
        drop_remainder=True,
        repeat=True,
        with_keypoints="keypoints" in getattr(detector, "target_keys", ()),
    )


def train(detector, dataset, recipe: Recipe, callbacks=(), log: bool = True, batches=None):
    """Compile ``detector`` with the recipe's optimizer and train it for ``recipe.steps`` steps.

    Args:
        detector: a dlnotes detector (built or not; its loss is built in).
        dataset: the training :class:`~dlnotes.data.CocoDataset`.
        recipe: the :class:`Recipe`.
        callbacks: more Keras callbacks.
        log: print an :class:`EpochLog` line every ``recipe.log_every`` steps.
        batches: a ready ``tf.data`` pipeline to use instead of :func:`training_batches`.

    Returns:
        The ``keras.callbacks.History``: one entry per ``log_every`` steps.
    """
    if batches is None:
        batches = training_batches(dataset, recipe, detector)
    detector.compile(optimizer=make_optimizer(recipe), jit_compile=recipe.jit_compile)
    callbacks = list(callbacks)
    if log:
        callbacks.append(EpochLog(recipe.log_every))
    return detector.fit(
        batches,
        steps_per_epoch=recipe.log_every,
        epochs=recipe.steps // recipe.log_every,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
    )
