"""The original PyCrCNN's ``pycrcnn.functional.flatten_layer``: :class:`FlattenLayer`
(``FlattenLayer()`` or ``FlattenLayer(HE)``), callable on ``[N, ...]``, giving ``[N, F]``."""
from ..layers import FlattenLayer

__all__ = ["FlattenLayer"]
