#!/usr/bin/env python3
"""`make demo`: the whole service on this machine, end to end.

Starts the pycrcnn server on 127.0.0.1 with the shipped models, then, as a
client: makes keys, encrypts real MNIST test digits (bundled with the
package), sends them with the public context only, gets them classified by
LeNet-1 on the ciphertexts, decrypts, and prints predictions, accuracy and
timings — first single digits in the packed layout (one request per digit,
the image packed into the SIMD slots of a few ciphertexts, with the plan the
server publishes), then 20 digits in one batch-mode pass (one image per SIMD
slot), then one digit in the seed's one-value-per-ciphertext fractional
encoding; last, a table of the three paths side by side: time, upload and
download per digit.

    python scripts/demo.py [--model NAME] [--packed-digits N] [--batch-digits N]
"""
from __future__ import annotations

import argparse
import socket
import statistics
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
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--quiet"])
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


def per_digit(path: str, report: dict) -> dict:
    """Time, upload and download per digit of one path (the public context, sent once, apart)."""
    n = report["images"]
    if report.get("per_image"):  # packed: one request per digit
        seconds = statistics.median(r["seconds"] for r in report["per_image"])
    else:
        seconds = (report["encryption_seconds"] + report["request_seconds"] + report["decryption_seconds"]) / n
    return {"path": path, "digits": n, "seconds": seconds,
            "upload": (report["upload_bytes"] - report["context_upload_bytes"]) / n,
            "download": report["download_bytes"] / n, "context": report["context_upload_bytes"]}


def summary(rows: list) -> None:
    print("\n== per digit, side by side (encrypt + upload + server + download + decrypt; "
          "the public context is uploaded once per session)")
    print(f"{'path':<44}{'digits':>7}{'time per digit':>16}{'upload per digit':>18}{'download per digit':>20}"
          f"{'public context':>16}")
    for r in rows:
        print(f"{r['path']:<44}{r['digits']:>7}{r['seconds']:>14.3f} s{r['upload'] / 1e6:>15.2f} MB"
              f"{r['download'] / 1e3:>17.0f} KB{r['context'] / 1e6:>13.1f} MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL, help="a shipped model (default: %(default)s)")
    ap.add_argument("--packed-digits", type=int, default=5, help="digits classified one at a time, packed")
    ap.add_argument("--batch-digits", type=int, default=20, help="digits classified in one batch pass")
    args = ap.parse_args(argv)
    model = args.model
    images, labels = sample_digits()
    models_dir = shipped_model_path(model).parent
    proc, url = start_server(models_dir)
    rows = []
    try:
        client = Client(url)
        print(f"server at {url}: {client.info()}")

        n = args.packed_digits
        t0 = time.perf_counter()
        ctx = pycrcnn.Context.from_plan(client.plan(model))  # the plan the server publishes: no weights
        ctx.keygen()                                        # with the rotation keys the plan needs
        keygen_s = time.perf_counter() - t0
        logits, report = client.classify(ctx, images[:n], model)
        show(f"{model}, packed layout: {n} real MNIST test digits, one request each", ctx, keygen_s, logits,
             labels[:n], report)
        rows.append(per_digit("packed layout (one digit per request)", report))

        n = args.batch_digits
        t0 = time.perf_counter()
        ctx = pycrcnn.Context(m=4096, encoding="batch", scale_bits=8, weight_scale_bits=8, n_plaintext_moduli=3, p_bits=25)
        ctx.keygen()
        keygen_s = time.perf_counter() - t0
        logits, report = client.classify(ctx, images[:n], model)
        show(f"{model}, batch encoding: {n} real MNIST test digits in one encrypted pass", ctx, keygen_s, logits,
             labels[:n], report)
        rows.append(per_digit(f"batch encoding (one pass of {n} digits)", report))

        t0 = time.perf_counter()
        ctx = pycrcnn.Context(m=4096, p=953983721, encoding="fractional")
        ctx.keygen()
        keygen_s = time.perf_counter() - t0
        logits, report = client.classify(ctx, images[:1], model)
        show(f"{model}, fractional encoding (one value per ciphertext, the seed's setting): 1 digit", ctx, keygen_s,
             logits, labels[:1], report)
        rows.append(per_digit("fractional encoding (the seed's)", report))
        summary(rows)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
