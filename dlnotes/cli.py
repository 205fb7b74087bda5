"""The ``dlnotes`` command line: train, evaluate, predict with and export a detector on a
COCO-format data set (an annotations JSON and a folder of images).

::

    dlnotes train    --data data/shapes --preset retinanet_tiny_256 --workdir runs/r --epochs 8
    dlnotes train    --workdir runs/r --resume --epochs 12       # continue from the last epoch
    dlnotes train    --data data/shapes --preset retinanet_tiny_256 --workdir runs/f \
                     --backbone-weights shapes --freeze-backbone   # a pre-trained, frozen backbone
    dlnotes evaluate --model-file runs/r/model.keras --data data/shapes       # COCO mAP, val split
    dlnotes predict  --model-file runs/r/model.keras --images photos/ --output runs/r/photos
    dlnotes export   --model-file runs/r/model.keras --output runs/r/saved_model

``python -m dlnotes`` is the same program. A data set is ``--annotations FILE --images DIR``, or
``--data DIR --split NAME`` for the layout of :mod:`dlnotes.data.shapes` and COCO
(``DIR/annotations/instances_NAME.json`` or ``DIR/annotations/NAME.json``, images in
``DIR/NAME/``). Boxes in the JSON are COCO ``xywh`` pixels; the models train on ``xyxy`` pixels
(:meth:`~dlnotes.data.CocoDataset.to_tf_dataset`) and every result written is COCO ``xywh`` in
original-image pixels.

Training is the book's recipe (:mod:`dlnotes.training`: AdamW, linear warm-up then cosine decay,
global gradient clipping) under a ``tf.distribute`` strategy (``--strategy``), with TensorBoard
logs in ``WORKDIR/logs``, a checkpoint of the weights, the optimizer and the epoch at the end of
every epoch in ``WORKDIR/backup`` (``keras.callbacks.BackupAndRestore``) and the run's settings in
``WORKDIR/run.json``, which ``--resume`` reads. No command replaces an existing file unless given
``--overwrite`` (:mod:`dlnotes.saving`).

Problems with the input — a missing file or folder, a malformed JSON, an unknown preset, backbone
weights that do not fit the preset's backbone, a model whose class count differs from the data's —
end the command with exit status 2 and a one-line message (:class:`UsageError`), before anything
is trained or written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dlnotes import training
from dlnotes.data import CocoDataset
from dlnotes.data.coco import image_file_problem
from dlnotes.data.transforms import letterbox
from dlnotes.evaluation import evaluate_detector, predictions_to_coco
from dlnotes.models import (
    EFFICIENTDET_PRESETS,
    FASTER_RCNN_PRESETS,
    KEYPOINT_PRESETS,
    RETINANET_PRESETS,
    YOLOV3_PRESETS,
    Detector,
    EfficientDet,
    FasterRCNN,
    KeypointDetector,
    RetinaNet,
    YOLOv3,
    evaluate_keypoints,
)
from dlnotes.saving import load_model, save_model, writing

__all__ = [
    "FAMILIES",
    "STRATEGIES",
    "UsageError",
    "build_detector",
    "build_parser",
    "check_matches",
    "dataset_paths",
    "export_saved_model",
    "find_preset",
    "load_dataset",
    "load_detector",
    "main",
    "make_strategy",
    "prepare_training",
]

#: Model family (``--model``) -> (detector class, its presets).
FAMILIES = {
    "retinanet": (RetinaNet, RETINANET_PRESETS),
    "yolov3": (YOLOv3, YOLOV3_PRESETS),
    "efficientdet": (EfficientDet, EFFICIENTDET_PRESETS),
    "faster_rcnn": (FasterRCNN, FASTER_RCNN_PRESETS),
    "keypoint": (KeypointDetector, KEYPOINT_PRESETS),
}
#: ``--strategy`` names (see :func:`make_strategy`).
STRATEGIES = ("default", "mirrored", "multiworker", "tpu")
#: ``--backbone-weights`` values that name weights rather than a file.
NAMED_WEIGHTS = ("shapes", "imagenet")
#: Image files ``predict`` reads from a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

#: Settings of a training run (saved in ``run.json``; ``--resume`` reuses them) and the defaults
#: of a new run. ``None``: derived from the data (``steps_per_epoch``: one pass over the training
#: images; ``warmup_steps``: a tenth of the steps, at most 100; ``image_size``: the preset's);
#: ``backbone_weights`` None: the preset's random initialisation.
RUN_DEFAULTS = {
    "preset": None,
    "model_file": None,
    "annotations": None,
    "images": None,
    "image_size": None,
    "backbone_weights": None,
    "freeze_backbone": False,
    "batch_size": 8,
    "steps_per_epoch": None,
    "learning_rate": 2e-3,
    "warmup_steps": None,
    "weight_decay": 1e-4,
    "clipnorm": 5.0,
    "seed": 0,
    "horizontal_flip": True,
    "jit_compile": False,
}


class UsageError(Exception):
    """A problem with what the command was given (a missing file, a malformed JSON, an unknown
    preset, a model that does not fit the data, a file that would be replaced): :func:`main`
    prints it on one line and returns 2."""


def _one_line(error):
    """The message of an exception on one line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


