"""Encrypted models: :class:`EncodedModel`, :func:`build_from_spec` and :func:`build_from_pytorch`.

:func:`build_from_spec` / :func:`build_from_pytorch` encode a
:class:`~pycrcnn.spec.ModelSpec` (or an ``nn.Sequential``, or a model file)
for a context and return an :class:`EncodedModel`, a ``list`` of encrypted
layers (the seed's ``for layer in layers: x = layer(x)`` works) that is also
callable.

Rencryption positions are torch module indices: a :class:`RencryptionLayer`
(decrypt + encrypt afresh, which restores the noise budget and, in the batch
encoding, the input scale) is inserted **before** the module with that index.
``rencrypt_positions=[3]`` on LeNet-1 means "rencrypt the output of module 2,
then run module 3".

Example::

    from pycrcnn import Pyfhel, build_from_pytorch, encrypt_matrix, decrypt_matrix
    HE = Pyfhel(); HE.contextGen(p=953983721, m=4096); HE.keyGen()
    model = build_from_pytorch(HE, "LeNet1_Approx_single_square.pt")
    logits = decrypt_matrix(HE, model(encrypt_matrix(HE, image), debug=True))
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._engine import CipherTensor, HEError
from .crypto import as_cipher_tensor
from .he import Context, Pyfhel, context_of
from .layers import (
    AveragePoolLayer,
    Conv1dLayer,
    ConvolutionalLayer,
    FlattenLayer,
    LinearLayer,
    PolynomialLayer,
    RencryptionLayer,
    SquareLayer,
)
from .spec import LayerSpec, ModelSpec, PathLike, load_model_spec
from .torch_import import spec_from_torch

__all__ = ["EncodedModel", "build_from_spec", "build_from_pytorch"]

HEType = Union[Pyfhel, Context]


def _encode_layer(HE: HEType, layer: LayerSpec):
    p, t = layer.params, layer.type
    if t == "Conv2d":
        return ConvolutionalLayer(HE, layer.weight, stride=p["stride"], padding=p["padding"], bias=layer.bias,
                                  dilation=p["dilation"], groups=p["groups"])
    if t == "Conv1d":
        return Conv1dLayer(HE, layer.weight, stride=p["stride"][0], padding=p["padding"][0], bias=layer.bias,
                           dilation=p["dilation"][0], groups=p["groups"])
    if t == "Linear":
        return LinearLayer(HE, layer.weight, layer.bias)
    if t == "AvgPool2d":
        return AveragePoolLayer(HE, p["kernel_size"], p["stride"], p["padding"])
    if t == "Flatten":
        return FlattenLayer(HE)
    if t == "Square":
        return SquareLayer(HE)
    if t == "Polynomial":
        return PolynomialLayer(HE, p["coefficients"])
    raise layer.error()


def _copies(probe: CipherTensor, image_shape: Sequence[int], fractional: bool) -> CipherTensor:
    """A tensor of one image whose every element is the probe's ciphertext."""
    element = probe.to_numpy().reshape(-1)[0]
    arr = np.empty(int(np.prod(image_shape)), dtype=object)
    for i in range(arr.size):
        arr[i] = element
    return CipherTensor(arr.reshape(((1,) if fractional else ()) + tuple(image_shape)))


def _single(t: CipherTensor) -> CipherTensor:
    """The one element of a one-element result, as a probe."""
    return t.to_numpy().reshape(-1)[0]


def _worst_row(w: np.ndarray) -> int:
    return int(np.abs(w.reshape(w.shape[0], -1)).sum(axis=1).argmax())


