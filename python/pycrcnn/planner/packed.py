"""The packed planner: one image in the slots of a few ciphertexts.

Runs ``Conv2d → activation → (linear layers → activation)* → linear layers``
where an activation is ``Square`` or a degree-2 ``Polynomial`` and the linear
layers are AvgPool2d, Conv2d (any stride, padding, channels), Linear, Flatten
(BatchNorm folded into the layer before it). The first convolution runs as
itself; the linear layers between two activations are fused into one integer
map (evaluated by diagonals over the slot layout the previous stage left), the
ones after the last activation into the map ``A·z + b`` (classes × features).
The plan fixes integers for everything:

- input ``x_int = round(x · 2^s_in)``, conv weights ``round(w · 2^s_w)``, conv
  bias ``round(b · 2^(s_in+s_w))``: the conv output at scale ``S = s_in+s_w``;
- an activation ``a0 + a1·z + a2·z²`` at scale S: ``c2 = round(a2·2^e)``,
  ``c1 = round(a1·2^(S+e))``, ``c0 = round(a0·2^(2S+e))`` (the square: 0, 0, 1),
  output at scale ``2S + e``;
- a fused map rounded *after* fusing: ``A_int = round(A · 2^s_a)``, bias at the
  output scale (input scale + s_a); logits are the outputs / 2^output_bits.

The engine's layout (``src/model/packed.rs``) evaluates exactly these
integers modulo the plaintext primes (CRT); ``plan.reference(x)`` evaluates
them in Python ints, and the plan checks on the calibration inputs that they
stay inside the plaintext range with ``margin_bits`` to spare.

Parameters (measured, ``notes/packed-layout.md``): m = 8192, q = 55+55+54+54
bits (128-bit security). One activation: plaintext primes of about 31 bits.
Two: about 20 bits (each activation and map costs about t + 8..14 bits of
noise). More: m = 16384, q = 436 bits, primes of about 31 bits. As many
primes as the outputs need; when nothing fits the plan names the stage.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import reference as np_reference
from .._engine import Context, FormatError, HEError, Model, PackedModel
from ..spec import LayerSpec, ModelSpec, UnsupportedLayerError, load_model_spec
from .plan import PLAN_FORMAT, Plan, PlanError

__all__ = ["plan_packed", "context_from_packed_info", "packed_model_from_info", "build_packed", "packed_family"]

#: ciphertext moduli sizes (bits) at m=8192, 128-bit security: 218 bits
MODULI_SIZES = (55, 55, 54, 54)
#: at m=16384 (436 of the 438 bits 128-bit security allows), for three activations or more
MODULI_SIZES_16384 = (55, 55, 55, 55, 54, 54, 54, 54)
LINEAR_TYPES = ("Conv2d", "AvgPool2d", "Linear", "Flatten")
ACTIVATION_TYPES = ("Square", "Polynomial")
#: the saved plan's version: 2 adds activations and hidden maps (version 1 plans still load)
PACKED_VERSION = 2
HEAD = ("layout='packed' runs Conv2d → Square/Polynomial (degree 2) → linear layers (AvgPool2d, Conv2d, Linear, "
        "Flatten), with further activations each followed by linear layers")


def _as_spec(model: Any) -> ModelSpec:
    from ..torch_import import as_model_spec

    return as_model_spec(model)


def _activation_coefficients(layer: LayerSpec) -> List[float]:
    if layer.type == "Square":
        return [0.0, 0.0, 1.0]
    c = [float(v) for v in layer.params["coefficients"]]
    while len(c) > 1 and c[-1] == 0.0:
        c.pop()
    if len(c) != 3:
        raise UnsupportedLayerError(
            f"{HEAD}; layer {layer.index} (Polynomial of degree {len(c) - 1}) is not of degree 2: the packed layout "
            "evaluates c0 + c1·x + c2·x² with one ciphertext product (use layout='batch' for other degrees)",
            index=layer.index)
    return c


def packed_family(spec: ModelSpec) -> Tuple[LayerSpec, List[Tuple[LayerSpec, List[LayerSpec]]]]:
    """The first convolution and, per activation, the activation and the
    linear layers after it; or an :class:`UnsupportedLayerError` that says
    why the model is outside what the packed layout runs."""
    layers = spec.layers
    for layer in layers:
        if not layer.supported:
            raise layer.error()
    if len(layers) < 3 or layers[0].type != "Conv2d" or layers[1].type not in ACTIVATION_TYPES:
        got = " → ".join(l.type for l in layers[:3])
        raise UnsupportedLayerError(f"{HEAD}; {spec.name} starts with {got}", index=layers[0].index if layers else None)
    conv = layers[0]
    p = conv.params
    if p["groups"] != 1 or tuple(p["dilation"]) != (1, 1):
        raise UnsupportedLayerError(f"{HEAD}; the first Conv2d (index {conv.index}) has groups/dilation", index=conv.index)
    if p["stride"][0] != p["stride"][1] or p["padding"][0] != p["padding"][1]:
        raise UnsupportedLayerError(f"{HEAD}; the first Conv2d (index {conv.index}) needs equal strides and paddings "
                                    "on both axes", index=conv.index)
    segments: List[Tuple[LayerSpec, List[LayerSpec]]] = []
    for layer in layers[1:]:
        if layer.type in ACTIVATION_TYPES:
            if segments and not segments[-1][1]:
                raise UnsupportedLayerError(
                    f"{HEAD}; layer {layer.index} ({layer.type}) follows another activation with no linear layer "
                    "between them", index=layer.index)
            _activation_coefficients(layer)
            segments.append((layer, []))
        elif layer.type in LINEAR_TYPES:
            segments[-1][1].append(layer)
        else:
            raise UnsupportedLayerError(f"{HEAD}; layer {layer.index} ({layer.type}) is not linear nor an activation",
                                        index=layer.index)
    if not segments[-1][1]:
        raise UnsupportedLayerError(f"{HEAD}; {spec.name} has no linear layer after its last activation",
                                    index=segments[-1][0].index)
    return conv, segments


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


def _map_to_info(out_shape: Sequence[int], a: np.ndarray, b: np.ndarray) -> Dict[str, Any]:
    """A hidden map as JSON: its non-zero weights row by row (CSR)."""
    rows, cols = np.nonzero(a)
    indptr = np.searchsorted(rows, np.arange(a.shape[0] + 1))
    return {"out_shape": [int(v) for v in out_shape], "in_features": int(a.shape[1]), "indptr": indptr.tolist(),
            "indices": cols.tolist(), "values": a[rows, cols].tolist(), "bias": [int(v) for v in b]}


def _map_from_info(m: Dict[str, Any]) -> Tuple[Tuple[int, int, int], np.ndarray, List[int]]:
    out_shape = tuple(int(v) for v in m["out_shape"])
    indptr = np.asarray(m["indptr"], dtype=np.int64)
    a = np.zeros((len(indptr) - 1, int(m["in_features"])), dtype=np.int64)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    a[rows, np.asarray(m["indices"], dtype=np.int64)] = np.asarray(m["values"], dtype=np.int64)
    return out_shape, a, [int(v) for v in m["bias"]]


def _packed_model(info: Dict[str, Any]) -> PackedModel:
    version = info.get("version", 1)
    if not isinstance(version, int) or version > PACKED_VERSION:
        raise FormatError(f"packed plan version {version!r} is newer than this build reads (≤ {PACKED_VERSION}): "
                          "update pycrcnn")
    try:
        w = info["weights"]
        acts = [tuple(int(c) for c in a) for a in info.get("activations", [[0, 0, 1]])]
        maps = [_map_from_info(m) for m in w.get("maps", [])]
        return PackedModel(tuple(info["in_shape"]), np.asarray(w["conv_weight"], dtype=np.int64),
                           np.asarray(w["conv_bias"], dtype=np.int64), int(info["stride"]), int(info["padding"]),
                           np.asarray(w["linear_weight"], dtype=np.int64), [int(v) for v in w["linear_bias"]],
                           int(info["scales"]["input_bits"]), int(info["scales"]["output_bits"]),
                           activations=acts, maps=maps)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise FormatError(f"malformed packed plan ({exc!r})") from None


def context_from_packed_info(info: Dict[str, Any]) -> Context:
    """A keyless context for a saved packed plan (``keygen()`` makes its keys)."""
    return _context(info, _packed_model(info))


def _stage_names(n_acts: int, squares: Sequence[bool]) -> List[Tuple[str, str]]:
    """(engine stage, report name) in order: conv, square, map1, square2, ..., linear."""
    out = [("conv", "conv")]
    for j in range(n_acts):
        if j:
            out.append((f"map{j - 1}", f"map{j}"))
        out.append((f"act{j}", ("square" if squares[j] else "polynomial") + (str(j + 1) if j else "")))
    out.append(("linear", "linear"))
    return out


def _is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if a % n == 0:
            continue
        y = pow(a, d, n)
        if y in (1, n - 1):
            continue
        for _ in range(r - 1):
            y = y * y % n
            if y == n - 1:
                break
        else:
            return False
    return True


def _simd_primes(m: int, bits: int, need_bits: float) -> List[int]:
    """The largest primes ≡ 1 (mod 2m) below 2^bits whose product passes
    2^need_bits (fewest primes), or [] when they run out."""
    out: List[int] = []
    total = 0.0
    k = (2 ** bits - 2) // (2 * m)
    while k > 0 and total < need_bits:
        p = k * 2 * m + 1
        if _is_prime(p):
            out.append(p)
            total += math.log2(p)
        k -= 1
    return out if total >= need_bits else []


def _noise_after(q_bits: int, t: float, kinds: Sequence[str], conv_rotates: bool) -> List[float]:
    """Predicted noise budget (bits) after each stage of a model with several
    activations (measured at m=8192 and 16384: the first convolution's
    rotations leave ≈ 2^65 of noise, an activation costs ≈ t+14 bits, a map
    with special-prime baby steps ≈ t+8, the final linear map ≈ t+6)."""
    left = q_bits - t - 4
    out = []
    for kind in kinds:
        if kind == "conv":
            left = min(left - (t + 12), q_bits - t - 65) if conv_rotates else left - (t + 12)
        else:
            left -= {"act": t + 14, "map": t + 8, "linear": t + 6}[kind]
        out.append(left)
    return out


def _size(acts: int, conv_rotates: bool, layers: Sequence[LayerSpec], m: Optional[int],
          moduli_sizes: Optional[Sequence[int]], p_bits: Optional[int], noise_margin: int) -> Tuple[int, List[int], int]:
    """(m, moduli sizes, prime bits) for the depth, or a PlanError naming the stage where the noise runs out."""
    if acts == 1:
        return m or 8192, list(moduli_sizes or MODULI_SIZES), p_bits or 31
    kinds = ["conv"] + ["act", "map"] * (acts - 1) + ["act", "linear"]
    candidates = [(m, list(moduli_sizes))] if m and moduli_sizes else \
        [(mm, list(ms)) for mm, ms in ((8192, MODULI_SIZES), (16384, MODULI_SIZES_16384)) if m in (None, mm)]
    worst = None
    for mm, sizes in candidates:
        if len(sizes) < acts + 2:
            continue
        q_bits = sum(sizes)
        t = p_bits or min(31, min(sizes) - 2)
        while not p_bits and t > 17 and _noise_after(q_bits, t, kinds, conv_rotates)[-1] < noise_margin:
            t -= 1
        left = _noise_after(q_bits, t, kinds, conv_rotates)
        if left[-1] >= noise_margin:
            return mm, sizes, t
        worst = (mm, t, left)
    if worst is None:
        most = max(len(sizes) for _, sizes in candidates)
        act = layers[1 + 2 * max(0, most - 2)]
        raise PlanError(f"the ciphertext moduli run out at layer {act.index} ({act.type}): {acts} activations need "
                        f"{acts + 2} moduli (one level each, the linear part above the last), m={m or 16384} has {most}",
                        layer=act.index, layer_name=act.type,
                        fix="fewer activations, a larger m, or layout='batch' with a rencryption before this layer")
    mm, t, left = worst
    stage = next(i for i, v in enumerate(left) if v < noise_margin)
    layer = layers[stage]
    raise PlanError(
        f"the noise budget runs out at layer {layer.index} ({layer.type}, packed stage {stage}) even at m={mm} "
        f"with {t}-bit plaintext primes (predicted {left[stage]:.0f} bits left, {noise_margin} needed)",
        layer=layer.index, layer_name=layer.type,
        fix="fewer activations, or layout='batch' with a rencryption before this layer")


def plan_packed(model: Any, calibration_inputs: Any, *, sec: int = 128, input_bits: Optional[int] = None,
                weight_bits: Optional[int] = None, map_bits: Optional[int] = None, margin_bits: int = 8,
                p_bits: Optional[int] = None, m: Optional[int] = None, moduli_sizes: Optional[Sequence[int]] = None,
                noise_margin: int = 10, measure: bool = True) -> Plan:
    """Plans a model for the packed layout.

    ``input_bits``, ``weight_bits``, ``map_bits``: signed bits of the largest
    calibration input, conv weight and fused-map entry (defaults 8/10/12 with
    one activation, 6/6/10 with more). The plaintext primes (about ``p_bits``
    each: by default the largest the noise allows for the depth, 31 for one
    activation) hold the largest calibration output times 2^``margin_bits``;
    ``m`` and ``moduli_sizes`` default to the smallest ring that fits the
    depth. With ``measure`` the plan encrypts one calibration input under a
    throwaway key, reports the noise budget measured after every stage and
    checks the result against the reference (seconds).
    """
    if sec != 128:
        raise HEError("the packed layout is planned at 128-bit security in this build")
    spec = _as_spec(model)
    conv, segments = packed_family(spec)
    acts = len(segments)
    deep = acts > 1
    # Deeper models square the scales again: fewer bits in, the fused maps
    # keep 10 (two-square LeNet-1: 999/1,000 argmax agreement at 6/6/10, outputs ≈ 2^82).
    input_bits = input_bits or (6 if deep else 8)
    weight_bits = weight_bits or (6 if deep else 10)
    map_bits = map_bits or (10 if deep else 12)
    x = np.asarray(calibration_inputs, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise HEError(f"calibration_inputs must be [N, C, H, W] images, got shape {list(x.shape)}")
    ig = _integers(spec, conv, segments, x, input_bits, weight_bits, map_bits)
    pm, weights, activations, maps, scales, stage_scales = (ig[k] for k in (
        "pm", "weights", "activations", "maps", "scales", "stage_scales"))
    s_in, s_w, scale, stride, padding, in_shape = (ig[k] for k in ("s_in", "s_w", "scale", "stride", "padding",
                                                                   "in_shape"))
    out_bits, agreement = ig["out_bits"], ig["agreement"]
    conv_rotates = (conv.weight.shape[2] - 1) // stride > 0
    m, moduli_sizes, p_bits = _size(acts, conv_rotates, [conv] + [l for act, tail in segments for l in (act, tail[-1])],
                                    m, moduli_sizes, p_bits, noise_margin)
    primes = _simd_primes(m, p_bits, out_bits + margin_bits + 1)
    if not primes:
        raise PlanError(f"outputs reach 2^{out_bits:.1f}: the plaintext primes ≡ 1 mod {2 * m} below 2^{p_bits} "
                        "do not hold them", layer=segments[-1][1][-1].index, layer_name=segments[-1][1][-1].type,
                        fix="fewer bits (input_bits, weight_bits, map_bits)")
    ctx0 = Context(m=m, sec=sec, encoding="batch", p=primes, n_plaintext_moduli=len(primes),
                   moduli_sizes=list(moduli_sizes))
    t_bits = sum(math.log2(p) for p in primes)
    layout = pm.layout(m, len(moduli_sizes))
    info = {
        "format": PLAN_FORMAT, "version": PACKED_VERSION if deep else 1, "layout": "packed", "model": spec.name,
        "in_shape": list(in_shape), "stride": stride, "padding": padding,
        "scales": {"input_bits": s_in, "weight_bits": s_w, "map_bits": scales[-1], "output_bits": scale},
        "parameters": {"m": m, "sec": sec, "p": [int(p) for p in primes], "moduli": [int(q) for q in ctx0.moduli],
                       "moduli_sizes": [int(s) for s in moduli_sizes]},
        "weights": {k: v if isinstance(v, list) else v.tolist() for k, v in weights.items()},
    }
    if deep:
        info["activations"] = activations
        info["scales"]["hidden_map_bits"] = scales[:-1]
        info["weights"]["maps"] = [_map_to_info(o, a, b) for o, a, b in maps]
    ctx = _context(info, pm)
    report = _report(spec, conv, segments, x, s_in, stage_scales, layout, pm, t_bits, out_bits, agreement)
    if out_bits + margin_bits + 1 > t_bits:
        raise PlanError(f"outputs reach 2^{out_bits:.1f}; the plaintext primes hold 2^{t_bits - 1:.1f}",
                        layer=segments[-1][1][-1].index, layer_name=segments[-1][1][-1].type, fix="more primes")
    plan = Plan("packed", ctx, report, info, lambda xi: _reference(pm, xi))
    if measure:
        _measure(plan, x[:1])
    return plan


def _integers(spec: ModelSpec, conv: LayerSpec, segments: Sequence[Tuple[LayerSpec, List[LayerSpec]]], x: np.ndarray,
              input_bits: int, weight_bits: int, map_bits: int) -> Dict[str, Any]:
    """The plan's integers at the given precisions, the engine model holding
    them, the calibration outputs' size (bits) and argmax agreement with the float model."""
    acts = len(segments)
    in_shape = tuple(int(s) for s in x.shape[1:])
    shape = tuple(conv.output_shape(in_shape))
    stride, padding = int(conv.params["stride"][0]), int(conv.params["padding"][0])
    s_in = _bits_for(float(np.abs(x).max()), input_bits)
    s_w = _bits_for(float(np.abs(conv.weight).max()), weight_bits)
    conv_bias = conv.bias if conv.bias is not None else np.zeros(conv.weight.shape[0])
    scale = s_in + s_w
    weights: Dict[str, Any] = {"conv_weight": _round(conv.weight * 2.0 ** s_w),
                               "conv_bias": _round(conv_bias * 2.0 ** scale)}
    activations, maps, scales, stage_scales = [], [], [], [scale]
    for j, (act, tail) in enumerate(segments):
        a = _activation_coefficients(act)
        e = 0 if act.type == "Square" else _bits_for(abs(a[2]), weight_bits)
        if 2 * scale + e > 120:
            raise PlanError(f"the integers pass 120 bits at layer {act.index} ({act.type}): each activation doubles "
                            f"the scale (2^{scale} before it)", layer=act.index, layer_name=act.type,
                            fix="fewer bits (input_bits, weight_bits, map_bits), fewer activations, or "
                                "layout='batch' with a rencryption before this layer")
        coeffs = [round(a[0] * 2.0 ** (2 * scale + e)), round(a[1] * 2.0 ** (scale + e)), round(a[2] * 2.0 ** e)]
        if any(abs(c) >= 2 ** 62 for c in coeffs[1:]) or abs(coeffs[0]) >= 2 ** 126:
            raise PlanError(f"the polynomial at layer {act.index} needs coefficients beyond 62 bits at this depth "
                            f"(input scale 2^{scale})", layer=act.index, layer_name=act.type,
                            fix="fewer bits (input_bits, weight_bits, map_bits) or a Square")
        activations.append(coeffs)
        scale = 2 * scale + e
        stage_scales.append(scale)
        A, b = _fused_map(tail, shape)
        s_a = _bits_for(float(np.abs(A).max()), map_bits)
        scales.append(s_a)
        a_int, b_int = _round(A * 2.0 ** s_a), [int(v) for v in np.round(b * 2.0 ** (scale + s_a))]
        if j + 1 < acts:
            out_shape = tuple(np_reference.forward_numpy(tail, np.zeros((1, *shape))).shape[1:])
            out_shape = tuple(out_shape) + (1,) * (3 - len(out_shape))
            maps.append((out_shape, a_int, b_int))
            shape = out_shape
        else:
            weights["linear_weight"], weights["linear_bias"] = a_int, b_int
        scale += s_a
        stage_scales.append(scale)
    try:
        pm = PackedModel(in_shape, weights["conv_weight"], weights["conv_bias"], stride, padding,
                         weights["linear_weight"], weights["linear_bias"], s_in, scale,
                         activations=[tuple(c) for c in activations], maps=maps)
    except HEError as exc:
        raise PlanError(f"the packed model does not fit: {exc}", fix="smaller scales or layout='batch'") from None
    # Plaintext range: the largest calibration output; argmax agreement with the float model.
    try:
        ref = [[int(v) for v in _reference(pm, xi)[0]] for xi in x]
    except HEError as exc:
        raise PlanError(f"{exc}", layer=segments[-1][1][-1].index, layer_name=segments[-1][1][-1].type,
                        fix="fewer bits (input_bits, weight_bits, map_bits)") from None
    out_bits = math.log2(max(max(abs(v) for r in ref for v in r), 1))
    floats = np_reference.forward_numpy(spec.layers, x).reshape(len(x), -1)
    agreement = float((np.asarray(ref, dtype=float).argmax(1) == floats.argmax(1)).mean())
    return {"pm": pm, "weights": weights, "activations": activations, "maps": maps, "scales": scales,
            "stage_scales": stage_scales, "s_in": s_in, "s_w": s_w, "scale": scale, "stride": stride,
            "padding": padding, "in_shape": in_shape, "out_bits": out_bits, "agreement": agreement}


