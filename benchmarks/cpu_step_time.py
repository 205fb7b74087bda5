"""What a CPU training step of the book's RetinaNet costs: graph mode against XLA, and input size.

Issue 13 asks every model chapter to learn within 4 minutes on 2 CPU cores; this measures two of
the levers. ``retinanet_tiny_256`` (random weights) is compiled with the book's recipe
(:mod:`dlnotes.training`) and trained on the shapes data set's own pipeline
(:func:`dlnotes.training.training_batches`: decoding, flips, letterbox, batches of ``--batch``)
in three settings: graph mode at 256 x 256, the same under XLA (``jit_compile=True``), and graph
mode at 128 x 128 (anchors and levels follow the input size). Per setting: the time of the first
``fit`` call of 5 steps (tracing or XLA compilation included) and the median over ``--rounds``
interleaved rounds (one round times every setting in turn, so that a burst of load from elsewhere
hits all of them) of the mean step time over ``--steps`` steps; the ratios are against the first
row.

    python benchmarks/cpu_step_time.py [--steps 20] [--rounds 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from dlnotes.comparison import build_detector
from dlnotes.data.shapes import load_shapes
from dlnotes.training import Recipe, make_optimizer, training_batches

SETTINGS = (("graph", False, 256), ("XLA", True, 256), ("graph", False, 128))


def compiled(train, jit, size, batch):
    """The model of one setting, compiled, with its batches and the time of its first 5 steps."""
    keras.utils.set_random_seed(0)
    model = build_detector("RetinaNet", train, size)  # anchor pixels follow the input size
    recipe = Recipe(steps=1000, batch_size=batch, warmup_steps=10, jit_compile=jit)
    model.compile(optimizer=make_optimizer(recipe), jit_compile=jit)
    batches = iter(training_batches(train, recipe, model))
    start = time.perf_counter()
    for _ in range(5):
        model.train_on_batch(*next(batches))
    return model, batches, time.perf_counter() - start


def step_time(model, batches, steps):
    """Mean seconds per ``train_on_batch`` over ``steps`` batches of the setting's pipeline."""
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*next(batches))
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    args = parser.parse_args()
    train = load_shapes("train")
    runs = [(mode, size, *compiled(train, jit, size, args.batch)) for mode, jit, size in SETTINGS]
    times = [[] for _ in runs]
    for _ in range(args.rounds):
        for timed, (_, _, model, batches, _) in zip(times, runs, strict=True):
            timed.append(step_time(model, batches, args.steps))
    print(
        f"retinanet_tiny_256, batch {args.batch}, median of {args.rounds} rounds of {args.steps} steps"
    )
    print(f"{'setting':16s} {'first 5 steps (s)':>18s} {'s / step':>9s} {'ratio':>6s}")
    base = float(np.median(times[0]))
    for (mode, size, _, _, first), timed in zip(runs, times, strict=True):
        per_step = float(np.median(timed))
        label = f"{mode}, {size} px"
        print(f"{label:16s} {first:18.1f} {per_step:9.3f} {per_step / base:6.2f}")


if __name__ == "__main__":
    main()
