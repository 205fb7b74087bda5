"""dlnotes.training: the schedule against its formula, the recipe's checks, a short real run."""

import math

import keras
import numpy as np
import pytest

from dlnotes.data.shapes import generate_shapes_dataset, load_shapes
from dlnotes.models import KeypointDetector, RetinaNet
from dlnotes.training import EpochLog, Recipe, make_optimizer, train, warmup_cosine


def _reference_rate(step, peak, steps, warmup):
    """float64 learning rate: linear 0 -> peak over `warmup`, then half a cosine to 0 at `steps`."""
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, steps - warmup) / (steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 10, 99])
def test_warmup_cosine_matches_the_formula(warmup):
    schedule = warmup_cosine(3e-3, 100, warmup)
    for step in (0, 1, 5, 10, 37, 50, 99, 100, 130):
        expected = _reference_rate(step, 3e-3, 100, warmup)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9), step


def test_make_optimizer_uses_the_recipe():
    recipe = Recipe(steps=200, learning_rate=1e-3, warmup_steps=20, weight_decay=5e-4, clipnorm=2)
    optimizer = make_optimizer(recipe)
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.weight_decay == pytest.approx(5e-4)
    assert optimizer.global_clipnorm == pytest.approx(2.0)
    assert float(optimizer.learning_rate) == 0.0  # step 0 of the warm-up
    assert float(optimizer._learning_rate(20)) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(warmup_steps=100), "warmup_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(log_every=30), "multiple of log_every"),
    ],
)
def test_recipe_rejects_bad_numbers(changes, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**{"steps": 100, "log_every": 10, "warmup_steps": 10, **changes})


def test_replace_keeps_the_other_fields():
    recipe = Recipe(steps=100, log_every=10, warmup_steps=10, learning_rate=1e-3)
    longer = recipe.replace(steps=300)
    assert (longer.steps, longer.learning_rate, recipe.steps) == (300, 1e-3, 100)


def test_epoch_log_prints_one_line_per_epoch():
    lines = []
    log = EpochLog(50, print_fn=lines.append)
    log.on_train_begin()
    log.on_epoch_end(0, {"loss": 1.5, "class_loss": 1.0, "box_loss": 0.25, "val_box_loss": 9.0})
    log.on_epoch_end(1, {"loss": 1.25, "class_loss": 0.75})
    assert lines[0].startswith("step    50: loss 1.500 (class 1.000, box 0.250), ")
    assert lines[1].startswith("step   100: loss 1.250 (class 0.750), ")
    assert all(line.endswith(" s") for line in lines)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "ds"
    generate_shapes_dataset(root, num_train=8, num_val=2, image_size=64, max_objects=3)
    return root


def test_train_runs_the_recipe(shapes_root, capsys):
    train_set = load_shapes("train", shapes_root)
    keras.utils.set_random_seed(0)
    detector = RetinaNet.from_preset(
        "retinanet_tiny_256", num_classes=train_set.num_classes, image_size=(64, 64),
        head_depth=1, num_channels=16, anchor_sizes=(16, 32, 64), anchor_strides=(8, 16, 32),
        neck_kwargs={"max_level": 5},
    )  # fmt: skip
    recipe = Recipe(steps=6, batch_size=2, warmup_steps=2, log_every=3, learning_rate=1e-3)
    history = train(detector, train_set, recipe)
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    assert int(detector.optimizer.iterations) == 6
    printed = capsys.readouterr().out.splitlines()
    assert [line[:10] for line in printed] == ["step     3", "step     6"]
    # the schedule ends at zero: the last step moved the weights with learning rate ~0
    assert float(detector.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)


def test_train_feeds_keypoints_to_the_keypoint_model(shapes_root):
    train_set = load_shapes("train", shapes_root)
    keras.utils.set_random_seed(0)
    detector = KeypointDetector.from_preset(
        "keypoint_tiny_256", num_classes=train_set.num_classes,
        num_keypoints=train_set.num_keypoints, image_size=(64, 64),
    )  # fmt: skip
    recipe = Recipe(steps=2, batch_size=2, warmup_steps=1, log_every=1)
    history = train(detector, train_set, recipe, log=False)
    assert np.isfinite(history.history["loss"]).all()
