"""The original PyCrCNN's ``pycrcnn.functional.square_layer``.

- :class:`SquareLayer` ``(HE)``: the engine's square activation, callable.
- :func:`square` ``(HE, image)``: squares every ciphertext of an object array
  of any shape.
"""
from __future__ import annotations

from typing import Any

from .._compat import cipher_array
from .._engine import CipherTensor
from ..layers import SquareLayer

__all__ = ["SquareLayer", "square"]


def square(HE: Any, image: Any) -> Any:
    """The square of every ciphertext of ``image`` (an object array of ``PyCtxt``
    of any shape, nested lists of them, or a CipherTensor): the same kind and
    shape back. Unlike Pyfhel 2's ``HE.power(x, 2)`` the inputs are left unchanged.

    Runs the engine's Square layer.
    """
    if isinstance(image, CipherTensor) and image.encoding != "fractional":
        return SquareLayer(HE)(image)
    arr = cipher_array(image, None, "square", "SquareLayer")
    flat = CipherTensor(arr.reshape(1, -1))  # one image of every value: any shape works
    out = SquareLayer(HE)(flat).to_numpy().reshape(arr.shape)
    return CipherTensor(out) if isinstance(image, CipherTensor) else out
