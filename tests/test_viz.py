"""Tests of dlnotes.viz: what each helper puts on the Axes (patches, lines, images, legends)."""

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display in tests

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from dlnotes import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def ax():
    return plt.subplots()[1]


def rectangles(ax):
    """(x, y, w, h) of the Rectangle patches on ``ax``."""
    return [
        (p.get_x(), p.get_y(), p.get_width(), p.get_height())
        for p in ax.patches
        if isinstance(p, Rectangle)
    ]


def test_class_color_is_fixed_distinct_and_grey_for_padding():
    colors = [viz.class_color(i) for i in range(10)]
    assert len(set(colors)) == 10
    assert viz.class_color(3) == viz.class_color(np.int64(3)) == colors[3]
    assert viz.class_color(len(viz.PALETTE)) == viz.class_color(0)  # cycles
    assert viz.class_color(-1) not in viz.PALETTE
    for color in colors:
        to_rgba(color)  # a valid Matplotlib colour


def test_show_image_uint8_float_and_grey():
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = 255
    ax = viz.show_image(image, title="red")
    assert ax.get_title() == "red"
    shown = ax.images[0].get_array()
    assert shown.shape == (20, 30, 3) and shown.dtype == np.uint8
    # Float images are in [0, 255]: scaled to [0, 1] (and clipped).
    ax = viz.show_image(tf.constant(image, tf.float32) + 300.0)
    np.testing.assert_allclose(ax.images[0].get_array()[..., 0], 1.0)
    ax = viz.show_image(np.full((8, 8, 1), 51.0, np.float32))
    np.testing.assert_allclose(ax.images[0].get_array(), 0.2)
    assert ax.images[0].get_clim() == (0, 1)  # grey levels are not stretched
    with pytest.raises(ValueError, match="shape"):
        viz.show_image(np.zeros((4, 4, 5)))


def test_draw_boxes_skips_padding_and_writes_captions(ax):
    boxes = np.array(
        [[10, 20, 50, 80], [-1, -1, -1, -1], [0, 0, 5, 5], [30, 30, 40, 45]], np.float32
    )
    labels = np.array([1, 0, -1, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.456])
    viz.draw_boxes(ax, tf.constant(boxes), labels, scores, class_names=["square", "circle"])
    assert rectangles(ax) == [(10, 20, 40, 60), (30, 30, 10, 15)]
    assert [t.get_text() for t in ax.texts] == ["circle 0.90", "square 0.46"]
    assert ax.patches[0].get_edgecolor() == to_rgba(viz.class_color(1))
    assert ax.patches[1].get_edgecolor() == to_rgba(viz.class_color(0))


def test_draw_boxes_formats_style_and_no_text(ax):
    xywh = np.array([[10, 20, 40, 60]])
    viz.draw_boxes(ax, xywh, fmt="xywh", color="red", linestyle="--", show_text=False)
    viz.draw_boxes(ax, [[30, 50, 40, 60]], fmt="center_xywh")
    assert rectangles(ax) == [(10, 20, 40, 60), (10, 20, 40, 60)]
    assert ax.patches[0].get_edgecolor() == to_rgba("red")
    assert ax.patches[0].get_linestyle() == "--"
    assert len(ax.texts) == 0  # no labels, no scores, or show_text=False: nothing to say
    with pytest.raises(ValueError, match="labels"):
        viz.draw_boxes(ax, xywh, labels=[1, 2])


def test_draw_boxes_empty(ax):
    assert viz.draw_boxes(ax, np.zeros((0, 4)), labels=np.zeros((0,)), scores=[]) is ax
    viz.draw_boxes(ax, [], fmt="yxyx")
    assert len(ax.patches) == 0 and len(ax.texts) == 0


def test_draw_anchors_subsamples_and_marks_centres(ax):
    anchors = np.array([[i, i, i + 10, i + 20] for i in range(10)], np.float32)
    viz.draw_anchors(ax, anchors, max_anchors=4, centers=True)
    drawn = rectangles(ax)
    assert len(drawn) == 4
    assert drawn[0][:2] == (0, 0) and drawn[-1][:2] == (9, 9)  # evenly spread, ends included
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata(), [x + 5 for x, *_ in drawn])
    np.testing.assert_allclose(line.get_ydata(), [y + 10 for _, y, *_ in drawn])
    ax2 = plt.subplots()[1]
    viz.draw_anchors(ax2, anchors)
    assert len(ax2.patches) == 10 and len(ax2.lines) == 0
    viz.draw_anchors(ax2, np.zeros((0, 4)), centers=True)
    assert len(ax2.patches) == 10 and len(ax2.lines) == 0


