"""Tests of dlnotes.darknet_io: cfg parsing, channel flow, YOLOv3 cfg, .weights read / write.

The published figures: yolov3.cfg (80 classes) has 75 convs and 62,001,757 parameters, i.e. a
yolov3.weights of 248,007,048 bytes; the Darknet-53 body 40,620,640 (darknet53.conv.74:
162,482,580 bytes). The byte layout is checked against a file written by hand in the test.
darknet's own cfg files (yolov3-openimages.cfg, yolov3-tiny.cfg, yolov3-spp.cfg, verbatim or
faithful excerpts) are read as darknet reads them, and the ones dlnotes does not build are
refused naming their first unsupported section.
"""

import os
import re
import struct

import keras
import numpy as np
import pytest
from _reference import randomize
from hypothesis import given, settings
from hypothesis import strategies as st

from dlnotes.anchors import YOLO_COCO_ANCHORS, YoloAnchors
from dlnotes.backbones import build_darknet53
from dlnotes.darknet_io import (
    CfgSection,
    ConvSpec,
    conv_specs,
    darknet53_cfg,
    darknet_units,
    load_darknet_weights,
    parse_cfg,
    save_darknet_weights,
    weights_file_size,
    yolov3_cfg,
    yolov3_config_from_cfg,
)
from dlnotes.models.yolov3 import YOLOv3
from dlnotes.necks import NeckConv, YoloFPN

F = 8
SHAPE = (64, 64, 3)


def snapshot(model):
    return [np.array(w) for w in model.weights]


def assert_same_weights(model, values):
    for w, v in zip(model.weights, values, strict=True):
        np.testing.assert_array_equal(np.asarray(w), v)


@pytest.fixture(scope="module")
def source():
    """f=8 body without conv bias (so darknet's count equals count_params)."""
    model = build_darknet53(SHAPE, initial_filters=F)
    randomize(model, seed=0)
    return model


@pytest.fixture(scope="module")
def source_file(source, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dk") / "body.weights")
    save_darknet_weights(source, path, seen=12345)
    return path


@pytest.fixture
def fresh():
    return build_darknet53(SHAPE, initial_filters=F)


# ----------------------------------------------------------------------------- parse_cfg
CFG = """
# a comment
[net]
width = 64
height=64
channels=3
hue=.1
policy=steps
steps=400000,450000

; another comment
[conv]
batch_normalize=1
filters=4
size=3
stride=2
pad=1
activation=leaky

[route]
layers = -1, 0

[yolo]
anchors = 10,13,  16,30,
"""


def test_parse_cfg_values_and_aliases(tmp_path):
    sections = parse_cfg(CFG)
    assert [s["type"] for s in sections] == ["net", "convolutional", "route", "yolo"]
    net = sections[0]
    assert net == {
        "type": "net",
        "width": 64,
        "height": 64,
        "channels": 3,
        "hue": 0.1,
        "policy": "steps",
        "steps": [400000, 450000],
    }
    assert sections[1]["activation"] == "leaky" and sections[1]["stride"] == 2
    assert sections[2]["layers"] == [-1, 0]
    assert sections[3]["anchors"] == [10, 13, 16, 30]
    path = tmp_path / "net.cfg"
    path.write_text(CFG)
    assert parse_cfg(path) == sections
    assert parse_cfg(str(path)) == sections


@pytest.mark.parametrize(
    "text, match",
    [
        ("[net]\nwidth=3\nthis is wrong\n", "line 3: cannot parse 'this is wrong'"),
        ("width=3\n[net]\n", "line 1: option 'width' before the first"),
        ("[net\nwidth=3\n", r"line 1: malformed section header '\[net'"),
        ("[]\n", "line 1: malformed section header"),
        ("[net]\n=3\n", "line 2: cannot parse"),
        ("[net]\nwidth=\n", "line 2: option 'width' has no value"),
        (
            "[net]\n[convolutional]\nfilters=3\nfilters=4\n",
            r"line 4: option 'filters' repeated in section \[convolutional\] \(first on line 3\)",
        ),
        ("[net]\ntype=x\n", "line 2: 'type' is reserved"),
        ("# only a comment\n\n", "has no"),
    ],
)
def test_parse_cfg_malformed(text, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        parse_cfg(text)
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad.cfg"):
        parse_cfg(path)


def test_parse_cfg_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.cfg"):
        parse_cfg(str(tmp_path / "missing.cfg"))


keys = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda k: k != "type")
values = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(-1e3, 1e3, allow_nan=False).filter(lambda v: v != int(v)),
    st.lists(st.integers(-100, 100), min_size=2, max_size=6),
    st.sampled_from(["leaky", "linear", "steps", "logistic"]),
)


@settings(max_examples=30, deadline=None)
@given(
    sections=st.lists(
        st.tuples(
            st.sampled_from(["net", "convolutional", "route", "yolo"]),
            st.dictionaries(keys, values, max_size=5),
        ),
        min_size=1,
        max_size=4,
    ),
    spaces=st.sampled_from(["", " ", "  \t"]),
)
def test_parse_cfg_round_trip(sections, spaces):
    lines = []
    for kind, options in sections:
        lines += [f"{spaces}[{kind}]", "# comment"]
        for key, value in options.items():
            text = ",".join(map(str, value)) if isinstance(value, list) else repr(value)
            text = text.strip("'")
            lines.append(f"{key}{spaces}={spaces}{text}{spaces}")
        lines.append("")
    parsed = parse_cfg("\n".join(lines))
    assert parsed == [{"type": kind, **options} for kind, options in sections]


