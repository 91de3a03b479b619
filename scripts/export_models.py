#!/usr/bin/env python
"""Export the shipped models to torch-free ``.npz`` files beside their ``.pt``.

For every model in ``python/pycrcnn/models/models.json`` (or those given with
``--only``), loads ``<name>.pt`` (needs torch), writes ``<name>.npz`` with
:func:`pycrcnn.net_builder.export_model` (weights as float64 arrays plus a JSON
description: no pickles, loadable without torch) carrying the model's
metadata (input shape, normalization, test accuracy, description), records it
as ``"npz"`` in ``models.json`` and checks that the ``.npz`` gives the ``.pt``'s
outputs through the numpy reference.

Every model the packed planner accepts gets its packed plan saved in the
``.npz`` (``pycrcnn.plan(net, x, layout="packed")`` calibrated on the first
200 MNIST training digits, else the bundled sample): a server publishes it
(``GET /models/<name>``) and runs packed requests with it. For a model the
planner refuses, the refusal is saved in the metadata
(``packed_plan_refused``) and the server publishes it instead.

``scripts/train_lenet1.py`` runs this after training; run it by hand after
changing a ``.pt``:

    python scripts/export_models.py [--only NAME ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "python" / "pycrcnn" / "models"


def calibration_digits() -> np.ndarray:
    """Model inputs for planning: the first 200 MNIST training digits (else the bundled sample)."""
    from pycrcnn import datasets

    try:
        images, _ = datasets.load_mnist(split="train", limit=200)
    except FileNotFoundError:
        images, _ = datasets.sample_digits()
    return datasets.normalize(images).astype(np.float64)


def packed_plan(spec: Any) -> Tuple[Any, Optional[str]]:
    """``(plan, None)`` when the packed planner accepts ``spec``, else ``(None, its reason)``."""
    import pycrcnn
    from pycrcnn import HEError

    try:
        return pycrcnn.plan(spec, calibration_digits(), layout="packed"), None
    except (HEError, NotImplementedError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def export_one(name: str, meta: Dict[str, Any], folder: Path) -> Path:
    """Writes ``folder/<name>.npz`` from ``folder/<meta['file']>`` (with its
    packed plan, or the planner's refusal) and checks it."""
    import torch

    from pycrcnn.models import load_torch_model
    from pycrcnn.net_builder import export_model, load_model_spec, spec_from_torch

    net = load_torch_model(folder / meta["file"])
    shape = meta.get("input_shape")
    spec = spec_from_torch(net, name=name, input_shape=shape)
    extra = {k: meta[k] for k in ("description", "dataset") if k in meta}
    plan, refused = packed_plan(spec)
    if refused:
        from pycrcnn.packed_serving import METADATA_REFUSAL_KEY

        extra[METADATA_REFUSAL_KEY] = refused
    path = export_model(spec, folder / f"{name}.npz", name=name, normalization=meta.get("normalization"),
                        accuracy=meta.get("test_accuracy"), metadata=extra, plan=plan)
    print(f"{name}: packed plan " + (f"refused: {refused}" if refused else
                                     f"saved (m={plan.info['parameters']['m']}, {len(plan.info['parameters']['p'])} primes)"))
    # the .npz must compute what the .pt computes
    loaded = load_model_spec(path)
    x = np.random.default_rng(0).uniform(0, 1, size=(4, *(shape or [1, 28, 28])))
    with torch.no_grad():
        want = net.double()(torch.from_numpy(x)).numpy()
    got = loaded.forward_numpy(x)
    err = float(np.max(np.abs(got - want)))
    if err > 1e-9:
        raise RuntimeError(f"{path}: the numpy reference differs from torch by {err}")
    return path


def export(names: Optional[Sequence[str]] = None, folder: Path = DEFAULT_OUT) -> List[Path]:
    """Exports ``names`` (default: every model of ``folder/models.json``); updates models.json."""
    meta_path = folder / "models.json"
    meta = json.loads(meta_path.read_text())
    unknown = [n for n in names or () if n not in meta]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; models.json has {sorted(meta)}")
    written = []
    for name in names or sorted(meta):
        path = export_one(name, meta[name], folder)
        meta[name]["npz"] = path.name
        written.append(path)
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    meta_path.write_text(json.dumps(dict(sorted(meta.items())), indent=2) + "\n")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="export only these models")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the models folder (default: the package's models/)")
    args = ap.parse_args(argv)
    export(args.only, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
