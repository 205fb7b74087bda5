"""Tests of dlnotes.models.efficientdet: the heads, automl's anchors / matching / loss, the
published parameter counts, and the Detector contract (fit / evaluate / predict, .keras, XLA,
two replicas, empty images, extreme logits, bad input)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from _reference import (
    assert_same_detections,
    check_replicas_match_one_device,
    detector_replicas_script,
    script_result,
    start_script,
)

from dlnotes.models.efficientdet import PRESETS, EfficientDet, EfficientDetHead

NUM_CLASSES = 3
SIZE = (128, 128)
SMALL = dict(
    image_size=SIZE, backbone="efficientnet_tiny", bifpn_width=16, bifpn_repeats=1, head_depth=1
)


# drop-connect off: a training-mode forward pass is then a deterministic function of the weights
DETERMINISTIC = dict(backbone_kwargs={"drop_connect_rate": 0.0})


def _small(**overrides):
    return EfficientDet(num_classes=NUM_CLASSES, **{**SMALL, **overrides})


def _train_data():
    rng = np.random.RandomState(1)
    x = rng.uniform(0, 255, (4, *SIZE, 3)).astype(np.float32)
    boxes = -np.ones((4, 3, 4), np.float32)
    labels = -np.ones((4, 3), np.int32)
    boxes[0, :2] = [[16, 16, 80, 80], [60, 40, 120, 100]]
    labels[0, :2] = [0, 1]
    boxes[2, 0], labels[2, 0] = [8, 60, 48, 124], 2  # image 1 is empty
    boxes[3, 0], labels[3, 0] = [20, 20, 100, 60], 1
    return x, {"boxes": boxes, "labels": labels}


@pytest.fixture(scope="module")
def model():
    return _small()


# ----------------------------------------------------------------------------- architecture
def _separable_params(c_in, c_out):
    return 9 * c_in + c_in * c_out + c_out  # depthwise, pointwise, bias


def test_head_structure_and_parameter_count():
    head = EfficientDetHead(9, 90, channels=64, depth=3, num_levels=5, prior_probability=0.01)
    levels = [keras.KerasTensor((None, s, s, 64)) for s in (64, 32, 16, 8, 4)]
    head.build([lv.shape for lv in levels])
    assert [tuple(o.shape) for o in head.compute_output_spec(levels)] == [
        (None, s, s, 9, 90) for s in (64, 32, 16, 8, 4)
    ]
    blocks = 3 * _separable_params(64, 64)
    norms = 5 * 3 * 4 * 64  # one BN per level and block: gamma, beta, mean, variance
    assert head.count_params() == blocks + norms + _separable_params(64, 9 * 90) == 69_354 + 1_920
    bias = head.output_conv.bias.numpy()
    np.testing.assert_allclose(bias, -math.log(99.0), rtol=1e-6)
    # the convs are shared by the levels, the BatchNorms are not
    assert len({id(n) for row in head.norms for n in row}) == 15 and len(head.convs) == 3


def _trainable(*objects):
    return sum(int(np.prod(w.shape)) for o in objects for w in o.trainable_weights)


def test_d0_has_automls_parameter_counts():
    """automl's EfficientDet-D0 for COCO's 90 classes: 3,880,067 trainable parameters = backbone
    3,595,388 (EfficientNet-B0 up to block 7a) + BiFPN 196,281 (P6's 1x1 conv-BN included) +
    heads 88,398. With the BatchNorm statistics 3,927,203, plus the 7 of dlnotes' input
    Normalization layer (mean, variance, count; automl normalises outside the network)."""
    d0 = EfficientDet.from_preset("efficientdet_d0", num_classes=90)
    heads = (d0.class_head, d0.box_head)
    assert _trainable(*heads) == 88_398 and sum(h.count_params() for h in heads) == 92_238
    assert _trainable(d0.neck) == 196_281 and d0.neck.count_params() == 179_321 + 20_800
    assert _trainable(d0.backbone) == 3_595_388 and d0.backbone.count_params() == 3_634_844 + 7
    assert _trainable(d0) == 3_880_067
    assert d0.count_params() == 3_927_203 + 7
    assert d0.anchors.shape == (49_104, 4)  # automl's 9 anchors per location on P3-P7 of 512


@pytest.mark.parametrize(
    "variant, millions", [(1, 6.6), (2, 8.1), (3, 12.0), (4, 20.7), (5, 33.7), (6, 51.9), (7, 51.9)]
)
def test_d1_to_d7_match_the_papers_parameter_counts(variant, millions):
    """The EfficientDet paper's Table 2 (trainable parameters, 90 classes), within 1 %."""
    model = EfficientDet.from_preset(f"efficientdet_d{variant}", num_classes=90)
    assert _trainable(model) / 1e6 == pytest.approx(millions, rel=0.01)


def test_anchors_are_automls():
    m = _small()
    generator = m.anchor_generator
    assert generator.strides == (8, 16, 32, 64, 128) and generator.num_anchors_per_location == 9
    assert generator.sizes == (32.0, 64.0, 128.0, 256.0, 512.0)  # anchor scale 4 x stride
    base = generator.base_anchors(0)  # (9, 4) around the origin, size 32 x octave scale
    widths, heights = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    aspects = sorted({round(float(a), 6) for a in widths / heights})  # automl's w / h
    assert aspects == [0.5, 1.0, 2.0]
    np.testing.assert_allclose(sorted(set(np.round(np.sqrt(widths * heights), 4))), [
        32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)], rtol=1e-4)  # fmt: skip
    assert m.box_coder.order == "yx" and m.box_coder.std == (1.0,) * 4
    assert m.label_encoder.positive_threshold == m.label_encoder.negative_threshold == 0.5