# ----------------------------------------------------------------------------- inputs


def find_preset(preset, family=None):
    """``(family, detector class)`` of a preset name of :data:`FAMILIES`.

    Args:
        preset: a preset name, e.g. ``"retinanet_tiny_256"``.
        family: optional ``--model`` name; the preset must belong to it.

    Raises:
        UsageError: an unknown family or preset, or a preset of another family.
    """
    if family is not None and family not in FAMILIES:
        raise UsageError(f"unknown model {family!r}; known models: {', '.join(FAMILIES)}")
    if preset is None:
        names = sorted(FAMILIES[family][1]) if family else _all_presets()
        raise UsageError(f"no preset given (--preset); presets: {', '.join(names)}")
    owners = [name for name, (_, presets) in FAMILIES.items() if preset in presets]
    if not owners:
        raise UsageError(f"unknown preset {preset!r}; known presets: {', '.join(_all_presets())}")
    if family is not None and owners[0] != family:
        raise UsageError(f"preset {preset!r} is a {owners[0]} preset, not a {family} one")
    return owners[0], FAMILIES[owners[0]][0]


def _all_presets():
    return sorted(name for _, presets in FAMILIES.values() for name in presets)


def dataset_paths(data=None, split="train", annotations=None, images=None):
    """``(annotations JSON, image folder or None)`` of a data set given on the command line.

    Args:
        data: ``--data DIR``: ``DIR/annotations/instances_{split}.json`` (or
            ``DIR/annotations/{split}.json``) and the images in ``DIR/{split}``.
        split: the split of ``data``.
        annotations: ``--annotations FILE`` (instead of ``data``).
        images: ``--images DIR``; with ``annotations``, None lets :class:`CocoDataset` find the
            folder next to the JSON.

    Returns:
        Two :class:`pathlib.Path` (the second None when the images are to be found).

    Raises:
        UsageError: both or neither of ``data`` and ``annotations``, a missing file or folder.
    """
    if data is not None and annotations is not None:
        raise UsageError("give either --data DIR or --annotations FILE, not both")
    if data is None and annotations is None:
        raise UsageError("no data set given: use --data DIR or --annotations FILE [--images DIR]")
    if images is not None and not Path(images).is_dir():
        raise UsageError(f"image folder not found: {images}")
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise UsageError(f"data folder not found: {root}")
        candidates = [root / "annotations" / f"instances_{split}.json"]
        candidates.append(root / "annotations" / f"{split}.json")
        found = [path for path in candidates if path.is_file()]
        if not found:
            raise UsageError(
                f"no annotations for split {split!r} in {root}: expected "
                + " or ".join(str(c) for c in candidates)
            )
        folder = Path(images) if images is not None else root / split
        if not folder.is_dir():
            raise UsageError(f"image folder of split {split!r} not found: {folder}")
        return found[0], folder
    if not Path(annotations).is_file():
        raise UsageError(f"annotation file not found: {annotations}")
    return Path(annotations), None if images is None else Path(images)


def load_dataset(annotations, images=None):
    """A :class:`~dlnotes.data.CocoDataset`; its errors (a malformed JSON or annotation, a
    missing or broken image) as :class:`UsageError`."""
    try:
        return CocoDataset(annotations, image_dir=images)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(_one_line(err)) from err


def load_detector(path):
    """A dlnotes detector from a ``.keras`` file (:func:`dlnotes.saving.load_model`, not
    compiled); a missing, broken or foreign file as :class:`UsageError`."""
    try:
        model = load_model(path, compile=False)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(_one_line(err)) from err
    if not isinstance(model, Detector):
        raise UsageError(f"{path} holds a {type(model).__name__}, not a dlnotes detector")
    return model


