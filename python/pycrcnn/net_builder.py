"""From a trained model to encrypted layers: ``build_from_pytorch`` and a torch-free model format.

Three steps, each usable on its own:

1. **Describe** the model without torch: :func:`spec_from_torch` turns an
   ``nn.Sequential`` (or a ``.pt`` path) into a :class:`ModelSpec` — a list of
   :class:`LayerSpec` (torch module index, type, parameters, weights as numpy
   arrays). BatchNorm is folded into the Conv/Linear layer before it, Dropout
   and Identity are dropped (inference), and modules that cannot run on
   encrypted data (ReLU, MaxPool2d, Tanh, ...) are recorded as unsupported:
   they only matter if the part of the network you build contains them.
2. **Store** it without pickles: :func:`export_model` writes one ``.npz`` (the
   arrays plus a JSON description); :func:`load_model_spec` reads it back with
   ``np.load(allow_pickle=False)`` — no torch needed, nothing executed.
3. **Encode** it for a context: :func:`build_from_spec` / :func:`build_from_pytorch`
   return an :class:`EncodedModel`, a ``list`` of encrypted layers (the seed's
   ``for layer in layers: x = layer(x)`` works) that is also callable.

Layer indices are always **torch module indices** (positions in the
``nn.Sequential``), also after slicing, folding or dropping modules.

Rencryption positions are torch module indices too: a :class:`RencryptionLayer`
(decrypt + encrypt afresh, which restores the noise budget and, in the batch
encoding, the input scale) is inserted **before** the module with that index.
``rencrypt_positions=[3]`` on LeNet-1 means "rencrypt the output of module 2,
then run module 3".

Example::

    from pycrcnn import Pyfhel, build_from_pytorch, encrypt_matrix, decrypt_matrix
    HE = Pyfhel(); HE.contextGen(p=953983721, m=4096); HE.keyGen()
    model = build_from_pytorch(HE, "LeNet1_Approx_single_square.pt")
    logits = decrypt_matrix(HE, model(encrypt_matrix(HE, image), debug=True))
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._engine import CipherTensor, FormatError, HEError, layer_output_shape
from .crypto import as_cipher_tensor
from .he import Context, Pyfhel, context_of
from .layers import (
    AveragePoolLayer,
    Conv1dLayer,
    ConvolutionalLayer,
    FlattenLayer,
    LinearLayer,
    PolynomialLayer,
    RencryptionLayer,
    SquareLayer,
)

__all__ = [
    "LayerSpec",
    "ModelSpec",
    "UnsupportedLayerError",
    "EncodedModel",
    "spec_from_torch",
    "export_model",
    "load_model_spec",
    "build_from_spec",
    "build_from_pytorch",
    "SUPPORTED_TYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

HEType = Union[Pyfhel, Context]
PathLike = Union[str, "os.PathLike[str]"]

#: layer types an EncodedModel can run
SUPPORTED_TYPES = ("Conv2d", "Conv1d", "Linear", "AvgPool2d", "Flatten", "Square", "Polynomial")
#: the ``format`` field of exported models
FORMAT_NAME = "pycrcnn-model"
#: the version of the exported format this module writes (and the newest it reads)
FORMAT_VERSION = 1

_ACTIVATION_ALTERNATIVE = (
    "pycrcnn.nn.Square or pycrcnn.nn.Polynomial (a polynomial activation) in its place, then retrain"
)
_ALTERNATIVES = {
    "ReLU": _ACTIVATION_ALTERNATIVE, "ReLU6": _ACTIVATION_ALTERNATIVE, "LeakyReLU": _ACTIVATION_ALTERNATIVE,
    "PReLU": _ACTIVATION_ALTERNATIVE, "RReLU": _ACTIVATION_ALTERNATIVE, "ELU": _ACTIVATION_ALTERNATIVE,
    "SELU": _ACTIVATION_ALTERNATIVE, "CELU": _ACTIVATION_ALTERNATIVE, "GELU": _ACTIVATION_ALTERNATIVE,
    "SiLU": _ACTIVATION_ALTERNATIVE, "Mish": _ACTIVATION_ALTERNATIVE, "Tanh": _ACTIVATION_ALTERNATIVE,
    "Sigmoid": _ACTIVATION_ALTERNATIVE, "Hardtanh": _ACTIVATION_ALTERNATIVE, "Hardsigmoid": _ACTIVATION_ALTERNATIVE,
    "Hardswish": _ACTIVATION_ALTERNATIVE, "Softplus": _ACTIVATION_ALTERNATIVE, "Softsign": _ACTIVATION_ALTERNATIVE,
    "Tanhshrink": _ACTIVATION_ALTERNATIVE, "LogSigmoid": _ACTIVATION_ALTERNATIVE, "Threshold": _ACTIVATION_ALTERNATIVE,
    "MaxPool1d": "AvgPool2d (average pooling is linear; max is not)",
    "MaxPool2d": "AvgPool2d (average pooling is linear; max is not)",
    "MaxPool3d": "AvgPool2d (average pooling is linear; max is not)",
    "AdaptiveMaxPool2d": "AvgPool2d with a fixed kernel and stride",
    "AdaptiveAvgPool2d": "AvgPool2d with a fixed kernel and stride (the input size is fixed anyway)",
    "Softmax": "nothing: leave it out of the encrypted part and apply softmax after decrypting (argmax is unchanged)",
    "LogSoftmax": "nothing: leave it out of the encrypted part and apply it after decrypting (argmax is unchanged)",
}
_DEFAULT_ALTERNATIVE = "HE-friendly modules: Conv2d, Conv1d, Linear, AvgPool2d, Flatten, pycrcnn.nn.Square, pycrcnn.nn.Polynomial"
_DROPPED = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout", "Identity")


class UnsupportedLayerError(HEError):
    """A module that cannot run on encrypted data is part of the network to build.

    The message names the torch module index, the module and the HE-friendly
    alternative. Attributes: ``index``, ``module`` (its repr), ``alternative``.
    """

    def __init__(self, message: str, index: Optional[int] = None, module: Optional[str] = None,
                 alternative: Optional[str] = None):
        super().__init__(message)
        self.index = index
        self.module = module
        self.alternative = alternative


# ---------------------------------------------------------------------------
# the torch-free model description


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


_TUPLE_PARAMS = ("kernel_size", "stride", "padding", "dilation")


def _params_from_json(params: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(params)
    for k in _TUPLE_PARAMS:
        if isinstance(out.get(k), list):
            out[k] = tuple(int(x) for x in out[k])
    return out


@dataclass
class LayerSpec:
    """One torch module, described without torch.

    ``index`` is the module's index in the ``nn.Sequential``; ``type`` one of
    :data:`SUPPORTED_TYPES` or ``"Unsupported"`` (then ``params`` holds
    ``module``, ``class``, ``reason`` and ``alternative``); ``weight`` and
    ``bias`` are float64 arrays in torch's layout (BatchNorm already folded in,
    see ``params["folded_batchnorm"]``).
    """

    index: int
    type: str
    params: Dict[str, Any] = field(default_factory=dict)
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None

    @property
    def supported(self) -> bool:
        return self.type in SUPPORTED_TYPES

    @property
    def end_index(self) -> int:
        """The last torch index this layer stands for (its folded BatchNorm, if any)."""
        return int(self.params.get("folded_batchnorm", self.index))

    def error(self) -> UnsupportedLayerError:
        """The error building this (unsupported) layer raises."""
        p = self.params
        module = p.get("module", self.type)
        reason = p.get("reason") or "it cannot run on encrypted data (BFV evaluates only additions and multiplications)"
        alt = p.get("alternative", _DEFAULT_ALTERNATIVE)
        return UnsupportedLayerError(
            f"layer {self.index} ({module}) is not supported: {reason}. Use {alt}. "
            f"To run only the layers before it, pass layers=[first, ..., {self.index - 1}].",
            index=self.index, module=module, alternative=alt)

    def output_shape(self, in_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of one output for the shape of one input, by the engine's
        rules; raises if the input does not fit (or the layer is unsupported)."""
        if not self.supported:
            raise self.error()
        try:
            return tuple(layer_output_shape(self.type, [int(s) for s in in_shape], self.params))
        except HEError as exc:
            raise type(exc)(f"layer {self.index}: {exc}") from None

    def describe(self) -> Dict[str, Any]:
        d = {"index": self.index, "type": self.type, "params": _jsonable(self.params)}
        if self.weight is not None:
            d["weight_shape"] = list(self.weight.shape)
        return d

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"LayerSpec({self.index}, {self.type}{', ' + args if args else ''})"