# The [net] section of darknet's cfg/yolov3-openimages.cfg and its first layers, verbatim: the
# "Testing" lines are indented, not commented out, so both blocks are active.
OPENIMAGES_NET = """[net]
# Testing
 batch=1
 subdivisions=1
# Training
batch=64
subdivisions=16
width=608
height=608
channels=3
momentum=0.9
decay=0.0005
angle=0
saturation = 1.5
exposure = 1.5
hue=.1

learning_rate=0.001
burn_in=5000
max_batches = 500200
policy=steps
steps=400000,450000
scales=.1,.1
"""
OPENIMAGES_START = (
    OPENIMAGES_NET
    + """
[convolutional]
batch_normalize=1
filters=32
size=3
stride=1
pad=1
activation=leaky

# Downsample

[convolutional]
batch_normalize=1
filters=64
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=32
size=1
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=64
size=3
stride=1
pad=1
activation=leaky

[shortcut]
from=-3
activation=linear
"""
)


@pytest.mark.parametrize("header", ["[net]", "[network]", "  [net]"])
def test_parse_cfg_repeated_net_option_keeps_the_first(header):
    # darknet: options are a list in file order, option_find returns the first match.
    text = f"""{header}
; Testing
batch=1
    subdivisions=1 # one image at a time
# Training
batch=64
\tsubdivisions = 16
width=416
batch=32
[convolutional]
filters=8
"""
    net, conv = parse_cfg(text)
    assert net == {"type": "net", "batch": 1, "subdivisions": 1, "width": 416}
    assert net.ignored == [(6, "batch", 64), (7, "subdivisions", 16), (9, "batch", 32)]
    assert net.option_lines == {"batch": 3, "subdivisions": 4, "width": 8}
    assert conv == {"type": "convolutional", "filters": 8} and conv.ignored == []


@pytest.mark.parametrize(
    "kind, option, first, second",
    [("convolutional", "filters", "255", "18"), ("yolo", "mask", "6,7,8", "0,1,2")],
)
def test_parse_cfg_repeated_layer_option_is_an_error(kind, option, first, second, tmp_path):
    text = f"[net]\nwidth=64\n\n[{kind}]\n# note\n{option}={first}\n{option} = {second}\n"
    path = tmp_path / "two.cfg"
    path.write_text(text)
    message = (
        rf"{re.escape(str(path))}, line 7: option '{option}' repeated in section \[{kind}\] \(first on line 6\); "
        r"only \[net\] may repeat an option \(darknet reads the first one\)"
    )
    with pytest.raises(ValueError, match=message):
        parse_cfg(path)


def test_parse_cfg_inline_comments_read_as_darknet_does():
    # darknet deletes the spaces ("filters=255#3*(80+5)") and atoi / atof stop at the '#'.
    sections = parse_cfg(
        """[net]
hue=.1#random hue
steps=400000,450000 # x 0.1 each
[convolutional]
  filters=255 # 3*(80+5)
size = 1;kernel
activation=linear   # no BN before the [yolo]
[yolo]
mask = 6,7,8	# the three largest
anchors = 10,13,  16,30,  # first two
"""
    )
    assert sections[0] == {"type": "net", "hue": 0.1, "steps": [400000, 450000]}
    assert sections[1] == {
        "type": "convolutional",
        "filters": 255,
        "size": 1,
        "activation": "linear",
    }
    assert sections[2] == {"type": "yolo", "mask": [6, 7, 8], "anchors": [10, 13, 16, 30]}
    with pytest.raises(ValueError, match="line 3: option 'filters' has no value"):
        parse_cfg("[net]\n[convolutional]\nfilters= # to do\n")


def test_parse_cfg_sections_say_where_they_were_read(tmp_path):
    sections = parse_cfg(CFG)
    assert all(isinstance(s, CfgSection) for s in sections)
    assert [(s.origin, s.line) for s in sections] == [
        ("<cfg text>", 3),
        ("<cfg text>", 12),
        ("<cfg text>", 20),
        ("<cfg text>", 23),
    ]
    assert sections[2].option_lines == {"layers": 21}
    path = tmp_path / "net.cfg"
    path.write_text(CFG)
    assert parse_cfg(path)[1].origin == str(path)


def test_parse_cfg_reads_yolov3_openimages_as_darknet():
    net, *layers = parse_cfg(OPENIMAGES_START)
    # Both blocks are active; darknet reads the first: batch=1, subdivisions=1.
    assert (net["batch"], net["subdivisions"]) == (1, 1)
    assert net.ignored == [(6, "batch", 64), (7, "subdivisions", 16)]
    assert (net["width"], net["height"], net["channels"]) == (608, 608, 3)
    assert (net["saturation"], net["hue"], net["burn_in"]) == (1.5, 0.1, 5000)
    assert (net["steps"], net["scales"]) == ([400000, 450000], [0.1, 0.1])
    assert [s["type"] for s in layers] == ["convolutional"] * 4 + ["shortcut"]
    assert [s["filters"] for s in layers[:4]] == [32, 64, 32, 64]
    assert [s["stride"] for s in layers[:4]] == [1, 2, 1, 1]
    specs = conv_specs([net, *layers])
    assert [s.in_channels for s in specs] == [3, 32, 64, 32]


def test_yolov3_openimages_cfg_gives_a_601_class_yolov3():
    # yolov3-openimages.cfg is yolov3.cfg with 601 classes (filters=1818), ignore_thresh .7,
    # a 608 input and its own [net]; its layers are what yolov3_cfg writes for these settings.
    layers = yolov3_cfg(601, input_shape=(608, 608, 3), ignore_thresh=0.7)
    text = OPENIMAGES_NET + "\n" + layers[layers.index("[convolutional]") :]
    config = yolov3_config_from_cfg(text)
    assert config["num_classes"] == 601 and config["image_size"] == (608, 608)
    assert (config["initial_filters"], config["neck_filters"]) == (32, (512, 256, 128))
    assert config["ignore_thresh"] == 0.7
    outputs = [s for s in conv_specs(text) if not s.batch_normalize]
    assert [s.filters for s in outputs] == [1818] * 3


