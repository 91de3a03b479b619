#!/usr/bin/env python3
"""Benchmark: whole MNIST test batches through encrypted LeNet-1s, batch layout, planner parameters.

For each model — the shipped ``lenet1_square`` and ``lenet1_two_square`` and
the seed's ``LeNet1_Approx_single_square.pt`` — in its own process (so peak
memory is per model):

* ``pycrcnn.plan`` on 2,048 training digits (``--calibration``; worst-case
  bounds for inputs in [0, 1], or ``--mode calibrated``: the largest values
  on those digits times 2, and then decrypted results that differ from
  ``plan.reference`` are counted as wraps): m, plaintext primes, moduli,
  scales (input / per weighted layer), the planner's predicted seconds;
* the first ``--n`` test digits (default: one full batch of m) encrypted,
  run and decrypted in batches of m (the last one partly filled): seconds of
  each phase; the forward pass with 2 threads and the first batch again with
  1 thread (wall and CPU seconds: on a shared machine the CPU seconds per
  image are the load-independent figure), and the 2-thread speed-up;
* amortized images/s and ms/image (server-side forward, and end to end);
* exact matches of the decrypted integers with ``plan.reference`` (images
  whose every output equals it), argmax agreement with float torch and
  accuracy against the labels, plain torch's time on the same digits;
* the first-principles floor: ciphertext products per image × the measured
  cost of one product (one thread, at the level it runs at), and how far the
  forward pass is from it;
* peak RSS, the load average before and after.

Writes ``benches/results/throughput.json`` and ``throughput.md`` (with
``--n N``: ``throughput_nN.*``; the Markdown table that goes into the README,
with the date, the machine and the load average).

Usage::

    python benches/throughput.py               # one batch per model
    python benches/throughput.py --n 10000     # the whole test set
    python benches/throughput.py --models lenet1_square
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import pycrcnn  # noqa: F401
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(ROOT / "python"))

import pycrcnn  # noqa: E402
from pycrcnn import datasets, set_num_threads  # noqa: E402

SHARED = Path(os.environ.get("PYCRCNN_SHARED", ROOT.parent / "shared"))
#: training digits the planner calibrates on: its agreement prediction needs
#: enough near-ties (one in 2,000 is the target)
CALIBRATION_DIGITS = 2048
MODELS = {
    "lenet1_square": "shipped",
    "lenet1_two_square": "shipped",
    "seed_single_square": str(SHARED / "models" / "pycrcnn-original" / "LeNet1_Approx_single_square.pt"),
}
OUT = ROOT / "benches" / "results"


def torch_model(name: str):
    from pycrcnn.models import load_torch_model, shipped_model_path

    path = shipped_model_path(name) if MODELS[name] == "shipped" else MODELS[name]
    return load_torch_model(path)


def product_cost(ctx) -> float:
    """Seconds of one ciphertext square (one CRT component, the engine's
    square, unfused, at the top level) on one thread."""
    t = ctx.encrypt(np.full((1, 8), 0.5))
    set_num_threads(1)
    t0 = time.perf_counter()
    ctx.square(t)
    return (time.perf_counter() - t0) / (8 * len(ctx.p if isinstance(ctx.p, list) else [ctx.p]))


def loadavg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def bench_model(name: str, n: int, mode: str = "worst-case", n_calibration: int = CALIBRATION_DIGITS,
                plan_options: Optional[dict] = None) -> dict:
    import torch

    from pycrcnn.spec import ModelSpec  # noqa: F401
    from pycrcnn.torch_import import spec_from_torch

    net = torch_model(name)
    spec = spec_from_torch(net, name=name, input_shape=(1, 28, 28))
    train, _ = datasets.load_mnist(split="train", limit=n_calibration)
    calib = datasets.normalize(train).astype(np.float64)
    t0 = time.perf_counter()
    plan = pycrcnn.plan(spec, calib, input_range=(0.0, 1.0), mode=mode, **(plan_options or {}))
    plan_s = time.perf_counter() - t0
    m = plan.m
    images, labels = datasets.load_mnist(limit=n or m)
    x = datasets.normalize(images).astype(np.float64)
    n = len(x)
    ctx = plan.context
    ctx.keygen()
    model = plan.model(ctx)

    with torch.no_grad():
        t0 = time.perf_counter()
        logits = net(torch.from_numpy(x.astype(np.float32))).numpy()
        torch_s = time.perf_counter() - t0
    ref = plan.reference(x)

    load_before = loadavg()
    enc_s = fwd_s = dec_s = fwd1_s = fwd2_first_s = cpu1_s = 0.0
    outs = []
    for start in range(0, n, m):
        part = x[start:start + m]
        set_num_threads(2)
        t0 = time.perf_counter()
        t = ctx.encrypt(part)
        enc_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        y = model(t)
        fwd_s += time.perf_counter() - t0
        if start == 0:  # the same batch again on one thread: wall and CPU seconds
            fwd2_first_s = fwd_s
            set_num_threads(1)
            t0, c0 = time.perf_counter(), time.process_time()
            model(t)
            fwd1_s, cpu1_s = time.perf_counter() - t0, time.process_time() - c0
            set_num_threads(2)
        del t
        t0 = time.perf_counter()
        outs.append(ctx.decrypt_integers(y))
        dec_s += time.perf_counter() - t0
        del y
    got = np.concatenate([o.astype(object) for o in outs])
    exact = int(sum(all(int(a) == int(b) for a, b in zip(g, r)) for g, r in zip(got, ref.astype(object))))
    values = plan.decode(got)
    agree = int(np.sum(np.argmax(values, 1) == np.argmax(logits, 1)))
    correct = int(np.sum(np.argmax(values, 1) == labels))
    torch_correct = int(np.sum(np.argmax(logits, 1) == labels))

    products = sum(int(np.prod(s)) for l, s in zip(spec.layers, _shapes(spec)) if l.type == "Square")
    k = len(plan.parameters["p"])
    cost = product_cost(ctx)
    set_num_threads(2)
    floor_per_image = products * k * cost / m
    batches = -(-n // m)
    first = min(n, m)
    return {
        "model": name, "n": n, "batches": batches, "plan": {**plan.parameters, "seconds": round(plan_s, 2),
                                                            "predicted_forward_s_1_thread": round(sum(r["seconds"] for r in plan.report), 2),
                                                            "report": plan.report, "notes": plan.notes},
        "layers": [layer._layer.name for layer in model],
        "encrypt_s": round(enc_s, 2), "forward_s": round(fwd_s, 2), "decrypt_s": round(dec_s, 2),
        "forward_2_threads_first_batch_s": round(fwd2_first_s, 2),
        "forward_1_thread_first_batch_s": round(fwd1_s, 2),
        "cpu_s_1_thread_first_batch": round(cpu1_s, 2),
        "images_per_s_forward_2_threads": round(n / fwd_s, 1),
        "images_per_s_forward_1_thread": round(first / fwd1_s, 1),
        # a pass costs the same for a full or a partly filled batch: per image of a full batch
        "cpu_ms_per_image_1_thread": round(1e3 * cpu1_s / m, 3),
        "images_per_s_1_thread_cpu": round(m / cpu1_s, 1),
        "speedup_2_threads": round(fwd1_s / fwd2_first_s, 2),
        "ms_per_image_forward": round(1e3 * fwd_s / n, 3),
        "images_per_s_end_to_end": round(n / (enc_s + fwd_s + dec_s), 1),
        "mode": plan.mode, "margin_bits": plan.margin_bits, "calibration_digits": len(calib),
        # calibrated plans: images whose decrypted integers differ from the reference (a wrap)
        "wraps": n - exact,
        "exact_matches": exact, "argmax_agreement": agree, "accuracy_encrypted": correct / n,
        "accuracy_torch": torch_correct / n, "torch_s": round(torch_s, 4),
        "ciphertext_products_per_batch": products * k, "product_cost_ms": round(cost * 1e3, 3),
        "floor_ms_per_image_1_thread": round(floor_per_image * 1e3, 4),
        "distance_to_floor_1_thread_cpu": round((cpu1_s / m) / floor_per_image, 2) if floor_per_image else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "load_before": load_before, "load_after": loadavg(),
    }


def _shapes(spec):
    shape, out = (1, 28, 28), []
    for layer in spec.layers:
        shape = tuple(layer.output_shape(shape))
        out.append(shape)
    return out


def markdown(results: list, meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']} (load average {meta['load_before']} before, "
             f"{meta['load_after']} after; per model below; the machine is shared: wall times stretch with the load, "
             f"CPU seconds on 1 thread much less). Command: `{meta['command']}`.", "",
             "| model | digits | m, primes × bits, moduli | scales (in/w) | encrypt s | forward s (2 thr) "
             "| decrypt s | images/s 2 thr (wall) | images/s 1 thr (wall / CPU) | 2 thr ÷ 1 thr | CPU ms/image 1 thr "
             "| floor ms/image (distance) | exact vs reference | argmax = torch | accuracy (enc / torch) | torch s "
             "| peak RSS MB | load (before / after) |",
             "|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |" + " |" * 16)
            continue
        p = r["plan"]
        primes = f"{len(p['p'])}×{max(int(q).bit_length() for q in p['p'])}"
        lines.append(
            f"| {r['model']}{' (calibrated, ' + str(r['margin_bits']) + '-bit margin)' if r.get('mode') == 'calibrated' else ''} "
            f"| {r['n']} | {p['m']}, {primes}, {p['moduli_sizes']} | {p['scale_bits']}/{p['weight_scale_bits']} "
            f"| {r['encrypt_s']} | {r['forward_s']} | {r['decrypt_s']} | {r['images_per_s_forward_2_threads']} "
            f"| {r['images_per_s_forward_1_thread']} / {r['images_per_s_1_thread_cpu']} | {r['speedup_2_threads']} "
            f"| {r['cpu_ms_per_image_1_thread']} | {r['floor_ms_per_image_1_thread']} ({r['distance_to_floor_1_thread_cpu']}×) "
            f"| {r['exact_matches']}/{r['n']}{' (' + str(r['wraps']) + ' wraps)' if r.get('mode') == 'calibrated' else ''} "
            f"| {r['argmax_agreement']}/{r['n']} "
            f"| {r['accuracy_encrypted']:.4f} / {r['accuracy_torch']:.4f} | {r['torch_s']} | {r['peak_rss_mb']} "
            f"| {r['load_before']} / {r['load_after']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=0, help="test digits per model (default: one batch of m)")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--mode", choices=["worst-case", "calibrated"], default="worst-case",
                    help="the planner's bounds: worst case (never wraps) or calibrated (wraps counted)")
    ap.add_argument("--calibration", type=int, default=CALIBRATION_DIGITS, help="training digits the planner sees")
    ap.add_argument("--plan-options", default="{}",
                    help='more pycrcnn.plan options as JSON, e.g. \'{"scale_bits": 5, "weight_scale_bits": [9, 9, 10]}\'')
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        try:
            print(json.dumps(bench_model(args.one, args.n, args.mode, args.calibration, json.loads(args.plan_options))))
        except Exception as exc:  # reported in the table, the other models still run
            print(json.dumps({"model": args.one, "error": f"{type(exc).__name__}: {exc}"}))
        return
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "load_before": loadavg(),
            "command": "python benches/throughput.py" + (f" --n {args.n}" if args.n else "")
            + (f" --mode {args.mode}" if args.mode != "worst-case" else "")
            + (f" --calibration {args.calibration}" if args.calibration != CALIBRATION_DIGITS else "")
            + (f" --plan-options '{args.plan_options}'" if json.loads(args.plan_options) else "")}
    results = []
    for name in args.models:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--n", str(args.n), "--mode", args.mode,
                               "--calibration", str(args.calibration), "--plan-options", args.plan_options],
                              capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else json.dumps(
            {"model": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"})
        r = json.loads(line)
        results.append(r)
        print(json.dumps(r)[:400], flush=True)
    meta["load_after"] = loadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    stem = ("throughput" if not args.n else f"throughput_n{args.n}") + ("_calibrated" if args.mode == "calibrated" else "")
    (OUT / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = markdown(results, meta)
    (OUT / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
