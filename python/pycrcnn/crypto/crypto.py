"""The seed's matrix helpers: encrypt_matrix / decrypt_matrix / encode_matrix / decode_matrix.

``pycrcnn.crypto.crypto`` is the original PyCrCNN's module path; the package
``pycrcnn.crypto`` re-exports the same functions. They accept what PyCrCNN
passed them -- nested lists, numpy arrays, torch tensors, object arrays of
``PyCtxt`` / ``PyPtxt`` -- of any shape, and return a :class:`CipherTensor`
(encrypt: it indexes like the seed's object array, ``to_numpy()`` gives one),
an object array of ``PyPtxt`` (encode) or a float64 ndarray (decrypt, decode).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from .._engine import CipherTensor, HEError
from ..he import Context, Pyfhel, PyPtxt, context_of

__all__ = ["encrypt_matrix", "decrypt_matrix", "encode_matrix", "decode_matrix", "as_cipher_tensor", "as_numbers"]

HEType = Union[Pyfhel, Context]


def as_numbers(matrix: Any) -> np.ndarray:
    """A float64 array from numbers, nested lists, numpy, a torch tensor or an
    object array of ``PyPtxt`` (their values)."""
    if hasattr(matrix, "detach") and hasattr(matrix, "cpu"):  # a torch tensor, with or without grad
        matrix = matrix.detach().cpu().numpy()
    arr = np.asarray(matrix)
    if arr.dtype == object:
        if arr.size and all(isinstance(x, CipherTensor) for x in arr.flat):
            raise HEError("expected numbers or encoded values (PyPtxt), got ciphertexts: decrypt them first "
                          "(decrypt_matrix)")
        return decode_matrix(None, arr)
    return np.asarray(arr, dtype=np.float64)


def encrypt_matrix(HE: HEType, matrix: Any) -> CipherTensor:
    """Encrypts every value (fractional: one ciphertext each; batch: axis 0 in the slots)."""
    if isinstance(matrix, CipherTensor):
        return matrix
    if hasattr(matrix, "detach") and hasattr(matrix, "cpu"):  # a torch tensor
        matrix = matrix.detach().cpu().numpy()
    arr = np.asarray(matrix)
    if arr.dtype == object:
        if all(isinstance(x, PyPtxt) for x in arr.flat):
            arr = decode_matrix(HE, arr)
        else:
            return CipherTensor(arr)
    return context_of(HE).encrypt(np.asarray(arr, dtype=np.float64))


def as_cipher_tensor(x: Any) -> CipherTensor:
    """A CipherTensor from a CipherTensor or the seed's object array of PyCtxt."""
    if isinstance(x, CipherTensor):
        return x
    arr = np.asarray(x, dtype=object)
    if arr.size == 0:
        raise HEError("empty array of ciphertexts")
    return CipherTensor(arr)


def decrypt_matrix(HE: HEType, matrix: Any) -> np.ndarray:
    """Decrypts to a float64 array of the logical shape."""
    ctx = context_of(HE)
    try:
        t = as_cipher_tensor(matrix)
    except HEError:
        out = each_ciphertext(matrix, lambda c: float(ctx.decrypt(c)), np.float64)
        if out is None:
            raise
        return out
    return np.asarray(ctx.decrypt(t), dtype=np.float64)


def each_ciphertext(matrix: Any, f: Any, dtype: Any) -> Optional[np.ndarray]:
    """``f`` of every ciphertext of an object array whose ciphertexts cannot form
    one tensor (they sit at different modulus levels, as element-wise Pyfhel
    arithmetic can leave them); None if it holds anything but single ciphertexts."""
    arr = np.asarray(matrix, dtype=object)
    if arr.size == 0 or not all(isinstance(c, CipherTensor) and c.ndim == 0 for c in arr.flat):
        return None
    out = np.empty(arr.shape, dtype=dtype)
    for idx, c in np.ndenumerate(arr):
        out[idx] = f(c)
    return out


def encode_matrix(HE: HEType, matrix: Any) -> np.ndarray:
    """An object array of PyPtxt of the same shape (the engine encodes
    plaintexts where they are used: a PyPtxt carries its value)."""
    arr = as_numbers(matrix)
    out = np.empty(arr.shape, dtype=object)
    pyfhel = HE if isinstance(HE, Pyfhel) else None
    for idx, v in np.ndenumerate(arr):
        out[idx] = PyPtxt(v, pyfhel)
    return out


def decode_matrix(HE: Any, matrix: Any) -> np.ndarray:
    """Values of an array of PyPtxt (or numbers) as float64, same shape."""
    arr = np.asarray(matrix, dtype=object)
    out = np.empty(arr.shape, dtype=np.float64)
    for idx, v in np.ndenumerate(arr):
        out[idx] = v._pycrcnn_value if isinstance(v, PyPtxt) else float(v)
    return out