# ----------------------------------------------------------------------------- conv_specs
FLOW = """
[net]
channels=5
[convolutional]
filters=8
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
filters=6
size=1
[shortcut]
from=-3
[route]
layers=-1, 0, 1
[upsample]
stride=2
[convolutional]
filters=4
size=3
groups=2
pad=0
padding=2
activation=linear
[route]
layers=0, 2
groups=2
group_id=1
[convolutional]
filters=3
size=1
batch_normalize=1
[yolo]
mask=0
"""


def test_conv_specs_channel_flow():
    specs = conv_specs(parse_cfg(FLOW))
    # Layers: 0 conv(8), 1 maxpool(8), 2 conv(6), 3 shortcut(6), 4 route 3+0+1 = 6+8+8 = 22,
    # 5 upsample(22), 6 conv(4, groups 2), 7 route (8 + 6) / 2 = 7, 8 conv(3), 9 yolo.
    assert [s.layer for s in specs] == [0, 2, 6, 8]
    assert [s.index for s in specs] == [0, 1, 2, 3]
    assert [s.in_channels for s in specs] == [5, 8, 22, 7]
    assert [s.kernel_shape for s in specs] == [
        (3, 3, 5, 8),
        (1, 1, 8, 6),
        (3, 3, 11, 4),
        (1, 1, 7, 3),
    ]
    assert [s.num_params for s in specs] == [
        9 * 5 * 8 + 4 * 8,
        8 * 6 + 6,
        9 * 11 * 4 + 4,
        7 * 3 + 4 * 3,
    ]
    assert [s.batch_normalize for s in specs] == [True, False, False, True]
    assert [s.activation for s in specs] == ["leaky", "logistic", "linear", "logistic"]
    assert [s.padding for s in specs] == [1, 0, 2, 0]
    assert weights_file_size(specs) == 20 + 4 * sum(s.num_params for s in specs)
    assert weights_file_size(specs, 0, 1) == 16 + 4 * sum(s.num_params for s in specs)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[convolutional]\nfilters=3\n", r"first section must be \[net\]"),
        ("[net]\n[convolutional]\n[connected]\noutput=10\n", r"section 2 .*\[connected\]"),
        ("[net]\n[convolutional]\n[route]\nlayers=3\n", "section 2 .*layers=3 points at layer 3"),
        ("[net]\n[convolutional]\n[route]\nlayers=-2\n", "layers=-2 points at layer -1"),
        ("[net]\n[convolutional]\n[route]\n", "missing the 'layers'"),
        ("[net]\n[convolutional]\n[shortcut]\nfrom=-5\n", "from=-5"),
        ("[net]\n[convolutional]\nfilters=0\n", "filters=0"),
        ("[net]\n[convolutional]\nsize=leaky\n", "size='leaky'"),
        ("[net]\n[convolutional]\nfilters=3\ngroups=2\n", "groups=2 must divide"),
    ],
)
def test_conv_specs_errors(text, match):
    with pytest.raises(ValueError, match=match):
        conv_specs(parse_cfg(text))


# ----------------------------------------------------------------------------- YOLOv3 cfg
def yolov3_layer_types():
    """The 107 layer types of darknet's yolov3.cfg, spelled out."""
    types = ["convolutional"]
    for n in (1, 2, 8, 8, 4):
        types += ["convolutional"] + ["convolutional", "convolutional", "shortcut"] * n
    for k in range(3):
        if k:
            types += ["route", "convolutional", "upsample", "route"]
        types += ["convolutional"] * 7 + ["yolo"]
    return types


def test_yolov3_cfg_matches_published_figures():
    text = yolov3_cfg(80)
    sections = parse_cfg(text)
    layers = sections[1:]
    assert [s["type"] for s in layers] == yolov3_layer_types()
    assert len(layers) == 107
    specs = conv_specs(sections)
    assert len(specs) == 75
    assert sum(s.num_params for s in specs) == 62_001_757
    assert weights_file_size(specs) == 248_007_048 == 20 + 4 * 62_001_757
    assert weights_file_size(text) == 248_007_048
    # Routes exactly as in yolov3.cfg.
    routes = {i: s["layers"] for i, s in enumerate(layers) if s["type"] == "route"}
    assert routes == {83: -4, 86: [-1, 61], 95: -4, 98: [-1, 36]}
    yolos = [s for s in layers if s["type"] == "yolo"]
    assert [y["mask"] for y in yolos] == [[6, 7, 8], [3, 4, 5], [0, 1, 2]]
    for y in yolos:
        assert y["anchors"] == YOLO_COCO_ANCHORS.astype(int).ravel().tolist()
        assert (y["classes"], y["num"], y["ignore_thresh"]) == (80, 9, 0.5)
    outputs = [s for s in specs if not s.batch_normalize]
    assert [(s.layer, s.filters, s.in_channels, s.activation) for s in outputs] == [
        (81, 255, 1024, "linear"),
        (93, 255, 512, "linear"),
        (105, 255, 256, "linear"),
    ]
    assert [s.filters for s in specs if s.layer in (84, 96)] == [256, 128]  # up convs
    assert [s.in_channels for s in specs if s.layer in (87, 99)] == [256 + 512, 128 + 256]
    assert sections[0]["width"] == sections[0]["height"] == 416


