"""``"encryption_parameters": "auto"`` in the parameter tester's JSON and the client's ``parameters.json``.

The client uses the plan the server publishes for the model where there is
one (servers do not publish plans yet), else plans locally from the model
file (``model_path``, or a shipped model named by ``net``), else says what
is missing. Calibration: 256 MNIST training digits (the bundled sample when
MNIST is not found), inputs in [0, 1] (``pycrcnn.datasets.normalize``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from .plan import Plan

__all__ = ["is_auto", "calibration_digits", "plan_from_config", "auto_test"]

#: the input range of normalized pixels
PIXEL_RANGE = (0.0, 1.0)


def is_auto(params: Any) -> bool:
    """True for ``"auto"`` (or ``["auto"]``)."""
    if isinstance(params, list) and len(params) == 1:
        params = params[0]
    return isinstance(params, str) and params.strip().lower() == "auto"


def calibration_digits(n: int = 256) -> np.ndarray:
    """``n`` normalized MNIST training digits (the bundled sample if MNIST is not found)."""
    from .. import datasets

    try:
        images, _ = datasets.load_mnist(split="train", limit=n)
    except FileNotFoundError:
        images, _ = datasets.sample_digits(limit=n)
    return datasets.normalize(images).astype(np.float64)


def plan_from_config(config: Dict[str, Any]) -> Plan:
    """The plan for a config whose parameters are ``"auto"``: planned from
    ``model_path`` or the shipped model named by ``net``."""
    from .. import plan
    from ..models import INFO, shipped_model_path

    model = config.get("model_path")
    if model is None:
        net = str(config.get("net", "")).lower()
        names = {k.lower(): k for k in INFO}
        if net in names:
            model = shipped_model_path(names[net])
    if model is None or not Path(str(model)).exists():
        raise ValueError('"encryption_parameters": "auto" needs a plan: the server publishes none for '
                         f"{config.get('net')!r}, and there is no local model file to plan from: set 'model_path' "
                         "to the model's .pt or .npz (or name a shipped model in 'net')")
    return plan(str(model), calibration_digits(), input_range=PIXEL_RANGE)


def auto_test(spec: Any, x: np.ndarray, labels: Optional[np.ndarray], reference_out: np.ndarray) -> Dict[str, Any]:
    """The parameter tester's result for ``"auto"``: plan, run the images
    encrypted in one batch, compare with the plan's exact reference and the
    float model."""
    from .. import plan

    t0 = time.perf_counter()
    result: Dict[str, Any] = {"encryption_parameters": "auto", "status": "ok", "error": None}
    try:
        p = plan(spec, x, input_range=PIXEL_RANGE)
        ctx = p.context
        ctx.keygen()
        model = p.model(ctx)
        t = ctx.encrypt(x)
        y, reports = model.run(t, measure_noise=True)
        ints = ctx.decrypt_integers(y)
        exact = np.array_equal(np.asarray(ints).astype(object), np.asarray(p.reference(x)).astype(object))
        values = p.decode(ints)
        result.update(
            planned=p.parameters, plan_report=p.report, notes=p.notes, exact=bool(exact),
            argmax_equal=bool(np.array_equal(np.argmax(values, -1), np.argmax(reference_out, -1))),
            final_max_error=float(np.max(np.abs(values - reference_out))),
            layers=[{"index": r["index"], "layer_name": r["name"], "min_noise": r.get("noise_budget"),
                     "seconds": r["seconds"]} for r in reports])
        if not exact:
            result["status"] = "mismatch"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        result.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      failed_layer={"index": getattr(exc, "layer", None), "layer_name": getattr(exc, "layer_name", None)})
    result["seconds"] = time.perf_counter() - t0
    return result