def check_matches(model, data, source):
    """Raises :class:`UsageError` unless ``model`` predicts the classes (and, for a keypoint
    model, the keypoints) of the :class:`CocoDataset` ``data``; ``source`` names the model."""
    if model.num_classes != data.num_classes:
        raise UsageError(
            f"{source} predicts {model.num_classes} classes but {data.annotation_file} has "
            f"{data.num_classes} categories ({', '.join(data.class_names)}); use a model trained "
            "on this data set's categories"
        )
    model_k = getattr(model, "num_keypoints", None)
    if model_k is not None and model_k != data.num_keypoints:
        raise UsageError(
            f"{source} predicts {model_k} keypoints per object but {data.annotation_file} has "
            f"{data.num_keypoints}"
        )


def _check_new(path, overwrite, what="file"):
    """Raises :class:`UsageError` when ``path`` exists and ``overwrite`` is False."""
    if Path(path).exists() and not overwrite:
        raise UsageError(
            f"{what} {path} exists and is kept; pass --overwrite to replace it, or choose "
            "another --output"
        )


def _model_file(path):
    if not Path(path).is_file():
        raise UsageError(f"model file not found: {path}")
    return Path(path)


def _backbone_weights(weights):
    """``--backbone-weights``: a name of :data:`NAMED_WEIGHTS` unchanged, or the absolute path of
    an existing weights file (:class:`UsageError` if it does not exist)."""
    if weights in NAMED_WEIGHTS:
        return weights
    if not Path(weights).is_file():
        raise UsageError(
            f"--backbone-weights {weights}: file not found (expected {' or '.join(NAMED_WEIGHTS)} "
            "or a .weights.h5 file)"
        )
    return str(Path(weights).resolve())


# ----------------------------------------------------------------------------- distribution


def make_strategy(name, tpu=None):
    """The ``tf.distribute`` strategy of ``--strategy``.

    * ``"default"``: the current (default) strategy, one device;
    * ``"mirrored"``: ``MirroredStrategy`` over every GPU, or over every logical CPU device when
      there is no GPU (one CPU unless the CPU was split into logical devices);
    * ``"multiworker"``: ``MultiWorkerMirroredStrategy`` (the cluster comes from ``TF_CONFIG``);
    * ``"tpu"``: ``TPUStrategy`` on the TPU ``tpu`` (a name or ``grpc://`` address; Colab and
      Cloud TPU VMs find theirs without one).

    Raises:
        UsageError: an unknown name; no TPU found.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as err:
            raise UsageError(f"--strategy tpu: no TPU found ({_one_line(err)})") from err
        return tf.distribute.TPUStrategy(resolver)
    raise UsageError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")


def _is_chief(strategy):
    """Whether this process writes the run's files (always, except on the non-chief workers
    of a multi-worker strategy)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


# ----------------------------------------------------------------------------- train


def build_detector(settings, data):
    """The detector of a run, built for its input size (call it under ``strategy.scope()``).

    Args:
        settings: the run's settings (:data:`RUN_DEFAULTS` keys): a new detector of
            ``settings["preset"]`` (at ``settings["image_size"]`` if given, its backbone from
            ``settings["backbone_weights"]`` if given) with the data's classes (and keypoints),
            or the saved detector ``settings["model_file"]``; with
            ``settings["freeze_backbone"]`` its backbone (BatchNorms included) is not trained.
        data: the training :class:`CocoDataset`.

    Raises:
        UsageError: an unknown preset; a keypoint preset on data without keypoints; a saved
            model whose classes differ from the data's; an input size the model cannot take;
            backbone weights that do not exist or do not fit the preset's backbone.
    """
    if settings["model_file"] is not None:
        model = load_detector(settings["model_file"])
        check_matches(model, data, settings["model_file"])
    else:
        _, cls = find_preset(settings["preset"])
        kwargs = {"num_classes": data.num_classes}
        if cls is KeypointDetector:
            if not data.num_keypoints:
                raise UsageError(
                    f"preset {settings['preset']!r} is a keypoint model, but no category of "
                    f"{data.annotation_file} defines keypoints"
                )
            kwargs["num_keypoints"] = data.num_keypoints
        if settings["image_size"] is not None:
            kwargs["image_size"] = (settings["image_size"],) * 2
        weights = settings["backbone_weights"]
        if weights is not None:
            kwargs["backbone_weights"] = weights
        try:
            model = cls.from_preset(settings["preset"], **kwargs)
        except FileNotFoundError as err:
            raise UsageError(f"--backbone-weights {weights}: {_one_line(err)}") from err
        except ValueError as err:
            source = f"preset {settings['preset']!r}"
            if weights is not None:
                source += f" with --backbone-weights {weights}"
            raise UsageError(f"{source}: {_one_line(err)}") from err
    if not model.built:  # a YOLOv3 builds itself in __init__
        model.build((None, *model.image_size, 3))
    if settings["freeze_backbone"]:
        model.backbone.trainable = False  # its BatchNorms too: they run in inference mode
    return model


