"""dlnotes: the package behind the runnable book on object detection in TensorFlow / Keras 3."""

__version__ = "0.1.0"
