"""From torch to a :class:`~pycrcnn.spec.ModelSpec`: :func:`spec_from_torch`.

Conv2d/Conv1d, Linear, AvgPool2d, Flatten and the polynomial activations
become layers; BatchNorm right after a Conv/Linear is folded into it, Dropout
and Identity are dropped (inference), and modules that cannot run on
encrypted data (ReLU, MaxPool2d, Tanh, ...) are recorded as unsupported,
naming the module and the HE-friendly alternative: they only matter if the
part of the network you build contains them.

Importing this module does not import torch; :func:`spec_from_torch` does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._engine import HEError
from .spec import DEFAULT_ALTERNATIVE, LayerSpec, ModelSpec

__all__ = ["spec_from_torch"]

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
_DROPPED = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout", "Identity")


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
              "alternative": alternative or _ALTERNATIVES.get(cls, DEFAULT_ALTERNATIVE)}
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


def as_model_spec(model: Any) -> ModelSpec:
    """The :class:`ModelSpec` of ``model``: a ModelSpec, a shipped model's
    name, a ``.npz`` export, a ``.pt`` file or a torch module (the last two
    import torch)."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str) and not Path(model).exists():
        from .models import INFO, shipped_model_path

        if model in INFO:  # a shipped model's name: its torch-free twin
            model = shipped_model_path(model, "npz")
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix == ".npz":
        from .spec import load_model_spec

        return load_model_spec(model)
    return spec_from_torch(model)
