"""Automatic encryption parameters: :func:`plan` and :class:`Plan`.

``plan = pycrcnn.plan(model, calibration_inputs, layout="batch", sec=128)``
chooses the input and weight scales, the plaintext prime(s) (CRT), the
polynomial degree m and the ciphertext moduli that keep every layer inside
the plaintext range and the noise budget at the least predicted cost, and
returns a :class:`Plan`: ``plan.context`` (a Context ready for ``keygen()``),
``plan.report`` (per layer: plaintext bits used, noise budget predicted,
seconds predicted) and ``plan.reference(x)`` (the model in the engine's exact
integer arithmetic). When nothing fits, :class:`PlanError` names the layer
and what would fix it.
"""
from __future__ import annotations

from typing import Any

from .plan import Plan, PlanError

__all__ = ["Plan", "PlanError", "plan", "LAYOUTS"]

#: the layouts :func:`plan` knows
LAYOUTS = ("batch", "packed")


def plan(model: Any, calibration_inputs: Any, *, layout: str = "batch", sec: int = 128, **options: Any) -> Plan:
    """Plans encryption parameters for ``model`` (a ModelSpec, an
    ``nn.Sequential``, or a ``.pt``/``.npz`` path) and ``calibration_inputs``
    (a float array ``[N, ...]`` of typical inputs).

    ``layout="batch"`` (one image per slot, the throughput layout) takes the
    options of :func:`pycrcnn.planner.batch.plan_batch`: ``input_range``
    (worst-case bounds: no wrap for any input in it; default the calibration
    inputs' min and max), ``scale_bits``,
    ``weight_scale_bits``, ``min_agreement``, ``noise_margin``, ``m``.
    """
    if layout == "batch":
        from .batch import plan_batch

        return plan_batch(model, calibration_inputs, sec=sec, **options)
    if layout == "packed":
        raise NotImplementedError('layout="packed" is not available yet (the packed single-image layout, issue 9); '
                                  'use layout="batch"')
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
