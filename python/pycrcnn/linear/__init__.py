"""The original PyCrCNN's ``pycrcnn.linear``: see :mod:`.linear_layer`."""
from .linear_layer import LinearLayer

__all__ = ["LinearLayer"]