def _recipe(settings, epochs):
    """The :class:`dlnotes.training.Recipe` of a run: ``epochs`` x ``steps_per_epoch`` steps."""
    try:
        return training.Recipe(
            steps=epochs * settings["steps_per_epoch"],
            batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            warmup_steps=settings["warmup_steps"],
            weight_decay=settings["weight_decay"],
            clipnorm=settings["clipnorm"],
            jit_compile=settings["jit_compile"],
            log_every=settings["steps_per_epoch"],
            horizontal_flip=settings["horizontal_flip"],
            seed=settings["seed"],
        )
    except ValueError as err:
        raise UsageError(_one_line(err)) from err


def prepare_training(settings, epochs, data, strategy):
    """The compiled detector, its training batches and its recipe, as ``dlnotes train`` makes
    them.

    Args:
        settings: the run's settings (:data:`RUN_DEFAULTS` keys, ``steps_per_epoch`` and
            ``warmup_steps`` filled in).
        epochs: total epochs (the schedule decays to 0 at ``epochs x steps_per_epoch``).
        data: the training :class:`CocoDataset`.
        strategy: a ``tf.distribute`` strategy (:func:`make_strategy`); the detector and its
            optimizer are made under its scope, the weights seeded with ``settings["seed"]``.

    Returns:
        ``(model, batches, recipe)``: the detector compiled with the book's optimizer
        (:func:`dlnotes.training.make_optimizer`: AdamW, warm-up + cosine decay, global
        clipping); the repeated, shuffled ``tf.data`` pipeline of global batches
        ``(images (B, H, W, 3), {"boxes": (B, M, 4) xyxy pixels, "labels": (B, M)[,
        "keypoints"]})`` (:func:`dlnotes.training.training_batches`); the
        :class:`dlnotes.training.Recipe`.
    """
    recipe = _recipe(settings, epochs)
    with strategy.scope():
        keras.utils.set_random_seed(settings["seed"])
        model = build_detector(settings, data)
        model.compile(optimizer=training.make_optimizer(recipe), jit_compile=recipe.jit_compile)
    batches = training.training_batches(data, recipe, model)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        options = tf.data.Options()  # shard the images (one source, not files)
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        batches = batches.with_options(options)
    return model, batches, recipe


def _given_settings(args):
    """The run settings given on the command line (data paths resolved), others None."""
    given = {key: getattr(args, key, None) for key in RUN_DEFAULTS}
    given["horizontal_flip"] = False if args.no_flip else None
    given["jit_compile"] = True if args.xla else None
    given["freeze_backbone"] = True if args.freeze_backbone else None
    if args.backbone_weights is not None:
        given["backbone_weights"] = _backbone_weights(args.backbone_weights)
    if args.data is not None or args.annotations is not None:
        annotations, images = dataset_paths(args.data, args.split, args.annotations, args.images)
        given["annotations"] = str(annotations.resolve())
        given["images"] = None if images is None else str(images.resolve())
    if args.model_file is not None:
        given["model_file"] = str(_model_file(args.model_file).resolve())
    return given


def _run_settings(args, run_file):
    """The settings of a new run (command line over :data:`RUN_DEFAULTS`), or with
    ``--resume`` those saved in ``run_file``; an option given on the command line that differs
    from the saved run is a :class:`UsageError`."""
    given = _given_settings(args)
    if not args.resume:
        if given["preset"] is not None and given["model_file"] is not None:
            raise UsageError("give either --preset (a new detector) or --model-file, not both")
        if given["backbone_weights"] is not None and given["model_file"] is not None:
            raise UsageError(
                "--backbone-weights is for a new detector (--preset), not with --model-file "
                "(a saved detector has its own weights)"
            )
        if given["preset"] is None and given["model_file"] is None:
            find_preset(None, args.model)  # names the presets
        if given["preset"] is not None:
            find_preset(given["preset"], args.model)
        if given["annotations"] is None:
            dataset_paths()  # raises: no data set given
        return {key: default if given[key] is None else given[key]
                for key, default in RUN_DEFAULTS.items()}  # fmt: skip
    if not run_file.is_file():
        raise UsageError(f"--resume: {run_file} not found (no run was started in this workdir)")
    saved = json.loads(run_file.read_text())
    settings, epochs = {**RUN_DEFAULTS, **saved["settings"]}, saved["epochs"]  # keys added later
    for key, value in given.items():
        if value is not None and value != settings[key]:
            raise UsageError(
                f"--resume continues the run in {run_file.parent} with its settings (run.json); "
                f"{key} is {settings[key]!r} there, not {value!r}"
            )
    return {**settings, "epochs": epochs}


