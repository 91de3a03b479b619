#!/usr/bin/env python
"""Train the HE-friendly MNIST models shipped in python/pycrcnn/models/.

Models (all ``nn.Sequential`` of torch.nn modules + ``pycrcnn.nn.Square``):

- ``lenet1_square``     -- the architecture of the original PyCrCNN's
  ``LeNet1_Approx_single_square.pt``: conv 1->4 5x5, Square, AvgPool 2,
  conv 4->12 5x5, AvgPool 2, Flatten, Linear 192->10 (one square).
- ``lenet1_two_square`` -- the same with a Square after both convolutions.
- ``tiny_cnn``          -- conv 1->2 3x3 stride 3, Square, Flatten,
  Linear 162->10: one square, cheap under encryption (concurrency tests).
- ``tiny_mlp``          -- AvgPool 4, Flatten, Linear 49->10: no
  multiplication between ciphertexts at all (runs at m=1024).

MNIST is read with ``pycrcnn.datasets.load_mnist`` (``--data`` or
``PYCRCNN_DATA`` / ``PYCRCNN_SHARED``); nothing is downloaded.  Inputs are
``pycrcnn.datasets.normalize`` (pixels / 255), as in the original PyCrCNN.
Each model is saved with ``torch.save(model)`` to ``<out>/<name>.pt`` and
exported torch-free to ``<out>/<name>.npz`` (``scripts/export_models.py``), and
``<out>/models.json`` records its test accuracy on the 10,000 test digits.

Usage:  python scripts/train_lenet1.py [--epochs 3] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
import torch
from torch import nn

from pycrcnn import datasets
from pycrcnn.nn import Square

DEFAULT_OUT = REPO / "python" / "pycrcnn" / "models"


def lenet1_square() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=5),
        Square(),
        nn.AvgPool2d(kernel_size=2),
        nn.Conv2d(4, 12, kernel_size=5),
        nn.AvgPool2d(kernel_size=2),
        nn.Flatten(),
        nn.Linear(192, 10),
    )


def lenet1_two_square() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=5),
        Square(),
        nn.AvgPool2d(kernel_size=2),
        nn.Conv2d(4, 12, kernel_size=5),
        Square(),
        nn.AvgPool2d(kernel_size=2),
        nn.Flatten(),
        nn.Linear(192, 10),
    )


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3, stride=3),
        Square(),
        nn.Flatten(),
        nn.Linear(2 * 9 * 9, 10),
    )


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.AvgPool2d(kernel_size=4),
        nn.Flatten(),
        nn.Linear(49, 10),
    )


# name -> (builder, description, default Adam learning rate)
MODELS = {
    "lenet1_square": (
        lenet1_square,
        "LeNet-1 with one Square (architecture of the original PyCrCNN's "
        "LeNet1_Approx_single_square.pt): conv 1->4 5x5, Square, AvgPool 2, "
        "conv 4->12 5x5, AvgPool 2, Flatten, Linear 192->10",
        1e-3,
    ),
    "lenet1_two_square": (
        lenet1_two_square,
        "LeNet-1 with a Square after each convolution: conv 1->4 5x5, Square, "
        "AvgPool 2, conv 4->12 5x5, Square, AvgPool 2, Flatten, Linear 192->10",
        1e-3,
    ),
    "tiny_cnn": (
        tiny_cnn,
        "tiny CNN for fast tests: conv 1->2 3x3 stride 3, Square, Flatten, "
        "Linear 162->10",
        1e-2,
    ),
    "tiny_mlp": (
        tiny_mlp,
        "tiny linear model for fast tests, no ciphertext products: AvgPool 4, "
        "Flatten, Linear 49->10",
        1e-2,
    ),
}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def activation_ranges(model: nn.Sequential, x: torch.Tensor) -> list:
    """max |value| after each layer over x (for choosing HE parameters)."""
    out = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            out.append(round(float(x.abs().max()), 4))
    return out


def train(name, build, x_tr, y_tr, x_te, y_te, epochs, batch, lr, seed, clip):
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(x_tr), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: loss diverged at epoch {epoch + 1}")
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        print(
            f"  {name} epoch {epoch + 1}/{epochs}: loss {total / len(x_tr):.4f}, "
            f"test acc {accuracy(model, x_te, y_te):.4f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    model.eval()
    return model, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="MNIST directory (default: PYCRCNN_DATA / PYCRCNN_SHARED)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's models/)")
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS), help="train only these models")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 1e-3 for LeNet-1, 1e-2 for the tiny models)")
    ap.add_argument("--clip", type=float, default=5.0, help="gradient norm clipping")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    x_tr_u8, y_tr = datasets.load_mnist(args.data, split="train")
    x_te_u8, y_te = datasets.load_mnist(args.data, split="test")
    x_tr = torch.from_numpy(datasets.normalize(x_tr_u8))
    x_te = torch.from_numpy(datasets.normalize(x_te_u8))
    y_tr_t, y_te_t = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    print(f"MNIST: train {tuple(x_tr.shape)}, test {tuple(x_te.shape)}")

    args.out.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / "models.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    names = args.only or list(MODELS)
    for name in names:
        build, description, default_lr = MODELS[name]
        lr = args.lr if args.lr is not None else default_lr
        model, seconds = train(
            name, build, x_tr, y_tr_t, x_te, y_te_t,
            args.epochs, args.batch, lr, args.seed, args.clip,
        )
        acc = accuracy(model, x_te, y_te_t)
        acc1k = accuracy(model, x_te[:1000], y_te_t[:1000])
        file = f"{name}.pt"
        torch.save(model, args.out / file)
        size = (args.out / file).stat().st_size
        cmd = f"python scripts/train_lenet1.py --epochs {args.epochs} --batch {args.batch} --lr {lr} --clip {args.clip} --seed {args.seed} --only {name}"
        meta[name] = {
            "file": file,
            "input_shape": [1, 28, 28],
            "test_accuracy": round(acc, 4),
            "test_accuracy_first_1000": round(acc1k, 4),
            "description": description,
            "max_abs_after_layer": activation_ranges(model, x_te),
            "squares": sum(isinstance(m, Square) for m in model.modules()),
            "parameters": sum(p.numel() for p in model.parameters()),
            "normalization": "pixels / 255 (pycrcnn.datasets.normalize)",
            "dataset": "MNIST (train 60,000 / test 10,000)",
            "training": {
                "command": cmd,
                "optimizer": f"Adam lr={lr}, batch {args.batch}, {args.epochs} epochs (cosine LR decay), grad-norm clip {args.clip}",
                "seed": args.seed,
                "seconds": round(seconds, 1),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        print(f"{name}: test accuracy {acc:.4f} (first 1000: {acc1k:.4f}), {size} bytes, {seconds:.0f}s")
        meta_path.write_text(json.dumps(dict(sorted(meta.items())), indent=2) + "\n")
    # the torch-free .npz beside every .pt (scripts/export_models.py, next to this script)
    from export_models import export

    export(names, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
