"""Darknet's file formats: ``.cfg`` network descriptions and ``.weights`` parameter files.

Darknet (pjreddie/darknet, the reference YOLOv3) describes a network as an INI-like ``.cfg``
file: a ``[net]`` section with the input size and training options, then one section per layer
(``[convolutional]``, ``[shortcut]``, ``[route]``, ``[upsample]``, ``[yolo]`` ...). Layers are
numbered from 0 in file order, ``[net]`` excluded; ``[route] layers = -1, 61`` concatenates the
previous layer's output with layer 61's (channels), ``[shortcut] from=-3`` adds layer ``i - 3``'s
output to the previous one.

:func:`parse_cfg` reads the values darknet reads. Darknet deletes every space and tab of a line,
skips the lines that then start with ``#`` or ``;``, and reads numbers with ``atoi`` / ``atof``,
which stop at the first other character: ``filters=255 # 3*(80+5)`` is 255, so a value ends at
its first ``#`` or ``;`` here. A section's options are a list in file order and
``option_find`` returns the first match, so when an option is repeated the FIRST value is used.
The official cfgs rely on it in ``[net]`` (``# Testing`` ``batch=1``, ``subdivisions=1``, then
``# Training`` ``batch=64``, ``subdivisions=16``, the user commenting out one block; with both
blocks active, as in ``yolov3-openimages.cfg``, darknet uses ``batch=1``): a repeat in ``[net]``
is accepted with that rule (the section's ``ignored`` list keeps the unused values), a repeat
in a layer section (two ``filters=``) is an error.

A ``.weights`` file is little-endian and has no names or shapes, only numbers in cfg order::

    int32 major, int32 minor, int32 revision
    seen: int64 if major * 10 + minor >= 2 else int32       (images seen in training)
    for every [convolutional] section, in cfg order:
        batch_normalize=1:  beta, gamma, moving mean, moving variance   (filters float32 each)
        batch_normalize=0:  bias                                        (filters float32)
        kernel (filters, in_channels / groups, size, size) float32      (out, in, kh, kw)

so the file size is ``20 + 4 * parameters`` (``16 + ...`` for version 0.1) and the cfg is needed
to read it. Keras keeps kernels as ``(kh, kw, in, out)``; :func:`load_darknet_weights` and
:func:`save_darknet_weights` transpose. A Keras conv that has both a bias and a BatchNorm (the
notes' ``use_bias=True`` Darknet-53) has a number darknet cannot store: since
``BN(z + b) = BN'(z)`` with ``moving_mean' = moving_mean - b``, saving folds the bias into the
moving mean and loading sets the bias to 0 — the same function at inference, and in training the
bias before a BN has no effect anyway.

Public figures this module reproduces: ``conv_specs(parse_cfg(yolov3_cfg(80)))`` has 75 convs
and 62,001,757 parameters, i.e. a file of 248,007,048 bytes, the size of the published
``yolov3.weights``; the Darknet-53 body (``darknet53_cfg()``, 52 convs) has 40,620,640, the
162,482,580 bytes of ``darknet53.conv.74``.

The Keras side is a list of *units* ``(Conv2D, BatchNormalization | None)`` in cfg order
(:func:`darknet_units`): a model provides them with a ``darknet_units()`` method (the YOLOv3
model) or by naming its layers ``conv{i}`` / ``bn{i}`` with ``i`` the darknet conv index
(:func:`dlnotes.backbones.darknet.build_darknet53`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import Sequence

import keras
import numpy as np

from dlnotes.anchors import YOLO_COCO_ANCHORS, YOLO_MASKS, YoloAnchors
from dlnotes.checks import check_num_classes, integer, positive_int
from dlnotes.darknet_layout import DARKNET53_BLOCKS
from dlnotes.saving import writing

__all__ = [
    "CfgSection",
    "ConvSpec",
    "conv_specs",
    "darknet53_cfg",
    "darknet_units",
    "load_darknet_weights",
    "parse_cfg",
    "save_darknet_weights",
    "weights_file_size",
    "yolov3_cfg",
    "yolov3_config_from_cfg",
]

# ----------------------------------------------------------------------------- cfg parsing

# darknet's parse.c accepts these short section names for the long ones.
_SECTION_ALIASES = {
    "conv": "convolutional",
    "network": "net",
    "max": "maxpool",
    "avg": "avgpool",
    "soft": "softmax",
    "conn": "connected",
    "normalization": "lrn",
}
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INLINE_COMMENT = re.compile(r"[#;]")


def _scalar(text):
    """int, else float, else the raw string (darknet reads every option as text)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _parse_value(text):
    """``"3"`` -> 3, ``".1"`` -> 0.1, ``"-1, 61"`` -> [-1, 61], ``"leaky"`` -> "leaky"."""
    if "," not in text:
        return _scalar(text)
    # darknet tolerates empty entries ("anchors = 10,13,  16,30, ") and ignores them.
    return [_scalar(part.strip()) for part in text.split(",") if part.strip()]


def _read_source(source):
    """(text, origin): a path (str or PathLike) is read; a str with a newline or starting with
    ``[`` is cfg text itself."""
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source and not source.lstrip().startswith("[")
    ):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"parse_cfg: cfg file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    if isinstance(source, str):
        return source, "<cfg text>"
    raise TypeError(f"parse_cfg: expected a path or the cfg text, got {type(source).__name__}")


class CfgSection(dict):
    """One section of a parsed cfg: the dict ``{"type": kind, option: value, ...}`` plus where
    it was read (it compares equal to the plain dict).

    Attributes:
        origin: the cfg's path, or ``"<cfg text>"``.
        line: line of the ``[section]`` header (1-based).
        option_lines: ``{option: line}`` of the value that was read.
        ignored: ``[(line, option, value), ...]``, the repeats of a ``[net]`` option that
            darknet does not read (it reads the first occurrence); empty for other sections.
    """

    def __init__(self, kind: str, origin: str, line: int):
        super().__init__(type=kind)
        self.origin = origin
        self.line = line
        self.option_lines: dict[str, int] = {}
        self.ignored: list[tuple[int, str, object]] = []


# Sections in which darknet's rule for a repeated option (the first one is read) is accepted.
_REPEATABLE = ("net",)


