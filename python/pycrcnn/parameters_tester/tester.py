"""Which encryption parameters does a model need? Run it encrypted under several and compare.

The seed's parameters tester, as a module and a command::

    python -m pycrcnn.parameters_tester CONFIG.json --model PATH --data DIR \\
        --out results.json [--plot noise.png] [--images N] [--max-threads K]

``CONFIG.json`` is the seed's format (command-line arguments override it)::

    {
      "encryption_parameters": [
        {"m": 2048, "p": 13513511, "sec": 128, "base": 2, "rencrypt_positions": []},
        {"m": 4096, "p": 953983721, "sec": 128, "base": 2}
      ],
      "debug": true,            // per-layer measurements ("y"/"n" accepted too)
      "layers": [0, 3] | null,  // torch indices to encrypt: min..max, as the seed's server
      "model_path": "LeNet1_Approx_single_square.pt",  // .pt, .npz, or a shipped model name
      "max_threads": 2,         // parameter sets tested at the same time
      "images": 1               // optional: MNIST test digits to encrypt
    }

Every parameter set uses the **fractional** encoding (the seed's: one value per
ciphertext; optional keys ``int_digits``/``frac_digits``, or Pyfhel's
``intDigits``/``fracDigits``). For each set the tester makes a context and keys,
encrypts the first ``images`` MNIST test digits (``pixels / 255``; ``--data``,
else ``$PYCRCNN_DATA``, else the shared folder; the bundled sample if none is
found), runs the selected layers and compares with the same layers in plain
float64 (torch when installed and the model is a ``.pt``; else the model's
numpy forward). When the selected layers start after module 0, their plain
input is the output of the modules before them.

The results (JSON) hold, per parameter set: ``encryption_parameters``,
``status`` (``ok``; ``wrap_possible`` when a layer's coefficient bound exceeds p/2 —
the measured errors then say whether values did wrap; ``noise_budget_exhausted``,
``context_error``, ``error``),
``final_max_error``, ``argmax_equal``, ``error`` and ``failed_layer`` (index and
name) when something failed, ``coefficients_fit``, ``first_wrap_layer`` and
``warnings`` (layers whose coefficient bound exceeds p/2), ``seconds``, and
``layers``: the seed's per-layer entries (``layer_name``, ``min_noise``,
``max_error``, ``max_error_position``, ``cipher_value``, ``plain_value``) plus
``index``, ``avg_error``, ``seconds`` and the growth report (``coeff_bound``,
``limit`` = p/2, ``wrap_error_bound``, ``fits``) and, with ``debug``, the measured
coefficients (``measured_coeff_max``, ``measured_wrap_risk``: the decode error that
coefficients measured above p/4 could cause; ``measured_wrap_layer`` names the
first layer where it is not 0). Without ``debug`` only the
final output is decrypted and ``min_noise`` is measured on a sample of each
layer's ciphertexts (``noise_sampled: true``).

A parameter set that cannot be made, whose noise budget runs out or whose
layer fails is reported with the message and the layer — never a crash, and
never numbers that were not compared.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..planner.auto import auto_test, is_auto
from .._engine import Context, HEError, NoiseBudgetExhausted
from ..model import build_from_spec
from ..spec import LayerSpec, ModelSpec, load_model_spec
from ..torch_import import spec_from_torch

__all__ = ["run_tests", "load_config", "plot_results", "main"]

#: ciphertexts per layer whose noise is measured when debug is off
NOISE_SAMPLE = 8


# ---------------------------------------------------------------------------
# configuration


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("y", "yes", "true", "1", "on")
    return bool(v)


def load_config(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """Reads a config file; a relative ``model_path`` is taken relative to the file."""
    path = Path(path)
    with open(path, "r", encoding="utf-8") as fh:
        try:
            cfg = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object with 'encryption_parameters'")
    mp = cfg.get("model_path")
    if isinstance(mp, str) and not Path(mp).is_absolute() and (path.parent / mp).exists():
        cfg["model_path"] = str((path.parent / mp).resolve())
    return cfg


def _resolve_model(model: Any) -> Tuple[ModelSpec, Any, str]:
    """(spec, torch net or None, description) for a path, shipped name, ModelSpec or nn.Sequential."""
    if isinstance(model, ModelSpec):
        return model, None, model.name
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not p.exists():
            from ..models import INFO, shipped_model_path

            if str(model) in INFO:
                p = shipped_model_path(str(model))
            else:
                raise FileNotFoundError(f"model {str(model)!r}: no such file, and not a shipped model "
                                        f"({', '.join(sorted(INFO))})")
        if p.suffix in (".pt", ".pth"):
            from ..models import load_torch_model

            net = load_torch_model(p)
            return spec_from_torch(p), net, str(p)
        return load_model_spec(p), None, str(p)
    # an nn.Sequential
    return spec_from_torch(model), model, type(model).__name__


def _parameter_sets(cfg: Dict[str, Any]) -> List[Any]:
    sets = cfg.get("encryption_parameters")
    if is_auto(sets):  # planned by pycrcnn.plan (batch layout)
        return ["auto"]
    if isinstance(sets, dict):
        sets = [sets]
    if not isinstance(sets, list) or not sets:
        raise ValueError("the config needs 'encryption_parameters': a non-empty list of {m, p, sec, base, ...}")
    for i, s in enumerate(sets):
        if not isinstance(s, dict):
            raise ValueError(f"encryption_parameters[{i}] is not an object: {s!r}")
    return sets


# ---------------------------------------------------------------------------
# inputs and the plain reference


def _load_inputs(spec: ModelSpec, n: int, data: Optional[str], dataset: str) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    """(inputs float64 [n, ...], labels or None, description)."""
    from .. import datasets

    shape = spec.input_shape
    if shape is None:
        first = spec.layers[0] if spec.layers else None
        if first is not None and first.type == "Conv2d" and first.params["in_channels"] != 1:
            shape = (first.params["in_channels"], 32, 32)
        else:
            shape = (1, 28, 28)
    if dataset.lower() == "random" or tuple(shape[-2:]) != (28, 28) or shape[0] != 1:
        rng = np.random.default_rng(0)
        return rng.random((n,) + tuple(shape)), None, f"random uniform [0, 1) inputs of shape {list(shape)} (seed 0)"
    try:
        images, labels = datasets.load_mnist(path=data, split="test", limit=n)
        where = f"MNIST test digits 0..{n - 1} from {datasets.mnist_dir(data)}"
    except FileNotFoundError:
        if data is not None:
            raise
        images, labels = datasets.sample_digits(limit=n)
        where = f"MNIST test digits 0..{n - 1} (bundled sample)"
    if len(images) < n:
        raise ValueError(f"only {len(images)} digits available, {n} requested")
    x = datasets.normalize(images).astype(np.float64)
    return x, labels, where + ", normalized pixels / 255"


class _Reference:
    """The plain forward pass, layer by layer, in float64."""

    def __init__(self, spec: ModelSpec, net: Any):
        self.spec = spec
        self.net = None
        if net is not None:
            try:
                import copy

                import torch  # noqa: F401

                self.net = copy.deepcopy(net).double().eval()
            except ImportError:
                self.net = None

    @property
    def kind(self) -> str:
        return "torch (float64)" if self.net is not None else "numpy forward of the model spec (float64)"

    def prefix(self, x: np.ndarray, start: int) -> np.ndarray:
        """Output of modules [0, start): the plain input of the selected layers."""
        if start == 0:
            return x
        if self.net is None:
            raise ValueError("the selected layers start after module 0, which needs the torch model (a .pt file) "
                             "to compute their plain input")
        import torch

        with torch.no_grad():
            t = torch.as_tensor(x, dtype=torch.float64)
            for module in list(self.net)[:start]:
                t = module(t)
        return t.numpy()

    def step(self, layer: LayerSpec, x: np.ndarray) -> np.ndarray:
        if self.net is None:
            return ModelSpec(layers=[layer]).forward_numpy(x)
        import torch

        with torch.no_grad():
            t = torch.as_tensor(x, dtype=torch.float64)
            for module in list(self.net)[layer.index:layer.end_index + 1]:
                t = module(t)
        return t.numpy()


# ---------------------------------------------------------------------------
# one parameter set


def _sample_noise(ctx: Context, t: Any) -> Optional[int]:
    """Minimum noise budget over a few ciphertexts of ``t`` (cheap)."""
    shape = tuple(t.shape)
    total = int(np.prod(shape)) if shape else 1
    if total == 0:
        return None
    picks = sorted(set(np.linspace(0, total - 1, min(NOISE_SAMPLE, total)).astype(int).tolist()))
    budgets = []
    for k in picks:
        idx = tuple(int(i) for i in np.unravel_index(k, shape))
        budgets.append(int(ctx.noise_budget(t[idx] if shape else t)))
    return min(budgets)


def _fmt_params(p: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items() if k != "rencrypt_positions") + (
        f", rencrypt before {p['rencrypt_positions']}" if p.get("rencrypt_positions") else "")


def _test_one(pset: Dict[str, Any], spec: ModelSpec, ref: _Reference, x_plain: np.ndarray, debug: bool,
              verbose: bool) -> Dict[str, Any]:
    result: Dict[str, Any] = {
        "encryption_parameters": dict(pset), "status": "ok", "final_max_error": None, "argmax_equal": None,
        "error": None, "failed_layer": None, "coefficients_fit": True, "first_wrap_layer": None,
        "measured_wrap_layer": None, "warnings": [],
        "seconds": None, "layers": [],
    }
    t_start = time.perf_counter()
    say = (lambda msg: print(f"[{_fmt_params(pset)}] {msg}", flush=True)) if verbose else (lambda msg: None)

    def fail(status: str, exc: BaseException, index: Optional[int], name: str) -> Dict[str, Any]:
        result.update(status=status, error=f"{type(exc).__name__}: {exc}",
                      failed_layer={"index": index, "layer_name": name})
        result["seconds"] = time.perf_counter() - t_start
        say(f"FAILED at {name} ({index}): {exc}")
        return result

    # the context
    try:
        m = int(pset.get("m", 2048))
        p = pset.get("p")
        if p is None:
            raise ValueError("'p' (the plaintext modulus) is required")
        ctx = Context(m=m, p=int(p), sec=int(pset.get("sec", 128)), encoding="fractional",
                      base=int(pset.get("base", 2)),
                      int_digits=int(pset.get("int_digits", pset.get("intDigits", 64))),
                      frac_digits=int(pset.get("frac_digits", pset.get("fracDigits", 32))))
        ctx.keygen()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return fail("context_error", exc, None, "context")
    try:
        model = build_from_spec(ctx, spec, rencrypt_positions=list(pset.get("rencrypt_positions") or []))
    except Exception as exc:  # noqa: BLE001
        return fail("error", exc, None, "build")
    try:
        enc = ctx.encrypt(x_plain)
    except Exception as exc:  # noqa: BLE001
        return fail("error", exc, None, "encryption")

    layers = result["layers"]
    layers.append({"index": None, "layer_name": "start", "min_noise": int(ctx.noise_budget(enc)), "max_error": 0.0,
                   "max_error_position": [0] * x_plain.ndim, "cipher_value": 0.0, "plain_value": 0.0,
                   "avg_error": 0.0, "seconds": 0.0, **_growth(enc)})
    plain = x_plain
    dec = None

    def on_layer(report: Dict[str, Any], out: Any) -> None:
        nonlocal plain, dec
        index, name = report["index"], report["name"]
        spec = model[report["position"]].spec
        if spec is not None:  # None: a rencryption, which changes no value
            plain = ref.step(spec, plain)
        entry: Dict[str, Any] = {"index": index, "layer_name": name, "seconds": report["seconds"],
                                 **_growth(out)}
        if not entry["fits"]:
            if result["coefficients_fit"]:
                result["first_wrap_layer"] = {"index": index, "layer_name": name}
            result["coefficients_fit"] = False
            result["warnings"].append(
                f"layer {index} ({name}): coefficient bound {entry['coeff_bound']:.4g} exceeds p/2 = "
                f"{entry['limit']:.4g}; wrapped coefficients may cause decoding errors up to "
                f"{entry['wrap_error_bound']:.4g}")
        layers.append(entry)
        if debug:
            entry["min_noise"] = report["noise_budget"]
            dec = np.asarray(ctx.decrypt(out), dtype=np.float64)  # NoiseBudgetExhausted stops the run
            entry.update(_errors(dec, plain))
            measured = _measured_coefficients(ctx, out)
            if measured:
                entry.update(measured)
                if measured["measured_wrap_risk"] > 0 and result.get("measured_wrap_layer") is None:
                    result["measured_wrap_layer"] = {"index": index, "layer_name": name}
        else:
            entry["min_noise"] = _sample_noise(ctx, out)
            entry["noise_sampled"] = True
        say(f"{index}: {name} {report['seconds']:.2f} s, noise {entry['min_noise']} bits"
            + (f", max error {entry['max_error']:.3g}" if "max_error" in entry else ""))

    # One pass through the engine's runner; the callback compares each layer with the plain reference.
    try:
        enc, _ = model.run(enc, measure_noise=debug, callback=on_layer)
    except NoiseBudgetExhausted as exc:  # a rencryption or a debug decryption that cannot decrypt
        return fail("noise_budget_exhausted", exc, getattr(exc, "layer", None) or layers[-1]["index"],
                    getattr(exc, "layer_name", None) or layers[-1]["layer_name"])
    except Exception as exc:  # noqa: BLE001
        return fail("error", exc, getattr(exc, "layer", None), getattr(exc, "layer_name", None) or "run")
    if not debug:
        try:
            dec = np.asarray(ctx.decrypt(enc), dtype=np.float64)
        except NoiseBudgetExhausted as exc:
            # name the first layer whose sampled budget ran out (the last one if none did)
            bad = next((e for e in layers[1:] if e.get("min_noise") is not None and e["min_noise"] <= 0), layers[-1])
            return fail("noise_budget_exhausted", exc, bad["index"], bad["layer_name"])
    assert dec is not None
    if not result["coefficients_fit"]:
        result["status"] = "wrap_possible"
    errs = _errors(dec, plain)
    result["final_max_error"] = errs["max_error"]
    result["final_avg_error"] = errs["avg_error"]
    if dec.ndim == 2 and dec.shape[1] > 1:
        result["argmax_equal"] = bool((dec.argmax(axis=1) == plain.argmax(axis=1)).all())
        result["predictions"] = dec.argmax(axis=1).tolist()
    result["seconds"] = time.perf_counter() - t_start
    say(f"done in {result['seconds']:.1f} s, final max error {result['final_max_error']:.4g}")
    return result


def _measured_coefficients(ctx: Context, t: Any) -> Optional[Dict[str, Any]]:
    """Measured (not worst-case) plaintext coefficients, where the engine offers it."""
    fn = getattr(ctx, "measure_coefficients", None)
    if fn is None:
        return None
    try:
        d = dict(fn(t))
    except HEError:
        return None
    return {"measured_coeff_max": float(d["max_abs"]), "measured_wrap_risk": float(d["wrap_risk"])}


def _growth(t: Any) -> Dict[str, Any]:
    g = dict(t.growth_report())
    return {"coeff_bound": float(g["coeff_bound"]), "limit": float(g["limit"]),
            "wrap_error_bound": float(g["wrap_error_bound"]), "fits": bool(g["fits"])}


def _errors(dec: np.ndarray, plain: np.ndarray) -> Dict[str, Any]:
    plain = np.asarray(plain, dtype=np.float64).reshape(dec.shape)
    diff = np.abs(dec - plain)
    pos = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return {"max_error": float(diff[pos]), "max_error_position": [int(i) for i in pos],
            "cipher_value": float(dec[pos]), "plain_value": float(plain[pos]), "avg_error": float(diff.mean())}


# ---------------------------------------------------------------------------
# the run


def run_tests(config: Dict[str, Any], model: Any = None, data: Optional[str] = None, images: Optional[int] = None,
              out: Optional[Union[str, "os.PathLike[str]"]] = None, plot: Optional[Union[str, "os.PathLike[str]"]] = None,
              max_threads: Optional[int] = None, debug: Optional[bool] = None, layers: Any = None,
              verbose: bool = False) -> Dict[str, Any]:
    """Runs every parameter set of ``config`` (the seed's dict) and returns the results.

    Keyword arguments override the config: ``model`` (path, shipped name,
    :class:`ModelSpec` or ``nn.Sequential``; else ``config['model_path']``),
    ``data`` (MNIST directory), ``images``, ``max_threads``, ``debug``,
    ``layers``. ``out`` writes the results as JSON, ``plot`` a PNG of noise
    budget, error and coefficient growth per layer.
    """
    cfg = dict(config)
    sets = _parameter_sets(cfg)
    model = model if model is not None else cfg.get("model_path")
    if model is None:
        raise ValueError("no model: pass --model or set 'model_path' in the config")
    debug = _truthy(cfg.get("debug", False)) if debug is None else bool(debug)
    layers = layers if layers is not None else cfg.get("layers")
    n_images = int(images if images is not None else cfg.get("images", 1))
    if n_images < 1:
        raise ValueError(f"images must be ≥ 1, got {n_images}")
    threads = int(max_threads if max_threads is not None else cfg.get("max_threads", 1) or 1)
    threads = max(1, min(threads, len(sets)))
    data = data if data is not None else cfg.get("data")

    full_spec, net, model_desc = _resolve_model(model)
    spec = full_spec.select(layers) if layers is not None else full_spec
    start = spec.indices[0]
    x, labels, data_desc = _load_inputs(full_spec, n_images, data, str(cfg.get("dataset", "MNIST")))
    ref = _Reference(full_spec, net)
    x_plain = ref.prefix(x, start)

    t0 = time.perf_counter()
    if sets == ["auto"]:
        plain_out = spec.forward_numpy(x_plain)
        results = [auto_test(spec, x_plain, labels, plain_out)]
    elif threads == 1:
        results = [_safe_test(s, spec, ref, x_plain, debug, verbose) for s in sets]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(lambda s: _safe_test(s, spec, ref, x_plain, debug, verbose), sets))
    report = {
        "model": model_desc,
        "model_name": spec.name,
        "layers": [spec.indices[0], spec.indices[-1]] if layers is not None else None,
        "encoded_layers": spec.describe(),
        "encoding": "batch" if sets == ["auto"] else "fractional",
        "images": n_images,
        "labels": labels.tolist() if labels is not None else None,
        "data": data_desc,
        "reference": ref.kind,
        "debug": debug,
        "max_threads": threads,
        "seconds": time.perf_counter() - t0,
        "results": results,
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(_json_safe(report), fh, indent=2)
    if plot is not None:
        plot_results(report, plot)
    return report


def _safe_test(pset, spec, ref, x_plain, debug, verbose) -> Dict[str, Any]:
    try:
        return _test_one(pset, spec, ref, x_plain, debug, verbose)
    except Exception as exc:  # noqa: BLE001 - a bug of ours must not hide the other sets' results
        return {"encryption_parameters": dict(pset), "status": "error", "final_max_error": None,
                "error": f"{type(exc).__name__}: {exc}", "failed_layer": None, "layers": [],
                "traceback": traceback.format_exc()}


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return _json_safe(float(v))
    return v


def plot_results(report: Dict[str, Any], path: Union[str, "os.PathLike[str]"]) -> Path:
    """A PNG with, per parameter set, the noise budget, the max abs error and the
    coefficient bound relative to p/2 after every layer."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    labels_done = False
    for res in report["results"]:
        entries = res.get("layers") or []
        if not entries:
            continue
        label = _fmt_params(res["encryption_parameters"]) + ("" if res.get("status") == "ok" else f" [{res['status']}]")
        if res.get("final_max_error") is not None:
            label += f", final error {res['final_max_error']:.2g}"
        xs = list(range(len(entries)))
        names = [("start" if e["index"] is None else f"{e['index']}:{e['layer_name']}") for e in entries]
        noise = [e.get("min_noise") if e.get("min_noise") is not None else np.nan for e in entries]
        err = [max(e["max_error"], 1e-12) if e.get("max_error") is not None else np.nan for e in entries]
        ratio = [e["coeff_bound"] / e["limit"] if e.get("limit") else np.nan for e in entries]
        axes[0].plot(xs, noise, marker="o", label=label)
        axes[1].plot(xs, err, marker="o", label=label)
        axes[2].plot(xs, ratio, marker="o", label=label)
        if not labels_done or len(names) > len(axes[2].get_xticks()):
            axes[2].set_xticks(xs)
            axes[2].set_xticklabels(names, rotation=30, ha="right")
            labels_done = True
        if res.get("final_max_error") is not None and all(np.isnan(err[1:])):
            axes[1].plot([xs[-1]], [max(res["final_max_error"], 1e-12)], marker="*", markersize=12)
    axes[0].axhline(0, color="red", linewidth=0.8)
    axes[0].set_ylabel("noise budget (bits)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("max |encrypted − plain|")
    axes[2].set_yscale("log")
    axes[2].axhline(1.0, color="red", linewidth=0.8)
    axes[2].set_ylabel("coeff bound / (p/2)")
    axes[0].set_title(f"{report.get('model_name') or report.get('model', '')}: {report.get('images', 1)} image(s), fractional encoding")
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# command line


def _parse_layers(text: str) -> List[int]:
    text = text.strip()
    if ".." in text or "-" in text.strip("-"):
        a, b = text.replace("..", "-").split("-", 1)
        return list(range(int(a), int(b) + 1))
    return [int(v) for v in text.replace(",", " ").split()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pycrcnn.parameters_tester",
        description="Run a model encrypted (fractional encoding) under several parameter sets and compare "
                    "with the plain model, layer by layer.")
    ap.add_argument("config", help="JSON config in the seed's format (encryption_parameters, debug, layers, ...)")
    ap.add_argument("--model", help="model file (.pt, .npz) or shipped model name; overrides model_path")
    ap.add_argument("--data", help="MNIST directory (default: $PYCRCNN_DATA, else the shared folder)")
    ap.add_argument("--out", default="results.json", help="results JSON (default: results.json)")
    ap.add_argument("--plot", help="write a PNG of noise budget, error and coefficient growth per layer")
    ap.add_argument("--images", type=int, help="number of MNIST test digits to encrypt (default 1)")
    ap.add_argument("--max-threads", type=int, help="parameter sets run at the same time")
    ap.add_argument("--layers", type=_parse_layers, help="torch indices to encrypt, e.g. '0,1,2' or '0-3'")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--debug", dest="debug", action="store_true", default=None, help="per-layer measurements")
    g.add_argument("--no-debug", dest="debug", action="store_false", help="only the final output")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-layer progress lines")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        report = run_tests(cfg, model=args.model, data=args.data, images=args.images, out=args.out, plot=args.plot,
                           max_threads=args.max_threads, debug=args.debug, layers=args.layers,
                           verbose=not args.quiet)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model {report['model']} on {report['data']}; reference: {report['reference']}")
    for res in report["results"]:
        line = f"  {_fmt_params(res['encryption_parameters'])}: {res['status']}"
        if res.get("final_max_error") is not None:
            line += f", final max error {res['final_max_error']:.4g}"
            if res.get("argmax_equal") is not None:
                line += f", argmax {'equal' if res['argmax_equal'] else 'DIFFERS'}"
        if res.get("failed_layer"):
            fl = res["failed_layer"]
            line += f" at layer {fl['index']} ({fl['layer_name']}): {res['error']}"
        if res.get("measured_wrap_layer"):
            mw = res["measured_wrap_layer"]
            line += f" [coefficients measured near/over p/2 from layer {mw['index']} ({mw['layer_name']})]"
        if res.get("first_wrap_layer"):
            fw = res["first_wrap_layer"]
            line += (f" (coefficient bound over p/2 from layer {fw['index']} ({fw['layer_name']}): values may "
                     "wrap; the measured error above says whether they did)")
        print(line)
    print(f"results written to {args.out}" + (f", plot to {args.plot}" if args.plot else ""))
    return 0

