"""Tests of dlnotes.data.transforms: boxes and keypoints follow the pixels; padding is untouched."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from dlnotes.data import shapes
from dlnotes.data.transforms import (
    horizontal_flip,
    keypoint_flip_pairs,
    letterbox,
    random_horizontal_flip,
    resize,
    undo_letterbox,
    undo_letterbox_keypoints,
    valid_box_mask,
)

FLIP_PAIRS = shapes.KEYPOINT_FLIP_PAIRS  # ((4, 2),): "left" <-> "right"


def _random_targets(rng, height, width, num_real, num_pad, k=5):
    """Boxes (N, 4) inside the image, keypoints (N, K, 3) with some v=0, -1 padding rows."""
    xy1 = rng.uniform(0, [width - 2, height - 2], size=(num_real, 2))
    xy2 = xy1 + rng.uniform(1, 1 + np.array([width, height]) - xy1 - 1, size=(num_real, 2))
    boxes = np.concatenate([xy1, np.minimum(xy2, [width, height])], axis=1)
    kps = np.concatenate(
        [
            rng.uniform(0, [width, height], size=(num_real, k, 2)),
            rng.integers(1, 3, size=(num_real, k, 1)).astype(np.float64),
        ],
        axis=-1,
    )
    unlabelled = rng.random((num_real, k)) < 0.3
    kps[unlabelled] = 0.0  # COCO: visibility 0 -> (0, 0, 0)
    boxes = np.concatenate([boxes, -np.ones((num_pad, 4))]).astype(np.float32)
    kps = np.concatenate([kps, -np.ones((num_pad, k, 3))]).astype(np.float32)
    return boxes, kps


# --------------------------------------------------------------------------- flips


def test_horizontal_flip_matches_numpy_reference():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
    boxes, kps = _random_targets(rng, 20, 30, num_real=4, num_pad=2)
    out_image, out_boxes, out_kps = horizontal_flip(image, boxes, kps, FLIP_PAIRS)

    assert out_image.dtype == tf.uint8
    np.testing.assert_array_equal(out_image.numpy(), image[:, ::-1])
    ref_boxes = boxes.astype(np.float64).copy()
    ref_boxes[:4, 0], ref_boxes[:4, 2] = 30 - boxes[:4, 2], 30 - boxes[:4, 0]
    np.testing.assert_allclose(out_boxes.numpy(), ref_boxes, atol=1e-5)
    ref_kps = kps.astype(np.float64).copy()
    visible = ref_kps[..., 2] > 0
    ref_kps[..., 0][visible] = 30 - ref_kps[..., 0][visible]
    ref_kps = ref_kps[:, [0, 1, 4, 3, 2]]  # right <-> left identities swap
    np.testing.assert_allclose(out_kps.numpy(), ref_kps, atol=1e-5)
    # padding rows stay -1, unlabelled keypoints stay (0, 0, 0)
    np.testing.assert_array_equal(out_boxes.numpy()[4:], -1)
    np.testing.assert_array_equal(out_kps.numpy()[4:], -1)
    assert np.all(out_kps.numpy()[:4][out_kps.numpy()[:4, :, 2] == 0] == 0)


def test_horizontal_flip_moves_a_drawn_rectangle_exactly():
    image = np.zeros((12, 16, 1), np.float32)
    image[3:7, 2:5] = 1.0  # pixels x in [2, 5), y in [3, 7)
    _, boxes, _ = horizontal_flip(image, np.array([[2.0, 3.0, 5.0, 7.0]], np.float32))
    flipped = horizontal_flip(image, np.zeros((0, 4), np.float32))[0].numpy()[..., 0]
    x1, y1, x2, y2 = boxes.numpy()[0].astype(int)
    assert (x1, y1, x2, y2) == (11, 3, 14, 7)
    expected = np.zeros((12, 16))
    expected[y1:y2, x1:x2] = 1.0
    np.testing.assert_array_equal(flipped, expected)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    num_real=st.integers(0, 5),
    num_pad=st.integers(0, 3),
)
def test_flip_twice_is_identity(seed, height, width, num_real, num_pad):
    rng = np.random.default_rng(seed)
    image = rng.random((height, width, 3)).astype(np.float32)
    boxes, kps = _random_targets(rng, height, width, num_real, num_pad)
    once = horizontal_flip(image, boxes, kps, FLIP_PAIRS)
    twice = horizontal_flip(*once, FLIP_PAIRS)
    np.testing.assert_array_equal(twice[0].numpy(), image)
    np.testing.assert_allclose(twice[1].numpy(), boxes, atol=1e-4)
    np.testing.assert_allclose(twice[2].numpy(), kps, atol=1e-4)
    # a flipped box is still a valid box inside the image
    real = once[1].numpy()[:num_real]
    assert np.all(real[:, 0] <= real[:, 2]) and np.all(real[:, 0] >= 0)
    assert np.all(real[:, 2] <= width + 1e-4)


def test_random_horizontal_flip_is_stateless_and_uses_probability():
    rng = np.random.default_rng(1)
    image = rng.random((8, 10, 3)).astype(np.float32)
    boxes, kps = _random_targets(rng, 8, 10, num_real=2, num_pad=1)
    flips = []
    for s in range(24):
        a = random_horizontal_flip(image, boxes, kps, FLIP_PAIRS, seed=[7, s])
        b = random_horizontal_flip(image, boxes, kps, FLIP_PAIRS, seed=[7, s])
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy())  # same seed, same result
        expected = horizontal_flip(image, boxes, kps, FLIP_PAIRS) if a[3] else (image, boxes, kps)
        for x, y in zip(a[:3], expected, strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
        flips.append(bool(a[3]))
    assert 0 < sum(flips) < len(flips)  # both outcomes occur for these fixed seeds
    always = random_horizontal_flip(image, boxes, seed=[0, 0], probability=1.0)
    never = random_horizontal_flip(image, boxes, seed=[0, 0], probability=0.0)
    assert bool(always[3]) and not bool(never[3]) and always[2] is None
    np.testing.assert_array_equal(never[0].numpy(), image)


def test_flip_and_undo_compile_with_xla():
    @tf.function(jit_compile=True)
    def step(image, boxes, kps, scale, offset):
        image, boxes, kps = horizontal_flip(image, boxes, kps, FLIP_PAIRS)
        return (
            image,
            undo_letterbox(boxes, scale, offset),
            undo_letterbox_keypoints(kps, scale, offset),
        )

    rng = np.random.default_rng(2)
    image = rng.random((2, 8, 10, 3)).astype(np.float32)
    b0, k0 = _random_targets(rng, 8, 10, 2, 1)
    boxes, kps = np.stack([b0, b0]), np.stack([k0, k0])
    scale = np.array([[2.0, 4.0], [1.0, 1.0]], np.float32)
    offset = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    out_image, out_boxes, out_kps = step(image, boxes, kps, scale, offset)
    ref_image, ref_boxes, ref_kps = horizontal_flip(image, boxes, kps, FLIP_PAIRS)
    np.testing.assert_array_equal(out_image.numpy(), ref_image.numpy())
    np.testing.assert_allclose(out_boxes.numpy()[1], ref_boxes.numpy()[1], atol=1e-5)
    first = ref_boxes.numpy()[0, :2]
    np.testing.assert_allclose(out_boxes.numpy()[0, :2], (first - [1, 0, 1, 0]) / [2, 4, 2, 4])
    np.testing.assert_array_equal(out_boxes.numpy()[:, 2], -1)  # padding untouched
    np.testing.assert_allclose(out_kps.numpy()[1], ref_kps.numpy()[1], atol=1e-5)


# --------------------------------------------------------------------------- resizing


def _letterbox_reference(h, w, th, tw, align):
    ratio = min(th / h, tw / w)
    nh = min(max(int(np.round(h * ratio)), 1), th)
    nw = min(max(int(np.round(w * ratio)), 1), tw)
    off = ((tw - nw) // 2, (th - nh) // 2) if align == "center" else (0, 0)
    return nh, nw, np.array([nw / w, nh / h]), np.array(off, np.float64)


@pytest.mark.parametrize("align", ["top_left", "center"])
@pytest.mark.parametrize(("in_hw", "out_hw"), [((30, 50), (64, 64)), ((90, 40), (32, 48))])
def test_letterbox_values_and_padding(in_hw, out_hw, align):
    rng = np.random.default_rng(3)
    h, w = in_hw
    image = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    boxes, kps = _random_targets(rng, h, w, num_real=3, num_pad=2)
    out, out_boxes, out_kps, scale, offset = letterbox(image, boxes, out_hw, kps, align=align)

    nh, nw, ref_scale, ref_offset = _letterbox_reference(h, w, *out_hw, align)
    assert out.shape == (*out_hw, 3) and out.dtype == tf.float32
    np.testing.assert_allclose(scale.numpy(), ref_scale, rtol=1e-6)
    np.testing.assert_allclose(offset.numpy(), ref_offset)
    ox, oy = int(ref_offset[0]), int(ref_offset[1])
    content = np.zeros(out_hw, bool)
    content[oy : oy + nh, ox : ox + nw] = True
    assert np.all(out.numpy()[~content] == 114.0)  # the padding is exactly pad_value
    expected_content = tf.image.resize(image.astype(np.float32), (nh, nw)).numpy()
    np.testing.assert_allclose(out.numpy()[oy : oy + nh, ox : ox + nw], expected_content, atol=1e-3)
    ref_boxes = boxes[:3] * np.tile(ref_scale, 2) + np.tile(ref_offset, 2)
    np.testing.assert_allclose(out_boxes.numpy()[:3], ref_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out_boxes.numpy()[3:], -1)
    vis = kps[:3, :, 2] > 0
    ref_xy = kps[:3, :, :2] * ref_scale + ref_offset
    np.testing.assert_allclose(out_kps.numpy()[:3][vis][:, :2], ref_xy[vis], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out_kps.numpy()[:3][~vis], 0)
    np.testing.assert_array_equal(out_kps.numpy()[3:], -1)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    in_h=st.integers(4, 120),
    in_w=st.integers(4, 120),
    out_h=st.integers(4, 96),
    out_w=st.integers(4, 96),
    center=st.booleans(),
    stretch=st.booleans(),
)
def test_resize_and_undo_round_trip(seed, in_h, in_w, out_h, out_w, center, stretch):
    rng = np.random.default_rng(seed)
    image = np.zeros((in_h, in_w, 3), np.uint8)
    boxes, kps = _random_targets(rng, in_h, in_w, num_real=3, num_pad=2)
    if stretch:
        _, out_boxes, out_kps, scale, offset = resize(image, boxes, (out_h, out_w), kps)
        np.testing.assert_allclose(scale.numpy(), [out_w / in_w, out_h / in_h], rtol=1e-6)
        np.testing.assert_array_equal(offset.numpy(), 0)
    else:
        align = "center" if center else "top_left"
        _, out_boxes, out_kps, scale, offset = letterbox(
            image, boxes, (out_h, out_w), kps, align=align
        )
    # the transformed boxes lie inside the output image
    real = out_boxes.numpy()[:3]
    assert np.all(real >= -1e-3) and np.all(real[:, [0, 2]] <= out_w + 1e-3)
    assert np.all(real[:, [1, 3]] <= out_h + 1e-3)
    back = undo_letterbox(out_boxes, scale, offset).numpy()
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)
    back_kps = undo_letterbox_keypoints(out_kps, scale, offset).numpy()
    np.testing.assert_allclose(back_kps, kps, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
@pytest.mark.parametrize(("in_hw", "out_hw"), [((40, 60), (64, 64)), ((64, 48), (24, 40))])
def test_drawn_rectangle_stays_inside_its_transformed_box(mode, in_hw, out_hw):
    """Bilinear resampling: output pixels more than half inside the rectangle have their centres
    inside the transformed box, and pixels well inside the box are more than half bright."""
    image = np.zeros((*in_hw, 1), np.float32)
    x1, y1, x2, y2 = 13, 9, 31, 27
    image[y1:y2, x1:x2] = 255.0
    box = np.array([[x1, y1, x2, y2]], np.float32)
    fn = letterbox if mode == "letterbox" else resize
    kwargs = {"pad_value": 0.0, "align": "center"} if mode == "letterbox" else {}
    out, out_box, _, _, _ = fn(image, box, out_hw, **kwargs)
    out = out.numpy()[..., 0]
    bx1, by1, bx2, by2 = out_box.numpy()[0]
    cy, cx = np.mgrid[0 : out_hw[0], 0 : out_hw[1]] + 0.5  # pixel centres
    bright = out > 127.5
    eps = 1e-3
    inside = (cx > bx1 - eps) & (cx < bx2 + eps) & (cy > by1 - eps) & (cy < by2 + eps)
    assert bright.any() and not np.any(bright & ~inside)
    deep = (cx > bx1 + 1) & (cx < bx2 - 1) & (cy > by1 + 1) & (cy < by2 - 1)
    assert deep.any() and np.all(bright[deep])


def test_batched_letterbox_matches_single_and_undo_with_batched_meta():
    rng = np.random.default_rng(4)
    images = rng.random((2, 30, 50, 3)).astype(np.float32)
    b0, _ = _random_targets(rng, 30, 50, 2, 1)
    b1, _ = _random_targets(rng, 30, 50, 2, 1)
    boxes = np.stack([b0, b1])
    out, out_boxes, _, scale, offset = letterbox(images, boxes, 40, align="center")
    assert out.shape == (2, 40, 40, 3)
    for i in range(2):
        single = letterbox(images[i], boxes[i], 40, align="center")
        np.testing.assert_allclose(out.numpy()[i], single[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(out_boxes.numpy()[i], single[1].numpy(), atol=1e-5)
    meta_scale = np.stack([scale.numpy()] * 2)
    meta_offset = np.stack([offset.numpy()] * 2)
    back = undo_letterbox(out_boxes, meta_scale, meta_offset).numpy()
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_undo_letterbox_clips_to_original_size_and_keeps_padding():
    boxes = np.array([[-8.0, 2.0, 30.0, 90.0], [-1, -1, -1, -1]], np.float32)
    out = undo_letterbox(boxes, [0.5, 0.5], [2.0, 0.0], original_size=[100, 50]).numpy()
    np.testing.assert_allclose(out, [[0.0, 4.0, 50.0, 100.0], [-1, -1, -1, -1]])


def test_valid_box_mask_and_flip_pairs():
    boxes = np.array([[-1, -1, -1, -1], [-1, 0, 3, 3], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(valid_box_mask(boxes).numpy(), [False, True, True])
    assert keypoint_flip_pairs(shapes.KEYPOINT_NAMES) == ((4, 2),)
    person = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_knee", "right_knee"]
    assert keypoint_flip_pairs(person) == ((1, 2), (3, 4), (5, 6))
    assert keypoint_flip_pairs(["a", "b"]) == ()


def test_bad_arguments_raise_clear_errors():
    image = np.zeros((8, 8, 3), np.float32)
    boxes = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="size must be positive"):
        letterbox(image, boxes, (0, 8))
    with pytest.raises(ValueError, match="height, width"):
        resize(image, boxes, (8, 8, 8))
    with pytest.raises(ValueError, match="align"):
        letterbox(image, boxes, 8, align="middle")
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        horizontal_flip(np.zeros((8, 8)), boxes)
    kps = np.zeros((1, 5, 3), np.float32)
    with pytest.raises(ValueError, match="out of range for 5 keypoints"):
        horizontal_flip(image, boxes, kps, flip_pairs=[(0, 5)])