def _section_header(line, raw, where, origin, lineno):
    kind = line[1:-1].strip().lower() if line.endswith("]") else ""
    if not kind or any(c in kind for c in "[]="):
        raise ValueError(f"parse_cfg: {where}: malformed section header {raw.strip()!r}")
    return CfgSection(_SECTION_ALIASES.get(kind, kind), origin, lineno)


def _strip_comment(value):
    """``"255 # 3*(80+5)"`` -> ``"255"``: a value ends at the first ``#`` or ``;``."""
    return _INLINE_COMMENT.split(value, maxsplit=1)[0].strip()


def _add_option(section, line, raw, where, lineno):
    key, sep, value = (part.strip() for part in line.partition("="))
    if not sep or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"parse_cfg: {where}: cannot parse {raw.strip()!r}; expected '[section]', "
            "'key=value' or a comment starting with '#' or ';'"
        )
    if section is None:
        raise ValueError(f"parse_cfg: {where}: option {key!r} before the first [section]")
    value = _strip_comment(value)
    if not value:
        raise ValueError(f"parse_cfg: {where}: option {key!r} has no value")
    if key == "type":
        raise ValueError(f"parse_cfg: {where}: 'type' is reserved for the section name")
    if key in section.option_lines:
        if section["type"] not in _REPEATABLE:
            raise ValueError(
                f"parse_cfg: {where}: option {key!r} repeated in section "
                f"[{section['type']}] (first on line {section.option_lines[key]}); only [net] "
                "may repeat an option (darknet reads the first one)"
            )
        section.ignored.append((lineno, key, _parse_value(value)))
        return
    section.option_lines[key] = lineno
    section[key] = _parse_value(value)


def parse_cfg(source: str | os.PathLike) -> list[CfgSection]:
    """Parse a darknet ``.cfg`` into a list of sections, reading the values darknet reads.

    The rules, darknet's (``read_cfg`` / ``read_option`` / ``option_find``):

    * Whitespace around a line, key or value is ignored; a line whose first other character is
      ``#`` or ``;`` is a comment, and so is the rest of a value from its first ``#`` or ``;``
      (``filters=255 # 3*(80+5)`` is 255: darknet deletes the spaces and its ``atoi`` /
      ``atof`` stop at the ``#``).
    * An option repeated in ``[net]`` (or ``[network]``) keeps its FIRST value: darknet appends
      a section's options to a list in file order and ``option_find`` returns the first match.
      With the official "``# Testing`` ``batch=1`` ... ``# Training`` ``batch=64``" blocks,
      the uncommented block that comes first is used (``yolov3-openimages.cfg`` leaves both
      uncommented, so darknet reads ``batch=1``, ``subdivisions=1``). The later values are
      kept in the section's ``ignored`` list, without a warning.
    * An option repeated in any other section is an error (darknet would read the first and
      report the other as an unused field; two ``filters=`` are a conflict, not a choice).

    Args:
        source: a path, or the cfg text itself (a string containing a newline or starting with
            ``[``).

    Returns:
        One :class:`CfgSection` (a dict) per section in file order:
        ``{"type": "convolutional", "filters": 32, ...}``. ``"type"`` is the section name in
        lower case with darknet's aliases expanded (``[conv]`` -> ``"convolutional"``,
        ``[network]`` -> ``"net"``, ``[max]`` -> ``"maxpool"`` ...). Option values are ints or
        floats where they parse as such, lists for comma-separated values
        (``layers = -1, 61`` -> ``[-1, 61]``), otherwise the raw string (``"leaky"``).

    Raises:
        ValueError: malformed line (not ``[section]``, ``key=value`` or a comment), an option
            before the first section, an empty value, a repeated option outside ``[net]``, an
            option named ``type``, or no section at all; the message names the file and line.
        FileNotFoundError: ``source`` looks like a path that does not exist.
    """
    text, origin = _read_source(source)
    sections: list[CfgSection] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        where = f"{origin}, line {lineno}"
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            sections.append(_section_header(line, raw, where, origin, lineno))
        else:
            _add_option(sections[-1] if sections else None, line, raw, where, lineno)
    if not sections:
        raise ValueError(f"parse_cfg: {origin} has no [section]")
    return sections