def _has_tensorboard():
    """Whether the ``tensorboard`` package (which ``keras.callbacks.TensorBoard`` writes with) is
    installed; TensorFlow >= 2.20 no longer installs it."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _completed_epochs(backup_dir):
    """Epochs finished by the run whose ``BackupAndRestore`` checkpoint is in ``backup_dir``
    (0 without a checkpoint)."""
    metadata = Path(backup_dir) / "training_metadata.json"
    if not metadata.is_file():
        return 0
    return int(json.loads(metadata.read_text())["epoch"])


def train_command(args):
    """``dlnotes train``: fit a detector, checkpoint every epoch, save the final ``.keras``."""
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} is a file, not a folder")
    run_file, backup_dir = workdir / "run.json", workdir / "backup"
    settings = _run_settings(args, run_file)
    epochs = args.epochs or settings.pop("epochs", None) or 10
    settings.pop("epochs", None)
    done = _completed_epochs(backup_dir)
    if args.resume and done == 0:
        raise UsageError(f"--resume: {backup_dir} holds no checkpoint (no epoch was completed)")
    if not args.resume and done:
        raise UsageError(
            f"{workdir} holds the checkpoint of an earlier run ({done} epochs); pass --resume to "
            "continue it, or choose another --workdir"
        )
    if done >= epochs:
        raise UsageError(
            f"the run in {workdir} has completed {done} epochs; pass --epochs > {done} to train on"
        )
    output = Path(args.output) if args.output else workdir / "model.keras"
    if output.suffix != ".keras":
        raise UsageError(f"--output {output} must end with .keras")
    _check_new(output, args.overwrite, "model file")

    data = load_dataset(settings["annotations"], settings["images"])
    if settings["steps_per_epoch"] is None:
        settings["steps_per_epoch"] = max(1, len(data) // settings["batch_size"])
    if settings["warmup_steps"] is None:
        settings["warmup_steps"] = min(100, epochs * settings["steps_per_epoch"] // 10)
    strategy = make_strategy(args.strategy, args.tpu)
    model, batches, recipe = prepare_training(settings, epochs, data, strategy)

    chief = _is_chief(strategy)
    if chief:
        workdir.mkdir(parents=True, exist_ok=True)
        with writing(run_file, overwrite=True, owner="dlnotes train") as tmp:
            Path(tmp).write_text(json.dumps({"settings": settings, "epochs": epochs}, indent=2))
    backbone = ""
    if settings["backbone_weights"] is not None:
        backbone += f", backbone weights {settings['backbone_weights']}"
    if settings["freeze_backbone"]:
        backbone += ", backbone frozen"
    print(
        f"{type(model).__name__} ({settings['preset'] or settings['model_file']}{backbone}), "
        f"{model.count_params():,} parameters, input {tuple(model.image_size)}; {len(data)} "
        f"images, {data.num_classes} classes; {epochs} epochs of {recipe.log_every} steps of "
        f"{recipe.batch_size} images on {strategy.num_replicas_in_sync} replica(s)"
        + (f"; resuming after epoch {done}" if done else ""),
        flush=True,
    )
    interactive = sys.stdout.isatty()
    callbacks = [keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False)]
    if _has_tensorboard():
        callbacks.append(keras.callbacks.TensorBoard(str(workdir / "logs"), write_graph=False))
    else:
        print("no TensorBoard logs: the tensorboard package is not installed (pip install "
              "'dlnotes[cli]')", flush=True)  # fmt: skip
    if not interactive:  # one line per epoch in logs instead of progress bars
        callbacks.append(
            training.EpochLog(recipe.log_every, print_fn=lambda line: print(line, flush=True))
        )
    model.fit(
        batches,
        epochs=epochs,
        steps_per_epoch=recipe.log_every,
        verbose=1 if interactive else 0,
        shuffle=False,  # the pipeline shuffles (seeded)
        callbacks=callbacks,
    )
    if chief:
        save_model(model, output, overwrite=args.overwrite)
        print(f"saved {output} (epoch {epochs}, optimizer step {int(model.optimizer.iterations)})")
    return 0


# ----------------------------------------------------------------------------- evaluate


def _write_json(path, value, overwrite):
    """Writes ``value`` as JSON to ``path`` atomically (:func:`dlnotes.saving.writing`)."""
    with writing(path, overwrite=overwrite, owner="dlnotes") as tmp:
        Path(tmp).write_text(json.dumps(value))


def evaluate_command(args):
    """``dlnotes evaluate``: COCO mAP of a saved detector; writes the detections as a COCO
    results JSON (``COCO.loadRes`` reads it)."""
    model_file = _model_file(args.model_file)
    annotations, images = dataset_paths(args.data, args.split, args.annotations, args.images)
    name = args.split if args.data is not None else annotations.stem
    output = Path(args.output or model_file.with_name(f"{model_file.stem}_{name}_detections.json"))
    _check_new(output, args.overwrite)
    data = load_dataset(annotations, images)
    model = load_detector(model_file)
    check_matches(model, data, model_file)
    if isinstance(model, KeypointDetector):
        evaluation = evaluate_keypoints(model, data, batch_size=args.batch_size)
        print(f"keypoints (OKS), {len(data)} images of {data.annotation_file}:")
        print(evaluation.result.summary(), end="")
        print("boxes (the extent of the keypoints):")
        print(evaluation.box_result.summary(), end="")
    else:
        evaluation = evaluate_detector(model, data, batch_size=args.batch_size)
        print(f"boxes, {len(data)} images of {data.annotation_file}:")
        print(evaluation.result.summary(), end="")
    _write_json(output, evaluation.detections, args.overwrite)
    print(f"wrote {len(evaluation.detections)} detections to {output}")
    return 0


# ----------------------------------------------------------------------------- predict


def _folder_images(folder):
    """Sorted image files of ``folder``; :class:`UsageError` for none or a broken one."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    for path in files:
        problem = image_file_problem(path)
        if problem:
            raise UsageError(f"cannot read image {path}: {problem}")
    return files


