"""Tests of dlnotes.anchors against a float64 re-implementation of keras-retinanet's algorithm."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlnotes import boxes as B
from dlnotes.anchors import (
    YOLO_COCO_ANCHORS,
    YOLO_MASKS,
    AnchorGenerator,
    YoloAnchors,
    kmeans_anchors,
    mean_best_iou,
    wh_iou,
)


# ----------------------------------------------------------------------------- reference
# keras-retinanet's published algorithm (keras_retinanet/utils/anchors.py), re-written here in
# float64 with explicit loops so that it shares nothing with the vectorised implementation.
def ref_generate_anchors(base_size, ratios, scales):
    """(A, 4) anchors centred at 0, ratio-major / scale-minor."""
    anchors = []
    for ratio in ratios:
        for scale in scales:
            area = (base_size * scale) ** 2
            w = np.sqrt(area / ratio)
            h = w * ratio
            anchors.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
    return np.array(anchors)


def ref_guess_shapes(image_shape, pyramid_levels):
    h, w = image_shape[:2]
    return [((h + 2**p - 1) // 2**p, (w + 2**p - 1) // 2**p) for p in pyramid_levels]


def ref_shift(shape, stride, anchors, offset=0.5):
    out = []
    for i in range(shape[0]):
        for j in range(shape[1]):
            cx, cy = (j + offset) * stride, (i + offset) * stride
            out.extend(a + [cx, cy, cx, cy] for a in anchors)
    return np.array(out).reshape(-1, 4)


def ref_anchors_for_shape(
    image_shape,
    pyramid_levels=(3, 4, 5, 6, 7),
    ratios=(0.5, 1, 2),
    scales=(2**0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)),
    offset=0.5,
):
    strides = [2**p for p in pyramid_levels]
    sizes = [2 ** (p + 2) for p in pyramid_levels]
    shapes = ref_guess_shapes(image_shape, pyramid_levels)
    all_anchors = np.zeros((0, 4))
    for idx in range(len(pyramid_levels)):
        base = ref_generate_anchors(sizes[idx], ratios, scales)
        all_anchors = np.append(all_anchors, ref_shift(shapes[idx], strides[idx], base, offset), 0)
    return all_anchors


# ----------------------------------------------------------------------------- AnchorGenerator
@pytest.mark.parametrize(
    "image_shape", [(512, 512), (600, 1000), (97, 131), (1, 1), (513, 7, 3), (128, 129)]
)
def test_matches_keras_retinanet_anchors_for_shape(image_shape):
    generator = AnchorGenerator()
    anchors = generator(image_shape)
    ref = ref_anchors_for_shape(image_shape)
    assert anchors.dtype == tf.float32
    assert anchors.shape == ref.shape
    np.testing.assert_allclose(anchors.numpy(), ref, rtol=0, atol=1e-4)


def test_512_image_has_49104_anchors():
    generator = AnchorGenerator()
    assert generator.num_anchors_per_location == 9
    assert generator.level_shapes((512, 512)) == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert generator.level_sizes((512, 512)) == [36864, 9216, 2304, 576, 144]
    assert generator((512, 512, 3)).shape == (49104, 4)


def test_level_shapes_are_ceil_division():
    generator = AnchorGenerator()
    assert generator.level_shapes((97, 131)) == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
    assert generator.level_shapes((1, 1)) == [(1, 1)] * 5
    assert generator.level_shapes(tf.TensorShape([600, 1000, 3])) == ref_guess_shapes(
        (600, 1000), range(3, 8)
    )


def test_anchors_per_level_concatenate_to_call():
    generator = AnchorGenerator()
    per_level = generator.anchors_per_level((97, 131))
    assert [int(a.shape[0]) for a in per_level] == generator.level_sizes((97, 131))
    np.testing.assert_array_equal(tf.concat(per_level, 0).numpy(), generator((97, 131)).numpy())


def test_centres_and_order_match_a_head_reshape():
    """Level l reshaped to (H_l, W_l, A, 4): cell (i, j) holds the base anchors at ((j+.5)s, (i+.5)s)."""
    generator = AnchorGenerator()
    image_shape = (96, 160)
    for level, anchors in enumerate(generator.anchors_per_level(image_shape)):
        h, w = generator.level_shapes(image_shape)[level]
        stride = generator.strides[level]
        grid = anchors.numpy().reshape(h, w, 9, 4)
        cx = np.broadcast_to(((np.arange(w) + 0.5) * stride)[None, :, None], (h, w, 9))
        cy = np.broadcast_to(((np.arange(h) + 0.5) * stride)[:, None, None], (h, w, 9))
        expected = generator.base_anchors(level) + np.stack([cx, cy, cx, cy], axis=-1)
        np.testing.assert_allclose(grid, expected, atol=1e-4)


def test_base_anchors_ratio_area_and_order():
    generator = AnchorGenerator()
    for level, size in enumerate((32, 64, 128, 256, 512)):
        base = generator.base_anchors(level)
        assert base.shape == (9, 4)
        w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
        # ratio = h / w, ratio-major: index = ratio_idx * 3 + scale_idx.
        np.testing.assert_allclose(h / w, np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-12)
        np.testing.assert_allclose(
            np.sqrt(w * h), size * np.tile([1, 2 ** (1 / 3), 2 ** (2 / 3)], 3), rtol=1e-12
        )
        np.testing.assert_allclose(base[:, :2], -base[:, 2:])  # centred at 0
    # Hand value: size 32, ratio 0.5, scale 1 -> w = 32 * sqrt(2), h = 16 * sqrt(2).
    np.testing.assert_allclose(
        generator.base_anchors(0)[0], [-16 * 2**0.5, -8 * 2**0.5, 16 * 2**0.5, 8 * 2**0.5]
    )


def test_custom_configuration_matches_reference():
    generator = AnchorGenerator(
        sizes=(16, 32), strides=(4, 8), ratios=(1.0, 3.0), scales=(1.0, 1.5), offset=0.0
    )
    assert generator.num_anchors_per_location == 4
    ref = ref_anchors_for_shape(
        (37, 21), pyramid_levels=(2, 3), ratios=(1.0, 3.0), scales=(1.0, 1.5), offset=0.0
    )
    np.testing.assert_allclose(generator((37, 21)).numpy(), ref, atol=1e-4)


def test_anchor_generator_config_round_trip():
    generator = AnchorGenerator(sizes=(24, 48), strides=(8, 16), ratios=(0.5, 1), offset=0.25)
    config = generator.get_config()
    assert config["strides"] == [8, 16] and config["offset"] == 0.25
    clone = AnchorGenerator.from_config(config)
    np.testing.assert_array_equal(clone((64, 48)).numpy(), generator((64, 48)).numpy())
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(generator))
    assert isinstance(restored, AnchorGenerator) and restored.get_config() == config


def test_anchor_generator_errors():
    generator = AnchorGenerator()
    for bad in [(0, 10), (10, -1), (5,), (10.5, 3), None]:
        with pytest.raises(ValueError, match="image_shape"):
            generator(bad)
    with pytest.raises(ValueError, match="same length"):
        AnchorGenerator(sizes=(32, 64), strides=(8,))
    with pytest.raises(ValueError, match="integers"):
        AnchorGenerator(strides=(8, 16, 32, 64, 128.5))
    with pytest.raises(ValueError, match="ratios"):
        AnchorGenerator(ratios=(0.5, -1.0))
    with pytest.raises(ValueError, match="level_index"):
        generator.base_anchors(5)

    @tf.function(input_signature=[tf.TensorSpec([2], tf.int32)])
    def symbolic(shape):
        return generator(shape)

    with pytest.raises(ValueError, match="static image shape"):
        symbolic(tf.constant([64, 64]))


def test_anchors_inside_a_graph_with_a_static_shape():
    generator = AnchorGenerator()

    @tf.function(jit_compile=True)
    def ious(gt):
        return B.pairwise_iou(generator((64, 64)), gt)

    # A 32x32 box centred on cell (3, 3) of P3 (centre 28) is exactly the size-32 square anchor.
    gt = tf.constant([[[12.0, 12.0, 44.0, 44.0]]])
    out = ious(gt)
    assert out.shape == (1, sum(generator.level_sizes((64, 64))), 1)
    best = int(tf.argmax(out[0, :, 0]))
    assert best == (3 * 8 + 3) * 9 + 3  # (row 3, col 3) of the 8x8 map, ratio 1 / scale 1
    assert float(out[0, best, 0]) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- YOLO anchors
def test_yolo_constants():
    assert YOLO_COCO_ANCHORS.shape == (9, 2)
    np.testing.assert_array_equal(YOLO_COCO_ANCHORS[0], [10, 13])
    np.testing.assert_array_equal(YOLO_COCO_ANCHORS[-1], [373, 326])
    areas = YOLO_COCO_ANCHORS.prod(axis=1)
    assert np.all(np.diff(areas) > 0)
    assert YOLO_MASKS == ((6, 7, 8), (3, 4, 5), (0, 1, 2))


def test_yolo_level_shapes_and_anchors():
    yolo = YoloAnchors()
    assert yolo.num_anchors_per_location == 3
    assert yolo.level_shapes((416, 416, 3)) == [(13, 13), (26, 26), (52, 52)]
    assert yolo.level_shapes((608, 416)) == [(19, 13), (38, 26), (76, 52)]
    np.testing.assert_array_equal(yolo.level_anchors(0), [[116, 90], [156, 198], [373, 326]])
    np.testing.assert_array_equal(yolo.level_anchors(2), [[10, 13], [16, 30], [33, 23]])
    with pytest.raises(ValueError, match="divisible"):
        yolo.level_shapes((416, 420))
    with pytest.raises(ValueError, match="level"):
        yolo.level_anchors(3)


def test_yolo_boxes_values():
    yolo = YoloAnchors()
    boxes = yolo.boxes((64, 96))
    assert [tuple(b.shape) for b in boxes] == [(2, 3, 3, 4), (4, 6, 3, 4), (8, 12, 3, 4)]
    assert all(b.dtype == tf.float32 for b in boxes)
    # Level 2 (stride 8), row 1, column 2: centre (20, 12); anchor 0 is 10 x 13.
    np.testing.assert_allclose(boxes[2][1, 2, 0].numpy(), [15, 5.5, 25, 18.5])
    # Level 0 (stride 32), row 1, column 0: centre (16, 48); anchor 2 is 373 x 326.
    np.testing.assert_allclose(
        boxes[0][1, 0, 2].numpy(), [16 - 186.5, 48 - 163, 16 + 186.5, 48 + 163]
    )
    for level, b in enumerate(boxes):
        wh = (b[..., 2:] - b[..., :2]).numpy()
        np.testing.assert_allclose(wh, np.broadcast_to(yolo.level_anchors(level), wh.shape))


def test_yolo_config_round_trip_and_errors():
    yolo = YoloAnchors(
        anchors=[[4, 5], [8, 9], [20, 30], [40, 10]], masks=[[2, 3], [0, 1]], strides=(16, 8)
    )
    config = yolo.get_config()
    assert config == {
        "anchors": [[4.0, 5.0], [8.0, 9.0], [20.0, 30.0], [40.0, 10.0]],
        "masks": [[2, 3], [0, 1]],
        "strides": [16, 8],
    }
    clone = YoloAnchors.from_config(config)
    np.testing.assert_array_equal(clone.level_anchors(0), [[20, 30], [40, 10]])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(yolo))
    assert isinstance(restored, YoloAnchors) and restored.get_config() == config
    with pytest.raises(ValueError, match="anchors"):
        YoloAnchors(anchors=[[10, 0], [5, 5], [3, 3]], masks=[[0, 1, 2]], strides=(8,))
    with pytest.raises(ValueError, match="index"):
        YoloAnchors(masks=((6, 7, 9), (3, 4, 5), (0, 1, 2)))
    with pytest.raises(ValueError, match="match"):
        YoloAnchors(strides=(32, 16))


# ----------------------------------------------------------------------------- wh_iou / k-means
def test_wh_iou_hand_values():
    wh1 = [[10, 10], [10, 20], [0, 0]]
    wh2 = [[10, 10], [20, 20], [20, 10]]
    expected = [
        [1.0, 100 / 400, 100 / 200],
        [100 / 200, 200 / 400, 100 / 300],
        [0.0, 0.0, 0.0],
    ]
    got = wh_iou(wh1, wh2)
    assert got.dtype == np.float64 and got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert wh_iou([[0, 0]], [[0, 0]])[0, 0] == 0.0  # empty vs empty: 0, not NaN


def test_wh_iou_is_iou_of_corner_aligned_boxes():
    rng = np.random.default_rng(0)
    wh1, wh2 = rng.uniform(1, 100, (6, 2)), rng.uniform(1, 100, (4, 2))
    corner = lambda wh: np.concatenate([np.zeros_like(wh), wh], axis=1)  # noqa: E731
    np.testing.assert_allclose(
        wh_iou(wh1, wh2), B.pairwise_iou(corner(wh1), corner(wh2)).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(wh_iou(wh1, wh2), wh_iou(wh2, wh1).T)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        wh_iou(np.ones((4, 3)), wh2)


def test_mean_best_iou_hand_value():
    assert mean_best_iou([[10, 10], [20, 20]], [[10, 10]]) == pytest.approx((1 + 0.25) / 2)
    assert mean_best_iou([[10, 10], [20, 20]], [[10, 10], [20, 20]]) == pytest.approx(1.0)


def clustered_wh(seed=1, per_cluster=60):
    centres = np.array([[10.0, 10.0], [50.0, 100.0], [200.0, 150.0]])
    rng = np.random.default_rng(seed)
    wh = np.concatenate([c * np.exp(rng.normal(0, 0.05, (per_cluster, 2))) for c in centres])
    return rng.permutation(wh), centres


def test_kmeans_recovers_well_separated_clusters():
    wh, centres = clustered_wh()
    anchors = kmeans_anchors(wh, k=3, seed=0)
    assert anchors.shape == (3, 2)
    np.testing.assert_allclose(anchors, centres, rtol=0.05)  # sorted by area, like centres
    assert mean_best_iou(wh, anchors) > 0.9
    # Any seed finds the same clusters here.
    for seed in (1, 2, 3):
        np.testing.assert_allclose(kmeans_anchors(wh, k=3, seed=seed), centres, rtol=0.05)


def test_kmeans_is_deterministic_sorted_and_better_than_random_choice():
    rng = np.random.default_rng(5)
    wh = rng.lognormal(mean=3.5, sigma=0.8, size=(300, 2))
    a = kmeans_anchors(wh, k=9, seed=7)
    np.testing.assert_array_equal(a, kmeans_anchors(wh, k=9, seed=7))
    areas = a.prod(axis=1)
    assert np.all(np.diff(areas) >= 0)
    random_pick = wh[rng.choice(len(wh), 9, replace=False)]
    assert mean_best_iou(wh, a) > mean_best_iou(wh, random_pick)


def test_kmeans_handles_duplicates_and_empty_clusters():
    # Only 4 distinct sizes for k = 4: every cluster must end on one of them, none lost.
    wh = np.repeat([[10.0, 10.0], [10.0, 40.0], [40.0, 10.0], [80.0, 80.0]], [50, 3, 3, 2], axis=0)
    anchors = kmeans_anchors(wh, k=4, seed=0)
    assert sorted(map(tuple, anchors)) == [(10, 10), (10, 40), (40, 10), (80, 80)]
    assert mean_best_iou(wh, anchors) == pytest.approx(1.0)


def test_kmeans_errors():
    with pytest.raises(ValueError, match="at least k=9 boxes, got 5"):
        kmeans_anchors(np.ones((5, 2)), k=9)
    with pytest.raises(ValueError, match="positive.*index 1"):
        kmeans_anchors([[1.0, 2.0], [0.0, 3.0], [2.0, 2.0]], k=2)
    with pytest.raises(ValueError, match="positive"):
        kmeans_anchors([[1.0, 2.0], [-1.0, 3.0], [2.0, np.nan]], k=2)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        kmeans_anchors(np.ones((10, 4)), k=2)
