"""What a server publishes of a saved plan, and the context a client makes from it.

A saved packed plan (``export_model(..., plan=plan)``) holds the model's
integer weights. A server publishes it without them (``GET /models/<name>``):
the client needs only the parameters, the scales, the shapes (which fix where
values sit in the slots and which rotation keys to make) and the rotation
steps. :func:`public_plan` strips the weights, keeping their shapes;
:func:`with_placeholder_weights` puts zeros of those shapes back, so that
``Context.from_plan(public)`` makes a context that packs, makes its keys and
decrypts exactly as one made from the whole plan (the layout depends on the
shapes only). Such a context cannot run the model or its ``reference``:
the server holds the weights.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

__all__ = ["public_plan", "is_public", "with_placeholder_weights"]


def public_plan(info: Dict[str, Any], layout: Dict[str, Any] = None) -> Dict[str, Any]:
    """``info`` without its weights (``weight_shapes`` instead) and, given the
    engine's ``layout`` of the plan, its rotation steps ``[[level, [steps]]]``,
    input ciphertexts per prime and classes."""
    out = {k: v for k, v in info.items() if k != "weights"}
    out["public"] = True
    out["weight_shapes"] = {k: list(np.shape(v)) for k, v in (info.get("weights") or {}).items()}
    if layout:
        out["rotation_steps"] = [[int(level), [int(s) for s in steps]] for level, steps in layout["rotation_needs"]]
        out["input_ciphertexts"] = int(layout["input_ciphertexts"])
        out["classes"] = int(layout["classes"])
    return out


def is_public(info: Dict[str, Any]) -> bool:
    """Whether ``info`` is a published plan (no weights)."""
    return isinstance(info, dict) and "weights" not in info and isinstance(info.get("weight_shapes"), dict)


def with_placeholder_weights(info: Dict[str, Any]) -> Dict[str, Any]:
    """A published plan with zero weights of the published shapes (a whole plan is returned as it is)."""
    if not is_public(info):
        return info
    shapes = info["weight_shapes"]
    if not all(isinstance(s, list) and all(isinstance(d, int) and 0 <= d <= 1 << 24 for d in s)
               for s in shapes.values()):
        from .._engine import FormatError

        raise FormatError(f"malformed published plan: weight_shapes {shapes!r}")
    zeros = {k: np.zeros(s, dtype=np.int64).tolist() for k, s in shapes.items()}
    return dict(info, weights=zeros)
