"""Matplotlib drawing for the book: images, boxes, anchors and their states, keypoints, heatmaps,
PR curves, image grids.

Every ``draw_*`` / ``plot_*`` function takes a Matplotlib ``Axes``, draws on it and returns it
(no ``plt.show()`` inside), so cells compose them freely. Inputs may be TensorFlow tensors, NumPy
arrays or lists. Boxes are absolute-pixel ``xyxy`` unless a ``fmt`` argument says otherwise;
padded entries (label -1, or a box of -1s) are skipped, so the padded targets and predictions
of the data pipeline and the post-processing can be passed as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

__all__ = [
    "PALETTE",
    "class_color",
    "draw_anchors",
    "draw_assignment",
    "draw_boxes",
    "draw_heatmap",
    "draw_keypoints",
    "image_grid",
    "plot_confusion",
    "plot_learning_curves",
    "plot_pr_curve",
    "show_image",
    "use_book_style",
]

#: One colour per class id (cycled): Matplotlib's "tab10" then the darker half of "tab20b",
#: distinct on natural images and on the synthetic data set's plain backgrounds.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
)
_PADDING_COLOR = "#bbbbbb"

# Anchor states of dlnotes.matching: 1 positive, 0 negative, -1 ignored.
_POSITIVE_COLOR = "#2ca02c"
_IGNORED_COLOR = "#999999"
_NEGATIVE_COLOR = "#1f77b4"
_GT_COLOR = "#d62728"


def use_book_style() -> None:
    """Draw figures as the stored book does: 11 pt fonts and, in Jupyter, "retina" PNGs.

    The book's notebooks are executed with a kernel profile (``book/.ipython``) that sets
    these; a kernel without it (Colab, a plain ``jupyter lab``) calls this instead. Retina PNGs
    are stored at twice ``figure.dpi`` and shown at their logical size, so they stay sharp on
    high-density screens. Outside IPython only the font size changes.
    """
    plt.rcParams.update({"font.size": 11})
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # no Jupyter: nothing more to set
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def _np(x, dtype=None) -> np.ndarray:
    """Tensor / array / list -> NumPy array."""
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def class_color(label) -> str:
    """The fixed colour (hex string) of a class id; padding / unknown labels (< 0) are grey."""
    label = int(label)
    if label < 0:
        return _PADDING_COLOR
    return PALETTE[label % len(PALETTE)]


def _image_for_display(image) -> np.ndarray:
    """uint8 or float [0, 255] image (H, W), (H, W, 1) or (H, W, 3) -> what ``imshow`` expects."""
    image = _np(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Expected an image (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}."
        )
    if image.dtype == np.uint8:
        return image
    # Float images are in [0, 255] in dlnotes; imshow wants floats in [0, 1].
    return np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 255.0) / 255.0


def show_image(image, ax=None, title: str | None = None, figsize=(5, 5)):
    """Shows an image without axis ticks.

    Args:
        image: ``(H, W, 3)``, ``(H, W, 1)`` or ``(H, W)``; uint8, or float in [0, 255]
            (clipped).
        ax: the Axes to draw on; a new figure of ``figsize`` when None.
        title: optional title.

    Returns:
        The Axes. Its data limits are the pixel grid: x in [-0.5, W - 0.5], y downwards.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    display = _image_for_display(image)
    if display.ndim == 2:  # grey levels are absolute, not stretched to the image's range
        ax.imshow(display, cmap="gray", vmin=0, vmax=255 if display.dtype == np.uint8 else 1)
    else:
        ax.imshow(display)
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)
    return ax


def _as_xyxy(boxes, fmt: str) -> np.ndarray:
    """``(N, 4)`` boxes in ``fmt`` -> float64 xyxy, converted by :func:`dlnotes.boxes.convert_format`."""
    boxes = _np(boxes, np.float64).reshape(-1, 4)
    if fmt == "xyxy" or boxes.shape[0] == 0:
        return boxes
    from dlnotes.boxes import convert_format  # only non-xyxy boxes need TensorFlow

    if fmt.startswith("rel_"):
        raise ValueError(f"draw_boxes draws absolute boxes; convert {fmt!r} boxes to pixels first.")
    return _np(convert_format(boxes, fmt, "xyxy"), np.float64)