def test_draw_assignment_styles_and_legend(ax):
    anchors = np.array(
        [[0, 0, 10, 10], [5, 5, 15, 15], [50, 50, 60, 60], [2, 2, 12, 12], [70, 70, 80, 80]]
    )
    states = tf.constant([1, 1, 0, -1, 0])
    gt = np.array([[1, 1, 11, 11], [-1, -1, -1, -1]])
    viz.draw_assignment(ax, anchors, states, gt_boxes=gt)
    assert len(ax.patches) == 4  # 2 positive + 1 ignored + 1 GT (padding skipped)
    positive = [p for p in ax.patches if p.get_edgecolor() == to_rgba("#2ca02c")]
    ignored = [p for p in ax.patches if p.get_linestyle() == "--"]
    thick = [p for p in ax.patches if p.get_linewidth() == 3.0]
    assert len(positive) == 2 and all(p.get_linestyle() == "-" for p in positive)
    assert len(ignored) == 1 and (ignored[0].get_x(), ignored[0].get_y()) == (2, 2)
    assert len(thick) == 1 and (thick[0].get_x(), thick[0].get_y()) == (1, 1)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["positive (2)", "ignored (1)", "ground truth (1)"]
    ax2 = plt.subplots()[1]
    viz.draw_assignment(ax2, anchors, states, show_negatives=True)
    assert len(ax2.patches) == 5
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == [
        "positive (2)",
        "ignored (1)",
        "negative (2)",
    ]
    with pytest.raises(ValueError, match="states"):
        viz.draw_assignment(ax2, anchors, [1, 0])


def test_draw_assignment_empty(ax):
    viz.draw_assignment(ax, np.zeros((0, 4)), np.zeros((0,)), gt_boxes=np.zeros((0, 4)))
    assert len(ax.patches) == 0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "positive (0)",
        "ignored (0)",
        "ground truth (0)",
    ]


def test_draw_keypoints_visibility_and_skeleton(ax):
    keypoints = np.array(
        [
            [[10, 10, 2], [20, 20, 1], [30, 30, 0]],
            [[40, 40, 2], [50, 50, 2], [-1, -1, -1]],
        ],
        np.float32,
    )
    viz.draw_keypoints(ax, keypoints, names=["a", "b", "c"], skeleton=[(0, 1), (1, 2)])
    filled, hollow = ax.collections
    np.testing.assert_allclose(filled.get_offsets(), [[10, 10], [40, 40], [50, 50]])
    np.testing.assert_allclose(hollow.get_offsets(), [[20, 20]])
    assert filled.get_facecolors().shape[0] == 3
    assert hollow.get_facecolors().shape[0] == 0  # hollow: no face colour
    # (0, 1) in both instances; (1, 2) never (keypoint 2 is unlabelled / padding).
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [40, 50])
    assert sorted(t.get_text() for t in ax.texts) == ["a", "a", "b", "b"]


def test_draw_keypoints_single_instance_and_empty(ax):
    viz.draw_keypoints(ax, tf.constant([[5.0, 6.0, 2.0]]))
    (points,) = ax.collections
    np.testing.assert_allclose(points.get_offsets(), [[5, 6]])
    ax2 = plt.subplots()[1]
    viz.draw_keypoints(ax2, np.zeros((0, 17, 3)), skeleton=[(0, 1)])
    viz.draw_keypoints(ax2, np.zeros((2, 3, 3)))  # all visibility 0
    assert len(ax2.collections) == 0 and len(ax2.lines) == 0
    with pytest.raises(ValueError, match="names"):
        viz.draw_keypoints(ax2, np.zeros((1, 3, 3)), names=["a"])


def test_draw_heatmap_extent_matches_image(ax):
    image = np.zeros((64, 80, 3), np.uint8)
    heatmap = np.random.default_rng(0).uniform(size=(8, 10, 2))
    viz.draw_heatmap(ax, heatmap, image=image, alpha=0.4)
    background, overlay = ax.images
    assert overlay.get_extent() == background.get_extent() == [-0.5, 79.5, 63.5, -0.5]
    np.testing.assert_allclose(overlay.get_array(), heatmap.max(axis=-1))  # channels: max
    assert overlay.get_alpha() == 0.4
    assert ax.get_xlim() == (-0.5, 79.5) and ax.get_ylim() == (63.5, -0.5)


def test_draw_heatmap_alone(ax):
    viz.draw_heatmap(ax, tf.ones((6, 4)))
    (image,) = ax.images
    assert image.get_extent() == [-0.5, 3.5, 5.5, -0.5]
    assert image.get_alpha() == 1.0
    with pytest.raises(ValueError, match="shape"):
        viz.draw_heatmap(ax, np.zeros((2, 2, 2, 2)))


