"""The packed planner: one image in the slots of a few ciphertexts.

Runs the single-square family ``Conv2d → Square → linear layers`` (AvgPool2d,
Conv2d, Linear, Flatten, BatchNorm folded into the layer before it): the
first convolution and the square run as themselves, every linear layer after
the square is fused into one affine map ``A·z + b`` (classes × conv outputs).
The plan fixes integers for everything:

- input ``x_int = round(x · 2^s_in)``, conv weights ``round(w · 2^s_w)``, conv
  bias ``round(b · 2^(s_in+s_w))``;
- the square of the conv output, at scale ``2^(2·(s_in+s_w))``;
- the fused map rounded *after* fusing: ``A_int = round(A · 2^s_a)``,
  ``b_int = round(b · 2^(2·(s_in+s_w)+s_a))``; logits are the outputs / 2^output_bits.

The engine's layout (``src/model/packed.rs``) evaluates exactly these
integers modulo the plaintext primes (CRT); ``plan.reference(x)`` evaluates
them in Python ints, and the plan checks on the calibration inputs that they
stay inside the plaintext range with ``margin_bits`` to spare.

Parameters (measured, ``notes/packed-layout.md``): m = 8192, q = 55+55+54+54
bits (128-bit security), plaintext primes of about 31 bits (noise allows ~38
for one square and the rotations), as many as the outputs need.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import reference as np_reference
from .._engine import Context, FormatError, HEError, Model, PackedModel
from ..spec import LayerSpec, ModelSpec, UnsupportedLayerError, load_model_spec
from .plan import PLAN_FORMAT, Plan

__all__ = ["plan_packed", "context_from_packed_info", "packed_model_from_info", "build_packed", "packed_family"]

#: ciphertext moduli sizes (bits) at m=8192, 128-bit security: 218 bits
MODULI_SIZES = (55, 55, 54, 54)
LINEAR_TYPES = ("Conv2d", "AvgPool2d", "Linear", "Flatten")


def _as_spec(model: Any) -> ModelSpec:
    from ..torch_import import as_model_spec

    return as_model_spec(model)


def packed_family(spec: ModelSpec) -> Tuple[LayerSpec, List[LayerSpec]]:
    """The first convolution and the linear layers after the square, or an
    :class:`UnsupportedLayerError` that says why the model is outside the family."""
    layers = spec.layers
    head = "layout='packed' runs Conv2d → Square → linear layers (AvgPool2d, Conv2d, Linear, Flatten)"
    for layer in layers:
        if not layer.supported:
            raise layer.error()
    if len(layers) < 3 or layers[0].type != "Conv2d" or layers[1].type != "Square":
        got = " → ".join(l.type for l in layers[:3])
        raise UnsupportedLayerError(f"{head}; {spec.name} starts with {got}", index=layers[0].index if layers else None)
    conv = layers[0]
    p = conv.params
    if p["groups"] != 1 or tuple(p["dilation"]) != (1, 1):
        raise UnsupportedLayerError(f"{head}; the first Conv2d (index {conv.index}) has groups/dilation", index=conv.index)
    if p["stride"][0] != p["stride"][1] or p["padding"][0] != p["padding"][1]:
        raise UnsupportedLayerError(f"{head}; the first Conv2d (index {conv.index}) needs equal strides and paddings "
                                    "on both axes", index=conv.index)
    tail = layers[2:]
    for layer in tail:
        if layer.type not in LINEAR_TYPES:
            raise UnsupportedLayerError(
                f"{head}; layer {layer.index} ({layer.type}) after the square is not linear: models with a second "
                "activation are not in the packed family yet (use layout='batch')", index=layer.index)
    if not tail:
        raise UnsupportedLayerError(f"{head}; {spec.name} has no linear layer after the square")
    return conv, tail


def _fused_map(tail: Sequence[LayerSpec], shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """A [classes, F] and b [classes] with tail(z) = A·z + b for z of ``shape``."""
    f = int(np.prod(shape))
    bias = np_reference.forward_numpy(tail, np.zeros((1, *shape))).reshape(-1)
    cols = []
    for start in range(0, f, 1024):
        eye = np.zeros((min(1024, f - start), f))
        eye[np.arange(eye.shape[0]), start + np.arange(eye.shape[0])] = 1.0
        cols.append(np_reference.forward_numpy(tail, eye.reshape(-1, *shape)).reshape(eye.shape[0], -1) - bias)
    return np.concatenate(cols).T, bias


def _bits_for(max_abs: float, bits: int) -> int:
    """Scale exponent s with max_abs·2^s just below 2^(bits-1)."""
    if max_abs <= 0:
        return bits - 1
    return int(bits - 1 - math.ceil(math.log2(max_abs)))


def _round(x: np.ndarray) -> np.ndarray:
    return np.round(x).astype(np.int64)


def _reference(pm: PackedModel, x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    c, h, w = pm.in_shape
    if x.shape not in ((1, c, h, w), (c, h, w)):
        raise HEError(f"the packed plan takes one image [1, {c}, {h}, {w}], got {list(x.shape)}")
    s_in, _ = pm.scales
    ints = pm.reference(_round(x.reshape(c, h, w) * 2.0 ** s_in))
    out = np.empty((1, len(ints)), dtype=object)
    out[0, :] = ints
    return out


def _context(info: Dict[str, Any], pm: PackedModel) -> Context:
    par = info["parameters"]
    ctx = Context(m=par["m"], p=list(par["p"]), sec=par["sec"], encoding="batch",
                  moduli_sizes=list(par["moduli_sizes"]), n_plaintext_moduli=len(par["p"]))
    if list(ctx.moduli) != list(par["moduli"]):
        raise FormatError("the plan's ciphertext moduli differ from the ones this build generates")
    ctx.attach_packed(pm)
    return ctx


def packed_model_from_info(info: Dict[str, Any]) -> PackedModel:
    """The engine's packed model of a saved plan, without a context (a server
    attaches it to the context it loads from the public context)."""
    if not isinstance(info, dict) or info.get("format") != PLAN_FORMAT or info.get("layout") != "packed":
        raise FormatError("not a saved packed plan")
    return _packed_model(info)


def _packed_model(info: Dict[str, Any]) -> PackedModel:
    try:
        w = info["weights"]
        return PackedModel(tuple(info["in_shape"]), np.asarray(w["conv_weight"], dtype=np.int64),
                           np.asarray(w["conv_bias"], dtype=np.int64), int(info["stride"]), int(info["padding"]),
                           np.asarray(w["linear_weight"], dtype=np.int64), np.asarray(w["linear_bias"], dtype=np.int64),
                           int(info["scales"]["input_bits"]), int(info["scales"]["output_bits"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"malformed packed plan ({exc!r})") from None


def context_from_packed_info(info: Dict[str, Any]) -> Context:
    """A keyless context for a saved packed plan (``keygen()`` makes its keys)."""
    return _context(info, _packed_model(info))


def plan_packed(model: Any, calibration_inputs: Any, *, sec: int = 128, input_bits: int = 8, weight_bits: int = 10,
                map_bits: int = 12, margin_bits: int = 8, p_bits: int = 31, m: int = 8192,
                moduli_sizes: Sequence[int] = MODULI_SIZES, measure: bool = True) -> Plan:
    """Plans a single-square model for the packed layout.

    ``input_bits``, ``weight_bits``, ``map_bits``: signed bits of the largest
    calibration input, conv weight and fused-map entry. The plaintext primes
    (about ``p_bits`` each, as many as needed) hold the largest calibration
    output times 2^``margin_bits``. With ``measure`` the plan encrypts one
    calibration input under a throwaway key and reports the noise budget
    measured after every stage (about a second).
    """
    if sec != 128:
        raise HEError("the packed layout is planned at 128-bit security (m=8192, 218-bit q) in this build")
    spec = _as_spec(model)
    conv, tail = packed_family(spec)
    x = np.asarray(calibration_inputs, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise HEError(f"calibration_inputs must be [N, C, H, W] images, got shape {list(x.shape)}")
    in_shape = tuple(int(s) for s in x.shape[1:])
    co_shape = conv.output_shape(in_shape)
    stride, padding = int(conv.params["stride"][0]), int(conv.params["padding"][0])
    A, b = _fused_map(tail, tuple(co_shape))
    s_in = _bits_for(float(np.abs(x).max()), input_bits)
    s_w = _bits_for(float(np.abs(conv.weight).max()), weight_bits)
    s_a = _bits_for(float(np.abs(A).max()), map_bits)
    conv_bias = conv.bias if conv.bias is not None else np.zeros(conv.weight.shape[0])
    s_z = 2 * (s_in + s_w)
    weights = {
        "conv_weight": _round(conv.weight * 2.0 ** s_w),
        "conv_bias": _round(conv_bias * 2.0 ** (s_in + s_w)),
        "linear_weight": _round(A * 2.0 ** s_a),
        "linear_bias": _round(b * 2.0 ** (s_z + s_a)),
    }
    pm = PackedModel(in_shape, weights["conv_weight"], weights["conv_bias"], stride, padding,
                     weights["linear_weight"], weights["linear_bias"], s_in, s_z + s_a)
    # Plaintext range: the largest calibration output (and intermediates, for the report).
    outs = [max(abs(int(v)) for v in _reference(pm, xi)[0]) for xi in x]
    out_bits = math.log2(max(max(outs), 1))
    conv_max = float(np.abs(np_reference.forward_numpy([conv], np.round(x * 2.0 ** s_in) / 2.0 ** s_in)).max())
    conv_bits = math.log2(max(conv_max * 2.0 ** (s_in + s_w), 1))
    worst = (float(np.abs(weights["linear_weight"]).sum(axis=1).max())
             * (np.abs(weights["conv_weight"]).reshape(len(conv_bias), -1).sum(axis=1).max() * 2.0 ** (input_bits - 1)
                + np.abs(weights["conv_bias"]).max()) ** 2 + np.abs(weights["linear_bias"]).max())
    n_primes = max(1, math.ceil((out_bits + margin_bits + 1) / (p_bits - 0.5)))
    ctx0 = Context(m=m, sec=sec, encoding="batch", p_bits=p_bits, n_plaintext_moduli=n_primes,
                   moduli_sizes=list(moduli_sizes))
    primes = ctx0.p if isinstance(ctx0.p, list) else [ctx0.p]
    t_bits = sum(math.log2(p) for p in primes)
    layout = pm.layout(m, len(moduli_sizes))
    info = {
        "format": PLAN_FORMAT, "version": 1, "layout": "packed", "model": spec.name,
        "in_shape": list(in_shape), "stride": stride, "padding": padding,
        "scales": {"input_bits": s_in, "weight_bits": s_w, "map_bits": s_a, "output_bits": s_z + s_a},
        "parameters": {"m": m, "sec": sec, "p": [int(p) for p in primes], "moduli": [int(q) for q in ctx0.moduli],
                       "moduli_sizes": [int(s) for s in moduli_sizes]},
        "weights": {k: v.tolist() for k, v in weights.items()},
    }
    ctx = _context(info, pm)
    report = [
        {"stage": "pack", "ciphertexts": layout["input_ciphertexts"], "bits": math.log2(max(np.abs(x).max() * 2.0 ** s_in, 1)),
         "rotations": 0},
        {"stage": "conv", "bits": conv_bits, "rotations": (conv.weight.shape[2] - 1) // stride},
        {"stage": "square", "bits": 2 * conv_bits, "rotations": 0},
        {"stage": "linear", "bits": out_bits, "worst_case_bits": math.log2(max(worst, 1)), "rotations": 0},
    ]
    report[3]["rotations"] = layout["rotations"] - report[1]["rotations"]
    for r in report:
        r["plaintext_bits"] = t_bits
        r["fits"] = r["bits"] + 1 < t_bits
    if out_bits + margin_bits + 1 > t_bits:
        raise HEError(f"outputs reach 2^{out_bits:.1f}; the plaintext primes hold 2^{t_bits - 1:.1f}")
    plan = Plan("packed", ctx, report, info, lambda xi: _reference(pm, xi))
    if measure:
        _measure(plan, x[:1])
    return plan


def _measure(plan: Plan, x: np.ndarray) -> None:
    """Noise budget after each stage on one calibration input, under a throwaway key."""
    probe = context_from_packed_info(plan.info)
    probe.keygen()
    encoded = build_packed(probe)
    e = probe.encrypt(x)
    report = {"pack": probe.noise_budget(e)}
    out, reports = encoded.run(e, measure_noise=True)
    for r in reports:
        report[{"PackedConv2d": "conv", "PackedSquare": "square", "PackedLinear": "linear"}[r["name"]]] = r["noise_budget"]
    if not np.array_equal(probe.decrypt_integers(out), plan.reference(x)):
        raise HEError("the packed run does not match the plan's reference (noise or range): report this model")
    for r in plan.report:
        r["noise_budget"] = report[r["stage"]]


class PackedEncodedModel(list):
    """The three packed stages (conv, square, linear) of a planned model,
    run by the engine's runner: callable, ``run(x)`` returns ``(out, reports)``."""

    def __init__(self, context: Context, indices: Sequence[int] = (0, 1, 2)):
        super().__init__()
        pm = context.packed_model
        if pm is None:
            raise HEError("this context is not planned for a packed model: use pycrcnn.plan(..., layout='packed')")
        self.context = context
        self.last_report: List[Dict[str, Any]] = []
        for stage, index in zip(("conv", "square", "linear"), indices):
            layer = pm.layer(context, stage)
            self.append(layer)
        self._model = Model([(int(i), l) for i, l in zip(indices, self)])

    def run(self, x: Any, *, measure_noise: bool = False, callback: Any = None) -> Tuple[Any, List[Dict[str, Any]]]:
        return self._model.run(x, measure_noise=measure_noise, callback=callback)

    def __call__(self, x: Any, debug: bool = False, progress: bool = False, callback: Any = None) -> Any:
        out, self.last_report = self.run(x, measure_noise=debug, callback=callback)
        return out


def build_packed(context: Context, spec: Optional[ModelSpec] = None) -> PackedEncodedModel:
    """The packed stages for ``context``'s plan; ``spec`` (the model built) must match it."""
    pm = context.packed_model
    if pm is None:
        raise HEError("this context is not planned for a packed model")
    if spec is None:
        return PackedEncodedModel(context)
    conv, tail = packed_family(spec)
    c, h, w = pm.in_shape
    if conv.weight.shape[1] != c or (spec.input_shape and tuple(spec.input_shape) != (c, h, w)) \
            or tail and np_reference.forward_numpy(tail, np.zeros((1, *conv.output_shape((c, h, w))))).size != pm.classes:
        raise HEError(f"{spec.name} does not match the model this context was planned for ({pm!r})")
    return PackedEncodedModel(context, (conv.index, spec.layers[1].index, tail[-1].index))