def test_darknet53_cfg_is_the_yolov3_prefix():
    body = parse_cfg(darknet53_cfg())
    assert len(body) == 1 + 75
    assert body == parse_cfg(yolov3_cfg())[:76]
    specs = conv_specs(body)
    assert len(specs) == 52
    assert sum(s.num_params for s in specs) == 40_620_640
    assert weights_file_size(specs) == 162_482_580  # darknet53.conv.74


@settings(max_examples=15, deadline=None)
@given(num_classes=st.integers(1, 200))
def test_yolov3_parameters_by_number_of_classes(num_classes):
    specs = conv_specs(parse_cfg(yolov3_cfg(num_classes)))
    # Only the 3 output convs change: (in + 1) * 3 * (5 + C) with in = 1024, 512, 256.
    assert sum(s.num_params for s in specs) == 62_001_757 + 1795 * 3 * (num_classes - 80)


def test_yolov3_cfg_options():
    with pytest.raises(ValueError, match="same number of anchors"):
        yolov3_cfg(3, anchors=YOLO_COCO_ANCHORS, masks=((3, 4, 5), (1, 2), (0,)))
    small = YoloAnchors(YOLO_COCO_ANCHORS[:6] * 0.5, masks=((4, 5), (2, 3), (0, 1)))
    text = yolov3_cfg(
        2, anchors=small, input_shape=(128, 96, 1), initial_filters=4, ignore_thresh=0.7
    )
    sections = parse_cfg(text)
    assert (sections[0]["height"], sections[0]["width"], sections[0]["channels"]) == (128, 96, 1)
    yolo = [s for s in sections if s["type"] == "yolo"][0]
    assert yolo["anchors"] == [5, 6.5, 8, 15, 16.5, 11.5, 15, 30.5, 31, 22.5, 29.5, 59.5]
    assert (yolo["mask"], yolo["num"], yolo["ignore_thresh"]) == ([4, 5], 6, 0.7)
    specs = conv_specs(sections)
    assert specs[0].kernel_shape == (3, 3, 1, 4)
    assert [s.filters for s in specs if not s.batch_normalize] == [14, 14, 14]  # 2 * (5 + 2)
    # Default neck filters (16f, 8f, 4f): first conv of each 5-conv block.
    assert [specs[i].filters for i in (52, 60, 68)] == [64, 32, 16]
    custom = conv_specs(parse_cfg(yolov3_cfg(2, neck_filters=(8, 6, 4), initial_filters=4)))
    # conv 59 / 67: the up convs (half of the level above); 60 / 68: the next blocks.
    assert [custom[i].filters for i in (52, 59, 60, 67, 68)] == [8, 4, 6, 3, 4]
    assert [custom[i].in_channels for i in (60, 68)] == [4 + 64, 3 + 32]  # + C4, C3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"input_shape": (400, 416, 3)}, "height 400 must be divisible by 32"),
        ({"input_shape": (416, 416)}, r"\(H, W, C\)"),
        ({"masks": ((6, 7, 8), (3, 4, 5))}, "3 outputs"),
        ({"neck_filters": (512, 256)}, "3 ints"),
        ({"neck_filters": (511, 256, 128)}, "even"),
        ({"ignore_thresh": 1.5}, "ignore_thresh"),
        ({"initial_filters": 0}, "initial_filters"),
    ],
)
def test_yolov3_cfg_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        yolov3_cfg(**{"num_classes": 80, **kwargs})


def test_yolov3_cfg_neck_matches_yolo_fpn():
    """The cfg's neck convs (blocks and up convs) have the parameters of YoloFPN."""
    specs = conv_specs(parse_cfg(yolov3_cfg(80, initial_filters=F)))
    neck = [s for s in specs[52:] if s.layer not in (80, 81, 92, 93, 104, 105)]  # no heads
    fpn = YoloFPN(filters=(16 * F, 8 * F, 4 * F))
    fpn.build([(None, 8, 8, 8 * F), (None, 4, 4, 16 * F), (None, 2, 2, 32 * F)])
    assert fpn.count_params() == sum(s.num_params for s in neck)


# ----------------------------------------------------------------------------- darknet_units
def test_darknet_units_follow_cfg_order(source):
    units = darknet_units(source)
    specs = conv_specs(parse_cfg(darknet53_cfg(F, SHAPE)))
    assert len(units) == len(specs) == 52
    for (conv, bn), spec in zip(units, specs, strict=True):
        assert tuple(conv.kernel.shape) == spec.kernel_shape
        assert conv.strides == (spec.stride, spec.stride)
        assert (bn is not None) == spec.batch_normalize
    assert [conv.name for conv, _ in units] == [f"conv{i}" for i in range(52)]


def test_darknet_units_errors():
    with pytest.raises(TypeError, match="darknet_units"):
        darknet_units(object())
    x = keras.Input((8, 8, 3))
    plain = keras.Model(x, keras.layers.Conv2D(2, 1, name="c")(x))
    with pytest.raises(ValueError, match="no darknet_units"):
        darknet_units(plain)
    y = keras.layers.Conv2D(2, 1, name="conv0")(x)
    gap = keras.Model(x, keras.layers.Conv2D(2, 1, name="conv2")(y))
    with pytest.raises(ValueError, match="not conv1"):
        darknet_units(gap)

    class Units:
        def darknet_units(self):
            return ["not a layer"]

    with pytest.raises(TypeError, match="unit 0"):
        darknet_units(Units())