def test_plot_pr_curve_reports_coco_ap(ax):
    recall = np.linspace(0, 1, 101)
    precision = np.where(recall <= 0.5, 1.0, 0.0)  # AP = 51 / 101
    viz.plot_pr_curve(ax, recall, precision, label="square")
    viz.plot_pr_curve(ax, tf.constant(recall), tf.constant(precision * 0.5))
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), precision)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == [f"square (AP = {51 / 101:.3f})", f"AP = {51 / 101 / 2:.3f}"]
    ax2 = plt.subplots()[1]
    viz.plot_pr_curve(ax2, [], [])
    assert ax2.get_legend().get_texts()[0].get_text() == "AP = 0.000"
    with pytest.raises(ValueError, match="recall"):
        viz.plot_pr_curve(ax2, [0, 1], [1])


def test_image_grid_draws_targets_and_predictions():
    images = tf.zeros((3, 32, 32, 3), tf.uint8)
    targets = {
        "boxes": np.array([[[1, 1, 10, 10], [-1, -1, -1, -1]]] * 3, np.float32),
        "labels": np.array([[0, -1]] * 3),
        "keypoints": np.array([[[[5, 5, 2]], [[-1, -1, -1]]]] * 3, np.float32),
    }
    predictions = {
        "boxes": np.array([[[2, 2, 12, 12], [3, 3, 9, 9], [0, 0, 0, 0]]] * 3, np.float32),
        "scores": np.array([[0.9, 0.3, 0.0]] * 3),
        "labels": np.array([[0, 1, 0]] * 3),  # the third one is beyond num_detections
        "num_detections": np.array([2, 1, 0]),
    }
    fig = viz.image_grid(images, targets, predictions, class_names=["a", "b"], ncols=2)
    assert len(fig.axes) == 4
    counts = [len(a.patches) for a in fig.axes]
    assert counts == [1 + 2, 1 + 1, 1 + 0, 0]
    dashed = [p for p in fig.axes[0].patches if p.get_linestyle() == "--"]
    assert [(p.get_x(), p.get_y()) for p in dashed] == [(1, 1)]
    assert [t.get_text() for t in fig.axes[0].texts] == ["a 0.90", "b 0.30"]
    assert len(fig.axes[0].collections) == 1  # the target keypoint
    assert not fig.axes[3].axison and len(fig.axes[3].images) == 0  # unused panel hidden


def test_image_grid_images_only_and_empty():
    fig = viz.image_grid([np.zeros((8, 8, 3), np.uint8)] * 5, titles=list("abcde"))
    assert len(fig.axes) == 8
    assert [a.get_title() for a in fig.axes[:5]] == list("abcde")
    assert sum(len(a.images) for a in fig.axes) == 5
    fig = viz.image_grid(np.zeros((0, 8, 8, 3)))
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 0


def test_draw_heatmap_colour_scale(ax):
    viz.draw_heatmap(ax, np.full((4, 4), 0.25))
    assert ax.images[-1].get_clim() == (0.25, 0.25)  # matplotlib's default: the map's own range
    viz.draw_heatmap(ax, np.full((4, 4), 0.25), vmin=0.0, vmax=1.0)
    assert ax.images[-1].get_clim() == (0.0, 1.0)


def test_plot_learning_curves_draws_one_line_per_model(ax):
    curves = {
        "a": [
            {"step": 100, "seconds": 50.0, "AP50": 0.1},
            {"step": 200, "seconds": 90.0, "AP50": 0.3},
        ],
        "b": [{"step": 100, "seconds": 70.0, "AP50": 0.0}],
    }
    viz.plot_learning_curves(ax, curves, x="step")
    assert len(ax.lines) == 3  # two curves and the target line
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [100, 200])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [0.1, 0.3])
    assert ax.lines[1].get_color() == viz.class_color(1)
    assert list(ax.lines[2].get_ydata()) == [0.5, 0.5]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "AP50"


def test_plot_confusion_normalises_rows_and_writes_counts(ax):
    matrix = np.array([[3, 1, 0], [0, 0, 2]])
    image = viz.plot_confusion(ax, matrix, ["circle", "star"], title="t")
    np.testing.assert_allclose(image.get_array(), [[0.75, 0.25, 0], [0, 0, 1]])
    assert [t.get_text() for t in ax.texts] == ["3", "1", "0", "0", "0", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["circle", "star", "missed"]
    assert ax.get_title() == "t"
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*2 class names"):
        viz.plot_confusion(ax, matrix, ["circle", "star"], missed=False)


def test_use_book_style_sets_the_font_size(monkeypatch):
    monkeypatch.setitem(plt.rcParams, "font.size", 10.0)
    viz.use_book_style()  # outside IPython: fonts only, no error
    assert plt.rcParams["font.size"] == 11
