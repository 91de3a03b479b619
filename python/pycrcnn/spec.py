"""The torch-free model format: :class:`ModelSpec`, a list of :class:`LayerSpec`, and its ``.npz`` file.

A :class:`ModelSpec` describes a sequential network without torch: each
:class:`LayerSpec` holds a torch module index, a type, parameters and weights
as numpy arrays (:func:`pycrcnn.torch_import.spec_from_torch` makes one from
an ``nn.Sequential``). :func:`export_model` writes it as one ``.npz`` (the
arrays plus a JSON description); :func:`load_model_spec` reads it back with
``np.load(allow_pickle=False)``: no torch needed, nothing executed.

Layer indices are always **torch module indices** (positions in the
``nn.Sequential``), also after slicing, folding or dropping modules.
Shapes are checked by the engine's rules (``_engine.layer_output_shape``),
the same the encrypted layers apply.
"""
from __future__ import annotations

import json
import os
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._engine import FormatError, HEError, layer_output_shape
from . import reference

__all__ = [
    "LayerSpec",
    "ModelSpec",
    "UnsupportedLayerError",
    "export_model",
    "load_model_spec",
    "SUPPORTED_TYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

PathLike = Union[str, "os.PathLike[str]"]

#: layer types an EncodedModel can run
SUPPORTED_TYPES = ("Conv2d", "Conv1d", "Linear", "AvgPool2d", "Flatten", "Square", "Polynomial")
#: the layers with a weight scale of their own (a context's per-layer
#: ``weight_scale_bits`` has one entry for each, in model order)
WEIGHTED_LAYERS = ("Conv2d", "Conv1d", "Linear")
#: the ``format`` field of exported models
FORMAT_NAME = "pycrcnn-model"
#: the version of the exported format this module writes (and the newest it reads)
FORMAT_VERSION = 1

#: what an unsupported module is told to use when no better alternative is known
DEFAULT_ALTERNATIVE = "HE-friendly modules: Conv2d, Conv1d, Linear, AvgPool2d, Flatten, pycrcnn.nn.Square, pycrcnn.nn.Polynomial"


class UnsupportedLayerError(HEError):
    """A module that cannot run on encrypted data is part of the network to build.

    The message names the torch module index, the module and the HE-friendly
    alternative. Attributes: ``index``, ``module`` (its repr), ``alternative``.
    """

    def __init__(self, message: str, index: Optional[int] = None, module: Optional[str] = None,
                 alternative: Optional[str] = None):
        super().__init__(message)
        self.index = index
        self.module = module
        self.alternative = alternative


# ---------------------------------------------------------------------------
# the torch-free model description


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


_TUPLE_PARAMS = ("kernel_size", "stride", "padding", "dilation")


def _params_from_json(params: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(params)
    for k in _TUPLE_PARAMS:
        if isinstance(out.get(k), list):
            out[k] = tuple(int(x) for x in out[k])
    return out


@dataclass
class LayerSpec:
    """One torch module, described without torch.

    ``index`` is the module's index in the ``nn.Sequential``; ``type`` one of
    :data:`SUPPORTED_TYPES` or ``"Unsupported"`` (then ``params`` holds
    ``module``, ``class``, ``reason`` and ``alternative``); ``weight`` and
    ``bias`` are float64 arrays in torch's layout (BatchNorm already folded in,
    see ``params["folded_batchnorm"]``).
    """

    index: int
    type: str
    params: Dict[str, Any] = field(default_factory=dict)
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None

    @property
    def supported(self) -> bool:
        return self.type in SUPPORTED_TYPES

    @property
    def end_index(self) -> int:
        """The last torch index this layer stands for (its folded BatchNorm, if any)."""
        return int(self.params.get("folded_batchnorm", self.index))

    def error(self) -> UnsupportedLayerError:
        """The error building this (unsupported) layer raises."""
        p = self.params
        module = p.get("module", self.type)
        reason = p.get("reason") or "it cannot run on encrypted data (BFV evaluates only additions and multiplications)"
        alt = p.get("alternative", DEFAULT_ALTERNATIVE)
        return UnsupportedLayerError(
            f"layer {self.index} ({module}) is not supported: {reason}. Use {alt}. "
            f"To run only the layers before it, pass layers=[first, ..., {self.index - 1}].",
            index=self.index, module=module, alternative=alt)

    def output_shape(self, in_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of one output for the shape of one input, by the engine's
        rules; raises if the input does not fit (or the layer is unsupported)."""
        if not self.supported:
            raise self.error()
        try:
            return tuple(layer_output_shape(self.type, [int(s) for s in in_shape], self.params))
        except HEError as exc:
            raise type(exc)(f"layer {self.index}: {exc}") from None

    def describe(self) -> Dict[str, Any]:
        d = {"index": self.index, "type": self.type, "params": _jsonable(self.params)}
        if self.weight is not None:
            d["weight_shape"] = list(self.weight.shape)
        return d

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"LayerSpec({self.index}, {self.type}{', ' + args if args else ''})"


@dataclass
class ModelSpec:
    """A sequential network without torch: what :func:`export_model` stores.

    ``layers`` are in order, each with its torch module index (dropped modules
    leave gaps). ``input_shape`` is the shape of one input (e.g. ``(1, 28, 28)``)
    when known; ``normalization`` says how raw data becomes inputs;
    ``rencrypt_positions`` are the torch indices before which the model should be
    rencrypted (used when building without explicit positions).
    """

    name: str = "model"
    input_shape: Optional[Tuple[int, ...]] = None
    layers: List[LayerSpec] = field(default_factory=list)
    normalization: Optional[str] = None
    rencrypt_positions: List[int] = field(default_factory=list)
    accuracy: Optional[float] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    #: the number of modules of the source network (torch indices run 0 .. n_modules-1)
    n_modules: Optional[int] = None

    @property
    def indices(self) -> List[int]:
        return [layer.index for layer in self.layers]

    @property
    def unsupported(self) -> List[LayerSpec]:
        return [layer for layer in self.layers if not layer.supported]

    def check_supported(self) -> None:
        """Raises :class:`UnsupportedLayerError` for the first unsupported layer."""
        bad = self.unsupported
        if bad:
            raise bad[0].error()

    def index_range(self, layers: Any = None) -> Tuple[int, int]:
        """``[start, stop)`` torch indices selected by ``layers`` (see :meth:`select`)."""
        last = (self.n_modules - 1) if self.n_modules else (max(self.indices) if self.layers else -1)
        if layers is None:
            return 0, last + 1
        if isinstance(layers, slice):
            start, stop, step = layers.indices(last + 1)
            if step != 1:
                raise HEError(f"layers: a slice with step {step}; only consecutive layers can be selected")
            sel = list(range(start, stop))
        elif isinstance(layers, (int, np.integer)):
            sel = [int(layers)]
        else:
            try:
                sel = [int(i) for i in layers]
            except (TypeError, ValueError):
                raise HEError(f"layers must be a list or range of torch module indices, got {layers!r}") from None
        if not sel:
            raise HEError("layers: empty selection")
        start, stop = min(sel), max(sel) + 1
        if start < 0 or stop - 1 > last:
            raise HEError(f"layers {layers!r}: torch module indices must lie in 0..{last} for {self.name!r}")
        return start, stop

    def select(self, layers: Any = None) -> "ModelSpec":
        """The sub-network of the torch indices ``layers``.

        ``layers`` is ``None`` (everything), a list of indices, a ``range`` or a
        ``slice``; as in the seed's requests, a list selects the consecutive
        modules from its smallest to its largest index (``[0, 3]`` = 0, 1, 2, 3).
        A BatchNorm folded into a layer must be selected together with it.
        """
        start, stop = self.index_range(layers)
        chosen = []
        for layer in self.layers:
            inside, bn_inside = start <= layer.index < stop, start <= layer.end_index < stop
            if inside != bn_inside:
                raise HEError(
                    f"layers {start}..{stop - 1}: module {layer.index} ({layer.type}) and the BatchNorm at "
                    f"{layer.end_index} folded into it must be selected together")
            if inside:
                chosen.append(layer)
        if not chosen:
            raise HEError(f"layers {start}..{stop - 1} of {self.name!r} hold no layer to run (only dropped modules)")
        # Where the selection's weighted layers sit among the whole model's:
        # a context's per-layer weight scales are one per weighted layer of
        # the whole model (pycrcnn.model.layer_weight_scale_bits).
        weighted = [l.index for l in self.layers if l.type in WEIGHTED_LAYERS]
        before = sum(1 for i in weighted if i < start)
        slots = {"weighted_before": int(self.metadata.get("weighted_before", 0)) + before,
                 "weighted_total": int(self.metadata.get("weighted_total", len(weighted)))}
        return ModelSpec(name=self.name, input_shape=self.input_shape if start == 0 else None, layers=chosen,
                         normalization=self.normalization if start == 0 else None,
                         rencrypt_positions=[p for p in self.rencrypt_positions if start < p < stop],
                         accuracy=self.accuracy if (start, stop) == self.index_range() else None,
                         metadata=dict(self.metadata, selected=[start, stop - 1], **slots), n_modules=self.n_modules)

    def describe(self) -> List[Dict[str, Any]]:
        return [layer.describe() for layer in self.layers]

    def output_shape(self, in_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of one output for the shape of one input (checks every layer's input)."""
        shape = tuple(int(s) for s in in_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:
        """The plain forward pass in float64 numpy with torch's semantics: the
        reference when torch is not installed."""
        return reference.forward_numpy(self.layers, x)

    def __repr__(self) -> str:
        body = "\n".join(f"  ({l.index}): {l.type} {_jsonable(l.params)}" for l in self.layers)
        return f"ModelSpec({self.name!r}, input_shape={self.input_shape}\n{body}\n)"


# ---------------------------------------------------------------------------
# the .npz format


def export_model(net_or_spec: Any, path: PathLike, *, name: Optional[str] = None,
                 input_shape: Optional[Sequence[int]] = None, normalization: Optional[str] = None,
                 rencrypt_positions: Optional[Sequence[int]] = None, accuracy: Optional[float] = None,
                 metadata: Optional[Dict[str, Any]] = None, plan: Any = None) -> Path:
    """Writes a model as one ``.npz``: float64 arrays ``layer<i>_weight`` /
    ``layer<i>_bias`` and ``__spec__``, a JSON string with the architecture and
    metadata (``format``, ``version``, ``name``, ``input_shape``,
    ``normalization``, ``rencrypt_positions``, ``accuracy``, ``layers``). No
    pickled objects: :func:`load_model_spec` reads it with
    ``np.load(allow_pickle=False)`` and without torch. Keyword arguments
    override the spec's metadata. ``plan`` (a :class:`pycrcnn.Plan`) is saved
    beside it as ``__plan__`` (JSON; ``pycrcnn.planner.load_plan`` reads it).
    Returns the path written.
    """
    if isinstance(net_or_spec, ModelSpec):
        spec = net_or_spec
    else:
        from .torch_import import spec_from_torch  # it imports this module

        spec = spec_from_torch(net_or_spec)
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    arrays: Dict[str, np.ndarray] = {}
    layers_json = []
    for k, layer in enumerate(spec.layers):
        entry = {"index": int(layer.index), "type": layer.type, "params": _jsonable(layer.params),
                 "weight": None, "bias": None}
        for what in ("weight", "bias"):
            arr = getattr(layer, what)
            if arr is not None:
                key = f"layer{k}_{what}"
                arrays[key] = np.ascontiguousarray(arr, dtype=np.float64)
                entry[what] = key
        layers_json.append(entry)
    shape = input_shape if input_shape is not None else spec.input_shape
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": name or spec.name,
        "input_shape": [int(s) for s in shape] if shape is not None else None,
        "normalization": normalization if normalization is not None else spec.normalization,
        "rencrypt_positions": [int(p) for p in (rencrypt_positions if rencrypt_positions is not None
                                                else spec.rencrypt_positions)],
        "accuracy": accuracy if accuracy is not None else spec.accuracy,
        "n_modules": spec.n_modules,
        "metadata": _jsonable(dict(spec.metadata, **(metadata or {}))),
        "layers": layers_json,
    }
    arrays["__spec__"] = np.array(json.dumps(doc))
    if plan is not None:
        arrays["__plan__"] = np.array(json.dumps(plan.info))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)  # the JSON strings are UTF-32: they compress ~10x
    return path


#: the largest array a model file may hold (bytes): a file is read whole, so a
#: header declaring more is refused before anything is allocated
MAX_ARRAY_BYTES = 1 << 30
#: integer parameters and their smallest allowed value
_INT_PARAMS = {"in_channels": 1, "out_channels": 1, "groups": 1, "in_features": 1, "out_features": 1,
               "folded_batchnorm": 0}
#: the errors of reading a damaged zip / npy container
_CONTAINER_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, SyntaxError, RecursionError,
                     RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error, struct.error,
                     tokenize.TokenError)


def _read_npz(path: Path) -> Dict[str, np.ndarray]:
    """Every array of a ``.npz`` (a zip of ``.npy`` files), read without
    pickles and checked before it is allocated: each member's header must
    declare a plain numeric (or string) dtype and no more bytes than it holds.
    Any damage is a :class:`FormatError`."""
    arrays: Dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with z.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                if dtype.hasobject:
                    raise FormatError(f"{path}: array {name!r} holds Python objects; model files hold numbers only")
                nbytes = int(np.prod([int(d) for d in shape], dtype=object)) * dtype.itemsize
                if nbytes > min(info.file_size, MAX_ARRAY_BYTES):
                    raise FormatError(f"{path}: array {name!r} declares shape {shape} ({nbytes} bytes) but the "
                                      f"file holds {info.file_size} bytes for it (limit {MAX_ARRAY_BYTES})")
                with z.open(info) as fh:
                    arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
    except FormatError:
        raise
    except (_CONTAINER_ERRORS + (MemoryError,)) as exc:
        raise FormatError(f"{path}: not a readable .npz model file ({type(exc).__name__}: {exc})") from None
    return arrays


def _spec_from_npz(path: Path) -> ModelSpec:
    npz = _read_npz(path)
    if "__spec__" not in npz:
        raise FormatError(f"{path}: no __spec__ entry; not a model written by pycrcnn.export_model")
    try:
        doc = json.loads(str(npz["__spec__"][()]))
    except (ValueError, TypeError, IndexError, RecursionError) as exc:
        raise FormatError(f"{path}: __spec__ is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                          f"expected {FORMAT_NAME!r}")
    if not _is_int(doc.get("version")) or doc["version"] > FORMAT_VERSION or doc["version"] < 1:
        raise FormatError(f"{path}: format version {doc.get('version')!r}; this pycrcnn reads 1..{FORMAT_VERSION}")
    entries = doc.get("layers")
    if not isinstance(entries, list):
        raise FormatError(f"{path}: 'layers' must be a list of layer descriptions")
    layers: List[LayerSpec] = []
    for k, entry in enumerate(entries):
        layer = _layer_from_json(entry, npz, f"{path}: layer {k}")
        if layers and layer.index <= layers[-1].index:
            raise FormatError(f"{path}: layer indices must increase, got {layers[-1].index} then {layer.index}")
        layers.append(layer)
    input_shape = doc.get("input_shape")
    if input_shape is not None and not (isinstance(input_shape, list) and 1 <= len(input_shape) <= 4
                                        and all(_is_int(s) and 1 <= s <= 1 << 20 for s in input_shape)):
        raise FormatError(f"{path}: input_shape must be a list of 1 to 4 positive integers, got {input_shape!r}")
    positions = doc.get("rencrypt_positions") or []
    if not (isinstance(positions, list) and all(_is_int(p) and 0 <= p < 1 << 31 for p in positions)):
        raise FormatError(f"{path}: rencrypt_positions must be a list of torch module indices, got {positions!r}")
    n_modules = doc.get("n_modules")
    if n_modules is not None and not (_is_int(n_modules) and (not layers or layers[-1].end_index < n_modules < 1 << 31)):
        raise FormatError(f"{path}: n_modules must be an integer above the last layer index, got {n_modules!r}")
    metadata = doc.get("metadata") or {}
    normalization, accuracy = doc.get("normalization"), doc.get("accuracy")
    if (not isinstance(metadata, dict) or not isinstance(normalization, (str, type(None)))
            or not (accuracy is None or (isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool)))):
        raise FormatError(f"{path}: metadata must be an object, normalization a string, accuracy a number")
    spec = ModelSpec(
        name=str(doc.get("name") or path.stem),
        input_shape=tuple(input_shape) if input_shape else None,
        layers=layers,
        normalization=normalization,
        rencrypt_positions=list(positions),
        accuracy=accuracy,
        metadata=dict(metadata),
        n_modules=n_modules,
    )
    # shapes of the weights against the parameters, so a bad file fails here and not in the engine
    for layer in spec.layers:
        _check_weights(layer, path)
    return spec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_from_json(entry: Any, npz: Dict[str, np.ndarray], where: str) -> LayerSpec:
    """One layer of ``__spec__``, its parameters type-checked and its arrays
    finite float64: what the engine gets is well-formed."""
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: a layer description must be an object, got {type(entry).__name__}")
    index, ltype, params = entry.get("index"), entry.get("type"), entry.get("params") or {}
    if not (_is_int(index) and 0 <= index < 1 << 31):
        raise FormatError(f"{where}: index must be a torch module index, got {index!r}")
    if ltype not in SUPPORTED_TYPES and ltype != "Unsupported":
        raise FormatError(f"{where}: unknown layer type {ltype!r} at index {index}")
    if not isinstance(params, dict):
        raise FormatError(f"{where}: params must be an object, got {type(params).__name__}")
    for key, value in params.items():
        if key in _INT_PARAMS:
            ok = _is_int(value) and _INT_PARAMS[key] <= value < 1 << 31
        elif key in _TUPLE_PARAMS:
            ok = (_is_int(value) and 0 <= value < 1 << 31) or (
                isinstance(value, list) and 1 <= len(value) <= 3 and all(_is_int(x) and 0 <= x < 1 << 31 for x in value))
        elif key == "coefficients":
            ok = isinstance(value, list) and 0 < len(value) <= 64 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) for c in value)
        elif key == "bias":
            ok = isinstance(value, bool)
        else:
            ok = True  # descriptive (module, class, reason, alternative, ...)
        if not ok:
            raise FormatError(f"{where} ({ltype}): bad parameter {key}={value!r}")
    arrs: Dict[str, Optional[np.ndarray]] = {}
    for what in ("weight", "bias"):
        key = entry.get(what)
        if key is None:
            arrs[what] = None
            continue
        if not isinstance(key, str) or key not in npz:
            raise FormatError(f"{where}: array {key!r} of layer {index} is missing")
        arr = npz[key]
        if arr.dtype.kind not in "fiu" or not np.all(np.isfinite(arr)):
            raise FormatError(f"{where}: {what} of layer {index} must hold finite numbers, got dtype {arr.dtype}")
        arrs[what] = np.asarray(arr, dtype=np.float64)
    return LayerSpec(index, ltype, _params_from_json(params), arrs["weight"], arrs["bias"])