# ----------------------------------------------------------------------------- weights round trip
def test_round_trip_identical_outputs_and_weights(source, source_file, fresh):
    header = load_darknet_weights(fresh, source_file, cfg=darknet53_cfg(F, SHAPE))
    assert header == {"major": 0, "minor": 2, "revision": 0, "seen": 12345}
    for a, b in zip(source.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(1).uniform(size=(2, 64, 64, 3)).astype("float32")
    for a, b in zip(source(x, training=False), fresh(x, training=False), strict=True):
        np.testing.assert_array_equal(a, b)
    # Saving again gives the same bytes.
    again = source_file + ".again"
    save_darknet_weights(fresh, again, seen=12345)
    with open(source_file, "rb") as f1, open(again, "rb") as f2:
        assert f1.read() == f2.read()


def test_file_size_is_header_plus_4_bytes_per_parameter(source, source_file):
    assert os.path.getsize(source_file) == 20 + 4 * source.count_params()
    assert weights_file_size(darknet53_cfg(F, SHAPE)) == os.path.getsize(source_file)


@settings(max_examples=6, deadline=None)
@given(
    version=st.sampled_from([(0, 1), (0, 2), (1, 0), (0, 0)]),
    revision=st.integers(0, 999),
    seen=st.integers(0, 2**31 - 1),
)
def test_header_versions_round_trip(source, tmp_path_factory, version, revision, seen):
    major, minor = version
    wide = major * 10 + minor >= 2
    if wide:
        seen *= 2**20  # int64 field: values beyond int32
    path = str(tmp_path_factory.mktemp("hdr") / "v.weights")
    size = save_darknet_weights(source, path, header=(major, minor, revision), seen=seen)
    assert size == os.path.getsize(path) == (20 if wide else 16) + 4 * source.count_params()
    with open(path, "rb") as f:
        raw = f.read(20)
    assert struct.unpack("<3i", raw[:12]) == (major, minor, revision)
    assert struct.unpack("<q" if wide else "<i", raw[12 : 20 if wide else 16])[0] == seen
    header = load_darknet_weights(darknet_units(source), path)
    assert header == {"major": major, "minor": minor, "revision": revision, "seen": seen}


def test_byte_layout_written_by_hand(tmp_path):
    """A 2-conv network: conv-BN 3x3 (2 -> 3), then conv+bias 1x1 (3 -> 2), version 0.1."""
    x = keras.Input((6, 6, 2))
    c0 = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv0")
    b0 = keras.layers.BatchNormalization(name="bn0")
    c1 = keras.layers.Conv2D(2, 1, name="conv1")
    keras.Model(x, c1(b0(c0(x))))
    rng = np.random.default_rng(7)
    beta, gamma, mean, var = rng.normal(size=(4, 3)).astype("float32")
    k0 = rng.normal(size=(3, 2, 3, 3)).astype("float32")  # darknet (out, in, kh, kw)
    bias1 = rng.normal(size=2).astype("float32")
    k1 = rng.normal(size=(2, 3, 1, 1)).astype("float32")
    raw = struct.pack("<3ii", 0, 1, 7, 99)
    raw += b"".join(a.astype("<f4").tobytes() for a in (beta, gamma, mean, var, k0, bias1, k1))
    path = tmp_path / "tiny.weights"
    path.write_bytes(raw)
    header = load_darknet_weights([(c0, b0), c1], path)
    assert header == {"major": 0, "minor": 1, "revision": 7, "seen": 99}
    kernel = np.asarray(c0.kernel)  # Keras (kh, kw, in, out)
    for o, i, r, c in np.ndindex(*k0.shape):
        assert kernel[r, c, i, o] == k0[o, i, r, c]
    np.testing.assert_array_equal(b0.beta, beta)
    np.testing.assert_array_equal(b0.gamma, gamma)
    np.testing.assert_array_equal(b0.moving_mean, mean)
    np.testing.assert_array_equal(b0.moving_variance, var)
    np.testing.assert_array_equal(c1.bias, bias1)
    np.testing.assert_array_equal(np.asarray(c1.kernel)[0, 0], k1[:, :, 0, 0].T)
    out = tmp_path / "tiny2.weights"
    save_darknet_weights([(c0, b0), c1], out, header=(0, 1, 7), seen=99)
    assert out.read_bytes() == raw


def test_bias_before_bn_is_folded(tmp_path):
    model = build_darknet53(SHAPE, initial_filters=F, use_bias=True)
    randomize(model, seed=2)
    path = str(tmp_path / "bias.weights")
    size = save_darknet_weights(model, path)
    # The file has darknet's count: no slot for the 4,464 conv biases.
    assert size == 20 + 4 * (model.count_params() - 4464)
    loaded = build_darknet53(SHAPE, initial_filters=F, use_bias=True)
    load_darknet_weights(loaded, path)
    conv, bn = model.get_layer("conv9"), model.get_layer("bn9")
    np.testing.assert_array_equal(loaded.get_layer("conv9").bias, 0.0)
    np.testing.assert_allclose(
        loaded.get_layer("bn9").moving_mean, np.asarray(bn.moving_mean) - np.asarray(conv.bias)
    )
    x = np.random.default_rng(3).uniform(size=(1, 64, 64, 3)).astype("float32")
    for a, b in zip(model(x, training=False), loaded(x, training=False), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


# ----------------------------------------------------------------------------- load errors
def unit_offsets(specs, header=20):
    """Byte offset where each conv starts and where the file ends."""
    offsets = [header]
    for s in specs:
        offsets.append(offsets[-1] + 4 * s.num_params)
    return offsets


def test_truncated_file_names_the_layer_and_leaves_model_untouched(source_file, fresh, tmp_path):
    specs = conv_specs(darknet53_cfg(F, SHAPE))
    offsets = unit_offsets(specs)
    before = snapshot(fresh)
    data = open(source_file, "rb").read()
    cut = offsets[30] + 100  # 100 bytes into conv 30
    path = tmp_path / "cut.weights"
    path.write_bytes(data[:cut])
    needed = 4 * specs[30].num_params
    with pytest.raises(
        ValueError, match=f"conv 30 \\(Keras layer 'conv30'.*needs {needed} bytes, 100 are left"
    ):
        load_darknet_weights(fresh, path)
    assert_same_weights(fresh, before)


def test_extra_bytes_give_sizes_and_leave_model_untouched(source, source_file, fresh, tmp_path):
    data = open(source_file, "rb").read()
    path = tmp_path / "long.weights"
    path.write_bytes(data + bytes(8))
    before = snapshot(fresh)
    with pytest.raises(
        ValueError, match=f"has {len(data) + 8} bytes, but this network needs {len(data)}"
    ):
        load_darknet_weights(fresh, path)
    assert_same_weights(fresh, before)
    # allow_trailing reads the leading convs, as darknet's `partial` does.
    load_darknet_weights(fresh, path, allow_trailing=True)
    assert_same_weights(fresh, snapshot(source))


def test_bad_header_and_missing_file(fresh, tmp_path):
    before = snapshot(fresh)
    with pytest.raises(FileNotFoundError, match="absent.weights"):
        load_darknet_weights(fresh, tmp_path / "absent.weights")
    short = tmp_path / "short.weights"
    short.write_bytes(bytes(8))
    with pytest.raises(ValueError, match="too short for a darknet header"):
        load_darknet_weights(fresh, short)
    negative = tmp_path / "negative.weights"
    negative.write_bytes(struct.pack("<3iq", -1, 2, 0, 0) + bytes(64))
    with pytest.raises(ValueError, match="bad header"):
        load_darknet_weights(fresh, negative)
    text = tmp_path / "text.weights"
    text.write_bytes(b"[net]\nwidth=416\nheight=416\n" * 4)
    with pytest.raises(ValueError, match="bad header"):
        load_darknet_weights(fresh, text)
    half = tmp_path / "half.weights"
    half.write_bytes(struct.pack("<3i", 0, 2, 0) + bytes(4))  # int64 seen needs 8 bytes
    with pytest.raises(ValueError, match="version 0.2 header"):
        load_darknet_weights(fresh, half)
    assert_same_weights(fresh, before)


def test_non_finite_values_are_rejected(source_file, fresh, tmp_path):
    data = bytearray(open(source_file, "rb").read())
    offsets = unit_offsets(conv_specs(darknet53_cfg(F, SHAPE)))
    data[offsets[5] : offsets[5] + 4] = struct.pack("<f", float("nan"))
    path = tmp_path / "nan.weights"
    path.write_bytes(bytes(data))
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="non-finite values in conv 5"):
        load_darknet_weights(fresh, path)
    assert_same_weights(fresh, before)


def test_cfg_mismatch(source_file, fresh):
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"conv 0 .*'conv0'.*\(3, 3, 3, 16\).*\(3, 3, 3, 8\)"):
        load_darknet_weights(fresh, source_file, cfg=darknet53_cfg(16, SHAPE))
    with pytest.raises(ValueError, match="75 convolutional sections, the model 52"):
        load_darknet_weights(fresh, source_file, cfg=yolov3_cfg(80, initial_filters=F))
    wrong = darknet53_cfg(F, SHAPE).replace("filters=32\n", "filters=40\n", 1)
    first = next(s for s in conv_specs(wrong) if s.filters == 40)
    with pytest.raises(ValueError, match=f"conv {first.index} "):
        load_darknet_weights(fresh, source_file, cfg=wrong)
    assert_same_weights(fresh, before)
    specs = conv_specs(darknet53_cfg(F, SHAPE))
    assert all(isinstance(s, ConvSpec) for s in specs)
    load_darknet_weights(fresh, source_file, cfg=specs)  # a ConvSpec list works too


