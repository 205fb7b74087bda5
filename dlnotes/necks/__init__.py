"""Necks: layers between a backbone and the detection heads.

Every neck has the same interface, so that a model (and chapter 2, which compares them on one
backbone) can swap them by name:

* a ``keras.layers.Layer`` registered with ``keras.saving.register_keras_serializable``, whose
  ``get_config`` holds its constructor arguments and whose weights are built from the input shapes;
* called on a **list** of backbone features ``[C3, C4, C5]`` (lowest stride first, consecutive
  entries differing by stride 2, any channel counts), it returns a **list** of pyramid levels,
  lowest stride first;
* its ``levels`` property gives the pyramid level of each output (stride ``2**level``).

Variants (:data:`NECKS`):

* ``"fpn"``: the original FPN of RetinaNet (:class:`~dlnotes.necks.fpn.FPN`), P3-P7;
* ``"fpn_bn"``: the notes' FPN, conv-BN-ReLU with levels taken after the activation
  (:meth:`FPN.notes_variant <dlnotes.necks.fpn.FPN.notes_variant>`);
* ``"panet"``: FPN plus PANet's bottom-up path (:class:`~dlnotes.necks.fpn.PANet`);
* ``"yolo_fpn"``: YOLOv3's concatenation FPN (:class:`~dlnotes.necks.fpn.YoloFPN`), three
  levels (stride 8, 16, 32);
* ``"bifpn"``: EfficientDet's weighted bidirectional FPN (:class:`~dlnotes.necks.bifpn.BiFPN`),
  P3-P7; :data:`~dlnotes.necks.bifpn.EFFICIENTDET_SCALING` holds the D0-D7 constants.
"""

from __future__ import annotations

from dlnotes.necks.bifpn import (
    EFFICIENTDET_SCALING,
    FUSION_MODES,
    BiFPN,
    BiFPNNode,
    ChannelProjection,
    bifpn_graph,
)
from dlnotes.necks.fpn import (
    FPN,
    NeckConv,
    PANet,
    YoloFPN,
    match_spatial_size,
    nearest_upsample_like,
)

__all__ = [
    "EFFICIENTDET_SCALING",
    "FPN",
    "FUSION_MODES",
    "BiFPN",
    "BiFPNNode",
    "ChannelProjection",
    "NECKS",
    "NeckConv",
    "PANet",
    "YoloFPN",
    "bifpn_graph",
    "build_neck",
    "match_spatial_size",
    "nearest_upsample_like",
]

#: Neck names -> constructors taking keyword arguments; :func:`build_neck` calls them.
NECKS = {
    "fpn": FPN,
    "fpn_bn": FPN.notes_variant,
    "panet": PANet,
    "yolo_fpn": YoloFPN,
    "bifpn": BiFPN,
}


def build_neck(name, **kwargs):
    """Builds the neck called ``name`` (a key of :data:`NECKS`) with constructor ``kwargs``.

    Example: ``build_neck("fpn_bn", num_channels=128)(backbone_features)`` returns the list of
    levels P3..P7, each ``(B, H_l, W_l, 128)``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        factory = NECKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown neck {name!r}; expected one of {sorted(NECKS)}.") from None
    return factory(**kwargs)