def _probe_layer(ctx: Context, layer: Any, probe: CipherTensor, fractional: bool) -> CipherTensor:
    """``layer``'s worst output element computed from copies of ``probe``."""
    spec = layer.spec
    if spec is None:
        return ctx.rencrypt(probe)
    t, w, b = spec.type, spec.weight, spec.bias
    if t in ("Conv2d", "Conv1d", "Linear"):
        o = _worst_row(w)
        bias = None if b is None else b[o:o + 1]
        if t == "Linear":
            enc, shape = LinearLayer(ctx, w[o:o + 1], bias), (w.shape[1],)
        elif t == "Conv2d":
            enc, shape = ConvolutionalLayer(ctx, w[o:o + 1], bias=bias), tuple(w.shape[1:])
        else:
            enc, shape = Conv1dLayer(ctx, w[o:o + 1], bias=bias), tuple(w.shape[1:])
        return _single(enc(_copies(probe, shape, fractional)))
    if t == "AvgPool2d":
        k = spec.params["kernel_size"]
        k = (k, k) if isinstance(k, int) else tuple(k)
        return _single(AveragePoolLayer(ctx, k)(_copies(probe, (1,) + k, fractional)))
    if t == "Square":
        return ctx.square(probe)
    if t == "Polynomial":
        return ctx.polynomial(probe, [float(c) for c in spec.params["coefficients"]])
    return probe  # Flatten: nothing happens to the values