def test_foreground_background_only_and_loss_against_numpy(model):
    x, y = _train_data()
    targets = {k: v.numpy() for k, v in model.compute_targets(y["boxes"], y["labels"]).items()}
    assert set(np.unique(targets["states"])) == {0, 1}  # no ignored anchor
    out = model(x)
    terms = {k: float(v) for k, v in model.loss_terms(y, out).items()}
    logits = out["class_logits"].numpy().astype(np.float64)
    deltas = out["box_deltas"].numpy().astype(np.float64)
    positive = targets["states"] == 1
    n = positive.sum()
    p = 1 / (1 + np.exp(-logits))
    t = targets["class_targets"]
    p_t = t * p + (1 - t) * (1 - p)
    alpha = t * 0.25 + (1 - t) * 0.75
    ce = np.logaddexp(0, -logits) * t + np.logaddexp(0, logits) * (1 - t)
    focal = alpha * (1 - p_t) ** 1.5 * ce  # automl's focal_loss, gamma 1.5
    assert terms["class_loss"] == pytest.approx(focal.sum() / n, rel=1e-4)
    d = np.abs(deltas - targets["box_targets"])
    huber = np.where(d <= 0.1, 0.5 * d**2, 0.1 * (d - 0.05))
    assert terms["box_loss"] == pytest.approx(huber[positive].sum() / (4 * n), rel=1e-4)
    total = float(model.compute_loss(x, y, out))
    assert total == pytest.approx(terms["class_loss"] + 50 * terms["box_loss"], rel=1e-5)


def test_empty_images_and_extreme_logits_give_finite_losses_and_gradients(model):
    x, _ = _train_data()
    empty = {"boxes": -np.ones((4, 2, 4), np.float32), "labels": -np.ones((4, 2), np.int32)}
    _, y = _train_data()
    for targets in (empty, y):
        for value in (-100.0, 100.0):
            logits = tf.Variable(tf.fill((4, model.anchors.shape[0], NUM_CLASSES), value))
            deltas = tf.Variable(tf.fill((4, model.anchors.shape[0], 4), value))
            with tf.GradientTape() as tape:
                loss = model.compute_loss(
                    x, targets, {"class_logits": logits, "box_deltas": deltas}
                )
            grads = tape.gradient(loss, [logits, deltas])
            assert np.isfinite(float(loss))
            assert all(np.isfinite(g.numpy()).all() for g in grads)


