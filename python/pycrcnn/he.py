"""Contexts: the native :class:`Context` and the Pyfhel-2-compatible shim.

``Pyfhel`` reproduces the API the original PyCrCNN used (Pyfhel 2 with SEAL's
FractionalEncoder), so seed notebooks run after changing their imports. All
arithmetic runs in the Rust engine; ``Pyfhel`` only translates calls.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ._engine import CipherTensor, Context, HEError, ParameterError, PyCtxt

__all__ = ["Context", "Pyfhel", "PyCtxt", "PyPtxt", "context_of"]


class PyPtxt:
    """An encoded (not encrypted) value, as Pyfhel's PyPtxt.

    The engine encodes plaintexts where they are used (centred, at the
    ciphertext's level), so a PyPtxt only carries its value.
    """

    __slots__ = ("_pycrcnn_value", "_pyfhel")

    def __init__(self, value: float = 0.0, pyfhel: Optional["Pyfhel"] = None):
        v = float(value)
        if not math.isfinite(v):
            raise HEError(f"cannot encode {value!r}: only finite numbers")
        self._pycrcnn_value = v
        self._pyfhel = pyfhel

    @property
    def value(self) -> float:
        return self._pycrcnn_value

    def __float__(self) -> float:
        return self._pycrcnn_value

    def __repr__(self) -> str:
        return f"PyPtxt({self._pycrcnn_value!r})"


def context_of(HE: Union["Pyfhel", Context]) -> Context:
    """The engine Context behind a Pyfhel or Context."""
    if isinstance(HE, Context):
        return HE
    ctx = getattr(HE, "context", None)
    if isinstance(ctx, Context):
        return ctx
    raise HEError("expected a pycrcnn Context or a Pyfhel with a context (call contextGen first)")


def _ptxt_value(x: Any) -> float:
    return x._pycrcnn_value if isinstance(x, PyPtxt) else float(x)


class Pyfhel:
    """Pyfhel 2's API over the Rust engine (fractional encoding by default)."""

    def __init__(self) -> None:
        self.context: Optional[Context] = None

    # -- context and keys ------------------------------------------------------
    def contextGen(self, p: int, m: int = 2048, flagBatching: bool = False, base: int = 2, sec: int = 128,
                   intDigits: int = 64, fracDigits: int = 32) -> None:
        """Makes the context. ``flagBatching=True`` selects the batch (SIMD) encoding,
        whose ``p`` must be a prime ≡ 1 mod 2m (``p=None`` lets the engine pick)."""
        if flagBatching:
            # Pyfhel's batching encoded integers: no fixed-point scaling.
            self.context = Context(m=m, p=p, sec=sec, encoding="batch", scale_bits=0, weight_scale_bits=0)
        else:
            self.context = Context(m=m, p=p, sec=sec, encoding="fractional", base=base,
                                   int_digits=intDigits, frac_digits=fracDigits)

    def _ctx(self) -> Context:
        if self.context is None:
            raise HEError("call contextGen() first")
        return self.context

    def keyGen(self) -> None:
        """Generates secret, public and relinearization keys."""
        self._ctx().keygen()

    def relinKeyGen(self, bitCount: int = 20, size: int = 5) -> None:
        """Accepted for compatibility: keyGen already made the relinearization keys
        the engine needs (fhe.rs picks its own decomposition)."""
        if int(bitCount) <= 0 or int(size) <= 0:
            raise ParameterError("relinKeyGen takes positive bitCount and size")
        self._ctx()

    def getm(self) -> int:
        return self._ctx().m

    def getp(self) -> Any:
        return self._ctx().p

    def getsec(self) -> int:
        return self._ctx().sec

    def getbase(self) -> int:
        return self._ctx().parameters().get("base", 2)

    def getflagBatch(self) -> bool:
        return self._ctx().encoding == "batch"

    # -- encoding and encryption --------------------------------------------
    def encodeFrac(self, value: float) -> PyPtxt:
        return PyPtxt(value, self)

    def decodeFrac(self, ptxt: PyPtxt) -> float:
        return _ptxt_value(ptxt)

    def encryptFrac(self, value: float) -> PyCtxt:
        return self._ctx().encrypt(np.float64(value))

    def encryptPtxt(self, ptxt: PyPtxt) -> PyCtxt:
        return self.encryptFrac(_ptxt_value(ptxt))

    def decryptFrac(self, ctxt: PyCtxt) -> float:
        return float(self._ctx().decrypt(ctxt))

    def encryptInt(self, value: int) -> PyCtxt:
        return self.encryptFrac(float(int(value)))

    def decryptInt(self, ctxt: PyCtxt) -> int:
        return int(round(self.decryptFrac(ctxt)))

    def encodeInt(self, value: int) -> PyPtxt:
        return PyPtxt(int(value), self)

    def decodeInt(self, ptxt: PyPtxt) -> int:
        return int(round(_ptxt_value(ptxt)))

    def noiseLevel(self, ctxt: CipherTensor) -> int:
        """Remaining invariant noise budget in bits (needs the secret key)."""
        return self._ctx().noise_budget(ctxt)

    # -- arithmetic: in place on the first argument, as Pyfhel 2 --------------
    @staticmethod
    def _result(target: CipherTensor, value: CipherTensor, in_new_ctxt: bool) -> CipherTensor:
        if in_new_ctxt:
            return value
        target._assign(value)
        return target

    def add(self, ctxt: PyCtxt, ctxt_other: PyCtxt, in_new_ctxt: bool = False) -> PyCtxt:
        return self._result(ctxt, ctxt + ctxt_other, in_new_ctxt)

    def add_plain(self, ctxt: PyCtxt, ptxt: PyPtxt, in_new_ctxt: bool = False) -> PyCtxt:
        return self._result(ctxt, ctxt + _ptxt_value(ptxt), in_new_ctxt)

    def sub(self, ctxt: PyCtxt, ctxt_other: PyCtxt, in_new_ctxt: bool = False) -> PyCtxt:
        return self._result(ctxt, ctxt - ctxt_other, in_new_ctxt)

    def sub_plain(self, ctxt: PyCtxt, ptxt: PyPtxt, in_new_ctxt: bool = False) -> PyCtxt:
        return self._result(ctxt, ctxt - _ptxt_value(ptxt), in_new_ctxt)

    def negate(self, ctxt: PyCtxt, in_new_ctxt: bool = False) -> PyCtxt:
        return self._result(ctxt, -ctxt, in_new_ctxt)

    def multiply(self, ctxt: PyCtxt, ctxt_other: PyCtxt, in_new_ctxt: bool = False) -> PyCtxt:
        return self._result(ctxt, self._ctx().multiply(ctxt, ctxt_other), in_new_ctxt)

    def multiply_plain(self, ctxt: PyCtxt, ptxt: PyPtxt, in_new_ctxt: bool = False) -> PyCtxt:
        """Product with a plaintext; an encoded zero works (gives an encryption of 0)."""
        return self._result(ctxt, ctxt * _ptxt_value(ptxt), in_new_ctxt)

    def square(self, ctxt: PyCtxt, in_new_ctxt: bool = False) -> PyCtxt:
        return self._result(ctxt, self._ctx().square(ctxt), in_new_ctxt)

    def power(self, ctxt: PyCtxt, expo: int, in_new_ctxt: bool = False) -> PyCtxt:
        expo = int(expo)
        if expo < 1:
            raise HEError(f"power needs an exponent ≥ 1, got {expo}")
        result = ctxt
        for _ in range(expo - 1):
            result = self._ctx().multiply(result, ctxt)
        if expo == 1:
            result = ctxt + 0.0
        return self._result(ctxt, result, in_new_ctxt)

    def relinearize(self, ctxt: PyCtxt) -> PyCtxt:
        """Products are relinearized as they are made: nothing left to do."""
        return ctxt

    # -- keys and contexts on disk ----------------------------------------------
    def savesecretKey(self, fileName: Union[str, Path]) -> None:
        """Writes the whole context with its secret key. Keep the file private."""
        self._ctx().save_secret_key(str(fileName))

    def restoresecretKey(self, fileName: Union[str, Path]) -> None:
        self.context = Context.load_secret_key(str(fileName))

    def savepublicKey(self, fileName: Union[str, Path]) -> None:
        """Writes the public context (parameters, public and relinearization keys)."""
        Path(fileName).write_bytes(self._ctx().public_context())

    def restorepublicKey(self, fileName: Union[str, Path]) -> None:
        self.context = Context.from_public(Path(fileName).read_bytes())

    saveContext = savepublicKey
    restoreContext = restorepublicKey

    def __repr__(self) -> str:
        return f"<Pyfhel over pycrcnn: {self.context!r}>"
