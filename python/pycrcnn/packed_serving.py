"""The packed layout on the server: a model's saved plan, what ``GET
/models/<name>`` publishes of it, the checks a packed request's public
context must pass, and the runners of packed requests, cached per public
context. Nothing here knows about HTTP (:mod:`pycrcnn.server` maps
:class:`PackedRequestError` to its status).

A model has a packed plan when its ``.npz`` holds one
(``export_model(..., plan=pycrcnn.plan(model, x, layout="packed"))``;
``scripts/export_models.py`` saves one for every shipped model the packed
planner accepts, and the planner's refusal for the others in the model's
metadata, ``packed_plan_refused``). The server publishes the plan without the
weights (:func:`pycrcnn.planner.public.public_plan`); a client makes its
context with ``Context.from_plan(published_plan)``.

A packed request is run by the engine's one runner: the plan's stages
(:func:`pycrcnn.planner.packed.build_packed`) bound to the request's public
context. The plan is read once per model file version; the stages bound to a
public context (with their masks, encoded on the first request) are kept per
``(context id, model, version)`` in a bounded LRU.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple

from ._engine import Context, HEError

__all__ = ["PackedPlan", "PackedRequestError", "packed_plan", "describe_packed", "PackedRunners",
           "METADATA_REFUSAL_KEY"]

#: the model metadata key holding the packed planner's refusal (written by scripts/export_models.py)
METADATA_REFUSAL_KEY = "packed_plan_refused"


class PackedRequestError(Exception):
    """A packed request the server refuses: ``status`` (4xx) and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class PackedPlan:
    """A model's saved packed plan, loaded once per model file version: the
    engine's packed model, the published plan and the rotation keys it needs."""

    def __init__(self, info: Dict[str, Any]):
        from .planner.packed import packed_model_from_info
        from .planner.public import public_plan

        self.info = info
        self.model = packed_model_from_info(info)
        par = info["parameters"]
        layout = dict(self.model.layout(int(par["m"]), len(par["moduli"])))
        self.input_ciphertexts = int(layout["input_ciphertexts"])
        self.classes = int(layout["classes"])
        self.needs: List[Tuple[int, int]] = [(int(level), int(s)) for level, steps in layout["rotation_needs"]
                                             for s in steps]
        self.public = public_plan(info, layout)
        self._bind_lock = threading.Lock()

    def context_problem(self, ctx: Context) -> Optional[str]:
        """Why ``ctx`` (a request's public context) cannot run this plan, or None."""
        par = self.info["parameters"]
        have = ctx.parameters()
        p = have.get("p")
        p = list(p) if isinstance(p, list) else [p]
        if ctx.encoding != "batch" or ctx.m != par["m"] or p != list(par["p"]) \
                or list(ctx.moduli) != list(par["moduli"]):
            return (f"the public context's parameters (encoding {ctx.encoding}, m={ctx.m}, p={p}) are not the "
                    f"model's packed plan (m={par['m']}, p={list(par['p'])}, its ciphertext moduli): make the "
                    "context with Context.from_plan(the plan GET /models/<name> publishes) and keygen()")
        held = {(int(level), int(s)) for level, steps in ctx.rotation_steps for s in steps}
        missing = [need for need in self.needs if need not in held]
        if missing:
            listed = ", ".join(f"step {s} at level {level}" for level, s in missing)
            return (f"the public context lacks rotation keys the packed model needs ({listed}): make it with "
                    "Context.from_plan(the plan GET /models/<name> publishes) and keygen(), which makes them")
        return None

    def bind(self, ctx: Context) -> Any:
        """The plan's stages bound to ``ctx`` (the runner's model: ``run(x)``).
        Every binding shares the plan's engine model; the engine keeps its
        masks per context (fhe.rs refuses products across two contexts'
        parameter objects even when their parameters are equal)."""
        from .planner.packed import build_packed

        # attach + build read the context's packed model: one at a time, as
        # a cached context may serve two models planned with the same parameters
        with self._bind_lock:
            ctx.attach_packed(self.model)
            return build_packed(ctx)


_plans_lock = threading.Lock()
_plans: Dict[Tuple[str, Any], Tuple[Optional[PackedPlan], Optional[str]]] = {}


def packed_plan(entry: Any, spec: Any) -> Tuple[Optional[PackedPlan], Optional[str]]:
    """``(plan, None)`` for a model (a registry entry and its loaded spec)
    with a saved packed plan, else ``(None, why not)``; never raises."""
    key = (str(entry.path), entry.version)
    with _plans_lock:
        if key in _plans:
            return _plans[key]
    result = _load(entry, spec)
    with _plans_lock:
        for old in [k for k in _plans if k[0] == key[0]]:
            del _plans[old]
        _plans[key] = result
    return result


