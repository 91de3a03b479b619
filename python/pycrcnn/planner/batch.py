"""The batch layout's planner (one image per slot, CryptoNets).

1. **Scales.** An input scale and one weight scale per weighted layer
   (Conv/Linear, model order): the fewest plaintext bits whose *predicted*
   argmax agreement with the float model on unseen inputs reaches
   ``min_agreement`` (default 0.9995; :mod:`.precision`: the calibration
   inputs' rounding errors against their top-2 logit gaps, with a linear tail
   near 0). ``scale_bits=`` / ``weight_scale_bits=`` (an int or a list) fix them.
2. **Plaintext range.** ``mode="worst-case"`` (default): every layer's bound
   max_o Σ|w_int|·B + |b_int| (squares B², polynomials Σ|c_k|B^k) for any
   input in ``input_range`` — the engine's own growth rules, so a planned run
   never wraps. ``mode="calibrated"``: the largest |integer| of any layer on
   the calibration inputs times 2^``margin_bits``; the context declares that
   bound (``calibrated_bound_bits``) and the engine lets layers through whose
   worst case could wrap. Inputs unlike the calibration ones may then wrap:
   count wraps against ``plan.reference``.
3. **Parameters.** Candidates (m, number of CRT primes k and their size up
   to 60 bits, number of ciphertext moduli L at the largest size the
   security level allows) ordered by predicted seconds per image; the first
   whose noise budget, measured on the engine's probes
   (``EncodedModel.predict``: one key generation and a probe pass each),
   stays above ``noise_margin`` at every layer wins.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._engine import HEError
from ..he import Context
from .batch_plan import BatchPlan
from .plan import PlanError
from .precision import WEIGHTED_LAYERS, round_half_away, choose_scales, float_peaks, log2_bits, peak_bits, quantized_forward

__all__ = ["plan_batch", "MAX_LOG_Q", "COST_NS"]

#: the Homomorphic Encryption Standard's largest log2 q per (sec, m)
MAX_LOG_Q = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
#: one thread's cost per (m · moduli) of: a weighted-sum term (ct × scalar,
#: lazily reduced), a ciphertext square as the engine runs it (fused with the
#: pooling after it, unrelinearized: 4.8 ms at m=8192 with three 60-bit
#: moduli; fhe.rs's general product with relinearization is ≈ 360), measured
#: on this machine (benches/throughput.py; ../shared/notes/fhe-rs.md)
COST_NS = {"term": 2.2, "product": 200.0}
#: the engine supports at most this many plaintext bits (CRT product)
MAX_PLAINTEXT_BITS = 120
#: the largest plaintext prime: below 2^60, the engine needs p < q/2 for every
#: ciphertext prime q, and those have at most 62 bits (src/he/params.rs)
MAX_PRIME_BITS = 60


def _as_spec(model: Any):
    from ..torch_import import as_model_spec

    spec = as_model_spec(model)
    spec.check_supported()
    return spec


class _Layers:
    """The model's layers with what the planner needs: shapes, integer
    weights per output row, operation counts."""

    def __init__(self, spec, in_shape: Sequence[int]):
        self.spec = spec
        self.layers = list(spec.layers)
        self.shapes = []
        shape = tuple(in_shape)
        for layer in self.layers:
            shape = tuple(layer.output_shape(shape))
            self.shapes.append(shape)
        self.in_shape = tuple(in_shape)

    def bounds(self, input_bound: float, s: int, ws: Union[int, Sequence[int]]) -> List[int]:
        """Worst-case |integer| after every layer (Python ints: exact), the
        engine's growth rule: max_o Σ|w_int|·B + |b_int|. ``ws``: one weight
        scale per weighted layer (or one for all); polynomial coefficients
        use the largest."""
        ws = list(ws) if not isinstance(ws, (int, np.integer)) else [int(ws)] * sum(
            1 for l in self.layers if l.type in WEIGHTED_LAYERS)
        w = max(ws) if ws else 0
        it = iter(ws)
        b = int(round_half_away(np.array([input_bound * 2.0 ** s]))[0])
        scale = 2.0 ** s
        out = []
        for layer in self.layers:
            t, p = layer.type, layer.params
            if t in WEIGHTED_LAYERS:
                w_k = next(it)
                wi = round_half_away(layer.weight * 2.0 ** w_k).reshape(layer.weight.shape[0], -1)
                scale *= 2.0 ** w_k
                bias = round_half_away(layer.bias * scale) if layer.bias is not None else np.zeros(len(wi))
                b = max(int(np.abs(row).sum()) * b + abs(int(bb)) for row, bb in zip(wi, bias))
            elif t == "AvgPool2d":
                k = int(np.prod(p["kernel_size"]))
                b, scale = b * k, scale * k
            elif t == "Square":
                b, scale = b * b, scale * scale
            elif t == "Polynomial":
                c = list(p["coefficients"])
                d = max(i for i, v in enumerate(c) if v != 0)
                cs = [abs(int(round_half_away(np.array([c[k] * 2.0 ** w * scale ** (d - k)]))[0])) for k in range(1, d + 1)]
                scale = scale ** d * 2.0 ** w
                b = sum(ck * b ** (k + 1) for k, ck in enumerate(cs)) + abs(int(round_half_away(np.array([c[0] * scale]))[0]))
            out.append(b)
        return out

    def op_counts(self) -> List[Tuple[float, float]]:
        """(weighted-sum terms, ciphertext products) per image, per layer."""
        counts = []
        shape = self.in_shape
        for layer, out_shape in zip(self.layers, self.shapes):
            n_out = int(np.prod(out_shape))
            t = layer.type
            if t in ("Conv2d", "Conv1d", "Linear"):
                counts.append((n_out * layer.weight[0].size, 0.0))
            elif t == "AvgPool2d":
                counts.append((n_out * int(np.prod(layer.params["kernel_size"])), 0.0))
            elif t == "Square":
                counts.append((0.0, float(n_out)))
            elif t == "Polynomial":
                d = max(i for i, v in enumerate(layer.params["coefficients"]) if v != 0)
                counts.append((float(n_out * d), float(n_out * (d - 1))))
            else:
                counts.append((0.0, 0.0))
            shape = out_shape
        return counts

    @property
    def products(self) -> int:
        return sum(1 for l in self.layers if l.type in ("Square", "Polynomial"))


def _rencryption_error(layer: Any, reason: str, alternatives: str, fix_alternatives: str) -> PlanError:
    """The PlanError for `layer` (a LayerSpec) failing for `reason`, whose
    fix is a rencryption before it: `alternatives` follow that fix in the
    message (", ..., or ..."), `fix_alternatives` in ``PlanError.fix``."""
    i = layer.index
    return PlanError(f"layer {i} ({layer.type}): {reason}. Fix: a rencryption before layer {i} "
                     f"(rencrypt_positions=[{i}]){alternatives}",
                     layer=i, layer_name=layer.type, fix=f"rencrypt_positions=[{i}]{fix_alternatives}")


def _agreement(ints: np.ndarray, float_out: np.ndarray) -> float:
    ints = np.asarray(ints, dtype=np.float64).reshape(len(float_out), -1)
    f = float_out.reshape(len(float_out), -1)
    if f.shape[1] > 1:
        return float(np.mean(np.argmax(ints, axis=1) == np.argmax(f, axis=1)))
    return 1.0


def _levels(L: int, layers: _Layers) -> List[int]:
    """Moduli left at every layer: products switch down while two moduli remain."""
    level, out = 0, []
    for layer in layers.layers:
        if layer.type in ("Square", "Polynomial"):
            d = 2 if layer.type == "Square" else max(i for i, v in enumerate(layer.params["coefficients"]) if v != 0)
            for _ in range(d - 1):
                if level + 2 < L:
                    level += 1
        out.append(L - level)
    return out


def _seconds(m: int, L: int, k: int, layers: _Layers) -> List[float]:
    """Predicted one-thread seconds per layer for a full batch of m images."""
    out = []
    for (terms, products), moduli in zip(layers.op_counts(), _levels(L, layers)):
        ns = (terms * COST_NS["term"] + products * COST_NS["product"]) * m * moduli * k
        out.append(ns * 1e-9)
    return out


def plan_batch(model: Any, calibration_inputs: Any, *, sec: int = 128, mode: str = "worst-case",
               input_range: Optional[Tuple[float, float]] = None,
               scale_bits: Optional[int] = None, weight_scale_bits: Union[int, Sequence[int], None] = None,
               min_agreement: float = 0.9995, margin_bits: int = 1, noise_margin: int = 6, m: Optional[int] = None,
               max_trials: int = 12) -> BatchPlan:
    """Plans the batch layout; see the module's docstring. Raises
    :class:`PlanError` naming the layer when nothing fits."""
    if sec not in MAX_LOG_Q:
        raise ValueError(f"sec must be 128, 192 or 256, got {sec}")
    if mode not in ("worst-case", "calibrated"):
        raise ValueError(f'mode must be "worst-case" or "calibrated", got {mode!r}')
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement}")
    spec = _as_spec(model)
    x = np.ascontiguousarray(calibration_inputs, dtype=np.float64)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError("calibration_inputs must be a non-empty batch [N, ...] of typical inputs")
    layers = _Layers(spec, x.shape[1:])
    lo, hi = (float(x.min()), float(x.max())) if input_range is None else map(float, input_range)
    input_bound = max(abs(lo), abs(hi))
    if (x.min() < lo or x.max() > hi):
        raise ValueError(f"calibration inputs lie outside input_range ({lo}, {hi})")
    float_out = spec.forward_numpy(x)
    from ..model import build_from_spec

    n_weighted = sum(1 for l in layers.layers if l.type in WEIGHTED_LAYERS)
    if weight_scale_bits is not None and not isinstance(weight_scale_bits, (int, np.integer)):
        fixed_w: Optional[List[int]] = [int(b) for b in weight_scale_bits]
        if len(fixed_w) != n_weighted:
            raise ValueError(f"weight_scale_bits has {len(fixed_w)} entries but the model has {n_weighted} weighted "
                             "layers (Conv/Linear); give one per weighted layer, in model order")
    else:
        fixed_w = None if weight_scale_bits is None else [int(weight_scale_bits)] * n_weighted

    peaks = float_peaks(layers.layers, x) if mode == "calibrated" else None

    def per_layer_bits(s: int, ws: List[int], exact: bool = False) -> List[float]:
        if mode == "calibrated":
            if exact:  # the quantized model's own integers on the calibration inputs
                return [log2_bits(p * 2.0 ** margin_bits) for p in quantized_forward(layers.layers, x, s, ws)[1]]
            return peak_bits(layers.layers, peaks, s, ws, margin_bits)
        return [log2_bits(b) for b in layers.bounds(input_bound, s, ws)]

    # 1. scales: the fewest plaintext bits predicted to agree on unseen inputs
    try:
        s, ws, predicted, agree = choose_scales(layers.layers, x, float_out, lambda s_, w_: max(per_layer_bits(s_, w_)),
                                                min_agreement, scale_bits=scale_bits, weight_scale_bits=fixed_w)
    except ValueError as exc:
        raise PlanError(f"{exc}; lower min_agreement or give larger scale_bits/weight_scale_bits",
                        fix="lower min_agreement") from None
    per_layer = per_layer_bits(s, ws, exact=True)
    total_bits = max(per_layer)
    w_param: Union[int, List[int]] = ws[0] if len(set(ws)) == 1 else list(ws)

    # 2. plaintext range
    if total_bits > MAX_PLAINTEXT_BITS:
        k = next(i for i, b in enumerate(per_layer) if b > MAX_PLAINTEXT_BITS)
        layer = layers.layers[k]
        raise _rencryption_error(
            layer, f"values need {per_layer[k]:.0f} plaintext bits at scale_bits={s}, weight_scale_bits={w_param} "
            f"({mode}); the engine holds at most {MAX_PLAINTEXT_BITS}", " or smaller scales", " or smaller scales")
    # the exact reference of the chosen scales on the calibration inputs
    runner = build_from_spec(Context(m=1024, encoding="batch", scale_bits=s, weight_scale_bits=w_param), spec).runner()
    ints, _ = runner.reference(x, s, max(ws) if ws else 0)
    exact_agree = _agreement(ints, float_out)
    # calibrated: the engine's declared bound, log2 of the largest |integer| (× 2^margin)
    calibrated_bits = (round(math.log2(max(1.0, (2.0 ** total_bits - 1) / 2)), 3) + 0.001
                       if mode == "calibrated" else None)

    # 3. parameters, cheapest first
    # the engine refuses a bound b unless 2b < T (src/he/tensor.rs check_fits)
    needed = total_bits + 0.01
    ms = [int(m)] if m is not None else [1024, 2048, 4096, 8192, 16384, 32768]
    candidates = []
    for mm in ms:
        maxq = MAX_LOG_Q[sec][mm]
        for k in range(1, 9):
            t = max(math.ceil(needed / k), int(math.log2(2 * mm)) + 3)
            # the engine needs p below half of every ciphertext prime (≤ 62 bits);
            # beyond 58 bits only for one prime (with several, smaller ones
            # cost less noise: measured, 2 × 60 bits exhausts the budget)
            if t > (MAX_PRIME_BITS if k == 1 else 58) or t * k > MAX_PLAINTEXT_BITS:
                continue
            for L in range(1, 16):
                b = min(max(60, t + 2), 62, maxq // L)
                if b < t + 2 or b < 17:
                    break
                if layers.products and L < 2:
                    continue
                cost = sum(_seconds(mm, L, k, layers)) / mm
                candidates.append((cost, mm, k, t, L, b))
    candidates.sort()
    failures = []
    for cost, mm, k, t, L, b in candidates[:max_trials]:
        try:
            ctx = Context(m=mm, sec=sec, encoding="batch", scale_bits=s, weight_scale_bits=w_param, p_bits=t,
                          n_plaintext_moduli=k, moduli_sizes=[b] * L, calibrated_bound_bits=calibrated_bits)
        except HEError as exc:
            failures.append(((mm, k, t, L, b), None, str(exc)))
            continue
        primes = [int(q) for q in (ctx.p if isinstance(ctx.p, list) else [ctx.p])]
        T = math.prod(primes)
        if math.log2(T) < needed:
            continue
        ctx.keygen()
        encoded = build_from_spec(ctx, spec)
        probe = _probe_bound(layers, input_bound, s, ws, math.log2(T) - 1)
        pred = encoded.predict(probe)
        budgets = [r.get("noise_budget") for r in pred]
        ok = len(pred) == len(layers.layers) and all(b_ is not None and b_ >= noise_margin for b_ in budgets)
        if ok:
            seconds = _seconds(mm, L, k, layers)
            bits = per_layer
            report = [{"index": layer.index, "name": layer.type, "bits": round(bi, 2), "plaintext_bits": round(math.log2(T), 2),
                       "noise_budget": bg, "seconds": round(sec_, 4)}
                      for layer, bi, bg, sec_ in zip(layers.layers, bits, budgets, seconds)]
            parameters = {"layout": "batch", "m": mm, "sec": sec, "p": primes,
                          "moduli_sizes": [b] * L, "moduli": [int(q) for q in ctx.moduli], "scale_bits": s,
                          "weight_scale_bits": w_param, "input_shape": list(x.shape[1:])}
            if calibrated_bits is not None:
                parameters["calibrated_bound_bits"] = calibrated_bits
            bound_note = (f"plaintext bits needed {total_bits:.1f}: the largest |integer| of any layer on the "
                          f"{len(x)} calibration inputs, times 2^{margin_bits} (calibrated: inputs unlike these may "
                          "wrap; count wraps against plan.reference)" if mode == "calibrated" else
                          f"plaintext bits needed {total_bits:.1f} (worst case for inputs in [{lo}, {hi}])")
            notes = [f"scales: input {s} bits, weights {ws} bits (Conv/Linear in model order)",
                     f"predicted argmax agreement with the float model on unseen inputs {predicted:.5f} "
                     f"(target {min_agreement}); measured on the {len(x)} calibration inputs {exact_agree:.4f} "
                     f"(exact reference)",
                     bound_note,
                     f"predicted {cost * 1e3:.3f} ms per image on one thread"]
            plan = BatchPlan(spec, parameters, report, mode=mode, input_range=(lo, hi),
                             margin_bits=margin_bits if mode == "calibrated" else 0.0, notes=notes)
            plan._context = None
            return plan
        failed = next((i for i, r in enumerate(pred) if not r.get("ok", True) or (r.get("noise_budget") or 0) < noise_margin),
                      len(pred) - 1)
        failures.append(((mm, k, t, L, b), failed, pred[failed].get("error", "noise budget below the margin")))
    # nothing fits: name the layer the most generous candidate failed at
    last = [f for f in failures if f[1] is not None]
    if last:
        (mm, k, t, L, b), pos, why = max(last, key=lambda f: (f[1], f[0][0]))
        layer = layers.layers[pos]
        raise _rencryption_error(
            layer, f"the noise budget runs out ({why}) with every parameter set tried (largest m tried "
            f"{max(f[0][0] for f in failures)}, {k} plaintext primes of {t} bits)",
            ", smaller scales, or a larger m", ", smaller scales or larger m")
    raise PlanError(f"no parameter set holds {needed:.0f} plaintext bits at {sec}-bit security"
                    + (f" with m={m}" if m is not None else "") + "; use smaller scales or a larger m",
                    fix="smaller scales or a larger m")


def _probe_bound(layers: _Layers, input_bound: float, s: int, w: Sequence[int], available_bits: float) -> float:
    """The probe's input value: the declared bound when its worst case fits
    the plaintext range (always, for a plan), else the largest fraction of
    it that does (noise barely depends on it)."""
    c = 1.0
    for _ in range(200):
        if math.log2(2 * layers.bounds(input_bound * c, s, w)[-1] + 1) < available_bits and \
                all(math.log2(2 * b + 1) < available_bits for b in layers.bounds(input_bound * c, s, w)):
            return input_bound * c
        c /= 2
    return 0.0

