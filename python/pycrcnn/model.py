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

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._engine import CipherTensor, HEError, Model, NoiseBudgetExhausted, RunCancelled
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
from .spec import WEIGHTED_LAYERS, LayerSpec, ModelSpec, PathLike, load_model_spec
from .torch_import import as_model_spec

__all__ = ["EncodedModel", "build_from_spec", "build_from_pytorch"]

HEType = Union[Pyfhel, Context]


def layer_weight_scale_bits(context: Any, spec: ModelSpec) -> List[Optional[int]]:
    """One weight scale per layer of ``spec``: the context's per-layer list
    (``weight_scale_bits`` given as a list, one per Conv/Linear layer in model
    order) spread over the weighted layers, ``None`` elsewhere and for
    uniform contexts. The list is the whole model's: a selection
    (``spec.select``) takes its own entries. A list whose length is not the
    model's weighted-layer count is refused, naming both."""
    bits = context.parameters().get("weight_scale_bits") if isinstance(context, Context) else None
    if not isinstance(bits, (list, tuple)):
        return [None] * len(spec.layers)
    weighted = [l for l in spec.layers if l.type in WEIGHTED_LAYERS]
    total = int(spec.metadata.get("weighted_total", len(weighted)))
    if len(bits) != total:
        raise HEError(f"the context has {len(bits)} per-layer weight scales ({list(bits)}) but {spec.name!r} has "
                      f"{total} weighted layers (Conv/Linear"
                      + (f": {', '.join(f'{l.index} {l.type}' for l in weighted)}" if total == len(weighted) else "")
                      + "); give one weight_scale_bits per weighted layer, in model order")
    offset = int(spec.metadata.get("weighted_before", 0))
    it = iter(bits[offset:offset + len(weighted)])
    return [int(next(it)) if l.type in WEIGHTED_LAYERS else None for l in spec.layers]


