"""Images/s of an encrypted batch job on a local Ray cluster (1 and 2 worker
processes) against the same job without Ray, so the overhead of the
distribution is stated; and the figures of the scaling model (README,
"Beyond one machine"): per-batch compute time, bytes per batch to and from the
cluster, bytes broadcast once.

The batches are encrypted once, before any timing: each row times the same
model over the same ciphertexts. "No Ray" runs the batches one after another
in this process with the engine on 1 thread, then on 2 threads (this machine's
cores); the Ray rows use 1 engine thread per task and 1 or 2 worker CPUs.
Ray's start-up (``ray.init``) is timed apart from the job.

    python benches/ray_scaling.py [--model tiny_cnn] [--m 4096] [--batches 4] [--batch-size 4096]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np

import pycrcnn
from pycrcnn import Context, datasets
from pycrcnn.models import shipped_model_path


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--scale-bits", type=int, default=6)
    parser.add_argument("--n-plaintext-moduli", type=int, default=2)
    parser.add_argument("--p-bits", type=int, default=25)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()

    import ray

    from pycrcnn.distributed import classify_dataset

    n = args.batches * args.batch_size
    try:
        images, labels = datasets.load_mnist(limit=n)
    except FileNotFoundError:
        images, labels = datasets.sample_digits()
    x = datasets.normalize(images)
    x = np.concatenate([x] * -(-n // len(x)))[:n]
    labels = np.concatenate([labels] * -(-n // len(labels)))[:n]
    ctx = Context(m=args.m, encoding="batch", scale_bits=args.scale_bits, weight_scale_bits=args.scale_bits,
                  n_plaintext_moduli=args.n_plaintext_moduli, p_bits=args.p_bits)
    ctx.keygen()
    path = shipped_model_path(args.model, "npz")
    batches = [ctx.encrypt(x[k:k + args.batch_size]) for k in range(0, n, args.batch_size)]
    print(f"# ray_scaling {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {_cpu()}, "
          f"{os.cpu_count()} cores, ray {ray.__version__}")
    print(f"# {args.model}, m={args.m}, {args.n_plaintext_moduli} plaintext moduli of {args.p_bits} bits, batch encoding, {len(batches)} batches of {args.batch_size} images "
          f"({n} images), encrypted beforehand")

    t0 = time.perf_counter()
    ctx.encrypt(x[:args.batch_size])
    encrypt_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch_blob = batches[0].to_bytes()
    serialize_seconds = time.perf_counter() - t0
    del batch_blob

    rows = []
    model = pycrcnn.build_from_spec(ctx, path)
    for threads in (1, 2):
        pycrcnn.set_num_threads(threads)
        t0 = time.perf_counter()
        outs = [model.run(b)[0] for b in batches]
        seconds = time.perf_counter() - t0
        acc = (np.concatenate([ctx.decrypt(o) for o in outs]).argmax(1) == labels).mean()
        rows.append((f"no Ray, engine on {threads} thread(s)", seconds, acc, None))
        if threads == 1:
            per_batch_local = seconds / len(batches)
    pycrcnn.set_num_threads(0)

    figures = None
    for workers in (1, 2):
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        start_up = time.perf_counter() - t0
        try:
            result = classify_dataset(path, ctx, batches, threads_per_task=1, progress=False)
        finally:
            ray.shutdown()
        acc = (np.concatenate([ctx.decrypt(o) for o in result.outputs]).argmax(1) == labels).mean()
        rows.append((f"Ray, {workers} worker process(es)", result.wall_seconds, acc, start_up))
        if workers == 1:
            figures = result

    print(f"{'job':<34} {'seconds':>8} {'images/s':>9} {'accuracy':>9} {'ray.init s':>10}")
    for name, seconds, acc, start_up in rows:
        print(f"{name:<34} {seconds:8.2f} {n / seconds:9.1f} {acc:9.4f} "
              f"{'' if start_up is None else f'{start_up:10.2f}'}")
    base1, base2 = rows[0][1], rows[1][1]
    ray1, ray2 = rows[2][1], rows[3][1]
    print(f"overhead of Ray, 1 worker vs no Ray on 1 thread: {100 * (ray1 / base1 - 1):+.1f}% time; "
          f"2 workers vs no Ray on 2 threads: {100 * (ray2 / base2 - 1):+.1f}% time; "
          f"speed-up 1 -> 2 workers: x{ray1 / ray2:.2f}")
    assert figures is not None
    compute = float(np.mean(figures.compute_seconds))
    task = float(np.mean(figures.task_seconds))
    print(f"scaling model: per-batch compute {compute:.3f} s on a worker (in-process {per_batch_local:.3f} s), "
          f"{task:.3f} s with parsing the batch and serializing the output; "
          f"per batch {np.mean(figures.batch_bytes) / 1e6:.2f} MB to the cluster and "
          f"{np.mean(figures.result_bytes) / 1e6:.2f} MB back; broadcast once {figures.broadcast_bytes / 1e6:.2f} MB "
          f"(public context + model); per-batch overhead on 1 worker "
          f"{(ray1 - sum(figures.compute_seconds)) / len(batches) * 1e3:.0f} ms")
    print(f"client, per batch: encryption {encrypt_seconds:.3f} s, serialization {serialize_seconds:.3f} s")
    bytes_per_batch = np.mean(figures.batch_bytes) + np.mean(figures.result_bytes)
    for link in (125e6, 1.25e9):  # 1 and 10 Gbit/s
        workers = task / max(encrypt_seconds + serialize_seconds, bytes_per_batch / link)
        print(f"  a client that encrypts as it sends, on a {link * 8 / 1e9:.0f} Gbit/s link, keeps about "
              f"{workers:.1f} single-thread workers busy ({args.batch_size / (encrypt_seconds + serialize_seconds):.0f} "
              f"images/s client limit, {args.batch_size * link / bytes_per_batch:.0f} images/s link limit)")


if __name__ == "__main__":
    main()
