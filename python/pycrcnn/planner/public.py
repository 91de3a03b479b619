"""What a server publishes of a saved plan, and the context a client makes from it.

A saved packed plan (``export_model(..., plan=plan)``) holds the model's
integer weights. A server publishes it without them (``GET /models/<name>``):
the client needs only the parameters, the scales, the shapes (which fix where
values sit in the slots and which rotation keys to make) and the rotation
steps. :func:`public_plan` replaces every weight array by its shape and every
sparse map (a dict with ``values``, as the hidden maps of deeper plans) by
its pattern (its ``values`` and ``bias`` dropped, their lengths kept);
:func:`with_placeholder_weights` fills them back with ones (and zero biases),
so that ``Context.from_plan(public)`` makes a context that packs, makes its
keys and decrypts exactly as one made from the whole plan: the layout
depends on the shapes and the sparsity patterns only (a pattern is kept
because a layout may skip zero diagonals; ones keep it). Such a context
cannot compute the model or its ``reference``: the server holds the weights.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

__all__ = ["public_plan", "is_public", "with_placeholder_weights"]

#: entries of a sparse map that hold weights (dropped; their lengths are published)
_SPARSE_WEIGHTS = ("values", "bias")


def _redact(value: Any) -> Dict[str, Any]:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = []
        for m in value:
            kept = {k: v for k, v in m.items() if k not in _SPARSE_WEIGHTS}
            kept.update({f"n_{k}": len(m[k]) for k in _SPARSE_WEIGHTS if k in m})
            out.append(kept)
        return {"sparse": out}
    return {"shape": [int(d) for d in np.shape(value)]}


def _placeholder(published: Any) -> Any:
    from .._engine import FormatError

    if not isinstance(published, dict):
        raise FormatError(f"malformed published plan: weights entry {published!r}")
    if "shape" in published:
        shape = published["shape"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d <= 1 << 24 for d in shape)
                and int(np.prod(shape, dtype=np.float64)) <= 1 << 26):
            raise FormatError(f"malformed published plan: weight shape {shape!r}")
        return np.ones(shape, dtype=np.int64).tolist()
    out = []
    for m in published.get("sparse", []):
        if not isinstance(m, dict):
            raise FormatError(f"malformed published plan: sparse map {m!r}")
        m = dict(m)
        for k in _SPARSE_WEIGHTS:
            n = m.pop(f"n_{k}", None)
            if n is not None:
                if not isinstance(n, int) or not 0 <= n <= 1 << 26:
                    raise FormatError(f"malformed published plan: n_{k}={n!r}")
                m[k] = [1 if k == "values" else 0] * n
        out.append(m)
    return out


def public_plan(info: Dict[str, Any], layout: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``info`` without its weights (``weights_published``: shapes and sparsity
    patterns) and, given the engine's ``layout`` of the plan, its rotation
    steps ``[[level, [steps]]]``, input ciphertexts per prime and classes."""
    out = {k: v for k, v in info.items() if k != "weights"}
    out["public"] = True
    out["weights_published"] = {k: _redact(v) for k, v in (info.get("weights") or {}).items()}
    if layout:
        out["rotation_steps"] = [[int(level), [int(s) for s in steps]] for level, steps in layout["rotation_needs"]]
        out["input_ciphertexts"] = int(layout["input_ciphertexts"])
        out["classes"] = int(layout["classes"])
    return out


def is_public(info: Dict[str, Any]) -> bool:
    """Whether ``info`` is a published plan (no weights)."""
    return isinstance(info, dict) and "weights" not in info and isinstance(info.get("weights_published"), dict)


def with_placeholder_weights(info: Dict[str, Any]) -> Dict[str, Any]:
    """A published plan with placeholder weights of the published shapes and
    patterns (a whole plan is returned as it is)."""
    if not is_public(info):
        return info
    return dict(info, weights={k: _placeholder(v) for k, v in info["weights_published"].items()})
