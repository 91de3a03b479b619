"""The original PyCrCNN's ``pycrcnn.linear.linear_layer``: :class:`LinearLayer`
``(HE, weights, bias=None)``, the engine's fully connected layer, callable on
``[N, F]``; ``weights`` (``[out, in]``) and ``bias`` are object arrays of
encoded values."""
from ..layers import LinearLayer

__all__ = ["LinearLayer"]
