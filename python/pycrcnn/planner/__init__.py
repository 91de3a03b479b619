"""Planning a model for encrypted inference: ``pycrcnn.plan(model, calibration_inputs, layout=...)``.

The planner chooses the parameters (m, moduli, plaintext primes) and the
scales of a model for a layout and returns a :class:`Plan`: the ready
``Context`` (``plan.context``, holding the plan; call ``keygen()``), a report
per stage and ``plan.reference(x)``, the exact integers decryption returns.

Layouts: ``"packed"`` (one image in the slots of a few ciphertexts: the
latency layout, :mod:`pycrcnn.planner.packed`).
"""
from __future__ import annotations

from typing import Any

from .plan import Plan, context_from_plan, load_plan

__all__ = ["Plan", "plan", "context_from_plan", "load_plan"]

LAYOUTS = ("packed",)


def plan(model: Any, calibration_inputs: Any, *, layout: str = "batch", sec: int = 128, **options: Any) -> Plan:
    """Plans ``model`` (an ``nn.Sequential``, a ``.pt``/``.npz`` path or a
    :class:`~pycrcnn.spec.ModelSpec`) for ``layout`` with ``calibration_inputs``
    (``[N, C, H, W]`` real inputs the scales are chosen for)."""
    if layout == "packed":
        from .packed import plan_packed

        return plan_packed(model, calibration_inputs, sec=sec, **options)
    raise ValueError(f"layout must be one of {LAYOUTS} in this build, got {layout!r}")
