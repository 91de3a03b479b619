"""The seed's matrix helpers: encrypt_matrix / decrypt_matrix / encode_matrix / decode_matrix.

They accept the nested lists and numpy arrays PyCrCNN used and return a
:class:`CipherTensor` (encrypt) or a float64 ndarray (decrypt, decode).
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np

from ._engine import CipherTensor, HEError
from .he import Context, Pyfhel, PyPtxt, context_of

__all__ = ["encrypt_matrix", "decrypt_matrix", "encode_matrix", "decode_matrix", "as_cipher_tensor"]

HEType = Union[Pyfhel, Context]


def encrypt_matrix(HE: HEType, matrix: Any) -> CipherTensor:
    """Encrypts every value (fractional: one ciphertext each; batch: axis 0 in the slots)."""
    if isinstance(matrix, CipherTensor):
        return matrix
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
    return np.asarray(context_of(HE).decrypt(as_cipher_tensor(matrix)), dtype=np.float64)


def encode_matrix(HE: HEType, matrix: Any) -> np.ndarray:
    """An object array of PyPtxt (plaintexts are encoded where they are used)."""
    arr = np.asarray(matrix, dtype=np.float64)
    out = np.empty(arr.shape, dtype=object)
    pyfhel = HE if isinstance(HE, Pyfhel) else None
    for idx, v in np.ndenumerate(arr):
        out[idx] = PyPtxt(v, pyfhel)
    return out


def decode_matrix(HE: HEType, matrix: Any) -> np.ndarray:
    """Values of an array of PyPtxt as float64."""
    arr = np.asarray(matrix, dtype=object)
    out = np.empty(arr.shape, dtype=np.float64)
    for idx, v in np.ndenumerate(arr):
        out[idx] = v._pycrcnn_value if isinstance(v, PyPtxt) else float(v)
    return out