def _report(spec: ModelSpec, conv: LayerSpec, segments: Sequence[Tuple[LayerSpec, List[LayerSpec]]], x: np.ndarray,
            s_in: int, stage_scales: Sequence[int], layout: Dict[str, Any], pm: PackedModel, t_bits: float,
            out_bits: float, agreement: float) -> List[Dict[str, Any]]:
    """Per stage: the bits its values use (calibration inputs, at the plan's
    scales), rotations and products; the noise budget is added by _measure."""
    xq = np.round(x * 2.0 ** s_in) / 2.0 ** s_in
    values = [np_reference.forward_numpy([conv], xq)]
    for act, tail in segments:
        values.append(np_reference.forward_numpy([act], values[-1]))
        values.append(np_reference.forward_numpy(tail, values[-1]))
    names = _stage_names(len(segments), [a.type == "Square" for a, _ in segments])
    diags, rots = layout["map_diagonals"], layout["map_rotations"]
    report = [{"stage": "pack", "ciphertexts": layout["input_ciphertexts"], "rotations": 0,
               "bits": math.log2(max(np.abs(x).max() * 2.0 ** s_in, 1))}]
    conv_rot = layout["rotations"] - sum(rots) - (layout["diagonals"][1] - 1) - (layout["diagonals"][2] - 1)
    for i, (engine, name) in enumerate(names):
        v = values[i] if i < len(values) else values[-1]
        r: Dict[str, Any] = {"stage": name, "engine_stage": engine,
                             "bits": math.log2(max(float(np.abs(v).max()) * 2.0 ** stage_scales[i], 1)), "rotations": 0}
        if engine == "conv":
            r["rotations"] = conv_rot
        elif engine.startswith("map"):
            j = int(engine[3:])
            r["rotations"], r["diagonals"] = rots[j], diags[j]
            # both SIMD rows at work (the first map only): each product serves two diagonals
            r["simd_rows"] = 2 if j == 0 and layout.get("row_shift") is not None else 1
        elif engine == "linear":
            r["rotations"] = (layout["diagonals"][1] - 1) + (layout["diagonals"][2] - 1)
            r["bits"] = out_bits
            r["argmax_agreement"] = agreement
        report.append(r)
    for r in report:
        r["plaintext_bits"] = t_bits
        r["fits"] = r["bits"] + 1 < t_bits or r["stage"] != "linear"
    return report


