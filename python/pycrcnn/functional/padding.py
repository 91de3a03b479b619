"""The original PyCrCNN's ``pycrcnn.functional.padding``: :func:`apply_padding`."""
from __future__ import annotations

from typing import Any

import numpy as np

from .._compat import cipher_array, pair
from .._engine import CipherTensor

__all__ = ["apply_padding"]


def apply_padding(t: Any, padding: Any) -> Any:
    """Zero-pads a batch of encrypted images ``[N, C, H, W]`` (object array of
    ``PyCtxt``) to ``[N, C, H + 2·py, W + 2·px]``; ``padding`` is an int or
    ``(py, px)``. As in the seed, every new element is an encryption of zero
    made from a ciphertext of the input minus itself (so no key is needed),
    here one fresh ciphertext per element. Returns the same kind as ``t``
    (an object array, or a CipherTensor).

    The engine's layers pad by themselves (``ConvolutionalLayer(...,
    padding=...)``): this is for code that pads explicitly.
    """
    arr = cipher_array(t, 4, "apply_padding", "the padding argument of ConvolutionalLayer / AveragePoolLayer")
    py, px = pair(padding, "padding")
    if py < 0 or px < 0:
        raise ValueError(f"apply_padding takes non-negative padding, got {(py, px)}")
    if py == 0 and px == 0:
        return t if isinstance(t, CipherTensor) else arr
    n, c, h, w = arr.shape
    out = np.empty((n, c, h + 2 * py, w + 2 * px), dtype=object)
    out[:, :, py:py + h, px:px + w] = arr
    border = np.ones(out.shape, dtype=bool)
    border[:, :, py:py + h, px:px + w] = False
    for idx in zip(*np.nonzero(border)):
        some = arr[idx[0], idx[1], 0, 0]
        out[idx] = some - some  # an encryption of zero under the same keys
    return CipherTensor(out) if isinstance(t, CipherTensor) else out
