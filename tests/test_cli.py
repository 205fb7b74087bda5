"""Tests of the ``dlnotes`` command line (dlnotes.cli) on a tiny shapes data set (8 + 4 images
of 128 px): ``python -m dlnotes`` train -> --resume -> evaluate -> predict -> export in
subprocesses, a run from the shipped backbone weights, frozen, the input errors (exit status 2 and
one line, before anything runs), and one training step of the CLI's model and optimizer on two
replicas against one device."""

import json
import os
import re
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import script_beside_tests, script_result

from dlnotes import cli
from dlnotes.backbones import build_backbone
from dlnotes.data import CocoDataset, generate_shapes_dataset
from dlnotes.models import RetinaNet
from dlnotes.saving import load_model, save_model

SIZE = 128


def dlnotes(*args):
    """``python -m dlnotes *args`` in a fresh interpreter -> ``CompletedProcess`` (text)."""
    return subprocess.run(
        [sys.executable, "-m", "dlnotes", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=900,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The data set, a two-category copy of its val split, and a start model.

    The start model is the tiny RetinaNet preset at 128 px with class scores starting at 0.5
    (the presets start at 0.01, under the 0.05 score threshold, and give no detection after a
    few steps), so that the trained model's detections can be checked.
    """
    root = tmp_path_factory.mktemp("cli")
    paths = generate_shapes_dataset(root / "shapes", num_train=8, num_val=4, image_size=SIZE)
    val = json.loads(paths["val_annotations"].read_text())
    val["categories"] = val["categories"][:2]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] in (1, 2)]
    two_classes = root / "two_classes.json"
    two_classes.write_text(json.dumps(val))
    model = RetinaNet.from_preset(
        "retinanet_tiny_256", num_classes=6, image_size=(SIZE, SIZE), prior_probability=0.5
    )
    model.build((None, SIZE, SIZE, 3))
    save_model(model, root / "start.keras")
    return {**paths, "data": root / "shapes", "start": root / "start.keras",
            "two_classes": two_classes}  # fmt: skip


def _refused(argv, capsys, fragment):
    """``cli.main(argv)`` returns 2 and prints one line on stderr that contains ``fragment``."""
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dlnotes {argv[0]}: error: "), err
    assert fragment in err, err


# ----------------------------------------------------------------------------- end to end


def test_train_resume_evaluate_predict_export(files, tmp_path, capsys):
    work, data = tmp_path / "run", files["data"]
    common = ["--data", data, "--workdir", work, "--steps-per-epoch", 1, "--batch-size", 2]

    # train: one epoch of one step from the start model (a fine-tuning run)
    first = dlnotes("train", "--model-file", files["start"], *common, "--epochs", 1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"^step +1: loss \d", first.stdout, re.M), first.stdout  # one line, no bar
    assert "optimizer step 1" in first.stdout
    settings = json.loads((work / "run.json").read_text())["settings"]
    assert settings["model_file"] == str(files["start"].resolve())
    assert settings["annotations"] == str(files["train_annotations"].resolve())
    assert (work / "backup" / "latest.weights.h5").is_file()
    assert list((work / "logs" / "train").glob("events.out.tfevents.*"))
    trained = load_model(work / "model.keras")
    assert trained.num_classes == 6 and tuple(trained.image_size) == (SIZE, SIZE)

    # a new run in the same workdir, or a resumed one onto the existing model file: refused
    again = ["train", "--model-file", files["start"], *common, "--epochs", 2]
    _refused(again, capsys, "pass --resume")
    _refused(["train", "--workdir", work, "--resume", "--epochs", 2], capsys, "--overwrite")
    _refused(["train", "--workdir", work, "--resume", "--epochs", 1], capsys, "--epochs > 1")

    # --resume: the second epoch only, from the checkpoint (weights, optimizer step, epoch)
    model_file = work / "model2.keras"
    second = dlnotes("train", "--workdir", work, "--resume", "--epochs", 2, "--output", model_file)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming after epoch 1" in second.stdout
    assert re.search(r"^step +2: loss", second.stdout, re.M)
    assert not re.search(r"^step +1:", second.stdout, re.M)
    assert "optimizer step 2" in second.stdout
    resumed = load_model(model_file)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(trained.get_weights(), resumed.get_weights(), strict=True)
    ]
    assert any(changed)

    # evaluate: the COCO summary, and a results JSON that pycocotools loads
    results = tmp_path / "val_detections.json"
    evaluated = dlnotes("evaluate", "--model-file", model_file, "--data", data, "--output", results)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in evaluated.stdout
    detections = json.loads(results.read_text())
    ground_truth = CocoDataset(files["val_annotations"]).coco
    loaded = ground_truth.loadRes(str(results))
    assert len(loaded.getAnnIds()) == len(detections) > 0
    assert {d["image_id"] for d in detections} <= {1, 2, 3, 4}
    assert {d["category_id"] for d in detections} <= set(range(1, 7))
    _refused(["evaluate", "--model-file", model_file, "--data", data, "--output", results],
             capsys, "exists and is kept")  # fmt: skip

    # predict on a folder of images (ids 1..4 in file order, like the data set's): the same
    # detections as evaluate's, drawn PNGs of the images' size, the image list
    predicted = tmp_path / "predicted"
    folder = dlnotes("predict", "--model-file", model_file, "--images", files["val_images"],
                     "--categories", files["val_annotations"], "--output", predicted)  # fmt: skip
    assert folder.returncode == 0, folder.stderr[-3000:]
    _assert_same_detections(json.loads((predicted / "detections.json").read_text()), detections)
    listed = json.loads((predicted / "images.json").read_text())
    assert [(e["id"], e["file_name"]) for e in listed] == [(i, f"{i:06d}.png") for i in range(1, 5)]
    for i in range(1, 5):
        drawn = cv2.imread(str(predicted / f"{i:06d}.png"))
        assert drawn is not None and drawn.shape == (SIZE, SIZE, 3)

    # predict on the data set's images (in process): the same detections
    on_data = tmp_path / "predicted_val"
    assert cli.main(["predict", "--model-file", str(model_file), "--data", str(data),
                     "--output", str(on_data)]) == 0  # fmt: skip
    _assert_same_detections(json.loads((on_data / "detections.json").read_text()), detections)
    assert not (on_data / "images.json").exists()

    # export: a SavedModel whose serve() gives the Keras model's detections
    exported = tmp_path / "saved_model"
    export = dlnotes("export", "--model-file", model_file, "--output", exported)
    assert export.returncode == 0, export.stderr[-3000:]
    images, _ = next(iter(CocoDataset(files["val_annotations"]).to_tf_dataset(4, SIZE)))
    loaded = tf.saved_model.load(str(exported))  # held: serve() reads its variables
    served = loaded.serve(images)
    want = resumed.predict_on_batch(images)
    assert set(served) == set(want) >= {"boxes", "scores", "labels", "num_detections"}
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(served[key]), value, atol=1e-4, err_msg=key)
    _refused(["export", "--model-file", model_file, "--output", exported], capsys, "--overwrite")


def _assert_same_detections(got, want):
    assert [(d["image_id"], d["category_id"]) for d in got] == [
        (d["image_id"], d["category_id"]) for d in want
    ]
    np.testing.assert_allclose([d["bbox"] for d in got], [d["bbox"] for d in want], atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-5)


# ----------------------------------------------------------------------------- backbone weights


def test_train_from_the_shapes_backbone_frozen_and_resume(files, tmp_path, capsys):
    work = tmp_path / "run"
    common = ["--workdir", work, "--steps-per-epoch", 1, "--batch-size", 2]
    first = ["train", "--data", files["data"], "--preset", "retinanet_tiny_256", "--image-size",
             SIZE, "--backbone-weights", "shapes", "--freeze-backbone", *common,
             "--epochs", 1]  # fmt: skip
    capsys.readouterr()
    assert cli.main([str(a) for a in first]) == 0
    assert "backbone weights shapes, backbone frozen" in capsys.readouterr().out
    settings = json.loads((work / "run.json").read_text())["settings"]
    assert settings["backbone_weights"] == "shapes" and settings["freeze_backbone"] is True

    # --resume rebuilds the same model from run.json: the shapes weights, frozen
    resumed = work / "model2.keras"
    assert cli.main(["train", "--workdir", str(work), "--resume", "--epochs", "2",
                     "--output", str(resumed)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "resuming after epoch 1" in out and "backbone frozen" in out
    assert "optimizer step 2" in out  # the optimizer state of the frozen model was restored

    # the backbone (BatchNorm statistics included) is the shipped one after both runs; the rest
    # trained
    shipped = build_backbone("resnet_tiny", weights="shapes").get_weights()
    one, two = load_model(work / "model.keras", compile=False), load_model(resumed, compile=False)
    for model in (one, two):
        for got, want in zip(model.backbone.get_weights(), shipped, strict=True):
            np.testing.assert_array_equal(got, want)
    changed = [
        not np.array_equal(a, b) for a, b in zip(one.get_weights(), two.get_weights(), strict=True)
    ]
    assert any(changed)


def test_freeze_backbone_of_a_new_and_a_saved_model(files):
    data = cli.load_dataset(files["train_annotations"])
    shipped = build_backbone("resnet_tiny", weights="shapes").get_weights()
    base = {**cli.RUN_DEFAULTS, "steps_per_epoch": 1, "warmup_steps": 0, "freeze_backbone": True}
    new = {**base, "preset": "retinanet_tiny_256", "image_size": SIZE, "backbone_weights": "shapes"}
    saved = {**base, "model_file": str(files["start"])}
    models = [cli.prepare_training(settings, 1, data, cli.make_strategy("default"))[0]
              for settings in (new, saved)]  # fmt: skip
    for model in models:
        assert model.backbone.trainable is False
        assert model.backbone.trainable_weights == [] and model.trainable_weights
        norms = [layer for layer in model.backbone._flatten_layers()
                 if isinstance(layer, keras.layers.BatchNormalization)]  # fmt: skip
        assert norms and not any(layer.trainable for layer in norms)
    for got, want in zip(models[0].backbone.get_weights(), shipped, strict=True):
        np.testing.assert_array_equal(got, want)


def test_backbone_weights_errors_exit_2_with_one_line(files, tmp_path, capsys):
    work = tmp_path / "w"
    new = ["train", "--data", files["data"], "--workdir", work, "--backbone-weights"]
    _refused([*new, "shapes", "--preset", "retinanet_resnet50_fpn"], capsys,
             "preset 'retinanet_resnet50_fpn' with --backbone-weights shapes: resnet50: no shapes "
             "weights")  # fmt: skip
    _refused([*new, "shapes", "--preset", "faster_rcnn_tiny_256"], capsys,
             "--backbone-weights shapes: vgg16: no shapes weights")  # fmt: skip
    _refused([*new, "shapes", "--preset", "yolov3_mini_256"], capsys,
             "--backbone-weights shapes: darknet53: no shapes weights")  # fmt: skip
    _refused([*new, "imagenet", "--preset", "retinanet_tiny_256"], capsys,
             "--backbone-weights imagenet: resnet_tiny: no ImageNet weights")  # fmt: skip
    missing = tmp_path / "missing.weights.h5"
    _refused([*new, missing, "--preset", "retinanet_tiny_256"], capsys,
             f"--backbone-weights {missing}: file not found")  # fmt: skip
    _refused([*new, "shapes", "--model-file", files["start"]], capsys,
             "is for a new detector (--preset), not with --model-file")  # fmt: skip
    assert not work.exists()  # nothing was written
    # a weights file that went missing after the command line was read (the builder's error)
    settings = {**cli.RUN_DEFAULTS, "preset": "retinanet_tiny_256"}
    settings["backbone_weights"] = str(missing)
    with pytest.raises(cli.UsageError, match="^--backbone-weights .*does not exist"):
        cli.build_detector(settings, cli.load_dataset(files["train_annotations"]))


# ----------------------------------------------------------------------------- bad input


def test_an_input_error_in_a_real_process_is_one_line_without_traceback(files, tmp_path):
    done = dlnotes("train", "--data", files["data"], "--preset", "retinanet_huge",
                   "--workdir", tmp_path / "w")  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dlnotes train: error: unknown preset 'retinanet_huge'; known presets")
    assert "retinanet_tiny_256" in last and "keypoint_tiny_256" in last
    assert not (tmp_path / "w").exists()


def test_input_errors_exit_2_with_one_line(files, tmp_path, capsys):
    data, start, val_images = files["data"], files["start"], files["val_images"]
    work = ["--workdir", tmp_path / "w"]
    missing = tmp_path / "missing"
    _refused(["train", "--data", missing, "--preset", "retinanet_tiny_256", *work], capsys,
             f"data folder not found: {missing}")  # fmt: skip
    _refused(["train", "--data", data, "--split", "test", "--preset", "retinanet_tiny_256",
              *work], capsys, "no annotations for split 'test'")  # fmt: skip
    _refused(["evaluate", "--model-file", start, "--annotations", missing / "a.json"], capsys,
             "annotation file not found")  # fmt: skip
    _refused(["export", "--model-file", missing / "m.keras"], capsys, "model file not found")
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"images": [')
    _refused(["evaluate", "--model-file", start, "--annotations", malformed, "--images",
              val_images], capsys, "is not a valid JSON file")  # fmt: skip
    _refused(["predict", "--model-file", malformed, "--images", val_images], capsys,
             "is not a zip archive")  # fmt: skip
    _refused(["train", "--data", data, "--preset", "nope", *work], capsys, "unknown preset 'nope'")
    _refused(["train", "--data", data, "--model", "ssd", "--preset", "retinanet_tiny_256",
              *work], capsys, "unknown model 'ssd'")  # fmt: skip
    _refused(["train", "--data", data, "--model", "yolov3", "--preset", "retinanet_tiny_256",
              *work], capsys, "is a retinanet preset, not a yolov3 one")  # fmt: skip
    _refused(["train", "--data", data, "--model", "yolov3", *work], capsys, "yolov3_mini_256")
    _refused(["train", "--data", data, "--preset", "efficientdet_tiny_256", "--image-size", 100,
              *work], capsys, "divisible by 128")  # fmt: skip
    # a model with 6 classes on data with 2 categories
    two = ["--annotations", files["two_classes"], "--images", val_images]
    _refused(["evaluate", "--model-file", start, *two], capsys,
             "predicts 6 classes but")  # fmt: skip
    _refused(["train", "--model-file", start, *two, *work], capsys, "has 2 categories")
    _refused(["train", "--data", data, "--preset", "retinanet_tiny_256", "--model-file", start,
              *work], capsys, "not both")  # fmt: skip
    assert not (tmp_path / "w").exists()  # nothing was written


def test_resume_keeps_the_run_settings(files, tmp_path, capsys):
    work = tmp_path / "w"
    (work / "backup").mkdir(parents=True)
    settings = {**cli.RUN_DEFAULTS, "preset": "retinanet_tiny_256", "annotations": "a.json"}
    (work / "run.json").write_text(json.dumps({"settings": settings, "epochs": 3}))
    _refused(["train", "--workdir", work, "--resume"], capsys, "holds no checkpoint")
    (work / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 2}))
    _refused(["train", "--workdir", work, "--resume", "--preset", "yolov3_mini_256"], capsys,
             "preset is 'retinanet_tiny_256' there, not 'yolov3_mini_256'")  # fmt: skip
    _refused(["train", "--workdir", work, "--resume", "--batch-size", 3], capsys, "batch_size")
    _refused(["train", "--workdir", work, "--resume", "--freeze-backbone"], capsys,
             "freeze_backbone is False there, not True")  # fmt: skip
    _refused(["train", "--workdir", work, "--resume", "--backbone-weights", "shapes"], capsys,
             "backbone_weights is None there, not 'shapes'")  # fmt: skip
    _refused(["train", "--data", files["data"], "--preset", "retinanet_tiny_256", "--workdir",
              work], capsys, "checkpoint of an earlier run (2 epochs); pass --resume")  # fmt: skip
    _refused(["train", "--workdir", tmp_path / "new", "--resume"], capsys, "run.json not found")


def test_every_preset_names_its_family():
    for family, (cls, presets) in cli.FAMILIES.items():
        for preset in presets:
            assert cli.find_preset(preset) == (family, cls)
            assert cli.find_preset(preset, family) == (family, cls)
    assert {"retinanet", "yolov3", "efficientdet", "faster_rcnn", "keypoint"} == set(cli.FAMILIES)


def test_dataset_paths_of_both_layouts(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations" / "val.json").write_text("{}")
    assert cli.dataset_paths(tmp_path, "val") == (tmp_path / "annotations" / "val.json",
                                                  tmp_path / "val")  # fmt: skip
    (tmp_path / "annotations" / "instances_val.json").write_text("{}")
    assert cli.dataset_paths(tmp_path, "val")[0] == tmp_path / "annotations" / "instances_val.json"
    with pytest.raises(cli.UsageError, match="not both"):
        cli.dataset_paths(tmp_path, "val", annotations=tmp_path / "annotations" / "val.json")
    assert cli.make_strategy("default").num_replicas_in_sync == 1
    with pytest.raises(cli.UsageError, match="unknown strategy"):
        cli.make_strategy("parameter_server")


# ----------------------------------------------------------------------------- two replicas

# The CLI's training set-up (cli.prepare_training: the detector and its optimizer under the
# strategy's scope, the data pipeline) on one device and on a MirroredStrategy over two logical
# CPUs (cli.make_strategy("mirrored")), two epochs of one step on the pipeline's first global
# batch of 4 images. BN is frozen, as in the models' two-replica tests (per-replica batch statistics differ
# from the global batch's); no warm-up, so that the first step moves the weights.
REPLICAS = """
import keras
from dlnotes import cli

def fit(strategy, data, weights=None):
    settings = {**cli.RUN_DEFAULTS, "preset": "retinanet_tiny_256", "image_size": 64,
                "batch_size": 4, "steps_per_epoch": 1, "warmup_steps": 0}
    model, batches, _ = cli.prepare_training(settings, 2, data, strategy)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    if weights is not None:
        model.set_weights(weights)
    initial = model.get_weights()
    # the pipeline's first batch, repeated (Keras' distributed copy of the pipeline shuffles and
    # flips in another order than one device's)
    batch = tf.data.Dataset.from_tensors(next(iter(batches))).repeat()
    history = model.fit(batch, steps_per_epoch=1, epochs=2, verbose=0, shuffle=False).history
    return initial, history

data = cli.load_dataset(ANNOTATIONS)
mirrored = cli.make_strategy("mirrored")
initial, single = fit(cli.make_strategy("default"), data)
_, dist = fit(mirrored, data, initial)
print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "single": single, "dist": dist}))
"""


@pytest.fixture(scope="module")
def mirrored_run(request, files):
    """Starts the two-replica script at module setup (when its test is selected), so that it runs
    beside the other tests."""
    script = f"ANNOTATIONS = {str(files['train_annotations'])!r}\n" + textwrap.dedent(REPLICAS)
    yield from script_beside_tests(request, "test_two_replicas_match_one_device", script)


def test_two_replicas_match_one_device(mirrored_run):
    out = script_result(mirrored_run, timeout=900)
    assert out["replicas"] == 2
    for key in ("loss", "class_loss", "box_loss"):
        single, dist = out["single"][key], out["dist"][key]
        # the first step: the same global-batch loss; the second: after the same update
        assert dist[0] == pytest.approx(single[0], rel=1e-5), key
        assert dist[1] == pytest.approx(single[1], rel=1e-4), key
        assert dist[1] != pytest.approx(dist[0], rel=1e-4), key  # the first step moved