# ----------------------------------------------------------------------------- save errors
def test_save_refuses_to_overwrite(source, source_file, tmp_path):
    before = open(source_file, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_darknet_weights(source, source_file)
    assert open(source_file, "rb").read() == before
    path = tmp_path / "x.weights"
    path.write_bytes(b"old")
    save_darknet_weights(source, path, seen=12345, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.weights"]  # no temporary file left
    # A missing folder is named with the user's path, not a temporary file's.
    with pytest.raises(FileNotFoundError, match=r"cannot write '.*missing/y\.weights': its folder"):
        save_darknet_weights(source, tmp_path / "missing" / "y.weights")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"header": (0, 2)}, "header"),
        ({"header": (-1, 2, 0)}, r"\[0, 1000\)"),
        ({"seen": -1}, "seen"),
        ({"header": (0, 1, 0), "seen": 2**31}, "seen"),
    ],
)
def test_save_bad_header(source, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_darknet_weights(source, tmp_path / "bad.weights", **kwargs)
    assert not os.listdir(tmp_path)


def test_units_darknet_cannot_represent(tmp_path):
    x = keras.Input((4, 4, 2))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, name="conv0")
    keras.Model(x, conv(x))
    with pytest.raises(ValueError, match="use_bias=False"):
        save_darknet_weights([conv], tmp_path / "a.weights")
    unbuilt = keras.layers.Conv2D(3, 1)
    with pytest.raises(ValueError, match="not built"):
        save_darknet_weights([unbuilt], tmp_path / "b.weights")


