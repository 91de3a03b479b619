"""Encryption helpers of the seed: ``encrypt_matrix``, ``decrypt_matrix``,
``encode_matrix``, ``decode_matrix`` (and ``as_cipher_tensor``).

The functions live in :mod:`pycrcnn.crypto.crypto`, the original PyCrCNN's
module path (``from pycrcnn.crypto.crypto import encrypt_matrix``); this
package re-exports them (``from pycrcnn.crypto import encrypt_matrix``).
"""
# the names the former module pycrcnn/crypto.py also held
from .._engine import CipherTensor, HEError
from ..he import Context, Pyfhel, PyPtxt, context_of
from .crypto import (
    HEType,
    as_cipher_tensor,
    as_numbers,
    decode_matrix,
    decrypt_matrix,
    encode_matrix,
    encrypt_matrix,
)

__all__ = ["encrypt_matrix", "decrypt_matrix", "encode_matrix", "decode_matrix", "as_cipher_tensor", "as_numbers"]
