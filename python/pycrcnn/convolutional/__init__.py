"""The original PyCrCNN's ``pycrcnn.convolutional``: see :mod:`.convolutional_layer`."""
from .convolutional_layer import ConvolutionalLayer, convolute2d

__all__ = ["ConvolutionalLayer", "convolute2d"]
