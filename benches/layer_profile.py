#!/usr/bin/env python3
"""Where one batch pass spends its time: per layer, wall and CPU seconds.

Plans the model (``pycrcnn.plan`` on 256 training digits, inputs in [0, 1]),
runs one full batch pass (its cost does not depend on how many of the m
slots are filled) on ``--threads`` engine threads and prints each layer's
wall seconds (the runner's report) and the process CPU seconds it took
(with 1 thread: the load-independent cost), then checks the result against
``plan.reference``.

Usage::

    python benches/layer_profile.py lenet1_square --threads 1
    python benches/layer_profile.py ../shared/models/pycrcnn-original/LeNet1_Approx_single_square.pt
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

import pycrcnn
from pycrcnn import datasets, set_num_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a shipped model name or a .pt / .npz path")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    x = datasets.normalize(datasets.load_mnist(limit=64)[0]).astype(np.float64)
    calib = datasets.normalize(datasets.load_mnist(split="train", limit=256)[0]).astype(np.float64)
    plan = pycrcnn.plan(args.model, calib, input_range=(0.0, 1.0))
    print(plan)
    print(plan.table())
    ctx = plan.context
    ctx.keygen()
    model = plan.model(ctx)
    set_num_threads(args.threads)
    t = ctx.encrypt(x)
    marks = []
    c0, w0 = time.process_time(), time.perf_counter()
    out, reports = model.run(t, callback=lambda r, _: marks.append(time.process_time()) or True)
    c1, w1 = time.process_time(), time.perf_counter()
    prev = c0
    for r, c in zip(reports, marks):
        print(f"{r['name']:26s} wall {r['seconds']:8.2f} s   cpu {c - prev:8.2f} s   level {r['level']}")
        prev = c
    print(f"pass: wall {w1 - w0:.2f} s, cpu {c1 - c0:.2f} s = {1e3 * (c1 - c0) / plan.m:.3f} CPU ms per image of a "
          f"full batch of {plan.m}; load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    exact = np.array_equal(np.asarray(ctx.decrypt_integers(out), dtype=object), np.asarray(plan.reference(x), dtype=object))
    print(f"exact vs plan.reference: {exact}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