@dataclass
class ModelSpec:
    """A sequential network without torch: what :func:`export_model` stores.

    ``layers`` are in order, each with its torch module index (dropped modules
    leave gaps). ``input_shape`` is the shape of one input (e.g. ``(1, 28, 28)``)
    when known; ``normalization`` says how raw data becomes inputs;
    ``rencrypt_positions`` are the torch indices before which the model should be
    rencrypted (used when building without explicit positions).
    """

    name: str = "model"
    input_shape: Optional[Tuple[int, ...]] = None
    layers: List[LayerSpec] = field(default_factory=list)
    normalization: Optional[str] = None
    rencrypt_positions: List[int] = field(default_factory=list)
    accuracy: Optional[float] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    #: the number of modules of the source network (torch indices run 0 .. n_modules-1)
    n_modules: Optional[int] = None

    @property
    def indices(self) -> List[int]:
        return [layer.index for layer in self.layers]

    @property
    def unsupported(self) -> List[LayerSpec]:
        return [layer for layer in self.layers if not layer.supported]

    def check_supported(self) -> None:
        """Raises :class:`UnsupportedLayerError` for the first unsupported layer."""
        bad = self.unsupported
        if bad:
            raise bad[0].error()

    def index_range(self, layers: Any = None) -> Tuple[int, int]:
        """``[start, stop)`` torch indices selected by ``layers`` (see :meth:`select`)."""
        last = (self.n_modules - 1) if self.n_modules else (max(self.indices) if self.layers else -1)
        if layers is None:
            return 0, last + 1
        if isinstance(layers, slice):
            start, stop, step = layers.indices(last + 1)
            if step != 1:
                raise HEError(f"layers: a slice with step {step}; only consecutive layers can be selected")
            sel = list(range(start, stop))
        elif isinstance(layers, (int, np.integer)):
            sel = [int(layers)]
        else:
            try:
                sel = [int(i) for i in layers]
            except (TypeError, ValueError):
                raise HEError(f"layers must be a list or range of torch module indices, got {layers!r}") from None
        if not sel:
            raise HEError("layers: empty selection")
        start, stop = min(sel), max(sel) + 1
        if start < 0 or stop - 1 > last:
            raise HEError(f"layers {layers!r}: torch module indices must lie in 0..{last} for {self.name!r}")
        return start, stop

    def select(self, layers: Any = None) -> "ModelSpec":
        """The sub-network of the torch indices ``layers``.

        ``layers`` is ``None`` (everything), a list of indices, a ``range`` or a
        ``slice``; as in the seed's requests, a list selects the consecutive
        modules from its smallest to its largest index (``[0, 3]`` = 0, 1, 2, 3).
        A BatchNorm folded into a layer must be selected together with it.
        """
        start, stop = self.index_range(layers)
        chosen = []
        for layer in self.layers:
            inside, bn_inside = start <= layer.index < stop, start <= layer.end_index < stop
            if inside != bn_inside:
                raise HEError(
                    f"layers {start}..{stop - 1}: module {layer.index} ({layer.type}) and the BatchNorm at "
                    f"{layer.end_index} folded into it must be selected together")
            if inside:
                chosen.append(layer)
        if not chosen:
            raise HEError(f"layers {start}..{stop - 1} of {self.name!r} hold no layer to run (only dropped modules)")
        return ModelSpec(name=self.name, input_shape=self.input_shape if start == 0 else None, layers=chosen,
                         normalization=self.normalization if start == 0 else None,
                         rencrypt_positions=[p for p in self.rencrypt_positions if start < p < stop],
                         accuracy=self.accuracy if (start, stop) == self.index_range() else None,
                         metadata=dict(self.metadata, selected=[start, stop - 1]), n_modules=self.n_modules)

    def describe(self) -> List[Dict[str, Any]]:
        return [layer.describe() for layer in self.layers]

    def output_shape(self, in_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of one output for the shape of one input (checks every layer's input)."""
        shape = tuple(int(s) for s in in_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:
        """The plain forward pass in float64 numpy with torch's semantics: the
        reference when torch is not installed."""
        y = np.asarray(x, dtype=np.float64)
        for layer in self.layers:
            y = _numpy_layer(layer, y)
        return y

    def __repr__(self) -> str:
        body = "\n".join(f"  ({l.index}): {l.type} {_jsonable(l.params)}" for l in self.layers)
        return f"ModelSpec({self.name!r}, input_shape={self.input_shape}\n{body}\n)"


# ---------------------------------------------------------------------------
# numpy reference forward


def _conv_nd(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray], stride, padding, dilation, groups) -> np.ndarray:
    """Cross-correlation as torch computes it, for 1 or 2 spatial dimensions."""
    nd = w.ndim - 2
    pads = [(0, 0), (0, 0)] + [(p, p) for p in padding]
    xp = np.pad(x, pads)
    n, cin = x.shape[:2]
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    out_sz = [(xp.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    out = np.zeros((n, cout, *out_sz), dtype=np.float64)
    cout_g = cout // groups
    for g in range(groups):
        xs = xp[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * cout_g:(g + 1) * cout_g]
        for pos in np.ndindex(*k):
            sl = tuple(slice(pos[i] * dilation[i], pos[i] * dilation[i] + stride[i] * (out_sz[i] - 1) + 1, stride[i])
                       for i in range(nd))
            patch = xs[(slice(None), slice(None)) + sl]
            wk = ws[(slice(None), slice(None)) + pos]
            out[:, g * cout_g:(g + 1) * cout_g] += np.einsum("nc...,oc->no...", patch, wk)
    if b is not None:
        out += b.reshape((1, cout) + (1,) * nd)
    return out


def _numpy_layer(layer: LayerSpec, x: np.ndarray) -> np.ndarray:
    p, t = layer.params, layer.type
    layer.output_shape(x.shape[1:])  # the engine's shape checks, before any numpy error
    if t == "Conv2d":
        return _conv_nd(x, layer.weight, layer.bias, p["stride"], p["padding"], p["dilation"], p["groups"])
    if t == "Conv1d":
        return _conv_nd(x, layer.weight, layer.bias, p["stride"], p["padding"], p["dilation"], p["groups"])
    if t == "Linear":
        y = x.reshape(x.shape[0], -1) @ layer.weight.T
        return y + layer.bias if layer.bias is not None else y
    if t == "AvgPool2d":
        (kh, kw) = p["kernel_size"]
        c = x.shape[1]
        w = np.zeros((c, 1, kh, kw))
        w[:] = 1.0 / (kh * kw)  # count_include_pad: padded zeros count
        return _conv_nd(x, w, None, p["stride"], p["padding"], (1, 1), c)
    if t == "Flatten":
        return x.reshape(x.shape[0], -1)
    if t == "Square":
        return x * x
    if t == "Polynomial":
        c = p["coefficients"]
        y = np.full_like(x, c[-1])
        for ck in reversed(c[:-1]):
            y = y * x + ck
        return y
    raise layer.error()


# ---------------------------------------------------------------------------
# torch -> spec


def _pair(v: Any, n: int = 2) -> Tuple[int, ...]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    t = tuple(int(x) for x in v)
    return t * n if len(t) == 1 and n > 1 else t


def _np(t: Any) -> Optional[np.ndarray]:
    if t is None:
        return None
    return np.array(t.detach().cpu().double().numpy(), dtype=np.float64)


def _unsupported(index: int, module: Any, reason: Optional[str] = None, alternative: Optional[str] = None) -> LayerSpec:
    cls = type(module).__name__
    params = {"module": repr(module).replace("\n", " "), "class": cls,
              "alternative": alternative or _ALTERNATIVES.get(cls, _DEFAULT_ALTERNATIVE)}
    if reason:
        params["reason"] = reason
    return LayerSpec(index, "Unsupported", params)


def _conv_padding(index: int, module: Any, nd: int) -> Union[Tuple[int, ...], LayerSpec]:
    pad = module.padding
    k, d = _pair(module.kernel_size, nd), _pair(module.dilation, nd)
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * nd
        total = [d[i] * (k[i] - 1) for i in range(nd)]
        if any(t % 2 for t in total):
            return _unsupported(index, module, "padding='same' with an even kernel pads asymmetrically",
                                "an odd kernel size or explicit symmetric padding")
        return tuple(t // 2 for t in total)
    return _pair(pad, nd)


def _module_spec(index: int, module: Any) -> Optional[LayerSpec]:
    """A LayerSpec for one torch module (None: dropped)."""
    import torch.nn as tnn

    cls = type(module).__name__
    if cls in _DROPPED:
        return None
    if isinstance(module, (tnn.Conv2d, tnn.Conv1d)) and type(module) in (tnn.Conv2d, tnn.Conv1d):
        nd = 2 if isinstance(module, tnn.Conv2d) else 1
        if module.padding_mode != "zeros":
            return _unsupported(index, module, f"padding_mode={module.padding_mode!r}", "padding_mode='zeros'")
        pad = _conv_padding(index, module, nd)
        if isinstance(pad, LayerSpec):
            return pad
        params = {
            "in_channels": int(module.in_channels), "out_channels": int(module.out_channels),
            "kernel_size": _pair(module.kernel_size, nd), "stride": _pair(module.stride, nd),
            "padding": pad, "dilation": _pair(module.dilation, nd), "groups": int(module.groups),
            "bias": module.bias is not None,
        }
        return LayerSpec(index, "Conv2d" if nd == 2 else "Conv1d", params, _np(module.weight), _np(module.bias))
    if type(module) is tnn.Linear:
        params = {"in_features": int(module.in_features), "out_features": int(module.out_features),
                  "bias": module.bias is not None}
        return LayerSpec(index, "Linear", params, _np(module.weight), _np(module.bias))
    if type(module) is tnn.AvgPool2d:
        k = _pair(module.kernel_size)
        s = _pair(module.stride) if module.stride is not None else k
        pad = _pair(module.padding)
        if module.ceil_mode:
            return _unsupported(index, module, "ceil_mode=True (partial windows at the border) is not supported",
                                "AvgPool2d with ceil_mode=False, or padding chosen so the windows fit")
        if not module.count_include_pad and any(pad):
            return _unsupported(index, module,
                                "count_include_pad=False divides border windows by a data-dependent count",
                                "AvgPool2d with count_include_pad=True (torch's default), or padding=0")
        if getattr(module, "divisor_override", None):
            return _unsupported(index, module, "divisor_override is not supported",
                                "AvgPool2d without divisor_override")
        return LayerSpec(index, "AvgPool2d", {"kernel_size": k, "stride": s, "padding": pad})
    if type(module) is tnn.Flatten:
        if module.start_dim != 1 or module.end_dim != -1:
            return _unsupported(index, module, "only Flatten(start_dim=1, end_dim=-1) (per image) is supported",
                                "nn.Flatten() with its defaults")
        return LayerSpec(index, "Flatten", {})
    if cls == "Square":
        # pycrcnn.nn.Square, and the seed's own `class Square` (pickled as __main__.Square)
        return LayerSpec(index, "Square", {})
    if cls == "Polynomial" and hasattr(module, "coefficients"):
        coeffs = [float(c) for c in np.asarray(_np(module.coefficients)).ravel()]
        if len(coeffs) < 2 or all(c == 0.0 for c in coeffs[1:]):
            return _unsupported(index, module, "a polynomial of degree 0 is a constant, not an activation",
                                "a polynomial of degree ≥ 1")
        return LayerSpec(index, "Polynomial", {"coefficients": coeffs})
    if isinstance(module, (tnn.Sequential, tnn.ModuleList)):
        return _unsupported(index, module, "a nested container", "a flat nn.Sequential (nn.Sequential(*modules))")
    return _unsupported(index, module)


def _fold_batchnorm(prev: LayerSpec, index: int, bn: Any) -> Optional[str]:
    """Folds BatchNorm ``bn`` (torch index ``index``) into ``prev`` in place; returns a reason if impossible."""
    if bn.running_mean is None or bn.running_var is None:
        return "a BatchNorm without running statistics (track_running_stats=False) uses batch statistics"
    n_out = prev.params.get("out_channels", prev.params.get("out_features"))
    if bn.num_features != n_out:
        return f"{bn.num_features} features after a layer with {n_out} outputs"
    if type(bn).__name__ == "BatchNorm2d" and prev.type != "Conv2d":
        return "BatchNorm2d after a layer that is not a Conv2d"
    if type(bn).__name__ == "BatchNorm1d" and prev.type not in ("Conv1d", "Linear"):
        return "BatchNorm1d after a layer that is not a Conv1d or Linear"
    mean, var = _np(bn.running_mean), _np(bn.running_var)
    gamma = _np(bn.weight) if bn.weight is not None else np.ones_like(mean)
    beta = _np(bn.bias) if bn.bias is not None else np.zeros_like(mean)
    factor = gamma / np.sqrt(var + float(bn.eps))
    w = prev.weight * factor.reshape((-1,) + (1,) * (prev.weight.ndim - 1))
    b = prev.bias if prev.bias is not None else np.zeros_like(mean)
    prev.weight = w
    prev.bias = (b - mean) * factor + beta
    prev.params["bias"] = True
    prev.params["folded_batchnorm"] = index
    return None


def _info_for(path: Path) -> Dict[str, Any]:
    """models.json metadata when ``path`` is a shipped model."""
    try:
        from .models import INFO, MODELS_DIR
    except Exception:  # noqa: BLE001 - metadata is optional
        return {}
    for name, info in INFO.items():
        try:
            if (MODELS_DIR / info["file"]).resolve() == path.resolve():
                return dict(info, name=name)
        except (KeyError, OSError):
            continue
    return {}


def spec_from_torch(net: Any, layers: Any = None, name: Optional[str] = None,
                    input_shape: Optional[Sequence[int]] = None) -> ModelSpec:
    """Describes an ``nn.Sequential`` (or a model file for :func:`pycrcnn.models.load_torch_model`).

    Conv2d/Conv1d (stride, padding incl. 'valid'/'same', dilation, groups),
    Linear, AvgPool2d, Flatten, ``Square`` (any module class of that name: the
    seed's and :class:`pycrcnn.nn.Square`) and :class:`pycrcnn.nn.Polynomial`
    are converted; BatchNorm1d/2d right after a Conv/Linear is folded into it
    (``w' = w·γ/√(var+ε)``, ``b' = (b−mean)·γ/√(var+ε)+β``); Dropout and Identity
    are dropped. Anything else is recorded as unsupported (building raises
    :class:`UnsupportedLayerError` only if it is selected). ``layers`` selects a
    sub-network (see :meth:`ModelSpec.select`).
    """
    info: Dict[str, Any] = {}
    if isinstance(net, (str, os.PathLike)):
        from .models import load_torch_model

        path = Path(net)
        info = _info_for(path)
        name = name or info.get("name") or path.stem
        net = load_torch_model(path)
    import torch.nn as tnn

    if isinstance(net, (list, tuple)):
        net = tnn.Sequential(*net)
    if not isinstance(net, tnn.Sequential):
        raise HEError(
            f"build_from_pytorch needs an nn.Sequential (or a path to one), got {type(net).__name__}: the order "
            "of a custom module's forward() cannot be read; wrap its modules in nn.Sequential")
    specs: List[LayerSpec] = []
    last: Optional[LayerSpec] = None  # the previous kept layer, if nothing but dropped modules since
    modules = list(net)
    for i, module in enumerate(modules):
        cls = type(module).__name__
        if cls in ("BatchNorm1d", "BatchNorm2d"):
            if last is not None and last.type in ("Conv2d", "Conv1d", "Linear") and "folded_batchnorm" not in last.params:
                reason = _fold_batchnorm(last, i, module)
            else:
                reason = "BatchNorm is folded into the Conv/Linear layer right before it, and there is none"
            if reason:
                specs.append(_unsupported(i, module, reason,
                                          "BatchNorm directly after a Conv2d/Conv1d/Linear (it is then folded into it)"))
                last = specs[-1]
            continue
        spec = _module_spec(i, module)
        if spec is None:
            continue
        specs.append(spec)
        last = spec
    if input_shape is None and info.get("input_shape"):
        input_shape = info["input_shape"]
    model = ModelSpec(
        name=name or "model",
        input_shape=tuple(int(s) for s in input_shape) if input_shape is not None else None,
        layers=specs,
        normalization=info.get("normalization"),
        accuracy=info.get("test_accuracy"),
        metadata={k: info[k] for k in ("description", "dataset") if k in info},
        n_modules=len(modules),
    )
    return model.select(layers) if layers is not None else model


# ---------------------------------------------------------------------------
# the .npz format


def export_model(net_or_spec: Any, path: PathLike, *, name: Optional[str] = None,
                 input_shape: Optional[Sequence[int]] = None, normalization: Optional[str] = None,
                 rencrypt_positions: Optional[Sequence[int]] = None, accuracy: Optional[float] = None,
                 metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Writes a model as one ``.npz``: float64 arrays ``layer<i>_weight`` /
    ``layer<i>_bias`` and ``__spec__``, a JSON string with the architecture and
    metadata (``format``, ``version``, ``name``, ``input_shape``,
    ``normalization``, ``rencrypt_positions``, ``accuracy``, ``layers``). No
    pickled objects: :func:`load_model_spec` reads it with
    ``np.load(allow_pickle=False)`` and without torch. Keyword arguments
    override the spec's metadata. Returns the path written.
    """
    spec = net_or_spec if isinstance(net_or_spec, ModelSpec) else spec_from_torch(net_or_spec)
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    arrays: Dict[str, np.ndarray] = {}
    layers_json = []
    for k, layer in enumerate(spec.layers):
        entry = {"index": int(layer.index), "type": layer.type, "params": _jsonable(layer.params),
                 "weight": None, "bias": None}
        for what in ("weight", "bias"):
            arr = getattr(layer, what)
            if arr is not None:
                key = f"layer{k}_{what}"
                arrays[key] = np.ascontiguousarray(arr, dtype=np.float64)
                entry[what] = key
        layers_json.append(entry)
    shape = input_shape if input_shape is not None else spec.input_shape
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": name or spec.name,
        "input_shape": [int(s) for s in shape] if shape is not None else None,
        "normalization": normalization if normalization is not None else spec.normalization,
        "rencrypt_positions": [int(p) for p in (rencrypt_positions if rencrypt_positions is not None
                                                else spec.rencrypt_positions)],
        "accuracy": accuracy if accuracy is not None else spec.accuracy,
        "n_modules": spec.n_modules,
        "metadata": _jsonable(dict(spec.metadata, **(metadata or {}))),
        "layers": layers_json,
    }
    arrays["__spec__"] = np.array(json.dumps(doc))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _spec_from_npz(path: Path) -> ModelSpec:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise FormatError(f"{path}: not a readable .npz model file ({exc})") from None
    with npz:
        if "__spec__" not in npz.files:
            raise FormatError(f"{path}: no __spec__ entry; not a model written by pycrcnn.export_model")
        try:
            doc = json.loads(str(npz["__spec__"][()]))
        except (ValueError, TypeError) as exc:
            raise FormatError(f"{path}: __spec__ is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                              f"expected {FORMAT_NAME!r}")
        if not isinstance(doc.get("version"), int) or doc["version"] > FORMAT_VERSION or doc["version"] < 1:
            raise FormatError(f"{path}: format version {doc.get('version')!r}; this pycrcnn reads 1..{FORMAT_VERSION}")
        layers = []
        try:
            for entry in doc["layers"]:
                arrs = {}
                for what in ("weight", "bias"):
                    key = entry.get(what)
                    if key is None:
                        arrs[what] = None
                    elif key not in npz.files:
                        raise FormatError(f"{path}: array {key!r} of layer {entry['index']} is missing")
                    else:
                        arrs[what] = np.asarray(npz[key], dtype=np.float64)
                ltype = str(entry["type"])
                if ltype not in SUPPORTED_TYPES and ltype != "Unsupported":
                    raise FormatError(f"{path}: unknown layer type {ltype!r} at index {entry['index']}")
                layers.append(LayerSpec(int(entry["index"]), ltype, _params_from_json(entry.get("params") or {}),
                                        arrs["weight"], arrs["bias"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: malformed layer description ({exc!r})") from None
    spec = ModelSpec(
        name=str(doc.get("name") or path.stem),
        input_shape=tuple(int(s) for s in doc["input_shape"]) if doc.get("input_shape") else None,
        layers=layers,
        normalization=doc.get("normalization"),
        rencrypt_positions=[int(p) for p in doc.get("rencrypt_positions") or []],
        accuracy=doc.get("accuracy"),
        metadata=dict(doc.get("metadata") or {}),
        n_modules=doc.get("n_modules"),
    )
    # shapes of the weights against the parameters, so a bad file fails here and not in the engine
    for layer in spec.layers:
        _check_weights(layer, path)
    return spec


def _check_weights(layer: LayerSpec, where: Any) -> None:
    p, w, t = layer.params, layer.weight, layer.type
    expected = None
    try:
        if t == "Conv2d":
            expected = (p["out_channels"], p["in_channels"] // p["groups"], *p["kernel_size"])
        elif t == "Conv1d":
            expected = (p["out_channels"], p["in_channels"] // p["groups"], *p["kernel_size"])
        elif t == "Linear":
            expected = (p["out_features"], p["in_features"])
        elif t == "Polynomial" and not p.get("coefficients"):
            raise FormatError(f"{where}: layer {layer.index} (Polynomial) has no coefficients")
    except KeyError as exc:
        raise FormatError(f"{where}: layer {layer.index} ({t}) lacks parameter {exc}") from None
    if expected is not None:
        if w is None or tuple(w.shape) != tuple(expected):
            raise FormatError(f"{where}: layer {layer.index} ({t}) weight shape "
                              f"{None if w is None else list(w.shape)}, expected {list(expected)}")
        if layer.bias is not None and layer.bias.shape != (expected[0],):
            raise FormatError(f"{where}: layer {layer.index} ({t}) bias shape {list(layer.bias.shape)}, "
                              f"expected [{expected[0]}]")


def load_model_spec(path: PathLike, layers: Any = None) -> ModelSpec:
    """Reads a model description: ``.npz`` from :func:`export_model` (no torch
    needed) or a ``.pt``/``.pth`` pickle (needs torch; only load files you trust,
    see :func:`pycrcnn.models.load_torch_model`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    if p.suffix == ".npz":
        spec = _spec_from_npz(p)
    elif p.suffix in (".pt", ".pth"):
        spec = spec_from_torch(p)
    else:
        raise FormatError(f"{p}: unknown model file type {p.suffix!r}; expected .npz (export_model) or .pt/.pth")
    return spec.select(layers) if layers is not None else spec


# ---------------------------------------------------------------------------
# encoding for a context


def _encode_layer(HE: HEType, layer: LayerSpec):
    p, t = layer.params, layer.type
    if t == "Conv2d":
        return ConvolutionalLayer(HE, layer.weight, stride=p["stride"], padding=p["padding"], bias=layer.bias,
                                  dilation=p["dilation"], groups=p["groups"])
    if t == "Conv1d":
        return Conv1dLayer(HE, layer.weight, stride=p["stride"][0], padding=p["padding"][0], bias=layer.bias,
                           dilation=p["dilation"][0], groups=p["groups"])
    if t == "Linear":
        return LinearLayer(HE, layer.weight, layer.bias)
    if t == "AvgPool2d":
        return AveragePoolLayer(HE, p["kernel_size"], p["stride"], p["padding"])
    if t == "Flatten":
        return FlattenLayer(HE)
    if t == "Square":
        return SquareLayer(HE)
    if t == "Polynomial":
        return PolynomialLayer(HE, p["coefficients"])
    raise layer.error()


def _copies(probe: CipherTensor, image_shape: Sequence[int], fractional: bool) -> CipherTensor:
    """A tensor of one image whose every element is the probe's ciphertext."""
    element = probe.to_numpy().reshape(-1)[0]
    arr = np.empty(int(np.prod(image_shape)), dtype=object)
    for i in range(arr.size):
        arr[i] = element
    return CipherTensor(arr.reshape(((1,) if fractional else ()) + tuple(image_shape)))


def _single(t: CipherTensor) -> CipherTensor:
    """The one element of a one-element result, as a probe."""
    return t.to_numpy().reshape(-1)[0]


def _worst_row(w: np.ndarray) -> int:
    return int(np.abs(w.reshape(w.shape[0], -1)).sum(axis=1).argmax())


def _probe_layer(ctx: Context, layer: Any, probe: CipherTensor, fractional: bool) -> CipherTensor:
    """``layer``'s worst output element computed from copies of ``probe``."""
    spec = layer.spec
    if spec is None:
        return ctx.rencrypt(probe)
    t, w, b = spec.type, spec.weight, spec.bias
    if t in ("Conv2d", "Conv1d", "Linear"):
        o = _worst_row(w)
        bias = None if b is None else b[o:o + 1]
        if t == "Linear":
            enc, shape = LinearLayer(ctx, w[o:o + 1], bias), (w.shape[1],)
        elif t == "Conv2d":
            enc, shape = ConvolutionalLayer(ctx, w[o:o + 1], bias=bias), tuple(w.shape[1:])
        else:
            enc, shape = Conv1dLayer(ctx, w[o:o + 1], bias=bias), tuple(w.shape[1:])
        return _single(enc(_copies(probe, shape, fractional)))
    if t == "AvgPool2d":
        k = spec.params["kernel_size"]
        k = (k, k) if isinstance(k, int) else tuple(k)
        return _single(AveragePoolLayer(ctx, k)(_copies(probe, (1,) + k, fractional)))
    if t == "Square":
        return ctx.square(probe)
    if t == "Polynomial":
        return ctx.polynomial(probe, [float(c) for c in spec.params["coefficients"]])
    return probe  # Flatten: nothing happens to the values


class EncodedModel(list):
    """Encrypted layers in order: a ``list`` (``for layer in model: x = layer(x)``
    works as in the seed) that is also callable, ``model(x, debug=False, progress=False)``.

    Every element has ``torch_index`` (its module's index; a rencryption layer
    has the index of the module it precedes) and ``spec`` (its
    :class:`LayerSpec`, ``None`` for rencryption).

    Attributes: ``HE`` and ``context``; ``spec`` (the selected :class:`ModelSpec`);
    ``specs``; ``rencrypt_positions``; ``last_report`` (a list of per-layer dicts
    of the last call: ``index``, ``name``, ``seconds``, ``shape``, ``growth`` and,
    with ``debug``, ``noise_budget``).
    """

    def __init__(self, HE: HEType, spec: ModelSpec, rencrypt_positions: Sequence[int] = ()):
        super().__init__()
        self.HE = HE
        self.context = context_of(HE)
        self.spec = spec
        self.rencrypt_positions = sorted({int(p) for p in rencrypt_positions})
        self.last_report: List[Dict[str, Any]] = []
        indices = spec.indices
        first, last = min(indices), max(indices)
        for p in self.rencrypt_positions:
            if not first <= p <= last:
                raise HEError(f"rencrypt position {p} is outside the model's torch indices {first}..{last} "
                              "(a rencryption is inserted before the module with that index)")
        pending = list(self.rencrypt_positions)
        for layer in spec.layers:
            while pending and pending[0] <= layer.index:
                r = RencryptionLayer(HE)
                r.torch_index, r.spec = pending.pop(0), None
                self.append(r)
            enc = _encode_layer(HE, layer)
            enc.torch_index, enc.spec = layer.index, layer
            self.append(enc)

    # -- description -----------------------------------------------------------
    @property
    def specs(self) -> List[LayerSpec]:
        return list(self.spec.layers)

    @property
    def indices(self) -> List[int]:
        return [getattr(layer, "torch_index", None) for layer in self]

    def segments(self) -> List[Tuple[int, int]]:
        """``[start, stop)`` torch-index ranges between rencryption positions:
        what a server runs between two round trips to the client."""
        idx = self.spec.indices
        bounds = [min(idx)] + [p for p in self.rencrypt_positions if p > min(idx)] + [max(idx) + 1]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if a < b]

    def describe(self) -> List[Dict[str, Any]]:
        """One dict per element: ``index``, ``type``, ``params`` (and ``weight_shape``)."""
        return [{"index": layer.torch_index, "type": "Rencryption", "params": {}} if layer.spec is None
                else layer.spec.describe() for layer in self]

    def output_shape(self, in_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of one output for the shape of one input."""
        return self.spec.output_shape(in_shape)

    def __repr__(self) -> str:
        body = ",\n".join(f"  ({l.torch_index}) {l!r}" for l in self)
        return f"EncodedModel([\n{body}\n])"

    # -- prediction ---------------------------------------------------------------
    def plan(self, input_bound: float = 1.0) -> List[Dict[str, Any]]:
        """Predicts, before running, whether the model fits the parameters.

        Runs each layer's worst output element on a *probe*: one ciphertext
        of ``input_bound`` standing for every input, combined by the output
        with the largest Σ|w| (so copies add up coherently: a conservative
        estimate). Costs milliseconds to seconds instead of a full pass and
        needs the secret key (the client chooses parameters). Returns one dict
        per layer: ``index``, ``name``, ``noise_budget`` (predicted bits
        left), ``growth`` (the engine's bound against p/2 or T/2) and ``ok``;
        on the first layer that would fail, ``error`` says why, and nothing
        after it is listed.
        """
        ctx = self.context
        if not ctx.has_secret_key:
            raise HEError("plan() measures noise on probe ciphertexts and needs the secret key")
        fractional = ctx.encoding == "fractional"
        probe = ctx.encrypt(np.float64(input_bound) if fractional else np.array([float(input_bound)]))
        plan: List[Dict[str, Any]] = []
        for layer in self:
            entry: Dict[str, Any] = {"index": layer.torch_index, "name": layer.name}
            try:
                probe = _probe_layer(ctx, layer, probe, fractional)
                entry["noise_budget"] = int(ctx.noise_budget(probe))
                entry["growth"] = dict(probe.growth_report())
                entry["ok"] = entry["noise_budget"] > 0 and (fractional or entry["growth"]["fits"])
                if entry["noise_budget"] <= 0:
                    entry["error"] = "noise budget exhausted"
            except HEError as exc:
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            plan.append(entry)
            if not entry["ok"]:
                break
        return plan

    # -- running --------------------------------------------------------------
    def _input(self, x: Any) -> CipherTensor:
        if isinstance(x, np.ndarray) and x.dtype != object:
            raise HEError("the model runs on encrypted data: encrypt the input first "
                          "(encrypt_matrix(HE, x) or context.encrypt(x))")
        t = as_cipher_tensor(x)
        if self.spec.input_shape is not None:
            got = tuple(t.shape[1:])
            if got != tuple(self.spec.input_shape):
                raise HEError(f"{self.spec.name}: expects inputs [N, {', '.join(map(str, self.spec.input_shape))}], "
                              f"got {list(t.shape)}")
        return t

    def _run(self, x: CipherTensor, layers: List[Any], debug: bool, progress: bool) -> CipherTensor:
        report: List[Dict[str, Any]] = []
        self.last_report = report
        fractional = x.encoding == "fractional"
        ctx = x.context  # the keys the data was encrypted under (a layer serves any key)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(layers), desc=self.spec.name, unit="layer", leave=False)
        try:
            owned = False  # the caller's tensor is never consumed, our intermediates may be
            for layer in layers:
                name = layer.name
                t0 = time.perf_counter()
                try:
                    x = layer._consume(x) if owned else layer(x)
                    owned = True
                except HEError as exc:
                    report.append({"index": layer.torch_index, "name": name, "error": str(exc),
                                   "error_type": type(exc).__name__})
                    raise _annotated(exc, layer) from exc
                seconds = time.perf_counter() - t0
                entry: Dict[str, Any] = {"index": layer.torch_index, "name": name, "seconds": seconds,
                                         "shape": list(x.shape)}
                try:
                    entry["growth"] = dict(x.growth_report())
                except Exception:  # noqa: BLE001 - informative only
                    pass
                if debug:
                    if ctx.has_secret_key:
                        entry["noise_budget"] = int(ctx.noise_budget(x))
                    _print_debug(entry, fractional)
                report.append(entry)
                if bar is not None:
                    bar.set_postfix_str(f"{layer.torch_index}:{name}")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return x

    def __call__(self, x: Any, debug: bool = False, progress: bool = False) -> CipherTensor:
        """Runs every layer (rencryptions included: they need the secret key)."""
        return self._run(self._input(x), list(self), debug, progress)

    def run_range(self, x: Any, start: int, stop: int, debug: bool = False, progress: bool = False,
                  rencrypt: bool = False) -> CipherTensor:
        """Runs the layers whose torch index is in ``[start, stop)``.

        Rencryption layers are skipped unless ``rencrypt=True``: between two
        :meth:`segments` the key holder rencrypts (on a server, that is the round
        trip to the client), so a server calls ``run_range`` once per segment.
        """
        chosen = [l for l in self if start <= l.torch_index < stop and (rencrypt or l.spec is not None)]
        if not any(l.spec is not None for l in chosen):
            raise HEError(f"no layer with a torch index in [{start}, {stop}); this model has {self.spec.indices}")
        t = as_cipher_tensor(x) if start > self.spec.indices[0] else self._input(x)
        return self._run(t, chosen, debug, progress)


def _annotated(exc: Exception, layer: Any) -> Exception:
    """The same exception type with the layer named first."""
    msg = f"layer {layer.torch_index} ({layer.name}): {exc}"
    try:
        new = type(exc)(msg)
    except Exception:  # noqa: BLE001
        return exc
    for attr in ("index", "module", "alternative"):
        if hasattr(exc, attr):
            setattr(new, attr, getattr(exc, attr))
    return new


def _print_debug(entry: Dict[str, Any], fractional: bool) -> None:
    parts = [f"[{entry['index']:>3}] {entry['name']:<12}", f"{entry['seconds']:8.3f} s",
             f"shape {entry['shape']}"]
    if "noise_budget" in entry:
        parts.append(f"noise budget {entry['noise_budget']} bits")
    g = entry.get("growth")
    if g:
        what = "coeff bound" if fractional else "value bound"
        parts.append(f"{what} {g['coeff_bound']:.3g} vs {'p/2' if fractional else 'T/2'} {g['limit']:.3g}"
                     + ("" if g["fits"] else f" (WRAP POSSIBLE: error up to {g['wrap_error_bound']:.3g})"))
    print("  ".join(parts), file=sys.stdout, flush=True)


def build_from_spec(HE: HEType, spec: Union[ModelSpec, PathLike], layers: Any = None,
                    rencrypt_positions: Optional[Sequence[int]] = None) -> EncodedModel:
    """Encodes a :class:`ModelSpec` (or a model file) for ``HE`` (a Pyfhel or Context).

    ``layers`` selects a sub-network by torch indices; ``rencrypt_positions``
    (torch indices, a rencryption before each; default: the spec's own) must
    lie inside it. Raises :class:`UnsupportedLayerError` if the selection holds
    a module that cannot run encrypted.
    """
    if not isinstance(spec, ModelSpec):
        spec = load_model_spec(spec)
    if layers is not None:
        spec = spec.select(layers)
    if not spec.layers:
        raise HEError(f"{spec.name!r} has no layer to run (only dropped modules such as Dropout/Identity)")
    spec.check_supported()
    positions = spec.rencrypt_positions if rencrypt_positions is None else list(rencrypt_positions)
    return EncodedModel(HE, spec, positions)


def build_from_pytorch(HE: HEType, net: Any, rencrypt_positions: Sequence[int] = (), layers: Any = None) -> EncodedModel:
    """The seed's builder: encrypted layers of an ``nn.Sequential`` (or a ``.pt``
    / ``.npz`` path, or a :class:`ModelSpec`) for a Pyfhel or Context.

    ``rencrypt_positions`` are torch module indices: a :class:`RencryptionLayer`
    is inserted **before** each. ``layers`` selects a sub-network (torch indices,
    e.g. ``[0, 1, 2]`` or ``range(0, 3)``); ``net[0:3]`` works as well.
    """
    if isinstance(net, ModelSpec):
        spec = net
    elif isinstance(net, (str, os.PathLike)) and Path(net).suffix == ".npz":
        spec = load_model_spec(net)
    else:
        spec = spec_from_torch(net)
    return build_from_spec(HE, spec, layers=layers, rencrypt_positions=list(rencrypt_positions or []))
