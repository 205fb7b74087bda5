"""Time to AP50: how fast the book's detectors learn on a CPU, as COCO AP50 against training time.

Issue 13 asks every model chapter's CPU profile to reach AP50 >= 0.5 on the shapes validation
split within the chapter's 4 minutes on 2 cores. This script measures where a configuration
stands: it builds one detector (``--model``: a name of :data:`dlnotes.comparison.LINEUP`, the CPU
preset of its chapter), trains it with the book's recipe (:mod:`dlnotes.training`) on a shapes variant
(``--variant``, at ``--size`` px), and evaluates COCO box AP / AP50 on the validation split every
``--every`` steps. The wall time counts training only (the evaluations are paused out), tracing
included. It prints one row per evaluation and the first step and time at which AP50 passed 0.1,
0.3 and 0.5; ``--png`` draws the curve, ``--json`` stores the rows, ``--save`` the weights
(chapter 8 loads them from ``book/side_by_side``). ``--backbone-weights shapes`` starts from the
backbone pre-trained on the shapes (:mod:`dlnotes.pretraining`), ``--freeze-backbone`` keeps it
fixed; the saved files and the curves then carry ``-shapes`` / ``-frozen`` in their names.

    python benchmarks/time_to_ap50.py --model RetinaNet [--variant standard --size 256]
        [--steps 600 --batch 8 --lr 3e-3 --every 100] [--png curve.png] [--json rows.json]
        [--backbone-weights shapes [--freeze-backbone]]

Several ``--model`` values train one after the other, each from the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import keras

from dlnotes import training, viz
from dlnotes.comparison import LINEUP, build_detector, first_reaching
from dlnotes.data.shapes import load_shapes
from dlnotes.evaluation import evaluate_detector
from dlnotes.saving import writing


class EvaluateEvery(keras.callbacks.Callback):
    """COCO AP on ``val`` after every Keras epoch; the evaluation time is not training time."""

    def __init__(self, detector, val, steps_per_epoch):
        super().__init__()
        self.detector, self.val, self.steps_per_epoch = detector, val, steps_per_epoch
        self.rows, self.trained, self._start = [], 0.0, None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.trained += time.perf_counter() - self._start
        result = evaluate_detector(self.detector, self.val).result
        row = {
            "step": (epoch + 1) * self.steps_per_epoch,
            "seconds": round(self.trained, 1),
            "loss": round(float(logs["loss"]), 4),
            "AP": round(result["AP"], 4),
            "AP50": round(result["AP50"], 4),
        }
        self.rows.append(row)
        print(
            f"{row['step']:6d} {row['seconds']:8.0f} {row['loss']:8.3f} {row['AP']:6.3f} "
            f"{row['AP50']:6.3f}",
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", choices=tuple(LINEUP), default=["RetinaNet"])
    parser.add_argument("--variant", default="standard", help="shapes variant (easy / standard)")
    parser.add_argument("--size", type=int, default=256, help="input side in px")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument("--png", help="draw AP50 against training seconds into this file")
    parser.add_argument("--json", help="write the rows of every model into this file")
    parser.add_argument(
        "--save", help="folder: save each trained model's weights as NAME.weights.h5 there"
    )
    parser.add_argument(
        "--backbone-weights", help="'shapes': the backbone pre-trained on the shapes"
    )
    parser.add_argument(
        "--freeze-backbone", action="store_true", help="keep the backbone (and its BN) fixed"
    )
    args = parser.parse_args()
    suffix = ("-" + args.backbone_weights if args.backbone_weights else "") + (
        "-frozen" if args.freeze_backbone else ""
    )
    # fail before training, not after it: nothing that exists is overwritten
    outputs = [args.json, args.png]
    if args.save:
        outputs += [
            os.path.join(args.save, n.replace(" ", "_") + suffix + ".weights.h5")
            for n in args.model
        ]
    existing = [path for path in outputs if path and os.path.exists(path)]
    if existing:
        parser.error(f"{', '.join(existing)} exist(s) and would be overwritten; move them away")

    train, val = (
        load_shapes("train", variant=args.variant),
        load_shapes("val", variant=args.variant),
    )
    recipe = training.Recipe(
        steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
        warmup_steps=args.warmup, log_every=args.every, jit_compile=args.jit,
    )  # fmt: skip
    print(f"shapes {args.variant!r} at {args.size} px; {recipe}")
    curves = {}
    for name in args.model:
        keras.utils.set_random_seed(0)
        overrides = {"backbone_weights": args.backbone_weights} if args.backbone_weights else {}
        detector = build_detector(name, train, args.size, **overrides)
        if args.freeze_backbone:
            detector.backbone.trainable = False  # BatchNorm in inference mode too (Keras 3)
        print(f"\n{name}: {type(detector).__name__}, {detector.count_params():,d} parameters")
        print(f"{'step':>6s} {'train s':>8s} {'loss':>8s} {'AP':>6s} {'AP50':>6s}")
        evaluation = EvaluateEvery(detector, val, args.every)
        training.train(detector, train, recipe, callbacks=[evaluation], log=False)
        curves[name + suffix] = evaluation.rows
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            path = os.path.join(args.save, name.replace(" ", "_") + suffix + ".weights.h5")
            with writing(path, owner="time_to_ap50", suffix=".weights.h5") as tmp:
                detector.save_weights(tmp, overwrite=True)
        if args.json:  # after every model: a long run keeps what it has
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "curves": curves}, f, indent=1)
        for level in (0.1, 0.3, 0.5):
            hit = first_reaching(evaluation.rows, level)
            reached = f"step {hit['step']}, {hit['seconds']:.0f} s" if hit else "not reached"
            print(f"AP50 >= {level}: {reached}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        viz.plot_learning_curves(ax, curves)
        ax.set(xlabel="training time (s)", ylabel="val AP50", ylim=(0, 1))
        ax.set_title(f"shapes {args.variant}, {args.size} px, batch {args.batch}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)


if __name__ == "__main__":
    main()
