"""What the detectors' safety checks cost in a training step.

Every dlnotes train step checks its batch before anything is computed from it (finite pixels,
labels in range, absolute-pixel ``xyxy`` boxes) and the loss and gradients before the optimizer
update (:class:`dlnotes.models.detector.Detector`). Under ``jit_compile=True`` the checks and the
update run as graph ops around the XLA-compiled core (forward, targets, loss, gradients), where
assertions work.

This script times, in one run and on the same weights and batch, ``model.train_on_batch`` of

* ``checked``: the detector as it is;
* ``unchecked``: the same model with the checks removed (no assertions), and, under XLA, the whole
  step (core *and* optimizer update) compiled as one function as Keras does by default,

for RetinaNet (the tiny CPU preset at 256 px and the ResNet-50 paper model at 512 px) and YOLOv3
(the mini preset), in graph mode and with XLA, as the median of ``--repeats`` interleaved rounds
after a warm-up, and prints the ratio checked / unchecked.

    python benchmarks/step_checks.py [--repeats N] [--batch B] [--large]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlnotes.models import RetinaNet, YOLOv3  # noqa: E402


def unchecked(cls):
    """A subclass of detector ``cls`` without the step's checks; under XLA Keras compiles its
    whole train step (core and update) as one function."""

    class Unchecked(cls):
        def input_assertions(self, images, targets=None):
            return []

        def _finite_step_assertions(self, loss, grads):
            return []

        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            loss, grads = self._train_core(x, y, self.step_seed())
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights, strict=True))
            return self.get_metrics_result()

        def _step_function(self, make, attribute, what):
            make()  # Keras' function as it is: the whole step under XLA with jit_compile
            return getattr(self, attribute)

    Unchecked.__name__ = f"Unchecked{cls.__name__}"
    return Unchecked


def random_batch(batch, size, num_classes, rng):
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    boxes = np.full((batch, 8, 4), -1.0, np.float32)
    labels = np.full((batch, 8), -1, np.int32)
    for b in range(batch):
        n = int(rng.integers(2, 9))
        wh = rng.uniform(size / 16, size / 2, (n, 2))
        xy = rng.uniform(0, 1, (n, 2)) * (size - wh)
        boxes[b, :n] = np.concatenate([xy, xy + wh], -1)
        labels[b, :n] = rng.integers(0, num_classes, n)
    return images, {"boxes": boxes, "labels": labels}


def configurations(large):
    yield (
        "RetinaNet tiny 256",
        RetinaNet,
        dict(num_classes=6, **{**RetinaNet.presets["retinanet_tiny_256"]}),
        256,
    )
    yield "YOLOv3 mini 256", YOLOv3, dict(num_classes=6, **YOLOv3.presets["yolov3_mini_256"]), 256
    if large:
        yield (
            "RetinaNet R50-FPN 512",
            RetinaNet,
            dict(num_classes=80, **RetinaNet.presets["retinanet_resnet50_fpn"]),
            512,
        )


def timed_ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--large", action="store_true", help="add RetinaNet-R50-FPN at 512 px")
    args = parser.parse_args()
    print(
        f"# step_checks: batch {args.batch}, median of {args.repeats}; TF {tf.__version__}, "
        f"Keras {keras.__version__}, {os.cpu_count()} CPU(s), {platform.machine()}"
    )
    print("| model | mode | checked ms | unchecked ms | checked / unchecked |")
    print("| --- | --- | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for title, cls, kwargs, size in configurations(args.large):
        x, y = random_batch(args.batch, size, kwargs["num_classes"], rng)
        for jit in (False, True):
            keras.utils.set_random_seed(0)
            models = {"checked": cls(**kwargs), "unchecked": unchecked(cls)(**kwargs)}
            models["unchecked"].set_weights(models["checked"].get_weights())
            for model in models.values():
                model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), jit_compile=jit)
                model.train_on_batch(x, y)  # trace and compile
                model.train_on_batch(x, y)
            rounds = {name: [] for name in models}
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                for name, model in models.items():
                    rounds[name].append(timed_ms(lambda m=model, x=x, y=y: m.train_on_batch(x, y)))
            checked, plain = (statistics.median(rounds[n]) for n in ("checked", "unchecked"))
            mode = "XLA" if jit else "graph"
            print(f"| {title} | {mode} | {checked:.1f} | {plain:.1f} | {checked / plain:.3f} |")


if __name__ == "__main__":
    main()