# ----------------------------------------------------------------------------- a YOLOv3 in units
class TinyYolo:
    """Darknet-53 + YoloFPN + heads as darknet units, in cfg order (as the YOLOv3 model does)."""

    def __init__(self, num_classes, seed):
        self.body = build_darknet53(SHAPE, initial_filters=F)
        filters = (16 * F, 8 * F, 4 * F)
        self.fpn = YoloFPN(filters=filters)
        self.fpn.build([(None, 8, 8, 8 * F), (None, 4, 4, 16 * F), (None, 2, 2, 32 * F)])
        self.heads, self.outputs = [], []
        for f in filters:
            head = NeckConv(2 * f, 3, batch_norm=True, activation="leaky_relu")
            head.build((None, None, None, f))
            out = keras.layers.Conv2D(3 * (5 + num_classes), 1)
            out.build((None, None, None, 2 * f))
            self.heads.append(head)
            self.outputs.append(out)
        rng = np.random.default_rng(seed)
        for layer in [self.fpn, *self.heads, *self.outputs]:
            for w in layer.weights:
                w.assign(rng.normal(0, 0.1, w.shape).astype("float32") ** 2)

    def darknet_units(self):
        units = list(darknet_units(self.body))
        for k in range(3):
            units += self.fpn.blocks[k] + [self.heads[k], self.outputs[k]]
            if k < 2:
                units.append(self.fpn.up_convs[k])
        return units

    def weights(self):
        layers = [self.body, self.fpn, *self.heads, *self.outputs]
        return [np.asarray(w) for layer in layers for w in layer.weights]