def _categories(path):
    """``(category ids, names)`` in label order (sorted ids) of a COCO JSON's categories."""
    try:
        categories = json.loads(Path(path).read_text())["categories"]
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--categories {path}: not a COCO JSON with categories ({err})") from err
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _load_image(path):
    """The image file ``path`` as uint8 ``(H, W, 3)`` RGB (a string tensor or a str)."""
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _letterboxed(paths, image_size, batch_size):
    """Batches ``(images (B, H, W, 3) float32, scale (B, 2), offset (B, 2))`` of the image files
    ``paths`` letterboxed to ``image_size`` (as in training; ``original = (x - offset) /
    scale``)."""

    def load(path):
        image, _, _, scale, offset = letterbox(_load_image(path), tf.zeros([0, 4]), image_size)
        return image, scale, offset

    files = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    return files.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)


def _draw(image, detections, label_of, class_names, path, score_threshold, overwrite):
    """Writes ``image`` (uint8 ``(H, W, 3)``) with its COCO ``detections`` (``bbox`` xywh
    pixels, ``keypoints`` when present) of score >= ``score_threshold`` to the PNG ``path``."""
    from matplotlib.figure import Figure

    from dlnotes import viz

    shown = [d for d in detections if d["score"] >= score_threshold]
    height, width = image.shape[:2]
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = figure.add_axes((0, 0, 1, 1))
    viz.show_image(image, ax=ax)
    if shown:
        viz.draw_boxes(
            ax,
            np.array([d["bbox"] for d in shown]),
            labels=[label_of[d["category_id"]] for d in shown],
            scores=[d["score"] for d in shown],
            class_names=class_names,
            fmt="xywh",
        )
        if "keypoints" in shown[0]:
            viz.draw_keypoints(
                ax, np.array([d["keypoints"] for d in shown]).reshape(len(shown), -1, 3)
            )
    with writing(path, overwrite=overwrite, owner="dlnotes predict", suffix=".png") as tmp:
        figure.savefig(tmp, format="png")


