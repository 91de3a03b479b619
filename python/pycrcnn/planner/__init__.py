"""Planning a model for encrypted inference: ``pycrcnn.plan(model, calibration_inputs, layout=...)``.

The planner chooses the parameters (m, moduli, plaintext primes) and the
scales of a model for a layout and returns a :class:`Plan`: the ready
``Context`` (``plan.context``; call ``keygen()``), a report per layer or
stage and ``plan.reference(x)``, the exact integers ``ctx.decrypt_integers``
returns. When nothing fits, :class:`PlanError` names the layer and what would
fix it.

Layouts: ``"batch"`` (one image per slot, the throughput layout,
:mod:`pycrcnn.planner.batch`) and ``"packed"`` (one image in the slots of a
few ciphertexts, the latency layout, :mod:`pycrcnn.planner.packed`).
"""
from __future__ import annotations

from typing import Any

from .plan import Plan, PlanError, context_from_plan, load_plan

__all__ = ["Plan", "PlanError", "plan", "context_from_plan", "load_plan", "LAYOUTS"]

#: the layouts :func:`plan` knows
LAYOUTS = ("batch", "packed")


def plan(model: Any, calibration_inputs: Any, *, layout: str = "batch", sec: int = 128, **options: Any) -> Plan:
    """Plans ``model`` (a ModelSpec, an ``nn.Sequential``, or a ``.pt``/``.npz``
    path) for ``layout`` with ``calibration_inputs`` (a float array ``[N, ...]``
    of typical inputs).

    ``layout="batch"`` takes the options of :func:`pycrcnn.planner.batch.plan_batch`
    (``input_range``, ``scale_bits``, ``weight_scale_bits`` (an int or one
    per Conv/Linear layer), ``min_agreement`` (predicted argmax agreement on
    unseen inputs, default 0.9995), ``mode`` ("worst-case" or "calibrated"
    with ``margin_bits``), ``noise_margin``, ``m``); ``layout="packed"`` those of
    :func:`pycrcnn.planner.packed.plan_packed`.
    """
    if layout == "batch":
        from .batch import plan_batch

        return plan_batch(model, calibration_inputs, sec=sec, **options)
    if layout == "packed":
        from .packed import plan_packed

        return plan_packed(model, calibration_inputs, sec=sec, **options)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
