"""``python -m pycrcnn.client``: encrypt images, classify them on a server, decrypt.

The original PyCrCNN's ``parameters.json`` runs as it is (see
:mod:`pycrcnn.client`); ``--layout packed`` classifies one image at a time in
the packed layout with a context made from the plan the server publishes for
the model (``GET /models/<name>``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Tuple

import numpy as np

from .client import Client, ServerError, _config_parameters, _context_from_config, config_encoding

__all__ = ["main"]


def _load_images(args: argparse.Namespace) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    from . import datasets

    if args.images:
        images = np.load(args.images, allow_pickle=False)
        labels = np.load(args.labels, allow_pickle=False) if args.labels else None
        return images, labels, args.images
    n = int(args.mnist)
    try:
        images, labels = datasets.load_mnist(split="test", limit=n)
        return images, labels, f"the first {len(images)} MNIST test digits"
    except FileNotFoundError:
        images, labels = datasets.sample_digits(n)
        return images, labels, f"{len(images)} bundled sample digits (MNIST not found; set PYCRCNN_DATA)"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pycrcnn-client",
        description="Encrypt images, classify them on a pycrcnn server, decrypt the results.")
    parser.add_argument("--config",
                        help="the original PyCrCNN's parameters.json: address, encryption_parameters "
                             "([{m, p, sec, base}]), net, layers, max_threads (optional with --net)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a .npy file of images (uint8 pixels [N, 28, 28] or model inputs)")
    src.add_argument("--mnist", type=int, metavar="N",
                     help="the first N MNIST test digits ($PYCRCNN_DATA or the shared folder; else the bundled sample)")
    parser.add_argument("--labels", help="a .npy file of labels for --images")
    parser.add_argument("--encoding", choices=["batch", "fractional"], default=None,
                        help="batch: all images in one pass (SIMD slots); fractional: the seed's encoding, one value "
                             "per ciphertext (default: the config's 'encoding', else fractional, as the original "
                             "configs mean)")
    parser.add_argument("--layout", choices=["batch", "packed"], default="batch",
                        help="packed: one image per request, packed into the slots of a few ciphertexts, with the "
                             "parameters of the plan the server publishes for the net (the config's "
                             "encryption_parameters are not used); batch (default): the config's encoding")
    parser.add_argument("--address", help="override the config's address")
    parser.add_argument("--net", help="override the config's net")
    parser.add_argument("--rencrypt", help="comma-separated rencryption positions (default: the model's)")
    parser.add_argument("--json", action="store_true", help="send JSON with base64 fields instead of binary frames")
    args = parser.parse_args(argv)

    config = {}
    try:
        if args.config:
            with open(args.config, "r", encoding="utf-8") as fh:
                config = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"pycrcnn-client: cannot read {args.config}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(config, dict):
        print(f"pycrcnn-client: {args.config} must hold a JSON object", file=sys.stderr)
        return 2
    try:
        params = _config_parameters(config)
        encoding = config_encoding(config, args.encoding)
    except ValueError as exc:
        print(f"pycrcnn-client: {args.config}: {exc}", file=sys.stderr)
        return 2
    address = args.address or config.get("address") or "http://127.0.0.1:5000"
    net = args.net or config.get("net")
    if not net:
        print("pycrcnn-client: no net: set 'net' in the config or pass --net", file=sys.stderr)
        return 2
    layers = config.get("layers")
    if config.get("max_threads"):
        from ._engine import set_num_threads

        set_num_threads(int(config["max_threads"]))

    from ._engine import Context, HEError

    client = Client(address)
    try:
        t0 = time.perf_counter()
        if args.layout == "packed":  # the parameters and rotation steps of the server's plan
            ctx = Context.from_plan(client.plan(net))
        else:
            ctx = _context_from_config(params, encoding)
        ctx.keygen()
        keygen_s = time.perf_counter() - t0
    except (ServerError, ConnectionError, KeyError) as exc:
        print(f"pycrcnn-client: no packed plan for {net!r}: {exc}", file=sys.stderr)
        return 1
    except HEError as exc:
        print(f"pycrcnn-client: encryption parameters {params}: {exc}", file=sys.stderr)
        return 2
    images, labels, what = _load_images(args)
    print(f"{ctx!r} ({args.layout} layout): keys made in {keygen_s:.2f} s; classifying {what} with {net!r} "
          f"at {address}")
    positions = None if args.rencrypt is None else [int(p) for p in args.rencrypt.split(",") if p.strip()]
    try:
        client.info()
        logits, report = client.classify(ctx, images, net, layers=layers, rencrypt_positions=positions,
                                         binary=not args.json)
    except ServerError as exc:
        print(f"pycrcnn-client: the server refused: {exc}", file=sys.stderr)
        return 1
    except (ConnectionError, KeyError) as exc:
        print(f"pycrcnn-client: {exc}", file=sys.stderr)
        return 1
    except HEError as exc:
        print(f"pycrcnn-client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    preds = logits.argmax(axis=1) if logits.ndim == 2 else logits
    for i, pred in enumerate(preds):
        label = "?" if labels is None else int(labels[i])
        mark = "" if labels is None else ("  ok" if int(pred) == label else "  WRONG")
        print(f"image {i:4d}: predicted {int(pred)}  label {label}{mark}")
    if labels is not None:
        acc = float(np.mean(preds == np.asarray(labels)[: len(preds)]))
        print(f"accuracy: {acc * 100:.1f} % ({int(round(acc * len(preds)))}/{len(preds)})")
    print(f"encryption: {report['encryption_seconds']:.2f} s; upload: {report['upload_bytes'] / 1e6:.1f} MB "
          f"(public context {report['context_upload_bytes'] / 1e6:.1f} MB); "
          f"server: {report['server_seconds']:.2f} s (request {report['request_seconds']:.2f} s); "
          f"download: {report['download_bytes'] / 1e6:.2f} MB; decryption: {report['decryption_seconds']:.2f} s; "
          f"round trips: {report['round_trips']}"
          + (f"; rencryption: {report['rencryption_seconds']:.2f} s" if report["round_trips"] > 1
             and args.layout == "batch" else ""))
    if report.get("per_image"):
        per = report["per_image"]
        mid = sorted(r["seconds"] for r in per)[len(per) // 2]
        print(f"packed layout, per image: {mid * 1e3:.0f} ms median (encrypt + upload + server + download + "
              f"decrypt), upload {per[0]['upload_bytes'] / 1e6:.2f} MB, download {per[0]['download_bytes'] / 1e3:.0f} KB")
    return 0
