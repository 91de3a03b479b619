"""The original PyCrCNN's ``pycrcnn.convolutional.convolutional_layer``.

- :class:`ConvolutionalLayer` ``(HE, weights, stride=(1, 1), padding=(0, 0), bias=None)``
  is the engine's layer (:class:`pycrcnn.layers.ConvolutionalLayer`): callable on
  ``[N, C, H, W]``; ``weights`` / ``bias`` are object arrays of encoded values.
- :func:`convolute2d` ``(image, filter_matrix, stride)`` convolves one 2-D
  image with one 2-D filter (no padding, no bias), as the seed's helper did.
"""
from __future__ import annotations

from typing import Any

from .._engine import CipherTensor
from .._compat import cipher_array, like_input, pair
from ..crypto import as_numbers
from ..layers import ConvolutionalLayer

__all__ = ["ConvolutionalLayer", "convolute2d"]


def convolute2d(image: Any, filter_matrix: Any, stride: Any) -> Any:
    """Cross-correlation of one encrypted 2-D image ``[H, W]`` (object array of
    ``PyCtxt``) with one 2-D filter ``[kh, kw]`` (numbers or encoded ``PyPtxt``):
    an object array ``[(H - kh) // sy + 1, (W - kw) // sx + 1]`` of ``PyCtxt``
    (a CipherTensor if ``image`` was one).

    Runs the engine's Conv2d on a one-image, one-channel tensor.
    """
    arr = cipher_array(image, 2, "convolute2d", "ConvolutionalLayer on [N, C, H, W]")
    w = as_numbers(filter_matrix)
    if w.ndim != 2:
        raise ValueError(f"convolute2d takes a 2-d filter, got shape {list(w.shape)}")
    ctx = arr[0, 0].context  # the parameters the image was encrypted with
    layer = ConvolutionalLayer(ctx, w[None, None], stride=pair(stride, "stride"))
    out = layer(CipherTensor(arr[None, None]))
    return like_input(out[0, 0], image)