def _check_weights(layer: LayerSpec, where: Any) -> None:
    p, w, t = layer.params, layer.weight, layer.type
    expected = None
    try:
        if t in ("Conv2d", "Conv1d"):
            kernel = p["kernel_size"]
            kernel = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,) * (2 if t == "Conv2d" else 1)
            expected = (p["out_channels"], p["in_channels"] // p["groups"], *kernel)
        elif t == "Linear":
            expected = (p["out_features"], p["in_features"])
        elif t == "Polynomial" and not p.get("coefficients"):
            raise FormatError(f"{where}: layer {layer.index} (Polynomial) has no coefficients")
    except KeyError as exc:
        raise FormatError(f"{where}: layer {layer.index} ({t}) lacks parameter {exc}") from None
    if expected is not None:
        if w is None or tuple(w.shape) != tuple(expected):
            raise FormatError(f"{where}: layer {layer.index} ({t}) weight shape "
                              f"{None if w is None else list(w.shape)}, expected {list(expected)}")
        if layer.bias is not None and layer.bias.shape != (expected[0],):
            raise FormatError(f"{where}: layer {layer.index} ({t}) bias shape {list(layer.bias.shape)}, "
                              f"expected [{expected[0]}]")


def load_model_spec(path: PathLike, layers: Any = None) -> ModelSpec:
    """Reads a model description: ``.npz`` from :func:`export_model` (no torch
    needed) or a ``.pt``/``.pth`` pickle (needs torch; only load files you trust,
    see :func:`pycrcnn.models.load_torch_model`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    if p.suffix == ".npz":
        spec = _spec_from_npz(p)
    elif p.suffix in (".pt", ".pth"):
        from .torch_import import spec_from_torch  # it imports this module

        spec = spec_from_torch(p)
    else:
        raise FormatError(f"{p}: unknown model file type {p.suffix!r}; expected .npz (export_model) or .pt/.pth")
    return spec.select(layers) if layers is not None else spec