def _encode_layer(HE: HEType, layer: LayerSpec, weight_scale_bits: Optional[int] = None):
    p, t = layer.params, layer.type
    if t == "Conv2d":
        return ConvolutionalLayer(HE, layer.weight, stride=p["stride"], padding=p["padding"], bias=layer.bias,
                                  dilation=p["dilation"], groups=p["groups"], weight_scale_bits=weight_scale_bits)
    if t == "Conv1d":
        return Conv1dLayer(HE, layer.weight, stride=p["stride"][0], padding=p["padding"][0], bias=layer.bias,
                           dilation=p["dilation"][0], groups=p["groups"], weight_scale_bits=weight_scale_bits)
    if t == "Linear":
        return LinearLayer(HE, layer.weight, layer.bias, weight_scale_bits=weight_scale_bits)
    if t == "AvgPool2d":
        return AveragePoolLayer(HE, p["kernel_size"], p["stride"], p["padding"])
    if t == "Flatten":
        return FlattenLayer(HE)
    if t == "Square":
        return SquareLayer(HE)
    if t == "Polynomial":
        return PolynomialLayer(HE, p["coefficients"])
    raise layer.error()


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
        for layer, bits in zip(spec.layers, layer_weight_scale_bits(self.context, spec)):
            while pending and pending[0] <= layer.index:
                r = RencryptionLayer(HE)
                r.torch_index, r.spec = pending.pop(0), None
                self.append(r)
            enc = _encode_layer(HE, layer, bits)
            enc.torch_index, enc.spec = layer.index, layer
            self.append(enc)
        # A square followed by an average pooling runs as one engine step with
        # the affine layer before it: each square's input is computed where it
        # is needed (the conv's output is never held whole) and the squares of
        # a window are added before BFV scales them back (one scaling per
        # pooled output). The absorbed elements pass their input through.
        # Fixed here, so that iterating over the layers computes as model(x).
        for k in range(1, len(self) - 1):
            prev, sq, nxt = self[k - 1], self[k], self[k + 1]
            if any(getattr(e, "_layer", None) is None for e in (prev, sq, nxt)):
                continue
            fused = sq._layer.fuse_with(nxt._layer, prev._layer)
            if fused is not None:
                new_prev, sq._layer, nxt._layer = fused
                if new_prev is not None:
                    prev._layer = new_prev

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
        first, last = self.spec.indices[0], self.spec.indices[-1]
        return [(self[a - 1].torch_index if a > 0 else first, self[b].torch_index if b < len(self) else last + 1)
                for a, b in self.runner().segments()]

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

    # -- running and predicting: everything goes through the Rust runner -----------
    def runner(self) -> Model:
        """The engine's :class:`~pycrcnn._engine.Model` over the layers as they
        are now (built per call: cheap, and a list edited by hand stays in step)."""
        steps = []
        for layer in self:
            engine_layer = getattr(layer, "_layer", None)
            if engine_layer is None:
                raise HEError(f"element {layer!r} of the model is not an encrypted layer of pycrcnn; "
                              "a model runs pycrcnn layers only")
            steps.append((int(layer.torch_index), engine_layer))
        return Model(steps)

    def predict(self, input_bound: float = 1.0, callback: Optional[Callable] = None) -> List[Dict[str, Any]]:
        """Predicts, before running, whether the model fits the parameters.

        The engine runs each layer's worst output element on a *probe*: one
        ciphertext of ``input_bound`` standing for every input, combined by the
        output with the largest Σ|w| (so copies add up coherently: a
        conservative estimate). Costs milliseconds to seconds instead of a full
        pass and needs the secret key (the client chooses parameters). Returns
        one dict per layer: ``index``, ``name``, ``noise_budget`` (predicted
        bits left), ``growth`` (the engine's bound against p/2 or T/2),
        ``seconds`` and ``ok``; on the first layer that would fail, ``error``
        says why, and nothing after it is listed. ``callback(report, probe)``
        sees every layer, as in :meth:`run`.
        """
        ctx = self.context
        if not ctx.has_secret_key:
            raise HEError("predict() measures noise on probe ciphertexts and needs the secret key")
        fractional = ctx.encoding == "fractional"
        reports, failure = self.runner().predict(ctx, float(input_bound), callback)
        out: List[Dict[str, Any]] = []
        for r in reports:
            fits = fractional or r["growth"]["fits"]
            out.append({"index": r["index"], "name": r["name"], "noise_budget": r["noise_budget"],
                        "growth": r["growth"], "seconds": r["seconds"], "ok": r["noise_budget"] > 0 and fits})
        if failure is not None:
            position, exc = failure
            message = "noise budget exhausted" if isinstance(exc, NoiseBudgetExhausted) else f"{type(exc).__name__}: {exc}"
            if position < len(out):
                out = out[:position + 1]
                out[position].update(ok=False, error=message)
            else:
                layer = self[position]
                out.append({"index": layer.torch_index, "name": layer.name, "ok": False, "error": message})
        else:
            for k, entry in enumerate(out):
                if not entry["ok"]:
                    del out[k + 1:]
                    break
        return out

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

    def run(self, x: Any, start: Optional[int] = None, stop: Optional[int] = None, *, rencrypt: bool = True,
            debug: bool = False, measure_noise: bool = False, progress: bool = False,
            callback: Optional[Callable] = None, switch_result: str = "never") -> Tuple[CipherTensor, List[Dict[str, Any]]]:
        """Runs the layers whose torch index is in ``[start, stop)`` (default:
        all) through the engine's runner and returns ``(output, reports)``.

        ``reports`` has one dict per layer: ``position`` (in this list),
        ``index``, ``name``, ``seconds``, ``shape``, ``level``, ``growth`` and,
        with ``measure_noise`` or ``debug`` (which also prints each report) and
        the secret key, ``noise_budget``;
        a layer that fails adds ``error`` and ``error_type`` before the
        exception (which names the layer: ``exc.layer``, ``exc.layer_name``)
        propagates. ``callback(report, tensor)`` is called after every layer;
        returning ``False`` stops the run with :class:`pycrcnn.RunCancelled`.
        ``rencrypt=False`` skips rencryption layers (a server's segments).
        ``switch_result`` ("never", "always", "auto") switches the result down to
        the last modulus. Unlike :meth:`__call__` it stores nothing on the
        model, so one model can serve concurrent runs.
        """
        indices = [layer.torch_index for layer in self]
        lo = indices[0] if start is None else start
        hi = indices[-1] + 1 if stop is None else stop
        positions = [k for k, i in enumerate(indices) if lo <= i < hi and (rencrypt or self[k].spec is not None)]
        if not any(self[k].spec is not None for k in positions):
            raise HEError(f"no layer with a torch index in [{lo}, {hi}); this model has {self.spec.indices}")
        t = as_cipher_tensor(x) if lo > self.spec.indices[0] else self._input(x)
        fractional = t.encoding == "fractional"
        reports: List[Dict[str, Any]] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(positions), desc=self.spec.name, unit="layer", leave=False)

        def on_layer(report: Dict[str, Any], tensor: CipherTensor) -> Any:
            reports.append(report)
            if debug:
                _print_debug(report, fractional)
            if bar is not None:
                bar.set_postfix_str(f"{report['index']}:{report['name']}")
                bar.update(1)
            return True if callback is None else callback(report, tensor)

        try:
            out, _ = self.runner().run(t, positions[0], positions[-1] + 1, rencrypt=rencrypt,
                                       measure_noise=debug or measure_noise,
                                       switch_result=switch_result, callback=on_layer)
        except HEError as exc:
            if getattr(exc, "layer_name", None) is not None and not isinstance(exc, RunCancelled):
                reports.append({"index": exc.layer, "name": exc.layer_name, "error": str(exc),
                                "error_type": type(exc).__name__})
            exc.reports = reports
            raise
        finally:
            if bar is not None:
                bar.close()
        return out, reports

    def __call__(self, x: Any, debug: bool = False, progress: bool = False,
                 callback: Optional[Callable] = None) -> CipherTensor:
        """Runs every layer (rencryptions included: they need the secret key);
        the per-layer reports are kept in ``last_report``."""
        return self.run_range(x, None, None, debug=debug, progress=progress, rencrypt=True, callback=callback)

    def run_range(self, x: Any, start: Optional[int], stop: Optional[int], debug: bool = False,
                  progress: bool = False, rencrypt: bool = False, callback: Optional[Callable] = None) -> CipherTensor:
        """Runs the layers whose torch index is in ``[start, stop)``.

        Rencryption layers are skipped unless ``rencrypt=True``: between two
        :meth:`segments` the key holder rencrypts (on a server, that is the round
        trip to the client), so a server calls ``run_range`` once per segment.
        The per-layer reports are kept in ``last_report`` (use :meth:`run` where
        several runs share the model).
        """
        try:
            out, self.last_report = self.run(x, start, stop, rencrypt=rencrypt, debug=debug, progress=progress,
                                             callback=callback)
        except HEError as exc:
            self.last_report = getattr(exc, "reports", [])
            raise
        return out


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
    if getattr(context_of(HE), "packed_model", None) is not None:
        # A context planned for the packed layout runs the plan's stages.
        from .planner.packed import build_packed

        return build_packed(context_of(HE), spec)
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
    return build_from_spec(HE, as_model_spec(net), layers=layers, rencrypt_positions=list(rencrypt_positions or []))
