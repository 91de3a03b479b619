"""Encrypted layers with the seed's names and signatures, callable as ``layer(x)``.

Each class holds an engine layer (Rust): the weights are encoded once, on
first use, and reused for every call. ``x`` is a :class:`CipherTensor` or the
seed's numpy object array of PyCtxt; the result is a CipherTensor.

As in the seed, ``layer.weights`` and ``layer.bias`` are object arrays of
encoded values (``PyPtxt``: ``HE.decodeFrac`` and ``decode_matrix`` read them
back); the float64 arrays the engine was given are ``layer.weight_values``
and ``layer.bias_values``. Weights may be given as numpy arrays, nested lists,
torch tensors or object arrays of ``PyPtxt``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ._engine import CipherTensor, Layer
from .crypto import as_cipher_tensor, as_numbers, encode_matrix
from .he import Context, Pyfhel, context_of

__all__ = ["EncryptedLayer", "ConvolutionalLayer", "Conv1dLayer", "LinearLayer", "AveragePoolLayer",
           "SquareLayer", "PolynomialLayer", "FlattenLayer", "RencryptionLayer"]

HEType = Union[Pyfhel, Context]


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _array(x: Any) -> Optional[np.ndarray]:
    return None if x is None else as_numbers(x)


class EncryptedLayer:
    """Base class: holds the engine layer and runs it."""

    _layer: Layer

    def __call__(self, x: Any) -> CipherTensor:
        return self._layer(as_cipher_tensor(x))

    @property
    def name(self) -> str:
        return self._layer.name

    @property
    def multiplies_ciphertexts(self) -> bool:
        return self._layer.multiplies_ciphertexts

    def output_shape(self, in_shape: Sequence[int]) -> list:
        """Shape of one output image for one input image's shape."""
        return self._layer.output_shape(list(in_shape))

    def describe(self) -> dict:
        return self._layer.describe()

    def __repr__(self) -> str:
        d = self.describe()
        args = ", ".join(f"{k}={v}" for k, v in d.items() if k != "type")
        return f"{type(self).__name__}({args})"


class _WeightedLayer(EncryptedLayer):
    """A layer with weights and an optional bias: ``weight_values`` /
    ``bias_values`` (float64, what the engine encodes) and the seed's
    ``weights`` / ``bias`` (object arrays of ``PyPtxt``, made on first access)."""

    weight_values: np.ndarray
    bias_values: Optional[np.ndarray]

    def _set_values(self, weights: Any, bias: Any) -> None:
        self.weight_values = _array(weights)
        self.bias_values = _array(bias)
        self._encoded: dict = {}

    def _encoded_values(self, what: str) -> Optional[np.ndarray]:
        values = getattr(self, f"{what}_values")
        if values is None:
            return None
        if what not in self._encoded:
            self._encoded[what] = encode_matrix(self.HE, values)
        return self._encoded[what]

    @property
    def weights(self) -> np.ndarray:
        """The weights as the seed held them: an object array of encoded values (PyPtxt)."""
        return self._encoded_values("weight")

    @weights.setter
    def weights(self, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__}.weights cannot be replaced: the engine layer holds the weights "
                             "it was built with; build a new layer with the new weights")

    @property
    def bias(self) -> Optional[np.ndarray]:
        """The bias as the seed held it: an object array of encoded values (PyPtxt), or None."""
        return self._encoded_values("bias")

    @bias.setter
    def bias(self, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__}.bias cannot be replaced: the engine layer holds the bias "
                             "it was built with; build a new layer with the new bias")


class ConvolutionalLayer(_WeightedLayer):
    """torch.nn.Conv2d on encrypted images: weights [out, in/groups, kh, kw].
    ``weight_scale_bits``: the layer's own weight scale (batch; default the context's)."""

    def __init__(self, HE: HEType, weights: Any, stride=(1, 1), padding=(0, 0), bias: Any = None,
                 dilation=(1, 1), groups: int = 1, weight_scale_bits: Optional[int] = None):
        self.HE = HE
        self._set_values(weights, bias)
        self.stride, self.padding, self.dilation, self.groups = _pair(stride), _pair(padding), _pair(dilation), int(groups)
        self._layer = Layer.conv2d(context_of(HE), self.weight_values, self.bias_values, self.stride, self.padding,
                                   self.dilation, self.groups, weight_scale_bits)


class Conv1dLayer(_WeightedLayer):
    """torch.nn.Conv1d on encrypted signals [N, C, L]: weights [out, in/groups, k]."""

    def __init__(self, HE: HEType, weights: Any, stride: int = 1, padding: int = 0, bias: Any = None,
                 dilation: int = 1, groups: int = 1, weight_scale_bits: Optional[int] = None):
        self.HE = HE
        self._set_values(weights, bias)
        self.stride, self.padding, self.dilation, self.groups = int(stride), int(padding), int(dilation), int(groups)
        self._layer = Layer.conv1d(context_of(HE), self.weight_values, self.bias_values, self.stride, self.padding,
                                   self.dilation, self.groups, weight_scale_bits)


class LinearLayer(_WeightedLayer):
    """torch.nn.Linear: weights [out, in]; each image is flattened first."""

    def __init__(self, HE: HEType, weights: Any, bias: Any = None, weight_scale_bits: Optional[int] = None):
        self.HE = HE
        self._set_values(weights, bias)
        self._layer = Layer.linear(context_of(HE), self.weight_values, self.bias_values, weight_scale_bits)


class AveragePoolLayer(EncryptedLayer):
    """torch.nn.AvgPool2d with count_include_pad=True (torch's default)."""

    def __init__(self, HE: HEType, kernel_size, stride=None, padding=(0, 0)):
        self.HE = HE
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)
        self._layer = Layer.avg_pool2d(context_of(HE), self.kernel_size, self.stride, self.padding)


class SquareLayer(EncryptedLayer):
    """x², the seed's activation."""

    def __init__(self, HE: HEType):
        self.HE = HE
        self._layer = Layer.square(context_of(HE))


class PolynomialLayer(EncryptedLayer):
    """Σ coefficients[k]·x^k, lowest degree first (e.g. [c, b, a] for a·x² + b·x + c)."""

    def __init__(self, HE: HEType, coefficients: Sequence[float]):
        self.HE = HE
        self.coefficients = [float(c) for c in _array(coefficients).ravel()]
        self._layer = Layer.polynomial(context_of(HE), self.coefficients)


class FlattenLayer(EncryptedLayer):
    """Flattens each image to one axis (torch.nn.Flatten)."""

    def __init__(self, HE: Optional[HEType] = None):
        self.HE = HE
        self._layer = None if HE is None else Layer.flatten(context_of(HE))

    def __call__(self, x: Any) -> CipherTensor:
        t = as_cipher_tensor(x)
        layer = self._layer if self._layer is not None else Layer.flatten(t.context)
        return layer(t)

    def describe(self) -> dict:
        return {"type": "Flatten"}

    def output_shape(self, in_shape: Sequence[int]) -> list:
        return [int(np.prod(in_shape))]

    @property
    def name(self) -> str:
        return "Flatten"

    @property
    def multiplies_ciphertexts(self) -> bool:
        return False


class RencryptionLayer(EncryptedLayer):
    """Decrypt and re-encrypt: a fresh noise budget. Needs the secret key; in the
    client/server protocol it is a round trip to the client."""

    def __init__(self, HE: HEType):
        self.HE = HE
        self._layer = Layer.rencryption(context_of(HE))