def test_image_sizes_and_bad_arguments():
    with pytest.raises(ValueError, match="divisible by 128"):
        _small(image_size=(200, 200))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        EfficientDet(num_classes=0, **SMALL)
    with pytest.raises(ValueError, match="Unknown preset"):
        EfficientDet.from_preset("efficientdet_d9", num_classes=3)
    with pytest.raises(ValueError, match="fusion"):
        _small(fusion="max")
    model = _small()
    with pytest.raises(ValueError, match=r"built for image_size=\(128, 128\)"):
        model(np.zeros((1, 256, 256, 3), np.float32))


# ----------------------------------------------------------------------------- Keras contract
def test_fit_evaluate_predict(model):
    model = _small()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = _train_data()
    history = model.fit(x, y, batch_size=2, epochs=2, verbose=0).history
    assert set(history) == {"loss", "class_loss", "box_loss"}
    np.testing.assert_allclose(
        history["loss"], np.add(history["class_loss"], 50 * np.asarray(history["box_loss"])),
        rtol=1e-5,
    )  # fmt: skip
    result = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    for key, value in model.loss_terms(y, model(x, training=False)).items():
        assert result[key] == pytest.approx(float(value), rel=1e-4)
    bias = model.class_head.output_conv.bias
    bias.assign(tf.zeros_like(bias))  # scores about 0.5: predict has work to do
    out = model.predict(x, batch_size=3, verbose=0)
    assert out["boxes"].shape == (4, 100, 4)
    assert_same_detections(out, model.decode(model(x)), atol=1e-4)
    assert (out["num_detections"] > 0).all()


def test_save_load_round_trip(tmp_path):
    m = _small(iou_loss="giou", fusion="softmax", **DETERMINISTIC)
    m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    path = str(tmp_path / "efficientdet.keras")
    m.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, EfficientDet) and loaded.get_config() == m.get_config()
    x, _ = _train_data()
    for training in (False, True):
        a, b = m(x, training=training), loaded(x, training=training)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_jit_compiled_training_matches_graph_training():
    x, y = _train_data()
    graph, xla = _small(**DETERMINISTIC), _small(**DETERMINISTIC)
    xla.set_weights(graph.get_weights())
    graph.compile(optimizer=keras.optimizers.SGD(0.01))
    xla.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=True)
    h_graph = graph.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    h_xla = xla.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    assert xla.xla_parts_compiled == {"train_core"}
    for key in h_graph:
        assert h_xla[key][0] == pytest.approx(h_graph[key][0], rel=1e-3)
    for a, b in zip(graph.get_weights(), xla.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_two_replicas_match_one_device():
    kwargs = {**SMALL, "num_classes": 3, "image_size": list(SIZE)}
    process = start_script(
        detector_replicas_script("dlnotes.models.efficientdet:EfficientDet", kwargs)
    )
    check_replicas_match_one_device(script_result(process), ("class_loss", "box_loss"))


def test_presets():
    assert set(PRESETS) == {f"efficientdet_d{i}" for i in range(8)} | {"efficientdet_tiny_256"}
    assert PRESETS["efficientdet_d3"]["image_size"] == (896, 896)
    assert PRESETS["efficientdet_d7"]["anchor_scale"] == 5.0
    tiny = EfficientDet.from_preset("efficientdet_tiny_256", num_classes=6)
    assert tiny.image_size == (256, 256) and tiny.count_params() < 500_000


@pytest.mark.parametrize("neck", ["fpn_bn", "panet", "object"])
def test_other_necks_on_the_same_detector(neck, tmp_path):
    from dlnotes.necks import FPN, BiFPN

    given = FPN(num_channels=16, name="my_fpn") if neck == "object" else neck
    m = _small(neck=given)
    assert not isinstance(m.neck, BiFPN)
    assert m.get_config()["neck"] == (neck if isinstance(given, str) else m.get_config()["neck"])
    x, _ = _train_data()
    outputs = m(x)
    reference = _small()  # the BiFPN model has the same anchors and heads
    for key in outputs:
        assert outputs[key].shape == reference(x)[key].shape
    assert m.class_head.count_params() == reference.class_head.count_params()
    path = str(tmp_path / "other_neck.keras")
    m.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.neck) is type(m.neck) and loaded.get_config() == m.get_config()
    np.testing.assert_array_equal(loaded(x)["class_logits"], outputs["class_logits"])
    assert "neck" not in reference.get_config()  # the default config is unchanged
