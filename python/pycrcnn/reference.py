"""The plain forward pass of a :class:`~pycrcnn.spec.ModelSpec` in float64 numpy.

torch's semantics without torch: the reference an encrypted run is compared
with when torch is not installed (``ModelSpec.forward_numpy``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from .spec import LayerSpec

__all__ = ["forward_numpy"]


def forward_numpy(layers: Sequence["LayerSpec"], x: np.ndarray) -> np.ndarray:
    """Runs ``layers`` in order on a batch ``x`` (the batch axis first)."""
    y = np.asarray(x, dtype=np.float64)
    for layer in layers:
        y = _numpy_layer(layer, y)
    return y


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


def _numpy_layer(layer: "LayerSpec", x: np.ndarray) -> np.ndarray:
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

