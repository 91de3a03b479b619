""":class:`BatchPlan`: a :class:`~pycrcnn.planner.plan.Plan` for the batch layout: the chosen
parameters, the per-layer report, the exact integer reference and streaming of many images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._engine import HEError
from ..he import Context
from .plan import PLAN_FORMAT, Plan

__all__ = ["BatchPlan", "batch_context"]


def batch_context(p: Dict[str, Any]) -> Context:
    """A new Context (no keys yet) for planned batch parameters."""
    ctx = Context(m=p["m"], p=list(p["p"]), sec=p["sec"], encoding="batch", scale_bits=p["scale_bits"],
                  weight_scale_bits=_weight_bits(p["weight_scale_bits"]), moduli_sizes=list(p["moduli_sizes"]),
                  calibrated_bound_bits=p.get("calibrated_bound_bits"))
    if list(ctx.moduli) != list(p["moduli"]):
        raise HEError("this build generates other ciphertext moduli for the planned sizes; plan again")
    return ctx


def _weight_bits(w: Any) -> Union[int, List[int]]:
    """An int (every weighted layer) or a list (one per Conv/Linear layer)."""
    return [int(b) for b in w] if isinstance(w, (list, tuple)) else int(w)


class BatchPlan(Plan):
    """Encryption parameters planned for a model in the batch layout.

    ``parameters`` (a dict: ``layout``, ``m``, ``sec``, ``p`` (plaintext
    primes), ``moduli_sizes``, ``moduli``, ``scale_bits``,
    ``weight_scale_bits`` (an int, or one per Conv/Linear layer in model
    order)), ``report`` (one dict per layer: ``index``,
    ``name``, ``bits`` (plaintext bits used), ``plaintext_bits`` (available),
    ``noise_budget`` (predicted bits left), ``seconds`` (predicted, one
    thread, one full batch of m images)), ``mode`` ("worst-case" or
    "calibrated", with ``margin_bits``), ``input_range``, ``spec`` (the
    model). ``context`` is a fresh :class:`Context` for these parameters,
    ready for ``keygen()``.
    """

    layout = "batch"

    def __init__(self, spec: Any, parameters: Dict[str, Any], report: List[Dict[str, Any]], *, mode: str,
                 input_range: Tuple[float, float], margin_bits: float = 0.0, notes: Sequence[str] = ()):
        # The base's context and reference are made lazily here: no super().__init__.
        self.spec = spec
        self.parameters = dict(parameters)
        self.report = list(report)
        self.mode = mode
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.margin_bits = float(margin_bits)
        self.notes = list(notes)
        self._context: Optional[Context] = None
        self._runner = None

    # -- parameters ------------------------------------------------------------------
    @property
    def m(self) -> int:
        return int(self.parameters["m"])

    @property
    def scale_bits(self) -> int:
        return int(self.parameters["scale_bits"])

    @property
    def weight_scale_bits(self) -> Union[int, List[int]]:
        """An int (every weighted layer) or one per Conv/Linear layer."""
        return _weight_bits(self.parameters["weight_scale_bits"])

    def new_context(self) -> Context:
        """A new Context (no keys yet) for the planned parameters."""
        return batch_context(self.parameters)

    @property
    def context(self) -> Context:
        """The plan's Context (made once; call ``keygen()`` on it)."""
        if self._context is None:
            self._context = self.new_context()
        return self._context

    def model(self, ctx: Optional[Context] = None):
        """The model encoded for ``ctx`` (default: :attr:`context`)."""
        from ..model import build_from_spec

        return build_from_spec(ctx if ctx is not None else self.context, self.spec)

    # -- the exact reference ------------------------------------------------------------
    def _engine_model(self):
        if self._runner is None:
            # Layers do not depend on keys; per-layer weight scales are the
            # layers' own (the uniform ones come with each reference call).
            w = self.weight_scale_bits
            self._runner = self.model(Context(m=1024, encoding="batch", scale_bits=self.scale_bits,
                                              weight_scale_bits=w)).runner()
        return self._runner

    @property
    def _uniform_weight_bits(self) -> int:
        w = self.weight_scale_bits
        return max(w) if isinstance(w, list) else w

    def reference(self, x: Any) -> np.ndarray:
        """The model on plaintext ``x`` (``[N, ...]``) in the engine's exact
        integer arithmetic: what ``ctx.decrypt_integers`` of an encrypted run
        returns, integer for integer (int64, or Python ints in an object
        array when they do not fit). Real values: divide by :attr:`output_scale`."""
        ints, _ = self._engine_model().reference(np.ascontiguousarray(x, dtype=np.float64), self.scale_bits,
                                                 self._uniform_weight_bits)
        return ints

    @property
    def output_scale(self) -> float:
        """The fixed-point scale of the model's outputs (integer = value · scale)."""
        _, scale = self._engine_model().reference(np.zeros((1, *self.parameters["input_shape"])), self.scale_bits,
                                                  self._uniform_weight_bits)
        return scale

    def decode(self, ints: np.ndarray) -> np.ndarray:
        """Exact integers to float64 values."""
        return np.asarray([float(v) for v in np.ravel(ints)]).reshape(np.shape(ints)) / self.output_scale

    # -- running many images ----------------------------------------------------------------
    def stream(self, x: Any, ctx: Optional[Context] = None, *, model: Any = None, batch_size: Optional[int] = None,
               progress: bool = False) -> Iterator[Tuple[slice, np.ndarray]]:
        """Encrypts, runs and decrypts ``x`` in batches of at most m images
        (the last one partly filled), one batch in memory at a time; yields
        ``(slice, exact integers)`` per batch. ``ctx`` holds the secret key
        (default: :attr:`context`, after ``keygen()``)."""
        ctx = ctx if ctx is not None else self.context
        model = model if model is not None else self.model(ctx)
        x = np.asarray(x, dtype=np.float64)
        size = min(int(batch_size or ctx.m), ctx.m)
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        starts = range(0, len(x), size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(x), unit="image", desc=getattr(self.spec, "name", "model"))
        try:
            for start in starts:
                part = slice(start, min(start + size, len(x)))
                t = ctx.encrypt(x[part])
                y = model(t)
                del t
                ints = ctx.decrypt_integers(y)
                del y
                if bar is not None:
                    bar.update(part.stop - part.start)
                yield part, ints
        finally:
            if bar is not None:
                bar.close()

    def run(self, x: Any, ctx: Optional[Context] = None, **options: Any) -> np.ndarray:
        """All of ``x`` through :meth:`stream`; the exact integers of every image."""
        parts = [ints for _, ints in self.stream(x, ctx, **options)]
        if any(p.dtype == object for p in parts):
            parts = [p.astype(object) for p in parts]
        return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.int64)

    # -- description and persistence -----------------------------------------------------------
    @property
    def info(self) -> Dict[str, Any]:
        """The JSON-able plan (what ``context_from_plan`` reads)."""
        return self.to_dict()

    def to_dict(self) -> Dict[str, Any]:
        """The plan without the model: parameters, mode, report (JSON-ready)."""
        return {"format": PLAN_FORMAT, "version": 1, "layout": "batch", "parameters": self.parameters, "mode": self.mode,
                "margin_bits": self.margin_bits, "input_range": list(self.input_range), "report": self.report,
                "notes": self.notes}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], spec: Any) -> "BatchPlan":
        if d.get("format") != PLAN_FORMAT:
            raise HEError("not a pycrcnn plan")
        return cls(spec, d["parameters"], d.get("report", []), mode=d.get("mode", "worst-case"),
                   input_range=tuple(d.get("input_range", (0.0, 0.0))), margin_bits=d.get("margin_bits", 0.0),
                   notes=d.get("notes", ()))

    def save(self, path: Union[str, Path]) -> None:
        """Writes :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Union[str, Path], spec: Any) -> "BatchPlan":
        return cls.from_dict(json.loads(Path(path).read_text()), spec)

    def table(self) -> str:
        """The report as a text table."""
        rows = [f"{'idx':>4} {'layer':<10} {'bits':>6} {'of':>5} {'budget':>7} {'seconds':>9}"]
        for r in self.report:
            nb = "-" if r.get("noise_budget") is None else str(r["noise_budget"])
            rows.append(f"{r['index']:>4} {r['name']:<10} {r['bits']:>6.1f} {r['plaintext_bits']:>5.1f} {nb:>7} "
                        f"{r['seconds']:>9.3f}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        p = self.parameters
        return (f"Plan(layout=batch, m={p['m']}, p={len(p['p'])}×{max(int(q).bit_length() for q in p['p'])} bits, "
                f"moduli={p['moduli_sizes']}, scale_bits={p['scale_bits']}, weight_scale_bits={p['weight_scale_bits']}, "
                f"mode={self.mode})")