def test_yolov3_units_round_trip_with_cfg(tmp_path):
    cfg = yolov3_cfg(3, initial_filters=F, input_shape=SHAPE)
    model = TinyYolo(3, seed=0)
    path = tmp_path / "yolo.weights"
    size = save_darknet_weights(model, path)
    assert size == weights_file_size(cfg)
    other = TinyYolo(3, seed=1)
    load_darknet_weights(other, path, cfg=cfg)
    for a, b in zip(model.weights(), other.weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # The body alone reads the first 52 convs of the full file.
    body = build_darknet53(SHAPE, initial_filters=F)
    load_darknet_weights(body, path, allow_trailing=True)
    for a, b in zip(model.body.weights, body.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"conv 58 .*\(1, 1, 256, 27\).*\(1, 1, 256, 24\)"):
        load_darknet_weights(other, path, cfg=yolov3_cfg(4, initial_filters=F))


# ----------------------------------------------------------------------------- darknet's other cfgs
# darknet's cfg/yolov3-tiny.cfg, verbatim: maxpools and two [yolo] heads.
TINY_CFG = """\
[net]
# Testing
batch=1
subdivisions=1
# Training
# batch=64
# subdivisions=2
width=416
height=416
channels=3
momentum=0.9
decay=0.0005
angle=0
saturation = 1.5
exposure = 1.5
hue=.1

learning_rate=0.001
burn_in=1000
max_batches = 500200
policy=steps
steps=400000,450000
scales=.1,.1

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=32
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=64
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=128
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=256
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=512
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=1

[convolutional]
batch_normalize=1
filters=1024
size=3
stride=1
pad=1
activation=leaky

###########

[convolutional]
batch_normalize=1
filters=256
size=1
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=512
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=255
activation=linear



[yolo]
mask = 3,4,5
anchors = 10,14,  23,27,  37,58,  81,82,  135,169,  344,319
classes=80
num=6
jitter=.3
ignore_thresh = .7
truth_thresh = 1
random=1

[route]
layers = -4

[convolutional]
batch_normalize=1
filters=128
size=1
stride=1
pad=1
activation=leaky

[upsample]
stride=2

[route]
layers = -1, 8

[convolutional]
batch_normalize=1
filters=256
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=255
activation=linear

[yolo]
mask = 0,1,2
anchors = 10,14,  23,27,  37,58,  81,82,  135,169,  344,319
classes=80
num=6
jitter=.3
ignore_thresh = .7
truth_thresh = 1
random=1
"""

# The first output of darknet's cfg/yolov3-spp.cfg (after the Darknet-53 body), verbatim.
SPP_OUTPUT_0 = """
######################

[convolutional]
batch_normalize=1
filters=512
size=1
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
size=3
stride=1
pad=1
filters=1024
activation=leaky

[convolutional]
batch_normalize=1
filters=512
size=1
stride=1
pad=1
activation=leaky

### SPP ###
[maxpool]
stride=1
size=5

[route]
layers=-2

[maxpool]
stride=1
size=9

[route]
layers=-4

[maxpool]
stride=1
size=13

[route]
layers=-1,-3,-5,-6

### End SPP ###

[convolutional]
batch_normalize=1
filters=512
size=1
stride=1
pad=1
activation=leaky


[convolutional]
batch_normalize=1
size=3
stride=1
pad=1
filters=1024
activation=leaky

[convolutional]
batch_normalize=1
filters=512
size=1
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
size=3
stride=1
pad=1
filters=1024
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=255
activation=linear


[yolo]
mask = 6,7,8
anchors = 10,13,  16,30,  33,23,  30,61,  62,45,  59,119,  116,90,  156,198,  373,326
classes=80
num=9
jitter=.3
ignore_thresh = .7
truth_thresh = 1
random=1

"""

SUPPORTED = (
    r"Supported architectures: YOLOv3 with a Darknet-53 body and three \[yolo\] heads .*and the "
    r"Darknet-53 body alone"
)


def yolov3_spp_cfg():
    """yolov3-spp.cfg: the Darknet-53 body, the SPP output above, then yolov3.cfg's other two
    outputs (the same sections in both files)."""
    yolov3 = yolov3_cfg(80)
    return darknet53_cfg() + SPP_OUTPUT_0 + yolov3[yolov3.index("# Up branch to output 1") :]


def line_of(text, header, nth=0):
    return [i for i, line in enumerate(text.splitlines(), start=1) if line == header][nth]


def test_darknet_other_cfgs_have_a_weights_layout():
    # conv_specs is the .weights layout of any cfg of these sections, maxpools included.
    tiny = conv_specs(TINY_CFG)
    assert len(tiny) == 13 and sum(s.num_params for s in tiny) == 8_858_734
    assert weights_file_size(tiny) == 35_434_956  # the published yolov3-tiny.weights
    assert [s.in_channels for s in tiny if s.layer == 21] == [128 + 256]  # after route -1, 8
    spp = conv_specs(yolov3_spp_cfg())
    assert len(spp) == 76
    assert [s.kernel_shape for s in spp if s.layer == 84] == [(1, 1, 4 * 512, 512)]  # after SPP
    # yolov3.cfg plus that 1x1 conv-BN.
    assert sum(s.num_params for s in spp) == 62_001_757 + 2048 * 512 + 4 * 512


def test_yolov3_tiny_cfg_is_refused_naming_its_maxpool(tmp_path):
    path = tmp_path / "yolov3-tiny.cfg"
    path.write_text(TINY_CFG)
    first_maxpool = re.escape(f"section 2 (darknet layer 1, [maxpool], {path} line 33)")
    heads = re.escape(
        f"expected 3 [yolo] sections, found 2: section 17 (darknet layer 16, [yolo], {path} "
        f"line 132), section 24 (darknet layer 23, [yolo], {path} line 174)"
    )
    message = f"{first_maxpool} is not a layer of YOLOv3 or Darknet-53; {heads}. {SUPPORTED}"
    assert line_of(TINY_CFG, "[maxpool]") == 33 and line_of(TINY_CFG, "[yolo]", 1) == 174
    with pytest.raises(ValueError, match=f"yolov3_config_from_cfg: {message}"):
        yolov3_config_from_cfg(path)
    with pytest.raises(ValueError, match=message):
        YOLOv3.from_darknet_cfg(path)


def test_yolov3_spp_cfg_is_refused_naming_its_maxpool():
    text = yolov3_spp_cfg()
    where = (
        f"section 79 (darknet layer 78, [maxpool], <cfg text> line {line_of(text, '[maxpool]')})"
    )
    message = f"{re.escape(where)} is not a layer of YOLOv3 or Darknet-53. {SUPPORTED}"
    with pytest.raises(ValueError, match=f"yolov3_config_from_cfg: {message}"):
        yolov3_config_from_cfg(text)
    with pytest.raises(ValueError, match=message):
        YOLOv3.from_darknet_cfg(text)


def test_yolov3_cfg_with_two_heads_is_refused_naming_them():
    yolov3 = yolov3_cfg(80)
    text = yolov3[: yolov3.index("# Up branch to output 2")]
    lines = [line_of(text, "[yolo]", k) for k in range(2)]
    heads = (
        f"expected 3 [yolo] sections, found 2: section 83 (darknet layer 82, [yolo], <cfg text> "
        f"line {lines[0]}), section 95 (darknet layer 94, [yolo], <cfg text> line {lines[1]})"
    )
    with pytest.raises(
        ValueError, match=f"yolov3_config_from_cfg: {re.escape(heads)}. {SUPPORTED}"
    ):
        yolov3_config_from_cfg(text)


def test_load_darknet_weights_names_an_unsupported_cfg(tmp_path):
    model = YOLOv3(num_classes=2, image_size=(64, 64), initial_filters=4)
    text = yolov3_spp_cfg()
    where = re.escape(
        f"section 79 (darknet layer 78, [maxpool], <cfg text> line {line_of(text, '[maxpool]')})"
    )
    message = (
        "load_darknet_weights: the cfg has 76 convolutional sections, the model 75 conv units; "
        f"the cfg is not a supported network: {where} is not a layer of YOLOv3 or Darknet-53. "
        f"{SUPPORTED}"
    )
    with pytest.raises(ValueError, match=message):
        load_darknet_weights(model, tmp_path / "yolov3-spp.weights", cfg=text)
    # yolov3-tiny: its maxpool and its two heads.
    with pytest.raises(ValueError, match=r"13 convolutional .*\[maxpool\].*found 2: section 17"):
        load_darknet_weights(model, tmp_path / "yolov3-tiny.weights", cfg=TINY_CFG)
    # A model mismatching a supported cfg gets the plain mismatch.
    with pytest.raises(ValueError, match=r"model 75 conv units$"):
        load_darknet_weights(model, tmp_path / "body.weights", cfg=darknet53_cfg())


def test_units_of_another_cfg_still_load_with_it(tmp_path):
    # A Keras network of yolov3-tiny's convs reads a tiny .weights file checked against its cfg.
    def units(seed):
        keras.utils.set_random_seed(seed)
        made = []
        for spec in conv_specs(TINY_CFG):
            conv = keras.layers.Conv2D(spec.filters, spec.size, use_bias=not spec.batch_normalize)
            conv.build((None, 8, 8, spec.in_channels))
            norm = None
            if spec.batch_normalize:
                norm = keras.layers.BatchNormalization()
                norm.build((None, 8, 8, spec.filters))
            made.append((conv, norm))
        return made

    source, target = units(0), units(1)
    path = tmp_path / "yolov3-tiny.weights"
    assert save_darknet_weights(source, path) == 35_434_956
    load_darknet_weights(target, path, cfg=TINY_CFG)
    for (a, _), (b, _) in zip(source, target, strict=True):
        np.testing.assert_array_equal(np.asarray(a.kernel), np.asarray(b.kernel))
