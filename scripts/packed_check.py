"""Packed layout check: exactness, argmax agreement and server time per digit.

    PYCRCNN_SHARED=../shared .venv/bin/python scripts/packed_check.py [--digits 10] [--agreement 1000] [--threads 2]

For each shipped model (single- and two-square LeNet-1): plans it on 100
training digits, checks argmax agreement of the plan's exact integer
reference with float torch on ``--agreement`` consecutive test digits, then
encrypts ``--digits`` test digits one by one, runs them (server time, the
model runner only), and checks the decryption against the reference.
Prints the load average beside every figure: the machine is shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import pycrcnn
from pycrcnn import datasets
from pycrcnn.models import load_torch_model, shipped_model_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", type=int, default=10)
    ap.add_argument("--agreement", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="lenet1_square,lenet1_two_square")
    args = ap.parse_args()
    pycrcnn.set_num_threads(args.threads)
    train, _ = datasets.load_mnist(split="train", limit=100)
    test, _ = datasets.load_mnist(split="test", limit=max(args.agreement, args.digits))
    calib = datasets.normalize(train).astype(np.float64)
    x = datasets.normalize(test).astype(np.float64)
    for name in args.models.split(","):
        net = load_torch_model(shipped_model_path(name))
        plan = pycrcnn.plan(net, calib, layout="packed")
        with torch.no_grad():
            want = net(torch.tensor(x[:args.agreement], dtype=torch.float32)).numpy().argmax(1)
        ref = np.array([[int(v) for v in plan.reference(xi[None])[0]] for xi in x[:args.agreement]], dtype=float)
        agree = int((ref.argmax(1) == want).sum())
        ctx = plan.context
        ctx.keygen()
        model = pycrcnn.build_from_pytorch(ctx, net)
        model(ctx.encrypt(x[:1]))  # masks are built on first use
        times, exact, up, down = [], 0, 0, 0
        for xi in x[:args.digits]:
            e = ctx.encrypt(xi[None])
            t0 = time.perf_counter()
            out = model(e)
            times.append(time.perf_counter() - t0)
            exact += bool((ctx.decrypt_integers(out) == plan.reference(xi[None])).all())
            up, down = len(e.to_bytes()), len(out.to_bytes())
        p = plan.info["parameters"]
        print(f"{name}: m={p['m']} moduli={p['moduli_sizes']} primes={len(p['p'])}x~{np.log2(max(p['p'])):.1f} bits; "
              f"server time per digit (threads={args.threads}) median {1000 * statistics.median(times):.0f} ms, "
              f"min {1000 * min(times):.0f} ms over {len(times)} digits; exact {exact}/{len(times)}; "
              f"argmax agreement with torch {agree}/{args.agreement}; upload {up / 1e6:.2f} MB, download "
              f"{down / 1e6:.2f} MB, public context {len(ctx.public_context()) / 1e6:.1f} MB; "
              f"load average {os.getloadavg()[0]:.1f}")
        print("   stages:", ", ".join(f"{r['name']} {1000 * r['seconds']:.0f} ms" for r in model.last_report))


if __name__ == "__main__":
    main()