def predict_command(args):
    """``dlnotes predict``: detections of a saved detector on a folder of images or a data
    set's images, as a COCO results JSON and drawn PNGs."""
    model_file = _model_file(args.model_file)
    if args.data is None and args.annotations is None:  # a plain folder of images
        if args.images is None:
            raise UsageError("no images given: use --images DIR, --data DIR or --annotations FILE")
        if not Path(args.images).is_dir():
            raise UsageError(f"image folder not found: {args.images}")
        paths = _folder_images(args.images)
        image_ids = list(range(1, len(paths) + 1))
        data = None
    else:
        data = load_dataset(*dataset_paths(args.data, args.split, args.annotations, args.images))
        paths = [Path(r["path"]) for r in data.records]
        image_ids = list(data.image_ids)
    output = Path(args.output or model_file.with_name(f"{model_file.stem}_predictions"))
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):  # the same name in two folders: add the image ids
        stems = [f"{i}_{s}" for i, s in zip(image_ids, stems, strict=True)]
    drawn = [output / f"{s}.png" for s in stems]
    written = [output / "detections.json", *drawn] + ([] if data else [output / "images.json"])
    for path in written:
        _check_new(path, args.overwrite)

    model = load_detector(model_file)
    if data is not None:
        check_matches(model, data, model_file)
        category_ids, class_names = data.category_ids, data.class_names
    elif args.categories is not None:
        category_ids, class_names = _categories(args.categories)
        if len(category_ids) != model.num_classes:
            raise UsageError(
                f"{model_file} predicts {model.num_classes} classes but --categories "
                f"{args.categories} has {len(category_ids)}"
            )
    else:  # no category ids known: the labels themselves
        category_ids, class_names = list(range(model.num_classes)), None

    detections = []
    batches = _letterboxed(paths, tuple(model.image_size), args.batch_size)
    for b, (images, scale, offset) in enumerate(batches):
        predictions = model.predict_on_batch(images)
        start = b * args.batch_size
        ids = image_ids[start : start + len(images)]
        detections += predictions_to_coco(predictions, ids, category_ids, scale, offset)

    output.mkdir(parents=True, exist_ok=True)
    label_of = {c: k for k, c in enumerate(category_ids)}
    per_image = {image_id: [] for image_id in image_ids}
    for detection in detections:
        per_image[detection["image_id"]].append(detection)
    entries = []
    for path, image_id, target in zip(paths, image_ids, drawn, strict=True):
        image = _load_image(str(path)).numpy()
        _draw(image, per_image[image_id], label_of, class_names, target, args.score_threshold,
              args.overwrite)  # fmt: skip
        entries.append({"id": image_id, "file_name": path.name, "height": image.shape[0],
                        "width": image.shape[1]})  # fmt: skip
    _write_json(output / "detections.json", detections, args.overwrite)
    if data is None:
        _write_json(output / "images.json", entries, args.overwrite)
    print(f"{len(detections)} detections on {len(paths)} images: {output}/detections.json and "
          f"{len(drawn)} drawn images (score >= {args.score_threshold}) in {output}")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------- export


