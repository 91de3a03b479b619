"""The original PyCrCNN's ``pycrcnn.functional.average_pool``.

- :class:`AveragePoolLayer` ``(HE, kernel_size, stride=(1, 1), padding=(0, 0))``:
  the engine's average pooling with the seed's default stride of 1 (torch's
  ``AvgPool2d`` and :class:`pycrcnn.AveragePoolLayer` default to the kernel
  size: pass ``stride`` explicitly to get the same layer either way).
- :func:`_avg` ``(HE, image, kernel_size, stride)``: average pooling of one 2-D
  encrypted image.
"""
from __future__ import annotations

from typing import Any

from .._compat import cipher_array, like_input, pair
from .._engine import CipherTensor
from ..layers import AveragePoolLayer as _EngineAveragePoolLayer

__all__ = ["AveragePoolLayer", "_avg"]


class AveragePoolLayer(_EngineAveragePoolLayer):
    """:class:`pycrcnn.layers.AveragePoolLayer` with the seed's default stride (1, 1).

    Attributes (as in the seed): ``HE``, ``kernel_size``, ``stride``, ``padding``,
    each a pair ``(y, x)``.
    """

    def __init__(self, HE: Any, kernel_size: Any, stride: Any = (1, 1), padding: Any = (0, 0)):
        super().__init__(HE, kernel_size, stride=stride, padding=padding)


def _avg(HE: Any, image: Any, kernel_size: Any, stride: Any) -> Any:
    """Average pooling of one encrypted 2-D image ``[H, W]`` (object array of
    ``PyCtxt``) with ``kernel_size`` and ``stride`` (ints or pairs ``(y, x)``), no
    padding: an object array ``[(H - ky) // sy + 1, (W - kx) // sx + 1]`` of
    ``PyCtxt`` (a CipherTensor if ``image`` was one).

    Runs the engine's AvgPool2d on a one-image, one-channel tensor.
    """
    arr = cipher_array(image, 2, "_avg", "AveragePoolLayer on [N, C, H, W]")
    layer = _EngineAveragePoolLayer(HE, pair(kernel_size, "kernel_size"), pair(stride, "stride"))
    out = layer(CipherTensor(arr[None, None]))
    return like_input(out[0, 0], image)