def _measure(plan: Plan, x: np.ndarray) -> None:
    """Noise budget after each stage on one calibration input, under a throwaway key."""
    probe = context_from_packed_info(plan.info)
    probe.keygen()
    encoded = build_packed(probe)
    e = probe.encrypt(x)
    budgets = {"pack": probe.noise_budget(e)}
    out, reports = encoded.run(e, measure_noise=True)
    for r, (_, name) in zip(reports, encoded.stage_names):
        budgets[name] = r["noise_budget"]
    if not np.array_equal(probe.decrypt_integers(out), plan.reference(x)):
        raise HEError("the packed run does not match the plan's reference (noise or range): report this model")
    for r in plan.report:
        r["noise_budget"] = budgets[r["stage"]]


class PackedEncodedModel(list):
    """The packed stages (conv, activations, hidden maps, linear) of a planned
    model, run by the engine's runner: callable, ``run(x)`` returns ``(out, reports)``."""

    def __init__(self, context: Context, indices: Optional[Sequence[int]] = None):
        super().__init__()
        pm = context.packed_model
        if pm is None:
            raise HEError("this context is not planned for a packed model: use pycrcnn.plan(..., layout='packed')")
        self.context = context
        self.last_report: List[Dict[str, Any]] = []
        stages = pm.stages
        squares = [tuple(a) == (0, 0, 1) for a in pm.activations]
        self.stage_names = _stage_names(len(squares), squares)
        indices = list(indices) if indices is not None else list(range(len(stages)))
        for stage in stages:
            self.append(pm.layer(context, stage))
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
    conv, segments = packed_family(spec)
    c, h, w = pm.in_shape
    if conv.weight.shape[1] != c or (spec.input_shape and tuple(spec.input_shape) != (c, h, w)) \
            or len(segments) != len(pm.activations) \
            or np_reference.forward_numpy(spec.layers, np.zeros((1, c, h, w))).size != pm.classes:
        raise HEError(f"{spec.name} does not match the model this context was planned for ({pm!r})")
    # conv, act0, map0, act1, ..., linear: the maps end at their tail's last layer.
    order = [conv.index]
    for j, (act, tail) in enumerate(segments):
        if j:
            order.append(segments[j - 1][1][-1].index)
        order.append(act.index)
    order.append(segments[-1][1][-1].index)
    return PackedEncodedModel(context, order)