def export_saved_model(model, path, overwrite=False):
    """Exports ``model`` as a TensorFlow SavedModel for serving (TF Serving, TFLite, ``tf.saved_
    model.load``) whose ``serve`` endpoint is the model's ``predict`` step.

    ``serve(images)``: ``images`` float32 ``(B, H, W, 3)`` RGB in [0, 255] at the model's
    ``image_size`` (letterboxed as in training) -> the padded detections ``{"boxes": (B, D, 4)
    xyxy pixels of the input, "scores": (B, D), "labels": (B, D), "num_detections": (B,)}``
    (``"keypoints"`` for a keypoint model), after the input checks.

    The SavedModel is written to a temporary folder next to ``path`` and renamed, so an existing
    ``path`` is replaced (``overwrite=True``) only by a complete export.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"export: {path} exists and is kept; pass overwrite=True")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"export: cannot write {path}: its folder does not exist")
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec([None, *model.image_size, 3], tf.float32, name="images")
    archive.add_endpoint("serve", model.predict_step, input_signature=[spec])
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        archive.write_out(str(tmp), verbose=False)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def export_command(args):
    """``dlnotes export``: a saved detector as a SavedModel for serving."""
    model_file = _model_file(args.model_file)
    output = Path(args.output or model_file.with_name(f"{model_file.stem}_saved_model"))
    _check_new(output, args.overwrite, "export folder")
    if not output.parent.is_dir():
        raise UsageError(f"cannot export to {output}: its folder {output.parent} does not exist")
    model = load_detector(model_file)
    export_saved_model(model, output, overwrite=args.overwrite)
    height, width = model.image_size
    print(f"exported {model_file} to {output}: serve(images (B, {height}, {width}, 3) float32) "
          "-> the padded detections")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------- parser


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _data_arguments(parser, split):
    group = parser.add_argument_group("data set (COCO format)")
    group.add_argument("--data", metavar="DIR", help="DIR/annotations/instances_SPLIT.json (or "
                       "SPLIT.json) with the images in DIR/SPLIT/")  # fmt: skip
    group.add_argument("--split", default=split, help=f"split of --data (default {split})")
    group.add_argument("--annotations", metavar="FILE", help="a COCO annotations JSON")
    group.add_argument("--images", metavar="DIR", help="the folder of the images")


def build_parser():
    """The ``argparse`` parser of ``dlnotes`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dlnotes",
        description="Train, evaluate, predict with and export dlnotes detectors on COCO-format "
        "data (an annotations JSON and a folder of images).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a detector (checkpoints every epoch)")
    _data_arguments(train, "train")
    model = train.add_argument_group("model")
    model.add_argument("--preset", help=f"a preset of any detector, e.g. retinanet_tiny_256 "
                       f"({len(_all_presets())} presets)")  # fmt: skip
    model.add_argument("--model", help=f"the preset's family, checked: {', '.join(FAMILIES)}")
    model.add_argument("--model-file", metavar="FILE", help="start from a saved .keras detector")
    model.add_argument("--image-size", type=_positive(int), help="square input size (default: "
                       "the preset's)")  # fmt: skip
    model.add_argument("--backbone-weights", metavar="W", help="a new detector's backbone "
                       "weights: shapes (shipped, for resnet_tiny), imagenet (downloads, where the "
                       "backbone has them) or a .weights.h5 file (default: random)")  # fmt: skip
    model.add_argument("--freeze-backbone", action="store_true", help="do not train the backbone "
                       "(its BatchNorms included): only the neck and heads learn")  # fmt: skip
    run = train.add_argument_group("training (the book's recipe)")
    run.add_argument("--workdir", required=True, help="run folder: run.json, backup/, logs/, "
                     "model.keras")  # fmt: skip
    run.add_argument("--resume", action="store_true", help="continue the run in --workdir from "
                     "its last epoch, with its settings")  # fmt: skip
    run.add_argument("--epochs", type=_positive(int), help="total epochs (default 10)")
    run.add_argument("--steps-per-epoch", type=_positive(int), help="default: images // batch")
    run.add_argument("--batch-size", type=_positive(int), help="global batch (default 8)")
    run.add_argument("--learning-rate", type=_positive(float), help="peak of AdamW (default 2e-3)")
    run.add_argument("--warmup-steps", type=int, help="linear warm-up (default steps / 10, <= 100)")
    run.add_argument("--weight-decay", type=float, help="AdamW's decoupled decay (default 1e-4)")
    run.add_argument("--clipnorm", type=_positive(float), help="global gradient norm (default 5)")
    run.add_argument("--seed", type=int, help="weights, shuffle and flips (default 0)")
    run.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    run.add_argument("--xla", action="store_true", help="compile the training step with XLA")
    run.add_argument("--strategy", choices=STRATEGIES, default="default",
                     help="tf.distribute strategy (default: one device)")  # fmt: skip
    run.add_argument("--tpu", help="TPU name or address for --strategy tpu")
    run.add_argument("--output", help="the trained model (default WORKDIR/model.keras)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    train.set_defaults(run=train_command)

    evaluate = commands.add_parser("evaluate", help="COCO mAP; writes the detections JSON")
    evaluate.add_argument("--model-file", required=True, metavar="FILE")
    _data_arguments(evaluate, "val")
    evaluate.add_argument("--batch-size", type=_positive(int), default=8)
    evaluate.add_argument("--output", help="results JSON (default next to the model file)")
    evaluate.add_argument("--overwrite", action="store_true")
    evaluate.set_defaults(run=evaluate_command)

    predict = commands.add_parser("predict", help="detections JSON and drawn PNGs")
    predict.add_argument("--model-file", required=True, metavar="FILE")
    _data_arguments(predict, "val")
    predict.add_argument("--categories", metavar="FILE", help="with --images alone: a COCO JSON "
                         "whose categories name the classes")  # fmt: skip
    predict.add_argument("--score-threshold", type=float, default=0.3, help="drawn detections")
    predict.add_argument("--batch-size", type=_positive(int), default=8)
    predict.add_argument("--output", help="output folder (default next to the model file)")
    predict.add_argument("--overwrite", action="store_true")
    predict.set_defaults(run=predict_command)

    export = commands.add_parser("export", help="a SavedModel for serving")
    export.add_argument("--model-file", required=True, metavar="FILE")
    export.add_argument("--output", help="SavedModel folder (default next to the model file)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=export_command)
    return parser


def main(argv=None):
    """Runs ``dlnotes`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status: 0, or
    2 with a one-line message on stderr for bad input (:class:`UsageError`, a file that would be
    replaced)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, FileExistsError, FileNotFoundError, IsADirectoryError) as err:
        print(f"dlnotes {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
