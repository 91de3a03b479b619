"""The original PyCrCNN's ``pycrcnn.functional``: pooling, flattening, padding,
rencryption and the square activation, as modules of the seed's names."""
from .average_pool import AveragePoolLayer
from .flatten_layer import FlattenLayer
from .padding import apply_padding
from .rencryption_layer import RencryptionLayer
from .square_layer import SquareLayer, square

__all__ = ["AveragePoolLayer", "FlattenLayer", "RencryptionLayer", "SquareLayer", "apply_padding", "square"]