class EncodedModel(list):
    """Encrypted layers in order: a ``list`` (``for layer in model: x = layer(x)``
    works as in the seed) that is also callable, ``model(x, debug=False, progress=False)``.

    Every element has ``torch_index`` (its module's index; a rencryption layer
    has the index of the module it precedes) and ``spec`` (its
    :class:`LayerSpec`, ``None`` for rencryption).

    Attributes: ``HE`` and ``context``; ``spec`` (the selected :class:`ModelSpec`);
    ``specs``; ``rencrypt_positions``; ``last_report`` (a list of per-layer dicts
    of the last call: ``index``, ``name``, ``seconds``, ``shape``, ``growth`` and,
    with ``debug``, ``noise_budget``).
    """

    def __init__(self, HE: HEType, spec: ModelSpec, rencrypt_positions: Sequence[int] = ()):
        super().__init__()
        self.HE = HE
        self.context = context_of(HE)
        self.spec = spec
        self.rencrypt_positions = sorted({int(p) for p in rencrypt_positions})
        self.last_report: List[Dict[str, Any]] = []
        indices = spec.indices
        first, last = min(indices), max(indices)
        for p in self.rencrypt_positions:
            if not first <= p <= last:
                raise HEError(f"rencrypt position {p} is outside the model's torch indices {first}..{last} "
                              "(a rencryption is inserted before the module with that index)")
        pending = list(self.rencrypt_positions)
        for layer in spec.layers:
            while pending and pending[0] <= layer.index:
                r = RencryptionLayer(HE)
                r.torch_index, r.spec = pending.pop(0), None
                self.append(r)
            enc = _encode_layer(HE, layer)
            enc.torch_index, enc.spec = layer.index, layer
            self.append(enc)

    # -- description -----------------------------------------------------------
    @property
    def specs(self) -> List[LayerSpec]:
        return list(self.spec.layers)

    @property
    def indices(self) -> List[int]:
        return [getattr(layer, "torch_index", None) for layer in self]

    def segments(self) -> List[Tuple[int, int]]:
        """``[start, stop)`` torch-index ranges between rencryption positions:
        what a server runs between two round trips to the client."""
        idx = self.spec.indices
        bounds = [min(idx)] + [p for p in self.rencrypt_positions if p > min(idx)] + [max(idx) + 1]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if a < b]

    def describe(self) -> List[Dict[str, Any]]:
        """One dict per element: ``index``, ``type``, ``params`` (and ``weight_shape``)."""
        return [{"index": layer.torch_index, "type": "Rencryption", "params": {}} if layer.spec is None
                else layer.spec.describe() for layer in self]

    def output_shape(self, in_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of one output for the shape of one input."""
        return self.spec.output_shape(in_shape)

    def __repr__(self) -> str:
        body = ",\n".join(f"  ({l.torch_index}) {l!r}" for l in self)
        return f"EncodedModel([\n{body}\n])"

    # -- prediction ---------------------------------------------------------------
    def plan(self, input_bound: float = 1.0) -> List[Dict[str, Any]]:
        """Predicts, before running, whether the model fits the parameters.

        Runs each layer's worst output element on a *probe*: one ciphertext
        of ``input_bound`` standing for every input, combined by the output
        with the largest Σ|w| (so copies add up coherently: a conservative
        estimate). Costs milliseconds to seconds instead of a full pass and
        needs the secret key (the client chooses parameters). Returns one dict
        per layer: ``index``, ``name``, ``noise_budget`` (predicted bits
        left), ``growth`` (the engine's bound against p/2 or T/2) and ``ok``;
        on the first layer that would fail, ``error`` says why, and nothing
        after it is listed.
        """
        ctx = self.context
        if not ctx.has_secret_key:
            raise HEError("plan() measures noise on probe ciphertexts and needs the secret key")
        fractional = ctx.encoding == "fractional"
        probe = ctx.encrypt(np.float64(input_bound) if fractional else np.array([float(input_bound)]))
        plan: List[Dict[str, Any]] = []
        for layer in self:
            entry: Dict[str, Any] = {"index": layer.torch_index, "name": layer.name}
            try:
                probe = _probe_layer(ctx, layer, probe, fractional)
                entry["noise_budget"] = int(ctx.noise_budget(probe))
                entry["growth"] = dict(probe.growth_report())
                entry["ok"] = entry["noise_budget"] > 0 and (fractional or entry["growth"]["fits"])
                if entry["noise_budget"] <= 0:
                    entry["error"] = "noise budget exhausted"
            except HEError as exc:
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            plan.append(entry)
            if not entry["ok"]:
                break
        return plan

    # -- running --------------------------------------------------------------
    def _input(self, x: Any) -> CipherTensor:
        if isinstance(x, np.ndarray) and x.dtype != object:
            raise HEError("the model runs on encrypted data: encrypt the input first "
                          "(encrypt_matrix(HE, x) or context.encrypt(x))")
        t = as_cipher_tensor(x)
        if self.spec.input_shape is not None:
            got = tuple(t.shape[1:])
            if got != tuple(self.spec.input_shape):
                raise HEError(f"{self.spec.name}: expects inputs [N, {', '.join(map(str, self.spec.input_shape))}], "
                              f"got {list(t.shape)}")
        return t

    def _run(self, x: CipherTensor, layers: List[Any], debug: bool, progress: bool) -> CipherTensor:
        report: List[Dict[str, Any]] = []
        self.last_report = report
        fractional = x.encoding == "fractional"
        ctx = x.context  # the keys the data was encrypted under (a layer serves any key)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(layers), desc=self.spec.name, unit="layer", leave=False)
        try:
            owned = False  # the caller's tensor is never consumed, our intermediates may be
            for layer in layers:
                name = layer.name
                t0 = time.perf_counter()
                try:
                    x = layer._consume(x) if owned else layer(x)
                    owned = True
                except HEError as exc:
                    report.append({"index": layer.torch_index, "name": name, "error": str(exc),
                                   "error_type": type(exc).__name__})
                    raise _annotated(exc, layer) from exc
                seconds = time.perf_counter() - t0
                entry: Dict[str, Any] = {"index": layer.torch_index, "name": name, "seconds": seconds,
                                         "shape": list(x.shape)}
                try:
                    entry["growth"] = dict(x.growth_report())
                except Exception:  # noqa: BLE001 - informative only
                    pass
                if debug:
                    if ctx.has_secret_key:
                        entry["noise_budget"] = int(ctx.noise_budget(x))
                    _print_debug(entry, fractional)
                report.append(entry)
                if bar is not None:
                    bar.set_postfix_str(f"{layer.torch_index}:{name}")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return x

    def __call__(self, x: Any, debug: bool = False, progress: bool = False) -> CipherTensor:
        """Runs every layer (rencryptions included: they need the secret key)."""
        return self._run(self._input(x), list(self), debug, progress)

    def run_range(self, x: Any, start: int, stop: int, debug: bool = False, progress: bool = False,
                  rencrypt: bool = False) -> CipherTensor:
        """Runs the layers whose torch index is in ``[start, stop)``.

        Rencryption layers are skipped unless ``rencrypt=True``: between two
        :meth:`segments` the key holder rencrypts (on a server, that is the round
        trip to the client), so a server calls ``run_range`` once per segment.
        """
        chosen = [l for l in self if start <= l.torch_index < stop and (rencrypt or l.spec is not None)]
        if not any(l.spec is not None for l in chosen):
            raise HEError(f"no layer with a torch index in [{start}, {stop}); this model has {self.spec.indices}")
        t = as_cipher_tensor(x) if start > self.spec.indices[0] else self._input(x)
        return self._run(t, chosen, debug, progress)


def _annotated(exc: Exception, layer: Any) -> Exception:
    """The same exception type with the layer named first."""
    msg = f"layer {layer.torch_index} ({layer.name}): {exc}"
    try:
        new = type(exc)(msg)
    except Exception:  # noqa: BLE001
        return exc
    for attr in ("index", "module", "alternative"):
        if hasattr(exc, attr):
            setattr(new, attr, getattr(exc, attr))
    return new


def _print_debug(entry: Dict[str, Any], fractional: bool) -> None:
    parts = [f"[{entry['index']:>3}] {entry['name']:<12}", f"{entry['seconds']:8.3f} s",
             f"shape {entry['shape']}"]
    if "noise_budget" in entry:
        parts.append(f"noise budget {entry['noise_budget']} bits")
    g = entry.get("growth")
    if g:
        what = "coeff bound" if fractional else "value bound"
        parts.append(f"{what} {g['coeff_bound']:.3g} vs {'p/2' if fractional else 'T/2'} {g['limit']:.3g}"
                     + ("" if g["fits"] else f" (WRAP POSSIBLE: error up to {g['wrap_error_bound']:.3g})"))
    print("  ".join(parts), file=sys.stdout, flush=True)


def build_from_spec(HE: HEType, spec: Union[ModelSpec, PathLike], layers: Any = None,
                    rencrypt_positions: Optional[Sequence[int]] = None) -> EncodedModel:
    """Encodes a :class:`ModelSpec` (or a model file) for ``HE`` (a Pyfhel or Context).

    ``layers`` selects a sub-network by torch indices; ``rencrypt_positions``
    (torch indices, a rencryption before each; default: the spec's own) must
    lie inside it. Raises :class:`UnsupportedLayerError` if the selection holds
    a module that cannot run encrypted.
    """
    if not isinstance(spec, ModelSpec):
        spec = load_model_spec(spec)
    if layers is not None:
        spec = spec.select(layers)
    if not spec.layers:
        raise HEError(f"{spec.name!r} has no layer to run (only dropped modules such as Dropout/Identity)")
    spec.check_supported()
    positions = spec.rencrypt_positions if rencrypt_positions is None else list(rencrypt_positions)
    return EncodedModel(HE, spec, positions)


def build_from_pytorch(HE: HEType, net: Any, rencrypt_positions: Sequence[int] = (), layers: Any = None) -> EncodedModel:
    """The seed's builder: encrypted layers of an ``nn.Sequential`` (or a ``.pt``
    / ``.npz`` path, or a :class:`ModelSpec`) for a Pyfhel or Context.

    ``rencrypt_positions`` are torch module indices: a :class:`RencryptionLayer`
    is inserted **before** each. ``layers`` selects a sub-network (torch indices,
    e.g. ``[0, 1, 2]`` or ``range(0, 3)``); ``net[0:3]`` works as well.
    """
    if isinstance(net, ModelSpec):
        spec = net
    elif isinstance(net, (str, os.PathLike)) and Path(net).suffix == ".npz":
        spec = load_model_spec(net)
    else:
        spec = spec_from_torch(net)
    return build_from_spec(HE, spec, layers=layers, rencrypt_positions=list(rencrypt_positions or []))
