#!/usr/bin/env python3
"""Per-operation cost of the engine through Python next to raw fhe.rs.

Both columns are measured in the same run, single-threaded, with the same
parameters (batch encoding, the engine's automatic plaintext prime): the
engine on tensors of ``--n`` ciphertexts (µs per ciphertext), raw fhe.rs by
``examples/raw_ops.rs`` (``cargo run --release --example raw_ops``). The
overhead column is what the Python binding and the engine add on top of
fhe.rs; it must stay under 10% for tensors of 1,000 ciphertexts or more.

    python benches/ops.py                 # m = 4096 and 8192, 1024 ciphertexts
    python benches/ops.py --m 4096 --n 2048
    python benches/ops.py --quick         # a smoke run (small tensors)

Both processes run with the same glibc malloc tunables (``--malloc tuned``,
the default): with glibc's defaults a fresh process returns freed ciphertext
memory to the OS and page-faults it in again, which costs more than an
addition, so the figures would compare heap histories rather than code.

Prints a markdown table that can be pasted into the README. The figures are
machine-dependent; the relative column is what matters.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import pycrcnn
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(ROOT / "python"))
    import pycrcnn

from pycrcnn import Context, LinearLayer

TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"

OPS = [
    ("encrypt", "encrypt (encode + secret-key encryption)"),
    ("add", "add (ciphertext + ciphertext)"),
    ("scalar_mul", "scalar multiply (tensor × number)"),
    ("weighted_sum_25", "weighted sum of 25 (Linear 25→n)"),
    ("square_relin", "square + relinearize (+ switch down)"),
]


def best(reps: int, fn) -> float:
    """Best wall time of `reps` calls, in seconds."""
    out = float("inf")
    for _ in range(reps):
        gc.collect()
        t = time.perf_counter()
        r = fn()
        out = min(out, time.perf_counter() - t)
        del r
    return out


def engine(m: int, n: int, quick: bool) -> dict:
    """Microseconds per ciphertext of each operation through Python."""
    ctx = Context(m=m, encoding="batch")
    ctx.keygen()
    rng = np.random.default_rng(0)
    images = 8
    x = rng.uniform(-1, 1, size=(images, n))
    res = {}
    reps = 1 if quick else 2
    res["encrypt"] = best(reps, lambda: ctx.encrypt(x)) / n
    t = ctx.encrypt(x)
    res["add"] = best(reps + 2, lambda: t + t) / n
    res["scalar_mul"] = best(reps + 2, lambda: t * -0.3) / n
    # n outputs, each a weighted sum of the same 25 input ciphertexts
    x25 = ctx.encrypt(rng.uniform(-1, 1, size=(images, 25)))
    layer = LinearLayer(ctx, rng.uniform(-1, 1, size=(n, 25)))
    layer(x25)  # encodes the weights once (cached per layer and level), as a served model does
    res["weighted_sum_25"] = best(reps, lambda: layer(x25)) / n
    del x25, layer
    res["square_relin"] = best(1, lambda: ctx.square(t)) / n
    del t
    gc.collect()
    return {k: v * 1e6 for k, v in res.items()}


def raw(ms, n: int) -> dict:
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "raw_ops", "--", *map(str, ms), f"--n={n}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--n", type=int, default=1024, help="ciphertexts per tensor (≥ 1000 for the 10%% criterion)")
    ap.add_argument("--quick", action="store_true", help="small tensors, few repetitions (smoke run)")
    ap.add_argument("--no-raw", action="store_true", help="skip the fhe.rs column")
    ap.add_argument("--rounds", type=int, default=2, help="alternating engine / fhe.rs rounds (best of)")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned (default): both sides run with GLIBC_TUNABLES raising glibc's mmap and trim "
                         "thresholds, so that freed ciphertext memory is reused instead of returned to the OS "
                         "and page-faulted in again; default: glibc's defaults, where the two processes' heap "
                         "histories differ and fresh-memory page faults dominate the cheap operations")
    args = ap.parse_args()
    n = 64 if args.quick else args.n
    if args.malloc == "tuned" and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        # glibc reads its tunables at start-up: run again with them (the fhe.rs side inherits them).
        env = dict(os.environ, GLIBC_TUNABLES=TUNABLES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    pycrcnn.set_num_threads(1)
    print(f"engine: pycrcnn {pycrcnn.__version__}, NTT {pycrcnn._engine.NTT_FEATURES}, "
          f"{pycrcnn.get_num_threads()} thread; {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}; malloc {args.malloc}", file=sys.stderr)
    if not args.no_raw:  # build the fhe.rs side first, outside the measurements
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "raw_ops"], cwd=ROOT, check=True)
    # Engine and fhe.rs alternate, and each figure is the best of the rounds:
    # on a shared machine a burst of load then hits one round, not one column.
    eng: dict = {}
    rawres = None if args.no_raw else {"results": {}}
    rounds = 1 if args.quick else args.rounds
    for r in range(rounds):
        for m in args.m:
            t0 = time.perf_counter()
            e = engine(m, n, args.quick)
            eng[m] = {k: min(v, eng.get(m, {}).get(k, float("inf"))) for k, v in e.items()}
            msg = f"  round {r + 1}/{rounds} m={m}: engine {time.perf_counter() - t0:.1f} s"
            if rawres is not None:
                t0 = time.perf_counter()
                got = raw([m], n)
                rawres["ntt"] = got["ntt"]
                prev = rawres["results"].get(str(m), {})
                rawres["results"][str(m)] = {k: min(v, prev.get(k, float("inf"))) for k, v in got["results"][str(m)].items()}
                msg += f", fhe.rs {time.perf_counter() - t0:.1f} s"
            print(msg, file=sys.stderr)

    print()
    print(f"Per-operation cost, µs per ciphertext, single thread, batch encoding, tensors of {n} ciphertexts "
          f"(engine through Python vs raw fhe.rs, same parameters, same run, best of {rounds} alternating "
          f"rounds, {'tuned' if args.malloc == 'tuned' else 'default'} glibc malloc):")
    print()
    print("| operation | m | pycrcnn (Python) | fhe.rs | overhead |")
    print("|---|---:|---:|---:|---:|")
    worst = float("-inf")
    for m in args.m:
        for key, label in OPS:
            e = eng[m][key]
            if rawres is not None:
                r = rawres["results"][str(m)][key]
                over = (e - r) / r * 100
                worst = max(worst, over)
                print(f"| {label} | {m} | {e:,.1f} | {r:,.1f} | {over:+.1f}% |")
            else:
                print(f"| {label} | {m} | {e:,.1f} | – | – |")
    print()
    if rawres is not None:
        verdict = "within" if worst < 10 else "OVER"
        print(f"Largest overhead: {worst:+.1f}% ({verdict} the 10% bound"
              f"{'' if n >= 1000 else '; tensors below 1,000 ciphertexts do not count'}).")


if __name__ == "__main__":
    main()