def _valid_boxes(boxes: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Mask of entries that are not padding: label >= 0, box not all -1, finite coordinates."""
    valid = np.all(np.isfinite(boxes), axis=-1) & ~np.all(boxes == -1, axis=-1)
    if labels is not None:
        valid &= labels >= 0
    return valid


def draw_boxes(
    ax,
    boxes,
    labels=None,
    scores=None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    color=None,
    linewidth: float = 1.5,
    linestyle: str = "-",
    alpha: float = 1.0,
    show_text: bool = True,
    fmt: str = "xyxy",
):
    """Draws boxes as unfilled rectangles, with "name score" captions.

    Args:
        ax: Matplotlib Axes (usually after :func:`show_image`).
        boxes: ``(N, 4)`` boxes in ``fmt`` (absolute pixels; default ``xyxy``).
        labels: optional ``(N,)`` int class ids; -1 marks padding (skipped).
        scores: optional ``(N,)`` scores, shown after the class name.
        class_names: optional names, indexed by label (sequence or mapping).
        color: one colour for every box; default the class colour (:func:`class_color`).
        linewidth, linestyle, alpha: rectangle style.
        show_text: draw the captions.
        fmt: box format, any absolute format of :data:`dlnotes.boxes.FORMATS`.

    Returns:
        The Axes, with one ``Rectangle`` patch (and one text when there is something to say) per
        non-padded box.
    """
    boxes = _as_xyxy(boxes, fmt)
    n = boxes.shape[0]
    labels = None if labels is None else _np(labels).astype(np.int64).reshape(-1)
    scores = None if scores is None else _np(scores, np.float64).reshape(-1)
    for name, values in (("labels", labels), ("scores", scores)):
        if values is not None and values.shape[0] != n:
            raise ValueError(f"draw_boxes: {n} boxes but {values.shape[0]} {name}.")
    valid = _valid_boxes(boxes, labels)
    for i in np.flatnonzero(valid):
        x1, y1, x2, y2 = boxes[i]
        label = None if labels is None else int(labels[i])
        edge = (
            color
            if color is not None
            else (class_color(label) if label is not None else PALETTE[0])
        )
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=edge,
                linewidth=linewidth,
                linestyle=linestyle,
                alpha=alpha,
            )
        )
        if not show_text:
            continue
        parts = []
        if label is not None:
            parts.append(_class_name(label, class_names))
        if scores is not None:
            parts.append(f"{scores[i]:.2f}")
        if parts:
            ax.text(
                x1,
                y1,
                " ".join(parts),
                color="white",
                fontsize=8,
                va="bottom",
                ha="left",
                bbox={"facecolor": edge, "alpha": 0.8 * alpha, "pad": 1, "edgecolor": "none"},
                clip_on=True,
            )
    return ax


def _class_name(label: int, class_names) -> str:
    if class_names is None:
        return str(label)
    try:
        return str(class_names[label])
    except (IndexError, KeyError):
        return str(label)


def draw_anchors(
    ax, anchors, color="#ff7f0e", max_anchors: int | None = None, centers: bool = False
):
    """Draws anchor boxes (thin, unfilled), optionally with their centres.

    Args:
        ax: Matplotlib Axes.
        anchors: ``(N, 4)`` xyxy anchors (e.g. one location's anchors, or all of one level).
        color: edge colour.
        max_anchors: draw at most this many, evenly spaced over the input order (all levels and
            positions stay represented); None draws all.
        centers: also mark each drawn anchor's centre with a dot (one ``Line2D``).

    Returns:
        The Axes, with one ``Rectangle`` per drawn anchor.
    """
    anchors = _np(anchors, np.float64).reshape(-1, 4)
    if max_anchors is not None and anchors.shape[0] > max_anchors:
        keep = np.linspace(0, anchors.shape[0] - 1, int(max_anchors)).round().astype(np.int64)
        anchors = anchors[keep]
    for x1, y1, x2, y2 in anchors:
        ax.add_patch(
            Rectangle(
                (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=0.8, alpha=0.7
            )
        )
    if centers and anchors.shape[0]:
        cx = 0.5 * (anchors[:, 0] + anchors[:, 2])
        cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
        ax.plot(cx, cy, linestyle="none", marker=".", markersize=3, color=color)
    return ax


def draw_assignment(ax, anchors, states, gt_boxes=None, show_negatives: bool = False):
    """Draws the result of anchor matching: which anchors are positive, ignored or negative.

    Positive anchors are solid green, ignored anchors grey dashed, negatives (only when
    ``show_negatives``, there are usually tens of thousands) thin blue; GT boxes thick red. A
    legend gives the count of each state.

    Args:
        ax: Matplotlib Axes.
        anchors: ``(N, 4)`` xyxy anchors.
        states: ``(N,)`` anchor states: 1 positive, 0 negative, -1 ignored.
        gt_boxes: optional ``(M, 4)`` xyxy GT boxes; rows of -1 (padding) are skipped.
        show_negatives: also draw the negative anchors.

    Returns:
        The Axes: one ``Rectangle`` per drawn anchor and GT box, and a legend.
    """
    anchors = _np(anchors, np.float64).reshape(-1, 4)
    states = _np(states).astype(np.int64).reshape(-1)
    if states.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"draw_assignment: {anchors.shape[0]} anchors but {states.shape[0]} states."
        )
    styles = [
        (1, "positive", {"edgecolor": _POSITIVE_COLOR, "linewidth": 1.5, "linestyle": "-"}),
        (-1, "ignored", {"edgecolor": _IGNORED_COLOR, "linewidth": 1.0, "linestyle": "--"}),
    ]
    if show_negatives:
        styles.append(
            (0, "negative", {"edgecolor": _NEGATIVE_COLOR, "linewidth": 0.5, "linestyle": "-"})
        )
    handles = []
    # Negatives first so that positives are drawn on top.
    for state, name, style in reversed(styles):
        chosen = anchors[states == state]
        for x1, y1, x2, y2 in chosen:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, **style))
        handles.append(
            Line2D(
                [],
                [],
                color=style["edgecolor"],
                linewidth=style["linewidth"],
                linestyle=style["linestyle"],
                label=f"{name} ({len(chosen)})",
            )
        )
    handles.reverse()
    if gt_boxes is not None:
        gt = _np(gt_boxes, np.float64).reshape(-1, 4)
        gt = gt[_valid_boxes(gt, None)]
        for x1, y1, x2, y2 in gt:
            ax.add_patch(
                Rectangle(
                    (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=_GT_COLOR, linewidth=3.0
                )
            )
        handles.append(
            Line2D([], [], color=_GT_COLOR, linewidth=3.0, label=f"ground truth ({len(gt)})")
        )
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    return ax


def draw_keypoints(ax, keypoints, names: Sequence[str] | None = None, skeleton=None, color=None):
    """Draws keypoints of several instances.

    Visibility 2 (visible) is a filled marker, 1 (labelled but occluded) a hollow one, 0 (not
    labelled) and padding (-1) are not drawn. Each keypoint type has its own colour
    (:func:`class_color` of its index) unless ``color`` is given.

    Args:
        ax: Matplotlib Axes.
        keypoints: ``(N, K, 3)`` (x, y, visibility) or ``(K, 3)`` for one instance.
        names: optional ``K`` keypoint names, written next to the drawn points.
        skeleton: optional ``(i, j)`` index pairs; a line joins two drawn keypoints.
        color: one colour for every point and line.

    Returns:
        The Axes: one scatter collection of filled points and one of hollow points (each
        present only when it has points), one ``Line2D`` per drawn skeleton edge, one text per
        named point.
    """
    keypoints = _np(keypoints, np.float64)
    if keypoints.ndim == 2:
        keypoints = keypoints[None]
    if keypoints.ndim != 3 or keypoints.shape[-1] != 3:
        raise ValueError(
            f"draw_keypoints expects (N, K, 3) keypoints, got shape {keypoints.shape}."
        )
    num_kpts = keypoints.shape[1]
    if names is not None and len(names) != num_kpts:
        raise ValueError(f"draw_keypoints: {num_kpts} keypoints but {len(names)} names.")
    xy, vis = keypoints[..., :2], keypoints[..., 2]
    drawn = (vis > 0) & np.all(np.isfinite(xy), axis=-1)
    kind = np.broadcast_to(np.arange(num_kpts), vis.shape)
    colors = np.array(
        [color if color is not None else class_color(k) for k in range(num_kpts)], dtype=object
    )

    for skel_i, skel_j in skeleton if skeleton is not None else ():
        for n in range(keypoints.shape[0]):
            if drawn[n, skel_i] and drawn[n, skel_j]:
                ax.add_line(
                    Line2D(
                        [xy[n, skel_i, 0], xy[n, skel_j, 0]],
                        [xy[n, skel_i, 1], xy[n, skel_j, 1]],
                        color=color if color is not None else "white",
                        linewidth=1.5,
                        alpha=0.8,
                    )
                )
    filled = drawn & (vis >= 2)
    hollow = drawn & (vis < 2)
    if filled.any():
        ax.scatter(
            xy[filled][:, 0],
            xy[filled][:, 1],
            s=30,
            c=list(colors[kind[filled]]),
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
    if hollow.any():
        ax.scatter(
            xy[hollow][:, 0],
            xy[hollow][:, 1],
            s=30,
            facecolors="none",
            edgecolors=list(colors[kind[hollow]]),
            linewidths=1.5,
            zorder=3,
        )
    if names is not None:
        for n, k in zip(*np.nonzero(drawn), strict=True):
            ax.text(
                xy[n, k, 0] + 2,
                xy[n, k, 1],
                str(names[k]),
                fontsize=7,
                color=colors[k],
                clip_on=True,
            )
    return ax


def draw_heatmap(
    ax, heatmap, image=None, alpha: float = 0.5, cmap: str = "jet", vmin=None, vmax=None
):
    """Shows a heatmap (e.g. a score map or a centerness target), over an image if given.

    The heatmap is stretched over the image's pixel extent, so a stride-s feature map of an
    ``(H, W)`` image lines up with it (each cell covers s x s pixels).

    Args:
        ax: Matplotlib Axes.
        heatmap: ``(h, w)`` or ``(h, w, C)``; several channels are reduced by max (e.g. per-class
            score maps).
        image: optional ``(H, W[, 3])`` image drawn underneath (see :func:`show_image`).
        alpha: heatmap opacity over the image (1 without an image).
        cmap: Matplotlib colormap name.
        vmin, vmax: the values at the ends of the colour scale (default: the heatmap's minimum
            and maximum). Fix them, e.g. to 0 and 1, to compare several maps.

    Returns:
        The Axes. The heatmap ``AxesImage`` is the last of ``ax.images`` and has the image's
        extent ``(-0.5, W - 0.5, H - 0.5, -0.5)``.
    """
    heatmap = _np(heatmap, np.float64)
    if heatmap.ndim == 3:
        heatmap = heatmap.max(axis=-1)
    if heatmap.ndim != 2:
        raise ValueError(f"draw_heatmap expects (h, w) or (h, w, C), got shape {heatmap.shape}.")
    if image is not None:
        show_image(image, ax=ax)
        height, width = _np(image).shape[:2]
    else:
        height, width = heatmap.shape
        ax.set_axis_off()
        alpha = 1.0
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    ax.imshow(
        np.nan_to_num(heatmap),
        cmap=cmap,
        alpha=alpha,
        vmin=vmin,
        vmax=vmax,
        extent=extent,
        interpolation="nearest",
    )
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    return ax


def plot_learning_curves(ax, curves, x: str = "seconds", y: str = "AP50", target=0.5):
    """Plots one learning curve per model: ``y`` against ``x``, with a dashed line at ``target``.

    Args:
        ax: Matplotlib Axes.
        curves: ``{name: rows}``, each row a dict with ``x`` and ``y`` (the curves of
            ``benchmarks/time_to_ap50.py``); model ``i`` gets :func:`class_color` ``(i)``.
        x, y: the row keys on the axes (e.g. ``"seconds"`` or ``"step"``; ``"AP50"``).
        target: a level to mark, or None.

    Returns:
        The Axes.
    """
    for i, (name, rows) in enumerate(curves.items()):
        ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", color=class_color(i), label=name)
    if target is not None:
        ax.axhline(target, color="gray", lw=0.8, ls="--")
    ax.set(xlabel=x, ylabel=y)
    return ax


def plot_pr_curve(ax, recall, precision, label: str | None = None):
    """Plots a precision-recall curve with its AP in the legend.

    AP is COCO's: the mean of ``precision`` over the sampled recall thresholds (pass the
    101-point curve of :func:`dlnotes.evaluation.precision_recall_curve` or
    :func:`dlnotes.evaluation.average_precision`).

    Args:
        ax: Matplotlib Axes.
        recall: ``(R,)`` recall values in [0, 1].
        precision: ``(R,)`` precision values.
        label: legend label; the AP is appended.

    Returns:
        The Axes with one more line and an updated legend.
    """
    recall = _np(recall, np.float64).reshape(-1)
    precision = _np(precision, np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(
            f"plot_pr_curve: {recall.size} recall values but {precision.size} precision values."
        )
    ap = float(np.mean(precision)) if precision.size else 0.0
    text = f"AP = {ap:.3f}" if label is None else f"{label} (AP = {ap:.3f})"
    ax.plot(recall, precision, label=text)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return ax


def plot_confusion(ax, matrix, class_names: Sequence[str], missed: bool = True, title=None):
    """Draws a confusion matrix as a heat map, rows normalised, with the counts in the cells.

    Args:
        ax: Matplotlib Axes.
        matrix: int ``(C, C)`` or, with ``missed``, ``(C, C + 1)`` counts: row = true class,
            column = predicted class (the last column: objects with no prediction), as
            :meth:`dlnotes.evaluation.BoxVersusClass.confusion` returns.
        class_names: ``C`` names, in the rows' order.
        missed: the last column counts misses (labelled "missed").
        title: the Axes title.

    Returns:
        The image returned by ``imshow`` (for a colour bar).
    """
    matrix = _np(matrix, np.int64)
    names = list(class_names)
    columns = names + (["missed"] if missed else [])
    if matrix.shape != (len(names), len(columns)):
        raise ValueError(
            f"plot_confusion: a matrix of shape {matrix.shape} does not fit {len(names)} class "
            f"names{' and a missed column' if missed else ''} (expected "
            f"{(len(names), len(columns))})."
        )
    totals = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if fraction[row, col] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return image


def _batch_item(values: Mapping | None, key: str, index: int):
    if values is None or values.get(key) is None:
        return None
    return _np(values[key])[index]


def image_grid(
    images,
    targets: Mapping | None = None,
    predictions: Mapping | None = None,
    class_names=None,
    ncols: int = 4,
    titles: Sequence[str] | None = None,
    panel_size: float = 3.0,
):
    """A grid of images with their ground truth (dashed) and predictions (solid, with scores).

    Args:
        images: ``(N, H, W, 3)`` batch (or a list of images).
        targets: optional ``{"boxes": (N, M, 4) xyxy, "labels": (N, M)}`` padded with -1,
            optionally ``"keypoints": (N, M, K, 3)``.
        predictions: optional ``{"boxes": (N, D, 4), "scores": (N, D), "labels": (N, D)}`` and
            optionally ``"num_detections": (N,)`` and ``"keypoints"``.
        class_names: names indexed by label.
        ncols: panels per row.
        titles: optional ``N`` panel titles.
        panel_size: inches per panel.

    Returns:
        The Matplotlib Figure (``fig.axes`` in row order; unused panels are hidden).
    """
    images = list(images) if not hasattr(images, "numpy") else list(images.numpy())
    n = len(images)
    ncols = max(1, min(int(ncols), n)) if n else 1
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False
    )
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_axis_off()
            continue
        show_image(images[i], ax=ax, title=None if titles is None else titles[i])
        if targets is not None:
            draw_boxes(
                ax,
                _batch_item(targets, "boxes", i),
                labels=_batch_item(targets, "labels", i),
                class_names=class_names,
                linestyle="--",
                show_text=predictions is None,
            )
            keypoints = _batch_item(targets, "keypoints", i)
            if keypoints is not None:
                draw_keypoints(ax, keypoints)
        if predictions is not None:
            boxes = _batch_item(predictions, "boxes", i)
            scores = _batch_item(predictions, "scores", i)
            labels = _batch_item(predictions, "labels", i)
            keypoints = _batch_item(predictions, "keypoints", i)
            count = _batch_item(predictions, "num_detections", i)
            if count is not None:
                keep = slice(0, int(count))
                boxes = boxes[keep]
                scores = None if scores is None else scores[keep]
                labels = None if labels is None else labels[keep]
                keypoints = None if keypoints is None else keypoints[keep]
            draw_boxes(ax, boxes, labels=labels, scores=scores, class_names=class_names)
            if keypoints is not None:
                draw_keypoints(ax, keypoints)
    fig.tight_layout()
    return fig
