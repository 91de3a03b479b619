#!/usr/bin/env python3
"""`make demo`: the whole service on this machine, end to end.

Starts the pycrcnn server on 127.0.0.1 with the shipped models, then, as a
client: makes keys, encrypts real MNIST test digits (bundled with the
package), sends them with the public context only, gets them classified by
LeNet-1 on the ciphertexts, decrypts, and prints predictions, accuracy and
timings — first 20 digits in one batch-mode pass (one image per SIMD slot),
then one digit in the seed's one-value-per-ciphertext fractional encoding.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

import pycrcnn
from pycrcnn.client import Client
from pycrcnn.datasets import sample_digits
from pycrcnn.models import shipped_model_path

MODEL = "lenet1_square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models_dir: Path) -> tuple:
    port = free_port()
    # One client at a time: one worker process with every core is the fastest
    # deployment for it (the default, 2 workers × 1 thread, serves two at once).
    proc = subprocess.Popen([sys.executable, "-m", "pycrcnn.server", "--models", str(models_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if requests.get(url + "/", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 60 s")


def show(title: str, ctx: pycrcnn.Context, keygen_s: float, logits: np.ndarray, labels: np.ndarray, report: dict) -> None:
    preds = logits.argmax(axis=1)
    print(f"\n== {title}")
    print(f"parameters: {ctx.parameters()}")
    print(" digit  label  prediction")
    for i, (lab, pred) in enumerate(zip(labels, preds)):
        print(f" {i:5d}  {lab:5d}  {pred:10d}  {'ok' if lab == pred else 'WRONG'}")
    acc = float((preds == labels).mean())
    print(f"accuracy: {acc * 100:.1f}% ({int((preds == labels).sum())}/{len(labels)})")
    print(f"key generation {keygen_s:.2f} s | encryption {report['encryption_seconds']:.2f} s | "
          f"upload {report['upload_bytes'] / 1e6:.1f} MB | server {report['server_seconds']:.2f} s | "
          f"download {report['download_bytes'] / 1e6:.2f} MB | decryption {report['decryption_seconds']:.2f} s | "
          f"per digit {(report['encryption_seconds'] + report['request_seconds'] + report['decryption_seconds']) / len(labels):.2f} s")


def main() -> int:
    images, labels = sample_digits()
    models_dir = shipped_model_path(MODEL).parent
    proc, url = start_server(models_dir)
    try:
        client = Client(url)
        print(f"server at {url}: {client.info()}")

        t0 = time.perf_counter()
        ctx = pycrcnn.Context(m=4096, encoding="batch", scale_bits=8, weight_scale_bits=8, n_plaintext_moduli=3, p_bits=25)
        ctx.keygen()
        keygen_s = time.perf_counter() - t0
        logits, report = client.classify(ctx, images[:20], MODEL)
        show(f"{MODEL}, batch encoding: 20 real MNIST test digits in one encrypted pass", ctx, keygen_s, logits,
             labels[:20], report)

        t0 = time.perf_counter()
        ctx = pycrcnn.Context(m=4096, p=953983721, encoding="fractional")
        ctx.keygen()
        keygen_s = time.perf_counter() - t0
        logits, report = client.classify(ctx, images[:1], MODEL)
        show(f"{MODEL}, fractional encoding (one value per ciphertext, the seed's setting): 1 digit", ctx, keygen_s,
             logits, labels[:1], report)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
