#!/usr/bin/env python3
"""Benchmark: the seed's single-square LeNet-1 on one real MNIST digit, encrypted.

Prints, for each encoding, the encrypted forward time per layer and in total,
key generation / encryption / decryption times, the peak resident memory
(``resource.getrusage``, measured in a separate process per encoding so the
figures do not mix), the max abs logit error against torch, and plain torch's
time for the same digit, measured in the same run.

* fractional — the seed's setting: m=4096, p=953983721, 128-bit security,
  one value per ciphertext, secret-key encryption (the key holder encrypts).
* batch — m=4096, 128-bit security, plaintext = three CRT primes ≈ 2^24,
  inputs at 2^8, weights at 2^8: one pass classifies up to 4096 digits for
  the price of one (``--batch-images N`` to run more than one).

Usage::

    python benches/lenet1.py                    # both encodings
    python benches/lenet1.py --encoding fractional --ops
    python benches/lenet1.py --json out.json

``--ops`` adds per-operation costs (one ciphertext square, one weighted-sum
term, encrypt, decrypt) measured on the same context, which is where the
per-layer times come from. The machine's load average is printed: on a shared
machine read every time with it in mind.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import pycrcnn  # noqa: F401
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(ROOT / "python"))

from pycrcnn import Context, datasets, get_num_threads, set_num_threads  # noqa: E402
from pycrcnn.net_builder import build_from_spec, export_model, load_model_spec  # noqa: E402

MODEL = "LeNet1_Approx_single_square.pt"


def make_context(encoding: str) -> Context:
    if encoding == "fractional":
        return Context(m=4096, p=953983721, sec=128, encoding="fractional")
    return Context(m=4096, p_bits=24, n_plaintext_moduli=3, sec=128, encoding="batch", scale_bits=8,
                   weight_scale_bits=8)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def model_path() -> Path:
    p = datasets.shared_dir() / "models" / "pycrcnn-original" / MODEL
    if not p.is_file():
        sys.exit(f"{p} not found: set PYCRCNN_SHARED to the shared folder")
    return p


def _best(fn, repeat: int) -> float:
    """The fastest of ``repeat`` calls (robust against a busy machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def plain_torch(x: np.ndarray, repeat: int = 50) -> dict:
    import torch

    from pycrcnn.models import load_torch_model

    torch.set_num_threads(1)  # one thread: steadier on a shared machine, and the fair single-image figure
    net = load_torch_model(model_path())
    t = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        out = net(t)  # warm up
        seconds = _best(lambda: net(t), repeat)
        layers = []
        y = t
        for i, mod in enumerate(net):
            z = mod(y)
            layers.append({"index": i, "name": type(mod).__name__,
                           "seconds": _best(lambda: mod(y), repeat)})  # noqa: B023
            y = z
    return {"seconds": seconds, "layers": layers, "logits": out.double().numpy()}


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def op_costs(ctx: Context) -> dict:
    """Per-operation wall times on this context (µs), from small tensors."""
    from pycrcnn._engine import Layer as L

    n = 64
    x = np.random.default_rng(0).uniform(0, 1, (1 if ctx.encoding == "fractional" else 4, n))
    t0 = time.perf_counter()
    e = ctx.encrypt(x)
    enc = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    sq = ctx.square(e)
    square = (time.perf_counter() - t0) / n
    w = np.random.default_rng(1).uniform(-1, 1, (n, n))
    lin = L.linear(ctx, w)
    lin(e)  # encode the weights once
    t0 = time.perf_counter()
    lin(e)
    term = (time.perf_counter() - t0) / (n * n)
    t0 = time.perf_counter()
    ctx.decrypt(sq)
    dec = (time.perf_counter() - t0) / n
    k = len(ctx.p) if isinstance(ctx.p, list) else 1
    return {"per_element_ciphertexts": k, "encrypt_us": enc * 1e6, "square_relin_us": square * 1e6,
            "weighted_sum_term_us": term * 1e6, "decrypt_us": dec * 1e6}


def run_one(encoding: str, n_images: int, ops: bool, spec_path: str) -> dict:
    # The encrypted run comes first and without torch (the model is read from
    # its torch-free export), so the peak RSS is the engine's; torch's plain
    # reference runs afterwards in the same process.
    images, labels = datasets.load_mnist(split="test", limit=n_images)
    x = datasets.normalize(images).astype(np.float64)
    res = {"encoding": encoding, "images": n_images, "threads": get_num_threads()}
    res["baseline_rss_mb"] = current_rss_mb()  # Python + numpy + the engine, before any ciphertext
    t0 = time.perf_counter()
    ctx = make_context(encoding)
    ctx.keygen()
    res["keygen_s"] = time.perf_counter() - t0
    res["parameters"] = {k: v for k, v in ctx.parameters().items()}
    model = build_from_spec(ctx, load_model_spec(spec_path))
    t0 = time.perf_counter()
    enc = ctx.encrypt(x)
    res["encrypt_s"] = time.perf_counter() - t0
    res["fresh_noise_budget"] = ctx.noise_budget(enc)
    t0 = time.perf_counter()
    out = model(enc)
    res["forward_s"] = time.perf_counter() - t0
    del enc
    res["layers"] = [{"index": e["index"], "name": e["name"], "seconds": e["seconds"]} for e in model.last_report]
    res["final_noise_budget"] = ctx.noise_budget(out)
    res["growth"] = dict(out.growth_report())
    t0 = time.perf_counter()
    logits = ctx.decrypt(out)
    res["decrypt_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    res["torch_imported_before_peak"] = "torch" in sys.modules
    res["torch"] = plain_torch(x)
    ref = res["torch"].pop("logits")
    res["max_abs_error"] = float(np.abs(logits - ref).max())
    res["argmax_equal"] = bool((logits.argmax(1) == ref.argmax(1)).all())
    res["predictions"] = logits.argmax(1).tolist()
    res["labels"] = labels.tolist()
    if ops:
        res["ops"] = op_costs(ctx)
    return res


def print_result(r: dict) -> None:
    p = r["parameters"]
    extra = (f"scale 2^{p['scale_bits']} / weights 2^{p['weight_scale_bits']}" if r["encoding"] == "batch"
             else f"base {p['base']}, {p['int_digits']}+{p['frac_digits']} digits")
    print(f"\n== {r['encoding']} encoding: m={p['m']}, p={p['p']}, sec={p['sec']}, log2 q={p['log_q']:.0f} "
          f"({len(p['moduli'])} moduli), {extra}; {r['images']} digit(s), {r['threads']} engine threads")
    print(f"   {'layer':<14}{'encrypted s':>12}{'torch ms':>10}")
    torch_by_index = {l["index"]: l["seconds"] for l in r["torch"]["layers"]}
    for l in r["layers"]:
        print(f"   {l['index']:>2} {l['name']:<11}{l['seconds']:>12.3f}{torch_by_index.get(l['index'], 0) * 1e3:>10.3f}")
    print(f"   {'forward':<14}{r['forward_s']:>12.3f}{r['torch']['seconds'] * 1e3:>10.3f}"
          f"   (encrypted / plain: {r['forward_s'] / r['torch']['seconds']:,.0f}×)")
    print(f"   keygen {r['keygen_s']:.3f} s, encrypt {r['encrypt_s']:.3f} s, decrypt {r['decrypt_s']:.3f} s; "
          f"noise budget {r['fresh_noise_budget']} → {r['final_noise_budget']} bits")
    print(f"   peak RSS {r['peak_rss_mb']:.0f} MB (of which {r['baseline_rss_mb']:.0f} MB before any ciphertext: "
          f"Python, numpy, the engine; torch is imported only afterwards, for the reference); max |logit − torch| = {r['max_abs_error']:.4g}; "
          f"argmax {'equal' if r['argmax_equal'] else 'DIFFERS'} (predicted {r['predictions'][:10]}, "
          f"labels {r['labels'][:10]})")
    g = r["growth"]
    print(f"   growth bound {g['coeff_bound']:.3g} vs limit {g['limit']:.3g}"
          + ("" if g["fits"] else f" (wrap possible; bound on its error {g['wrap_error_bound']:.3g})"))
    if "ops" in r:
        o = r["ops"]
        print(f"   per op (µs, wall, {o['per_element_ciphertexts']} ciphertext(s) per element): encrypt "
              f"{o['encrypt_us']:.0f}, square+relin {o['square_relin_us']:.0f}, weighted-sum term "
              f"{o['weighted_sum_term_us']:.1f}, decrypt {o['decrypt_us']:.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoding", choices=["fractional", "batch", "all"], default="all")
    ap.add_argument("--batch-images", type=int, default=1, help="digits in the batch-mode pass (≤ 4096)")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0 = all cores)")
    ap.add_argument("--ops", action="store_true", help="also measure per-operation costs")
    ap.add_argument("--json", help="write the figures as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        set_num_threads(args.threads)

    if args.child:  # one encoding in this process; JSON on stdout
        r = run_one(args.encoding, args.batch_images if args.encoding == "batch" else 1, args.ops, args.spec)
        print("RESULT " + json.dumps(r))
        return 0

    load = os.getloadavg()
    print(f"LeNet-1 (one square), {MODEL}, one real MNIST test digit; {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    results = []
    import tempfile

    spec_path = str(Path(tempfile.mkdtemp()) / "lenet1.npz")
    export_model(load_model_spec(model_path()), spec_path)  # torch-free copy for the encrypted runs
    for enc in (["fractional", "batch"] if args.encoding == "all" else [args.encoding]):
        cmd = [sys.executable, __file__, "--child", "--encoding", enc, "--batch-images", str(args.batch_images),
               "--threads", str(args.threads), "--spec", spec_path] + (["--ops"] if args.ops else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"\n== {enc}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print_result(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average": load, "results": results}, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
