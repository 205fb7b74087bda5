"""Darknet-53's layout in darknet's cfg order: the one description both its Keras builder
(:func:`dlnotes.backbones.build_darknet53`) and the file converters (:mod:`dlnotes.darknet_io`,
which writes ``darknet53_cfg`` / ``yolov3_cfg`` from it) read, so neither imports the other's
internals.

The body is ``conv3x3 f``, then five stages ``s = 1..5`` of a stride-2 ``conv3x3`` to ``2**s f``
channels followed by ``DARKNET53_BLOCKS[s - 1]`` residual blocks (``[conv1x1] [conv3x3]
[shortcut from=-3]``): 52 convs and darknet layers 0-74. Keras layers are named ``conv{i}`` /
``bn{i}`` by darknet conv index ``i``, the order of a ``.weights`` file.
"""

from __future__ import annotations

__all__ = ["DARKNET53_BLOCKS", "DARKNET53_OUTPUT_LAYERS"]

#: Residual blocks in Darknet-53's five stages (strides 2, 4, 8, 16, 32).
DARKNET53_BLOCKS: tuple[int, ...] = (1, 2, 8, 8, 4)

#: Darknet layer index of each output ``C3``, ``C4``, ``C5`` (``[route] layers = -1, 61`` ...).
DARKNET53_OUTPUT_LAYERS: dict[str, int] = {"C3": 36, "C4": 61, "C5": 74}
