"""Input conventions of the backbones: RGB images in ``[0, 255]`` -> what the weights expect.

Every detector of the book takes RGB float images with values in ``[0, 255]`` and puts the
backbone's :class:`ImagePreprocessing` layer in front of it
(:func:`dlnotes.backbones.preprocess_for` picks the mode by backbone name; ``"none"`` for a
backbone that normalises its input itself).
"""

from __future__ import annotations

import keras
from keras import layers, ops

__all__ = ["ImagePreprocessing"]

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_RGB_MEAN = (0.485, 0.456, 0.406)
_TORCH_RGB_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="dlnotes")
class ImagePreprocessing(layers.Layer):
    """Map RGB images with values in ``[0, 255]`` to a backbone's expected input.

    Modes (``"caffe"`` and ``"torch"`` equal
    ``keras.applications.imagenet_utils.preprocess_input(x, mode=...)``):

    * ``"caffe"``: RGB -> BGR, minus the ImageNet BGR mean (103.939, 116.779, 123.68), no scaling
      (``keras.applications.resnet.preprocess_input``).
    * ``"torch"``: ``x / 255``, minus mean (0.485, 0.456, 0.406), divided by std
      (0.229, 0.224, 0.225), in RGB order.
    * ``"unit"``: ``x / 255`` (darknet's input, RGB in ``[0, 1]``).
    * ``"none"``: ``x`` unchanged but for the dtype (the EfficientNets normalise inside the model,
      as keras.applications' do).

    Input ``(..., 3)`` of any real dtype; output the same shape in the layer's compute dtype.
    """

    MODES = ("caffe", "torch", "unit", "none")

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"ImagePreprocessing: mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def build(self, input_shape):
        if input_shape[-1] != 3:
            raise ValueError(
                f"ImagePreprocessing({self.mode!r}) needs RGB images (..., 3), got shape "
                f"{tuple(input_shape)}"
            )
        self.built = True

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "none":
            return x
        mean = ops.convert_to_tensor(_TORCH_RGB_MEAN, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(_TORCH_RGB_STD, dtype=self.compute_dtype)
        return (x / 255.0 - mean) / std

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
