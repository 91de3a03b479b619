"""``python -m pycrcnn.distributed``: classify MNIST digits on a Ray cluster.

The client (this process) loads N test digits, encrypts them in batches (batch
encoding, ``--batch-size`` images per tensor), sends the public context and
the model once and one batch per task to the cluster, decrypts the outputs
and prints the accuracy and images/s. Parameters are explicit Context
arguments (``--m``, ``--scale-bits``, ...).

Example: ``python -m pycrcnn.distributed --model tiny_mlp --mnist 512 --m 2048
--scale-bits 6 --weight-scale-bits 6 --address auto``
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np


def _model_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    from ..models import list_shipped_models, shipped_model_path

    if name not in list_shipped_models():
        raise SystemExit(f"--model {name!r}: not a file and not a shipped model ({', '.join(list_shipped_models())})")
    return shipped_model_path(name, "npz")


class _Encrypting:
    """The batches, encrypted one at a time as they are read (sized, for the progress bar)."""

    def __init__(self, ctx, x: np.ndarray, size: int):
        self.ctx, self.x, self.size = ctx, x, size

    def __len__(self) -> int:
        return -(-len(self.x) // self.size)

    def __iter__(self):
        for k in range(0, len(self.x), self.size):
            yield self.ctx.encrypt(self.x[k:k + self.size])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pycrcnn.distributed", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a shipped model name (tiny_mlp, tiny_cnn, ...) or a .npz file")
    parser.add_argument("--mnist", type=int, required=True, metavar="N", help="classify the first N MNIST test digits")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address ('auto', 'host:6379', 'ray://host:10001'); default: a local cluster")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per encrypted batch (default: m)")
    parser.add_argument("--m", type=int, default=2048, help="polynomial degree (slots per ciphertext)")
    parser.add_argument("--p", type=int, default=None, help="plaintext modulus (default: the engine picks)")
    parser.add_argument("--scale-bits", type=int, default=6)
    parser.add_argument("--weight-scale-bits", type=int, default=6)
    parser.add_argument("--n-plaintext-moduli", type=int, default=1)
    parser.add_argument("--p-bits", type=int, default=None)
    parser.add_argument("--threads-per-task", type=int, default=1)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from .. import Context, HEError, datasets
    from . import BatchesFailed, classify_dataset

    if args.mnist < 1:
        parser.error("--mnist must be ≥ 1")
    try:
        images, labels = datasets.load_mnist(limit=args.mnist)
    except FileNotFoundError:
        images, labels = datasets.sample_digits(args.mnist)
        print(f"MNIST files not found: using the {len(images)} bundled sample digits", file=sys.stderr)
    x = datasets.normalize(images)
    try:
        ctx = Context(m=args.m, p=args.p, encoding="batch", scale_bits=args.scale_bits,
                      weight_scale_bits=args.weight_scale_bits, n_plaintext_moduli=args.n_plaintext_moduli,
                      p_bits=args.p_bits)
        ctx.keygen()
    except HEError as exc:
        parser.error(f"parameters: {exc}")
    size = args.batch_size or ctx.m
    if not 1 <= size <= ctx.m:
        parser.error(f"--batch-size must be in 1..m={ctx.m}")
    t0 = time.perf_counter()
    batches = _Encrypting(ctx, x, size)  # each batch is encrypted when its task is submitted
    try:
        result = classify_dataset(_model_path(args.model), ctx, batches, address=args.address,
                                  num_cpus=args.num_cpus, threads_per_task=args.threads_per_task,
                                  max_retries=args.max_retries, progress=not args.no_progress)
    except BatchesFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except HEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logits = np.concatenate([ctx.decrypt(t) for t in result.outputs])
    seconds = time.perf_counter() - t0
    accuracy = float((logits.argmax(1) == labels).mean())
    n_batches = len(result.outputs)
    print(f"{len(x)} digits in {n_batches} batches of ≤ {size}: accuracy {accuracy:.4f}, "
          f"{len(x) / seconds:.1f} images/s end to end ({seconds:.2f} s incl. encryption and decryption), "
          f"cluster job {result.wall_seconds:.2f} s ({len(x) / result.wall_seconds:.1f} images/s, encryption "
          f"included), compute {sum(result.compute_seconds):.2f} s summed over tasks; "
          f"sent once {result.broadcast_bytes / 1e6:.2f} MB, per batch {np.mean(result.batch_bytes) / 1e6:.2f} MB "
          f"out / {np.mean(result.result_bytes) / 1e6:.2f} MB back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
