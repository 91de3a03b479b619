"""Shared plumbing of the original PyCrCNN module paths (``pycrcnn.convolutional``,
``pycrcnn.functional``, ``pycrcnn.linear``, ``pycrcnn.local_execution``).

The seed's module-level helpers (``convolute2d``, ``_avg``, ``square``,
``apply_padding``) took numpy object arrays of ciphertexts and returned them.
The faces run the engine's layers on those arrays: :func:`cipher_array`
turns the input into a :class:`CipherTensor` of the shape the layer needs and
:func:`like_input` gives the result back in the kind the caller passed (an
object array of ``PyCtxt``, or a CipherTensor).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import numpy as np

from ._engine import CipherTensor, HEError

__all__ = ["cipher_array", "like_input", "pair"]


def pair(v: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    """``(y, x)`` from an int or a pair (torch modules hold either)."""
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    try:
        a, b = v
        return int(a), int(b)
    except (TypeError, ValueError):
        raise HEError(f"{what} must be an int or a pair (y, x), got {v!r}") from None


def cipher_array(x: Any, ndim: Union[int, None], where: str, instead: str) -> np.ndarray:
    """The seed's object array of ``PyCtxt`` behind ``x`` (an object array, nested
    lists, or a fractional CipherTensor), checked to have ``ndim`` axes.

    Batch-encoded tensors keep the batch in the slots: they have no
    one-value-per-ciphertext array, and the error says to use ``instead``.
    """
    if isinstance(x, CipherTensor):
        if x.encoding != "fractional":
            raise HEError(f"{where} works on the seed's one-value-per-ciphertext arrays (fractional encoding); "
                          f"this tensor is {x.encoding}-encoded: use {instead}")
        if x.ndim > 0:
            arr = x.to_numpy()
        else:
            arr = np.empty((), dtype=object)
            arr[()] = x
    else:
        arr = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
        if arr.dtype != object:
            raise HEError(f"{where} works on encrypted values (object arrays of PyCtxt), got an array of "
                          f"{arr.dtype}: encrypt it first (encrypt_matrix)")
    if arr.size == 0:
        raise HEError(f"{where}: empty array")
    bad = next((v for v in arr.flat if not isinstance(v, CipherTensor)), None)
    if bad is not None:
        raise HEError(f"{where} works on encrypted values (PyCtxt), got a {type(bad).__name__}: "
                      "encrypt the values first (encrypt_matrix)")
    if ndim is not None and arr.ndim != ndim:
        raise HEError(f"{where} takes a {ndim}-d array, got shape {list(arr.shape)}")
    return arr


def like_input(result: CipherTensor, x: Any) -> Any:
    """``result`` as the kind of thing ``x`` was: a CipherTensor for a
    CipherTensor, else the seed's object array of ``PyCtxt``."""
    if isinstance(x, CipherTensor):
        return result
    return result.to_numpy()