# ----------------------------------------------------------------------------- channel flow


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One ``[convolutional]`` section with its input channels resolved.

    Attributes:
        index: position among the cfg's convs (0-based): the order of the ``.weights`` file.
        layer: darknet layer index (0-based, ``[net]`` excluded), as routes count.
        filters: output channels.
        size: square kernel size.
        stride: stride.
        pad: darknet's ``pad`` flag (1: ``size // 2`` pixels on each side).
        padding: the padding in pixels darknet uses (``size // 2`` if ``pad`` else the
            ``padding`` option, default 0).
        groups: grouped convolution (1 for YOLOv3).
        in_channels: input channels from the simulated channel flow.
        batch_normalize: conv-BN (no bias) when True, conv with bias when False.
        activation: darknet activation name (``"leaky"``, ``"linear"``, ``"logistic"`` ...).
    """

    index: int
    layer: int
    filters: int
    size: int
    stride: int
    pad: int
    padding: int
    groups: int
    in_channels: int
    batch_normalize: bool
    activation: str

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Keras kernel shape ``(kh, kw, in / groups, out)``; darknet stores the transpose
        ``(out, in / groups, kh, kw)``."""
        return (self.size, self.size, self.in_channels // self.groups, self.filters)

    @property
    def num_params(self) -> int:
        """Numbers this conv has in a ``.weights`` file: the kernel plus 4 BN vectors or a bias."""
        kh, kw, cin, cout = self.kernel_shape
        return kh * kw * cin * cout + (4 if self.batch_normalize else 1) * self.filters


# Sections whose output has the channels of their input and that hold no weights.
_CHANNEL_PRESERVING = (
    "upsample",
    "yolo",
    "region",
    "detection",
    "maxpool",
    "avgpool",
    "softmax",
    "cost",
    "dropout",
    "activation",
    "logistic",
    "l2norm",
    "lrn",
)


def _as_sections(cfg):
    if isinstance(cfg, (str, os.PathLike)):
        return parse_cfg(cfg)
    if isinstance(cfg, Sequence) and all(isinstance(s, dict) and "type" in s for s in cfg):
        return list(cfg)
    raise TypeError(
        "expected cfg text, a cfg path or the list of section dicts from parse_cfg, got "
        f"{type(cfg).__name__}"
    )


def _int_option(section, key, default, where, minimum):
    value = section.get(key, default)
    return integer(value, f"option {key}={value!r}", f"conv_specs: {where}", minimum)


def _where(index, section):
    """``"section 2 (darknet layer 1, [maxpool], yolov3-tiny.cfg line 33)"``: a layer section
    of a cfg, its file and line when it comes from :func:`parse_cfg`."""
    place = f"section {index} (darknet layer {index - 1}, [{section['type']}]"
    line = getattr(section, "line", None)
    if line is not None:
        place += f", {section.origin} line {line}"
    return place + ")"


def conv_specs(sections: Sequence[dict] | str | os.PathLike) -> list[ConvSpec]:
    """Simulate a darknet network's channel flow and describe each convolution.

    Starting from ``[net] channels`` (3 if absent), every layer's output channels are
    tracked: a conv outputs ``filters``; ``[route]`` concatenates the layers it lists
    (negative entries count back from the route, others are absolute layer indices) and
    divides by its ``groups`` option (default 1); ``[shortcut]`` keeps the previous layer's
    channels (its ``from`` must be an earlier layer); the weight-free layers ``[upsample]``,
    ``[yolo]``, ``[region]``, ``[detection]``, ``[maxpool]``, ``[avgpool]``, ``[softmax]``,
    ``[cost]``, ``[dropout]``, ``[activation]``, ``[logistic]``, ``[l2norm]``, ``[lrn]`` keep
    them too. Spatial sizes are not simulated (the ``.weights`` file does not depend on them).

    Args:
        sections: the output of :func:`parse_cfg` (or cfg text / a path, parsed first). The
            first section must be ``[net]``.

    Returns:
        One :class:`ConvSpec` per ``[convolutional]`` section, in cfg order. The parameter
        total is ``sum(s.num_params for s in specs)``.

    Raises:
        ValueError: no leading ``[net]``, a section type this simulation does not support
            (e.g. ``[connected]``, which also holds weights), a route / shortcut pointing at a
            missing or later layer, or a conv option out of range; the message names the
            section index (``[net]`` is section 0), type, and file and line when known.

    This is the ``.weights`` layout of any cfg made of these sections (``yolov3-tiny.cfg`` and
    ``yolov3-spp.cfg``, with their ``[maxpool]`` layers, included); whether it is a network
    dlnotes builds is checked by :func:`yolov3_config_from_cfg` and, on a mismatch, by
    :func:`load_darknet_weights`.
    """
    sections = _as_sections(sections)
    if not sections or sections[0]["type"] != "net":
        first = sections[0]["type"] if sections else None
        raise ValueError(f"conv_specs: the first section must be [net], got [{first}]")
    net_channels = _int_option(sections[0], "channels", 3, "section 0 [net]", 1)
    out_channels: list[int] = []  # per darknet layer
    specs: list[ConvSpec] = []
    for layer, section in enumerate(sections[1:]):
        kind = section["type"]
        where = _where(layer + 1, section)
        previous = out_channels[-1] if out_channels else net_channels

        def resolve(ref, option, layer=layer, where=where):
            if isinstance(ref, bool) or not isinstance(ref, int):
                raise ValueError(f"conv_specs: {where}: {option} entry {ref!r} is not an int")
            index = layer + ref if ref < 0 else ref
            if not 0 <= index < layer:
                raise ValueError(
                    f"conv_specs: {where}: {option}={ref} points at layer {index}, which is not "
                    f"an earlier layer (0..{layer - 1})"
                )
            return index

        if kind == "convolutional":
            size = _int_option(section, "size", 1, where, 1)
            pad = _int_option(section, "pad", 0, where, 0)
            groups = _int_option(section, "groups", 1, where, 1)
            filters = _int_option(section, "filters", 1, where, 1)
            if previous % groups or filters % groups:
                raise ValueError(
                    f"conv_specs: {where}: groups={groups} must divide the input channels "
                    f"({previous}) and filters ({filters})"
                )
            activation = section.get("activation", "logistic")  # darknet's default
            spec = ConvSpec(
                index=len(specs),
                layer=layer,
                filters=filters,
                size=size,
                stride=_int_option(section, "stride", 1, where, 1),
                pad=pad,
                padding=size // 2 if pad else _int_option(section, "padding", 0, where, 0),
                groups=groups,
                in_channels=previous,
                batch_normalize=bool(_int_option(section, "batch_normalize", 0, where, 0)),
                activation=str(activation),
            )
            specs.append(spec)
            out_channels.append(filters)
        elif kind == "route":
            refs = section.get("layers")
            if refs is None:
                raise ValueError(f"conv_specs: {where}: missing the 'layers' option")
            refs = refs if isinstance(refs, list) else [refs]
            total = sum(out_channels[resolve(r, "layers")] for r in refs)
            groups = _int_option(section, "groups", 1, where, 1)
            if total % groups:
                raise ValueError(
                    f"conv_specs: {where}: groups={groups} does not divide the {total} "
                    "concatenated channels"
                )
            out_channels.append(total // groups)
        elif kind == "shortcut":
            refs = section.get("from")
            if refs is None:
                raise ValueError(f"conv_specs: {where}: missing the 'from' option")
            if section.get("weights_type", "none") != "none":
                raise ValueError(
                    f"conv_specs: {where}: weighted shortcuts (weights_type="
                    f"{section['weights_type']!r}) are not supported"
                )
            for r in refs if isinstance(refs, list) else [refs]:
                resolve(r, "from")
            out_channels.append(previous)
        elif kind in _CHANNEL_PRESERVING:
            out_channels.append(previous)
        else:
            raise ValueError(
                f"conv_specs: {where}: unsupported section type [{kind}]; supported: "
                f"[convolutional], [route], [shortcut], {', '.join(f'[{t}]' for t in _CHANNEL_PRESERVING)}"
            )
    return specs


def _header_bytes(major, minor):
    """20 bytes for version >= 0.2 (int64 ``seen``), 16 before: darknet's rule."""
    return 12 + (8 if _wide_seen(major, minor) else 4)


def _wide_seen(major, minor):
    # darknet parse.c: if ((major*10 + minor) >= 2 && major < 1000 && minor < 1000) size_t seen
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def weights_file_size(
    specs: Sequence[ConvSpec] | Sequence[dict] | str | os.PathLike, major: int = 0, minor: int = 2
) -> int:
    """Bytes of a ``.weights`` file for the convs ``specs`` (or a cfg): header + 4 per number.

    ``weights_file_size(yolov3_cfg(80))`` is 248,007,048, ``yolov3.weights``' size.
    """
    if not (isinstance(specs, Sequence) and all(isinstance(s, ConvSpec) for s in specs)):
        specs = conv_specs(specs)
    return _header_bytes(major, minor) + 4 * sum(s.num_params for s in specs)


# ----------------------------------------------------------------------------- cfg writing

# [net] options of darknet's yolov3.cfg (training schedule and augmentation).
_NET_TRAINING = (
    "momentum=0.9",
    "decay=0.0005",
    "angle=0",
    "saturation=1.5",
    "exposure=1.5",
    "hue=.1",
    "",
    "learning_rate=0.001",
    "burn_in=1000",
    "max_batches=500200",
    "policy=steps",
    "steps=400000,450000",
    "scales=.1,.1",
)


class _CfgText:
    """Accumulates cfg sections and counts darknet layers."""

    def __init__(self, input_shape):
        height, width, channels = input_shape
        self.lines = [
            "[net]",
            "# Testing",
            "# batch=1",
            "# subdivisions=1",
            "# Training",
            "batch=64",
            "subdivisions=16",
            f"width={width}",
            f"height={height}",
            f"channels={channels}",
            *_NET_TRAINING,
            "",
        ]
        self.num_layers = 0

    def section(self, kind, comment=None, **options):
        """Appends ``[kind]`` with ``options``; returns its darknet layer index."""
        if comment:
            self.lines.append(f"# {comment}")
        self.lines.append(f"[{kind}]")
        self.lines.extend(f"{key}={value}" for key, value in options.items())
        self.lines.append("")
        self.num_layers += 1
        return self.num_layers - 1

    def conv(self, filters, size, stride=1, batch_normalize=True, activation="leaky", comment=None):
        options = {"batch_normalize": 1} if batch_normalize else {}
        options.update(filters=filters, size=size, stride=stride, pad=1, activation=activation)
        return self.section("convolutional", comment=comment, **options)

    def text(self):
        return "\n".join(self.lines)


def _darknet53_body(cfg, f):
    """Writes Darknet-53's 52 convs and 23 shortcuts; returns the layers of C3, C4, C5."""
    cfg.conv(f, 3)
    outputs = {}
    for stage, n_blocks in enumerate(DARKNET53_BLOCKS):
        channels = f * 2 ** (stage + 1)
        cfg.conv(channels, 3, stride=2, comment=f"Downsample to stride {2 ** (stage + 1)}")
        for _ in range(n_blocks):
            cfg.conv(channels // 2, 1)
            cfg.conv(channels, 3)
            last = cfg.section("shortcut", **{"from": -3, "activation": "linear"})
        if stage >= 2:
            outputs[f"C{stage + 1}"] = last
    return outputs


def _check_input_shape(input_shape, owner, multiple):
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"{owner}: input_shape must be (H, W, C), got {input_shape!r}")
    height, width, channels = (positive_int(d, "every entry of input_shape", owner) for d in shape)
    for dim, what in ((height, "height"), (width, "width")):
        if dim < 32 or dim % multiple:
            need = "divisible by 32 (YOLO's largest stride)" if multiple > 1 else "at least 32"
            raise ValueError(f"{owner}: input {what} {dim} must be {need}; got {input_shape!r}")
    return height, width, channels


def darknet53_cfg(initial_filters: int = 32, input_shape: Sequence[int] = (416, 416, 3)) -> str:
    """The darknet cfg text of the Darknet-53 body alone (darknet layers 0-74).

    Same sections as the first 75 of :func:`yolov3_cfg` (``[net]`` and layers 0-74: 52 convs,
    23 shortcuts), i.e. what :func:`dlnotes.backbones.darknet.build_darknet53` builds; the
    weights of ``darknet53.conv.74`` follow it. ``input_shape`` is ``(H, W, C)`` with
    ``H, W >= 32``.
    """
    f = positive_int(initial_filters, "initial_filters", "darknet53_cfg")
    cfg = _CfgText(_check_input_shape(input_shape, "darknet53_cfg", 1))
    _darknet53_body(cfg, f)
    return cfg.text()


def _format_number(value):
    return f"{float(value):g}"


def yolov3_cfg(
    num_classes: int = 80,
    anchors=YOLO_COCO_ANCHORS,
    masks=YOLO_MASKS,
    input_shape: Sequence[int] = (416, 416, 3),
    initial_filters: int = 32,
    neck_filters: Sequence[int] | None = None,
    ignore_thresh: float = 0.5,
) -> str:
    """The darknet cfg text of YOLOv3, in the section order of darknet's ``yolov3.cfg``.

    Layout (layer indices for the defaults; 107 layers, 75 convs)::

        0-74     Darknet-53 body (52 convs + 23 shortcuts), C3 = 36, C4 = 61, C5 = 74
        for output k = 0, 1, 2 (stride 32, 16, 8), with f_k = neck_filters[k]:
          [route] layers=-4; 1x1 conv f_{k-1}/2; [upsample] stride=2;
          [route] layers=-1, 61 (k=1) / -1, 36 (k=2)                      (k > 0 only)
          5-conv block 1x1 f_k, 3x3 2f_k, 1x1 f_k, 3x3 2f_k, 1x1 f_k   (conv-BN-leaky)
          3x3 conv 2f_k (conv-BN-leaky), 1x1 conv len(mask) * (5 + C) (linear, with bias)
          [yolo] mask, anchors, classes, num, ignore_thresh ...

    This is the convs' order of a ``.weights`` file (and of the ``darknet_units()`` of
    dlnotes' YOLOv3): block_0, head_0, up conv_0, block_1, head_1, up conv_1, block_2, head_2.
    The ``[net]`` section carries the official training options (batch 64, lr 0.001,
    steps 400000 / 450000 ...).

    Args:
        num_classes: ``C``.
        anchors: ``(K, 2)`` ``[w, h]`` in input pixels, or a :class:`~dlnotes.anchors.YoloAnchors`
            (then ``masks`` is taken from it).
        masks: anchor indices per output, stride 32 first (YOLO_MASKS: (6,7,8), (3,4,5),
            (0,1,2)); three outputs.
        input_shape: ``(H, W, C)`` with ``H`` and ``W`` divisible by 32.
        initial_filters: Darknet-53's ``f``.
        neck_filters: ``(f_0, f_1, f_2)``; default ``(16f, 8f, 4f)`` = (512, 256, 128).
        ignore_thresh: the ``[yolo]`` ignore threshold (0.5 in the paper and keras-yolo3; the
            official cfg ships 0.7).

    Returns:
        The cfg text; ``conv_specs(parse_cfg(yolov3_cfg(80)))`` totals 62,001,757 parameters.

    Raises:
        ValueError: a bad number of classes, anchors / masks, input size or filters.
    """
    owner = "yolov3_cfg"
    num_classes = check_num_classes(num_classes, owner)
    if isinstance(anchors, YoloAnchors):
        yolo = anchors
    else:
        if len(masks) != 3:
            raise ValueError(f"{owner}: YOLOv3 has 3 outputs, got {len(masks)} masks: {masks}")
        yolo = YoloAnchors(anchors, masks)
    if yolo.strides != (32, 16, 8):
        raise ValueError(
            f"{owner}: YOLOv3's outputs have strides (32, 16, 8), the anchors say {yolo.strides}"
        )
    f = positive_int(initial_filters, "initial_filters", owner)
    if neck_filters is None:
        neck_filters = (16 * f, 8 * f, 4 * f)
    if isinstance(neck_filters, (int, np.integer)) or len(neck_filters) != 3:
        raise ValueError(f"{owner}: neck_filters must be 3 ints, got {neck_filters!r}")
    neck_filters = [positive_int(n, "every neck filter", owner) for n in neck_filters]
    if neck_filters[0] % 2 or neck_filters[1] % 2:
        raise ValueError(
            f"{owner}: neck_filters[0] and [1] feed a 1x1 up conv of half their width and must "
            f"be even, got {neck_filters}"
        )
    ignore_thresh = float(ignore_thresh)
    if not 0.0 <= ignore_thresh <= 1.0:
        raise ValueError(f"{owner}: ignore_thresh must be in [0, 1], got {ignore_thresh}")

    cfg = _CfgText(_check_input_shape(input_shape, owner, 32))
    body = _darknet53_body(cfg, f)
    laterals = (None, body["C4"], body["C3"])
    anchors_text = ",  ".join(
        f"{_format_number(w)},{_format_number(h)}" for w, h in yolo.anchors.tolist()
    )
    for k, (width, mask) in enumerate(zip(neck_filters, yolo.masks, strict=True)):
        if k:
            cfg.section("route", comment=f"Up branch to output {k}", layers=-4)
            cfg.conv(neck_filters[k - 1] // 2, 1)
            cfg.section("upsample", stride=2)
            cfg.section("route", layers=f"-1, {laterals[k]}")
        cfg.conv(width, 1, comment=f"Output {k} (stride {yolo.strides[k]}): 5-conv block")
        cfg.conv(2 * width, 3)
        cfg.conv(width, 1)
        cfg.conv(2 * width, 3)
        cfg.conv(width, 1)
        cfg.conv(2 * width, 3, comment=f"Output {k}: head")
        cfg.conv(len(mask) * (5 + num_classes), 1, batch_normalize=False, activation="linear")
        cfg.section(
            "yolo",
            mask=",".join(str(i) for i in mask),
            anchors=anchors_text,
            classes=num_classes,
            num=len(yolo.anchors),
            jitter=".3",
            ignore_thresh=_format_number(ignore_thresh),
            truth_thresh=1,
            random=1,
        )
    return cfg.text()


# ----------------------------------------------------------------------------- Keras units

_CONV_NAME = re.compile(r"conv(\d+)")


# Layer types of the networks dlnotes builds from a cfg ([net] aside).
_YOLOV3_LAYERS = ("convolutional", "shortcut", "route", "upsample", "yolo")
_SUPPORTED = (
    "Supported architectures: YOLOv3 with a Darknet-53 body and three [yolo] heads (darknet's "
    "yolov3.cfg, any classes, anchors and input size), and the Darknet-53 body alone "
    "(darknet53.conv.74: layers 0-74)"
)


def _architecture_problems(sections, heads):
    """Why ``sections`` is not a network dlnotes builds: the first layer of a type that YOLOv3
    does not use (the ``[maxpool]`` of yolov3-tiny and yolov3-spp), and a number of ``[yolo]``
    sections not in ``heads`` (yolov3-tiny has 2); ``[]`` if neither."""
    problems = []
    for index, section in enumerate(sections[1:], start=1):
        if section["type"] not in _YOLOV3_LAYERS:
            problems.append(f"{_where(index, section)} is not a layer of YOLOv3 or Darknet-53")
            break
    yolo = [index for index, section in enumerate(sections) if section["type"] == "yolo"]
    if len(yolo) not in heads:
        found = ": " + ", ".join(_where(i, sections[i]) for i in yolo) if yolo else ""
        expected = " or ".join(str(n) for n in heads)
        problems.append(f"expected {expected} [yolo] sections, found {len(yolo)}{found}")
    return problems


def yolov3_config_from_cfg(cfg) -> dict:
    """The :class:`dlnotes.models.YOLOv3` arguments of a darknet YOLOv3 cfg.

    Reads ``[net]`` (input size, channels), the three ``[yolo]`` sections (classes, anchors, masks,
    ``ignore_thresh``), the first conv (``initial_filters``) and the 3x3 head conv before each
    ``[yolo]`` (``2 f_k``: the FPN widths), then checks that :func:`yolov3_cfg` of these arguments
    has exactly the convs of ``cfg`` (kernel shapes, strides, batch norm), so that a model built
    from them reads the cfg's ``.weights``.

    Args:
        cfg: cfg text, a path, or the sections of :func:`parse_cfg`.

    Returns:
        ``{"num_classes", "image_size", "initial_filters", "neck_filters", "anchors", "masks",
        "ignore_thresh"}``.

    Raises:
        ValueError: not a 3-output YOLOv3 cfg (naming the first conv that differs, or what is
            missing), inconsistent classes / anchors between the ``[yolo]`` sections, or input
            channels other than 3. A layer YOLOv3 does not have (the ``[maxpool]`` of
            ``yolov3-tiny.cfg`` and of ``yolov3-spp.cfg``'s SPP block) or a number of ``[yolo]``
            sections other than 3 (``yolov3-tiny.cfg`` has 2) is named with its section
            index, darknet layer index, file and line, and the message lists the supported
            architectures.
    """
    sections = _as_sections(cfg)
    if not sections or sections[0]["type"] != "net":
        raise ValueError("yolov3_config_from_cfg: the cfg must start with a [net] section")
    net = sections[0]
    if int(net.get("channels", 3)) != 3:
        raise ValueError(
            f"yolov3_config_from_cfg: YOLOv3 takes 3 channels, [net] has {net['channels']}"
        )
    problems = _architecture_problems(sections, heads=(3,))
    if problems:
        raise ValueError(f"yolov3_config_from_cfg: {'; '.join(problems)}. {_SUPPORTED}")
    yolo = [k for k, section in enumerate(sections) if section["type"] == "yolo"]
    heads = [sections[k] for k in yolo]
    for key in ("classes", "anchors", "mask"):
        if any(key not in head for head in heads):
            raise ValueError(f"yolov3_config_from_cfg: a [yolo] section has no {key!r}")
    num_classes = int(heads[0]["classes"])
    anchors = np.asarray(heads[0]["anchors"], np.float64).reshape(-1, 2)
    for head in heads[1:]:
        if int(head["classes"]) != num_classes or not np.array_equal(
            np.asarray(head["anchors"], np.float64).reshape(-1, 2), anchors
        ):
            raise ValueError(
                "yolov3_config_from_cfg: the [yolo] sections disagree on classes or anchors"
            )
    convs = [s for s in sections[1:] if s["type"] == "convolutional"]
    config = {
        "num_classes": num_classes,
        "image_size": (int(net["height"]), int(net["width"])),
        "initial_filters": int(convs[0]["filters"]),
        "neck_filters": tuple(int(sections[k - 2]["filters"]) // 2 for k in yolo),
        "anchors": anchors.tolist(),
        "masks": [[int(i) for i in np.atleast_1d(head["mask"])] for head in heads],
        "ignore_thresh": float(heads[0].get("ignore_thresh", 0.5)),
    }
    expected = conv_specs(
        yolov3_cfg(
            num_classes, anchors, config["masks"], (*config["image_size"], 3),
            config["initial_filters"], config["neck_filters"], config["ignore_thresh"],
        )
    )  # fmt: skip
    given = conv_specs(sections)
    for want, got in zip(expected, given, strict=False):
        if (want.kernel_shape, want.stride, bool(want.batch_normalize)) != (
            got.kernel_shape, got.stride, bool(got.batch_normalize)
        ):  # fmt: skip
            raise ValueError(
                f"yolov3_config_from_cfg: conv {got.index} (cfg layer {got.layer}) is "
                f"{got.kernel_shape} stride {got.stride} batch_normalize "
                f"{int(bool(got.batch_normalize))}; YOLOv3 with these settings has "
                f"{want.kernel_shape} stride {want.stride} batch_normalize "
                f"{int(bool(want.batch_normalize))}"
            )
    if len(expected) != len(given):
        raise ValueError(
            f"yolov3_config_from_cfg: the cfg has {len(given)} convs, YOLOv3 has {len(expected)}"
        )
    return config


def _as_unit(entry, i):
    """(Conv2D, BN | None) from a pair, a bare Conv2D or a NeckConv-like ``.conv`` / ``.norm``."""
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        conv, norm = entry
    elif isinstance(entry, keras.layers.Conv2D):
        conv, norm = entry, None
    elif hasattr(entry, "conv") and hasattr(entry, "norm"):
        conv, norm = entry.conv, entry.norm
    else:
        raise TypeError(
            f"darknet unit {i}: expected (Conv2D, BatchNormalization | None), a Conv2D or a "
            f"layer with .conv / .norm (NeckConv), got {type(entry).__name__}"
        )
    if not isinstance(conv, keras.layers.Conv2D) or not (
        norm is None or isinstance(norm, keras.layers.BatchNormalization)
    ):
        raise TypeError(
            f"darknet unit {i}: expected (Conv2D, BatchNormalization | None), got "
            f"({type(conv).__name__}, {type(norm).__name__})"
        )
    return conv, norm


def _units_by_name(model):
    """(conv{i}, bn{i} | None) pairs of a model built by build_darknet53, by index ``i``."""
    convs, norms = {}, {}
    for layer in model.layers:
        match = _CONV_NAME.fullmatch(layer.name)
        if match and isinstance(layer, keras.layers.Conv2D):
            convs[int(match.group(1))] = layer
        elif isinstance(layer, keras.layers.BatchNormalization):
            norms[layer.name] = layer
    if not convs:
        raise ValueError(
            f"darknet_units: model {model.name!r} has no darknet_units() method and no Conv2D "
            "layers named conv{i}; build it with dlnotes.backbones.build_darknet53 or give it "
            "a darknet_units() method"
        )
    missing = sorted(set(range(max(convs) + 1)) - set(convs))
    if missing:
        raise ValueError(
            f"darknet_units: model {model.name!r} has conv layers up to conv{max(convs)} but "
            f"not conv{missing[0]} ({len(missing)} missing); darknet indices must be 0..n-1"
        )
    return [(convs[i], norms.get(f"bn{i}")) for i in range(len(convs))]


def darknet_units(
    model,
) -> list[tuple[keras.layers.Conv2D, keras.layers.BatchNormalization | None]]:
    """The (conv, BN) pairs of a Keras model in darknet cfg order (the ``.weights`` order).

    * A model (or any object) with a ``darknet_units()`` method: its result, each entry a
      ``(Conv2D, BatchNormalization | None)`` pair, a bare ``Conv2D`` (a conv without BN, e.g.
      YOLO's output convs) or a layer with ``.conv`` and ``.norm`` attributes
      (:class:`dlnotes.necks.NeckConv`).
    * Otherwise a Keras model whose convs are named ``conv{i}`` (and BNs ``bn{i}``) with ``i``
      the darknet conv index, as built by :func:`dlnotes.backbones.build_darknet53`.

    Returns:
        ``[(conv_0, bn_0 or None), ...]``, one pair per darknet ``[convolutional]`` section.

    Raises:
        ValueError / TypeError: the model provides neither, or an entry is not a conv unit.
    """
    method = getattr(model, "darknet_units", None)
    if callable(method):
        raw = list(method())
    elif isinstance(model, keras.Model):
        raw = _units_by_name(model)
    else:
        raise TypeError(
            f"darknet_units: expected a keras.Model or an object with a darknet_units() method, "
            f"got {type(model).__name__}"
        )
    return [_as_unit(entry, i) for i, entry in enumerate(raw)]


def _resolve_units(model_or_units):
    if isinstance(model_or_units, (list, tuple)):
        return [_as_unit(entry, i) for i, entry in enumerate(model_or_units)]
    return darknet_units(model_or_units)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What one unit reads / writes: shapes and whether a BN or a bias is stored."""

    index: int
    name: str
    kernel_shape: tuple[int, int, int, int]
    batch_normalize: bool

    @property
    def filters(self):
        return self.kernel_shape[-1]

    @property
    def count(self):
        return int(np.prod(self.kernel_shape)) + (4 if self.batch_normalize else 1) * self.filters


def _layout(i, conv, norm):
    if not conv.built:
        raise ValueError(
            f"darknet unit {i} ({conv.name!r}) is not built; call the model on an input first"
        )
    if conv.data_format != "channels_last":
        raise ValueError(f"darknet unit {i} ({conv.name!r}): only channels_last is supported")
    kernel_shape = tuple(int(d) for d in conv.kernel.shape)
    if norm is None:
        if not conv.use_bias:
            raise ValueError(
                f"darknet unit {i} ({conv.name!r}): a darknet conv without BatchNorm stores a "
                "bias, but this conv has use_bias=False"
            )
    else:
        if not (norm.center and norm.scale):
            raise ValueError(
                f"darknet unit {i} ({norm.name!r}): darknet stores BN beta and gamma; the layer "
                f"has center={norm.center}, scale={norm.scale}"
            )
        if tuple(norm.moving_mean.shape) != (kernel_shape[-1],):
            raise ValueError(
                f"darknet unit {i}: BN {norm.name!r} has {tuple(norm.moving_mean.shape)} "
                f"channels, conv {conv.name!r} outputs {kernel_shape[-1]} (BN must act on the "
                "last axis)"
            )
    return _Layout(i, conv.name, kernel_shape, norm is not None)


def _cfg_mismatch(specs, layouts):
    """How the model's conv units differ from the cfg's convs, or None."""
    if len(specs) != len(layouts):
        return (
            f"the cfg has {len(specs)} convolutional sections, the model {len(layouts)} conv units"
        )
    bn = {True: "with BatchNorm", False: "with bias, no BatchNorm"}
    for spec, lay in zip(specs, layouts, strict=True):
        if spec.kernel_shape != lay.kernel_shape or spec.batch_normalize != lay.batch_normalize:
            return (
                f"conv {spec.index} (darknet layer {spec.layer}, Keras layer {lay.name!r}) does "
                f"not match the cfg: cfg kernel (kh, kw, in, out) {spec.kernel_shape} "
                f"{bn[spec.batch_normalize]}, model {lay.kernel_shape} {bn[lay.batch_normalize]}"
            )
    return None


def _check_against_cfg(layouts, cfg):
    """Raises if the units are not the cfg's convs; the message says when the cfg is not a
    network dlnotes builds (a model of another cfg, e.g. yolov3-tiny, still loads if it fits)."""
    sections = None
    if isinstance(cfg, Sequence) and cfg and all(isinstance(s, ConvSpec) for s in cfg):
        specs = list(cfg)
    else:
        sections = _as_sections(cfg)
        specs = conv_specs(sections)
    mismatch = _cfg_mismatch(specs, layouts)
    if mismatch is None:
        return
    problems = _architecture_problems(sections, heads=(0, 3)) if sections else []
    if problems:
        mismatch += f"; the cfg is not a supported network: {'; '.join(problems)}. {_SUPPORTED}"
    raise ValueError(f"load_darknet_weights: {mismatch}")


def _read_header(data, path):
    if len(data) < 12:
        raise ValueError(
            f"load_darknet_weights: {path!r} has {len(data)} bytes, too short for a darknet "
            "header (int32 major, minor, revision, then seen)"
        )
    major, minor, revision = (int(v) for v in np.frombuffer(data, "<i4", 3))
    if min(major, minor, revision) < 0 or major >= 1000 or minor >= 1000:
        raise ValueError(
            f"load_darknet_weights: {path!r} has a bad header (major={major}, minor={minor}, "
            f"revision={revision}); is it a darknet .weights file?"
        )
    wide = _wide_seen(major, minor)
    size = _header_bytes(major, minor)
    if len(data) < size:
        raise ValueError(
            f"load_darknet_weights: {path!r} has {len(data)} bytes, too short for a version "
            f"{major}.{minor} header ({size} bytes)"
        )
    seen = int(np.frombuffer(data, "<u8" if wide else "<i4", 1, 12)[0])
    if seen < 0:
        raise ValueError(f"load_darknet_weights: {path!r} has a bad header (seen={seen})")
    return {"major": major, "minor": minor, "revision": revision, "seen": seen}, size


def load_darknet_weights(model_or_units, path, cfg=None, *, allow_trailing: bool = False) -> dict:
    """Read a darknet ``.weights`` file into a Keras model's conv / BN layers.

    The whole file is read and checked before anything is assigned, so a failed load leaves the
    model untouched. Kernels ``(out, in, kh, kw)`` become ``(kh, kw, in, out)``; BN gets beta,
    gamma, moving mean and variance; a conv without BN gets its bias; a conv with both a bias
    and a BN (``use_bias=True``) gets bias 0 (see the module docstring).

    Args:
        model_or_units: a model (see :func:`darknet_units`) or a list of units in cfg order.
            Its layers must be built.
        path: the ``.weights`` file (e.g. ``yolov3.weights``, ``darknet53.conv.74``).
        cfg: optional cfg (text, path, sections or ``ConvSpec`` list) to check the model's
            conv shapes against before reading. Any cfg whose convs the model has fits (a
            Keras yolov3-tiny with a ``darknet_units()`` method loads ``yolov3-tiny.weights``);
            when they differ and the cfg is not YOLOv3 or the Darknet-53 body, the error also
            names the cfg's first unsupported section.
        allow_trailing: accept bytes after the last unit (e.g. load the Darknet-53 body from
            the first 52 convs of ``yolov3.weights``, as ``darknet partial`` does).

    Returns:
        The header: ``{"major", "minor", "revision", "seen"}``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: bad header; the file ends inside a unit (the message names the unit's index
            and Keras name, the bytes it needs and the bytes left); bytes left over (expected
            and actual file sizes); non-finite numbers; a conv that does not match ``cfg``.
    """
    units = _resolve_units(model_or_units)
    layouts = [_layout(i, conv, norm) for i, (conv, norm) in enumerate(units)]
    if cfg is not None:
        _check_against_cfg(layouts, cfg)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_darknet_weights: weights file {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    header, offset = _read_header(data, path)

    values = []
    for lay in layouts:
        needed = 4 * lay.count
        left = len(data) - offset
        if needed > left:
            raise ValueError(
                f"load_darknet_weights: {path!r} ends inside conv {lay.index} (Keras layer "
                f"{lay.name!r}, kernel {lay.kernel_shape}): it needs {needed} bytes, "
                f"{left} are left; was the file written for this network?"
            )
        flat = np.frombuffer(data, "<f4", lay.count, offset)
        offset += needed
        if not np.all(np.isfinite(flat)):
            raise ValueError(
                f"load_darknet_weights: {path!r} has non-finite values in conv {lay.index} "
                f"(Keras layer {lay.name!r})"
            )
        n = lay.filters
        head = 4 * n if lay.batch_normalize else n
        kh, kw, cin, cout = lay.kernel_shape
        kernel = flat[head:].reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)
        values.append((flat[:head].reshape(-1, n), kernel))
    if offset != len(data) and not allow_trailing:
        raise ValueError(
            f"load_darknet_weights: {path!r} has {len(data)} bytes, but this network needs "
            f"{offset} ({len(data) - offset} bytes too many); was the file written for a larger "
            "network? (allow_trailing=True reads only the first convs)"
        )

    # Everything fits: assign.
    for (conv, norm), (head, kernel) in zip(units, values, strict=True):
        conv.kernel.assign(kernel)
        if norm is None:
            conv.bias.assign(head[0])
            continue
        beta, gamma, mean, variance = head
        norm.beta.assign(beta)
        norm.gamma.assign(gamma)
        norm.moving_mean.assign(mean)
        norm.moving_variance.assign(variance)
        if conv.use_bias:
            conv.bias.assign(np.zeros_like(beta))
    return header


def save_darknet_weights(
    model_or_units,
    path,
    header: Sequence[int] = (0, 2, 0),
    seen: int = 0,
    overwrite: bool = False,
) -> int:
    """Write a Keras model's conv / BN weights as a darknet ``.weights`` file.

    The inverse of :func:`load_darknet_weights`; a conv with both a bias and a BN is written
    with the bias folded into the moving mean (``mean - bias``).

    Args:
        model_or_units: a model (see :func:`darknet_units`) or a list of units in cfg order.
        path: output file. It is written to a temporary file in the same folder and renamed, so
            a failure never leaves a partial file.
        header: ``(major, minor, revision)``, each in ``[0, 1000)``; version ``>= 0.2`` stores
            ``seen`` as int64, older ones as int32.
        seen: images seen in training (darknet's counter), ``>= 0``.
        overwrite: replace an existing file.

    Returns:
        The file size in bytes: ``20 + 4 * count`` for version >= 0.2, ``16 + ...`` before, with
        ``count`` the darknet parameter count.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: the folder of ``path`` does not exist (named with ``path``).
        ValueError: bad header or ``seen``; a unit darknet cannot represent.
    """
    try:
        major, minor, revision = (int(v) for v in header)
    except (TypeError, ValueError):
        raise ValueError(
            f"save_darknet_weights: header must be (major, minor, revision), got {header!r}"
        ) from None
    if min(major, minor, revision) < 0 or major >= 1000 or minor >= 1000:
        raise ValueError(
            f"save_darknet_weights: header values must be in [0, 1000), got {tuple(header)}"
        )
    wide = _wide_seen(major, minor)
    limit = 2**64 if wide else 2**31
    if isinstance(seen, bool) or not isinstance(seen, (int, np.integer)) or not 0 <= seen < limit:
        raise ValueError(
            f"save_darknet_weights: seen must be an int in [0, {limit}) for version "
            f"{major}.{minor}, got {seen!r}"
        )
    units = _resolve_units(model_or_units)
    for i, (conv, norm) in enumerate(units):
        _layout(i, conv, norm)  # validates that darknet can represent the unit
    path = os.fspath(path)
    with writing(path, overwrite, owner="save_darknet_weights") as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<3i", major, minor, revision))
            f.write(struct.pack("<Q" if wide else "<i", int(seen)))
            for conv, norm in units:
                kernel = keras.ops.convert_to_numpy(conv.kernel)
                bias = keras.ops.convert_to_numpy(conv.bias) if conv.use_bias else None
                if norm is None:
                    head = [bias]
                else:
                    mean = keras.ops.convert_to_numpy(norm.moving_mean)
                    if bias is not None:
                        mean = mean - bias  # BN(z + b) == BN with moving mean (mean - b)
                    head = [
                        keras.ops.convert_to_numpy(norm.beta),
                        keras.ops.convert_to_numpy(norm.gamma),
                        mean,
                        keras.ops.convert_to_numpy(norm.moving_variance),
                    ]
                for array in head:
                    f.write(np.asarray(array, "<f4").tobytes())
                f.write(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), "<f4").tobytes())
    return os.path.getsize(path)
