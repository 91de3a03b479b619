"""What a ``/compute`` request asks for, checked before anything is parsed
from its blobs: its ``encryption_parameters`` against the public context
(which is authoritative) and its ``layers`` (a range of torch indices).
Errors are :class:`ApiError` (the server answers them with their status).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from ._engine import Context

__all__ = ["ApiError", "check_parameters", "parse_layers"]

#: ``encryption_parameters`` keys compared with the public context (aliases of the seed's names)
_PARAM_ALIASES = {
    "m": "m", "p": "p", "sec": "sec", "encoding": "encoding", "base": "base",
    "int_digits": "int_digits", "intDigits": "int_digits",
    "frac_digits": "frac_digits", "fracDigits": "frac_digits",
    "scale_bits": "scale_bits", "weight_scale_bits": "weight_scale_bits", "moduli": "moduli",
    "n_plaintext_moduli": "n_plaintext_moduli",
}


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def check_parameters(requested: Any, ctx: Context) -> List[str]:
    """Compares the seed's ``encryption_parameters`` with the public context
    (which is authoritative). Raises ApiError(400) on a disagreement; returns
    the keys that were ignored."""
    if requested is None:
        return []
    if isinstance(requested, list):
        if not requested:
            return []
        requested = requested[0]
    if not isinstance(requested, dict):
        raise ApiError(400, "encryption_parameters must be a list of objects like "
                            '[{"m": 4096, "p": 953983721, "sec": 128, "base": 2}] (the first one is used)')
    actual = ctx.parameters()
    ignored: List[str] = []
    for key, want in requested.items():
        name = _PARAM_ALIASES.get(key)
        if name is None:
            ignored.append(key)
            continue
        if want is None:
            continue
        if name == "n_plaintext_moduli":
            have: Any = len(actual["p"]) if isinstance(actual["p"], list) else 1
        elif name not in actual:
            raise ApiError(
                400, f"encryption_parameters: {key!r} does not apply to the {actual['encoding']} encoding of the "
                     f"public context (its parameters: {_param_summary(actual)})")
        else:
            have = actual[name]
        if not _same_param(want, have):
            raise ApiError(
                400, f"encryption_parameters disagree with the public context, which is authoritative: "
                     f"{key}={want!r} requested, the public context has {have!r} "
                     f"({_param_summary(actual)})")
    return ignored


def _same_param(want: Any, have: Any) -> bool:
    if isinstance(want, bool):
        return False
    if isinstance(have, list):
        if isinstance(want, (int, float)) and len(have) == 1:
            want = [want]
        if not isinstance(want, list) or len(want) != len(have):
            return False
        return all(_same_param(w, h) for w, h in zip(want, have))
    if isinstance(have, str) or isinstance(want, str):
        return str(want).lower() == str(have).lower()
    if isinstance(want, (int, float)) and isinstance(have, (int, float)):
        return float(want) == float(have)
    return False


def _param_summary(p: Dict[str, Any]) -> str:
    keys = ["m", "p", "sec", "encoding", "base", "int_digits", "frac_digits", "scale_bits", "weight_scale_bits"]
    return ", ".join(f"{k}={p[k]}" for k in keys if k in p)


def parse_layers(layers: Any, spec: Any, name: str) -> Tuple[int, int]:
    """``[start, stop)`` from the seed's ``layers`` (None = all; a list selects
    its smallest through its largest torch index, which must be consecutive)."""
    n_modules = spec.n_modules if spec.n_modules else max(spec.indices) + 1
    if layers is None:
        return 0, n_modules
    if isinstance(layers, bool) or not isinstance(layers, list) or not layers:
        raise ApiError(400, f"layers must be null (all layers) or a non-empty list of torch module indices, "
                            f"got {layers!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ApiError(400, f"layers must hold integers (torch module indices), got {layers!r}")
    idx = sorted(set(layers))
    if idx[0] < 0 or idx[-1] >= n_modules:
        raise ApiError(400, f"layers {layers!r}: model {name!r} has torch module indices 0..{n_modules - 1}")
    if idx != list(range(idx[0], idx[-1] + 1)):
        raise ApiError(400, f"layers {layers!r}: the indices must be consecutive (a range of the network), "
                            f"e.g. {list(range(idx[0], idx[-1] + 1))}")
    return idx[0], idx[-1] + 1