def _load(entry: Any, spec: Any) -> Tuple[Optional[PackedPlan], Optional[str]]:
    refused = ((spec.metadata or {}) if spec is not None else {}).get(METADATA_REFUSAL_KEY)
    if refused:
        return None, f"the packed planner refuses this model: {refused}"
    if entry.path.suffix != ".npz":
        return None, ("no packed plan: plans are saved in a model's .npz (export_model(net, 'm.npz', "
                      "plan=pycrcnn.plan(net, x, layout='packed')))")
    from .planner import load_plan

    try:
        info = load_plan(entry.path)
    except Exception as exc:  # noqa: BLE001 - a bad file is described, never a crash
        return None, f"the saved plan cannot be read: {type(exc).__name__}: {exc}"
    if info is None or info.get("layout") != "packed":
        return None, ("no packed plan saved with this model (export_model(net, 'm.npz', "
                      "plan=pycrcnn.plan(net, x, layout='packed')))")
    try:
        return PackedPlan(info), None
    except (HEError, KeyError, TypeError, ValueError) as exc:
        return None, f"the saved packed plan is not usable by this build: {type(exc).__name__}: {exc}"


def describe_packed(entry: Any, spec: Any) -> Dict[str, Any]:
    """The ``packed`` entry of ``GET /models/<name>``: the published plan
    (layout, parameters, scales, shapes, rotation steps; no weights), or why
    there is none."""
    plan, why = packed_plan(entry, spec)
    if plan is None:
        return {"available": False, "reason": why}
    return {"available": True, "plan": plan.public}


class PackedRunners:
    """The stages of a packed plan bound to a public context, by ``(context
    id, model, model version)``; at most ``size`` kept. A runner holds its
    context (the server's parsed-context cache may have let it go: a few
    hundred MB at m=8192 with rotation keys) and its masks (~25 MB for
    LeNet-1): few are kept, and one whose context the server parsed again is
    bound again."""

    def __init__(self, size: int = 4):
        from .registry import LRU

        self._lru = LRU(size)

    def get(self, context_id: str, entry: Any, plan: PackedPlan, ctx: Context) -> Any:
        key = (context_id, entry.name, entry.version)
        kept = self._lru.get(key)
        if kept is not None and kept[1] is ctx:
            return kept[0]
        runner = plan.bind(ctx)
        self._lru.put(key, (runner, ctx))
        return runner

    def stats(self) -> Dict[str, int]:
        return self._lru.stats()


def run_packed(runners: PackedRunners, entry: Any, spec: Any, layers: Tuple[int, int], context_id: str,
               ctx: Context, data: bytes, t_start: float) -> Tuple[Dict[str, Any], bytes]:
    """Runs a packed request: the whole model on the packed input ``data``
    under ``ctx`` (the request's public context, named ``context_id``; the
    request arrived at ``t_start``, ``time.perf_counter()``). Returns
    ``(fields of the answer, the result's bytes)``; raises
    :class:`PackedRequestError` (4xx) for a request that cannot run."""
    import os
    import time

    from ._engine import CipherTensor, NoiseBudgetExhausted, ParameterError, PlaintextOverflow

    plan, why = packed_plan(entry, spec)
    if plan is None:
        raise PackedRequestError(422, f"model {entry.name!r} has no packed plan, send it in the batch layout "
                                      f"(no \"layout\" field): {why}")
    n_modules = spec.n_modules if spec.n_modules else max(spec.indices) + 1
    if tuple(layers) != (0, n_modules):
        raise PackedRequestError(400, f"a packed request runs the whole model ({entry.name!r}: layers 0..{n_modules - 1}); "
                                      f"got layers {layers[0]}..{layers[1] - 1}: send \"layers\": null")
    problem = plan.context_problem(ctx)
    if problem:
        raise PackedRequestError(400, problem)
    try:
        x = CipherTensor.from_bytes(data, ctx)
    except HEError as exc:
        raise PackedRequestError(400, f"data rejected: {exc}") from None
    want = [ctx.m, plan.input_ciphertexts]
    if list(x.shape) != want:
        raise PackedRequestError(
            400, f"data of logical shape {list(x.shape)} is not the packed input of {entry.name!r}: the plan's "
                 f"context encrypts one image into {plan.input_ciphertexts} packed ciphertexts per prime (logical "
                 f"shape {want}); a batch-layout tensor goes without \"layout\": \"packed\"")
    runner = runners.get(context_id, entry, plan, ctx)
    t0 = time.perf_counter()
    parse_seconds = t0 - t_start
    try:
        out, reports = runner.run(x)
    except (PlaintextOverflow, NoiseBudgetExhausted, ParameterError) as exc:
        raise PackedRequestError(422, f"{type(exc).__name__}: {exc}") from None
    except HEError as exc:
        raise PackedRequestError(400, str(exc)) from None
    compute_seconds = time.perf_counter() - t0
    blob = out.to_bytes()
    fields = {
        "net": entry.name,
        "layout": "packed",
        "layers": [0, n_modules - 1],
        "shape": list(out.shape),
        "classes": plan.classes,
        "level": out.level,
        "switched_to_last_level": True,
        "timings": [{"index": r["index"], "type": r["name"], "seconds": r["seconds"], "shape": r["shape"]}
                    for r in reports],
        "server_seconds": compute_seconds,
        "parse_seconds": parse_seconds,
        "serialize_seconds": time.perf_counter() - t0 - compute_seconds,
        "encoding": ctx.encoding,
        "parameters": ctx.parameters(),
        "worker_pid": os.getpid(),
    }
    return fields, blob
