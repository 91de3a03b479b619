"""The :class:`Plan` a planner returns, and contexts made from a saved plan."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from .._engine import Context, FormatError, HEError

__all__ = ["Plan", "PlanError", "context_from_plan", "load_plan"]

PLAN_FORMAT = "pycrcnn-plan"


class PlanError(HEError):
    """No parameters fit the model. ``layer`` / ``layer_name`` name the layer
    where the plaintext range or the noise budget runs out; ``fix`` says what
    would make it fit."""

    def __init__(self, message: str, layer: Optional[int] = None, layer_name: Optional[str] = None,
                 fix: Optional[str] = None):
        super().__init__(message)
        self.layer = layer
        self.layer_name = layer_name
        self.fix = fix


class Plan:
    """A model planned for a layout.

    ``context``: a :class:`Context` with the chosen parameters, holding the plan
    (``keygen()`` makes the keys it needs). ``report``: one dict per stage
    (``stage``, ``bits`` used by the values against the plaintext range,
    ``noise_budget`` predicted, ``rotations``). ``info``: a JSON-able dict with
    everything needed to make a matching context elsewhere
    (:func:`context_from_plan`), saved with ``export_model(..., plan=plan)``.
    ``reference(x)`` evaluates the planned integer arithmetic in plaintext:
    ``ctx.decrypt_integers(ctx_result)`` equals it exactly.
    """

    def __init__(self, layout: str, context: Context, report: List[Dict[str, Any]], info: Dict[str, Any],
                 reference: Callable[[Any], np.ndarray]):
        self.layout = layout
        self.context = context
        self.report = report
        self.info = info
        self._reference = reference

    def reference(self, x: Any) -> np.ndarray:
        """The exact output integers for ``x`` (object array of Python ints)."""
        return self._reference(x)

    def __repr__(self) -> str:
        return f"Plan(layout={self.layout!r}, context={self.context!r}, stages={[r['stage'] for r in self.report]})"


def context_from_plan(info: Dict[str, Any]) -> Context:
    """A context (without keys) matching a saved plan, or the plan a server
    publishes without the weights (``GET /models/<name>``, see
    :mod:`pycrcnn.planner.public`): what a client makes from it."""
    if not isinstance(info, dict) or info.get("format") != PLAN_FORMAT:
        raise FormatError("not a pycrcnn plan (format field missing or wrong)")
    if info.get("layout") == "packed":
        from .packed import context_from_packed_info
        from .public import with_placeholder_weights

        return context_from_packed_info(with_placeholder_weights(info))
    if info.get("layout") == "batch":
        from .batch_plan import batch_context

        return batch_context(info["parameters"])
    raise FormatError(f"plan layout {info.get('layout')!r} is not supported by this build")


def load_plan(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The plan saved in a model's ``.npz`` (``export_model(..., plan=plan)``), or None."""
    with np.load(Path(path), allow_pickle=False) as npz:
        if "__plan__" not in npz.files:
            return None
        try:
            return json.loads(str(npz["__plan__"][()]))
        except ValueError as exc:
            raise FormatError(f"{path}: __plan__ is not valid JSON ({exc})") from None
