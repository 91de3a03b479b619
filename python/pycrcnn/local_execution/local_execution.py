"""The original PyCrCNN's ``pycrcnn.local_execution.local_execution``.

:func:`local_execution` ``(data, parameters, debug=False)`` makes keys from the
seed's ``parameters`` (``encryption_parameters``, ``max_threads``, ``layers``),
encrypts ``data``, runs the model's encrypted layers and returns the
decrypted outputs: client and server in one process, for trying parameters.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from .._engine import HEError, get_num_threads, set_num_threads
from ..crypto import decrypt_matrix, encrypt_matrix
from ..he import Pyfhel

__all__ = ["local_execution", "pyfhel_from_parameters", "find_model"]


def pyfhel_from_parameters(parameters: Mapping[str, Any]) -> Pyfhel:
    """A :class:`Pyfhel` with keys, from ``parameters["encryption_parameters"]``
    (a list whose first entry, or a dict, holds ``m``, ``p``, ``sec``, ``base``
    and optionally ``intDigits`` / ``fracDigits``), the seed's fractional encoding."""
    ep = parameters.get("encryption_parameters")
    if isinstance(ep, (list, tuple)):
        if not ep:
            raise HEError("'encryption_parameters' is an empty list: give one {m, p, sec, base} entry")
        ep = ep[0]
    if not isinstance(ep, Mapping) or "p" not in ep:
        raise HEError("parameters need 'encryption_parameters': [{\"m\": ..., \"p\": ..., \"sec\": ..., \"base\": ...}]")
    kw: Dict[str, Any] = {"p": int(ep["p"]), "m": int(ep.get("m", 2048)), "sec": int(ep.get("sec", 128)),
                          "base": int(ep.get("base", 2))}
    for src, dst in (("intDigits", "intDigits"), ("int_digits", "intDigits"), ("fracDigits", "fracDigits"),
                     ("frac_digits", "fracDigits")):
        if src in ep:
            kw[dst] = int(ep[src])
    HE = Pyfhel()
    HE.contextGen(**kw)
    HE.keyGen()
    HE.relinKeyGen(20, 5)
    return HE


def find_model(parameters: Mapping[str, Any]) -> Any:
    """The model ``parameters`` name: ``parameters["model"]`` (an ``nn.Sequential``
    or a ``.pt`` / ``.npz`` path); else ``./model.pt`` in the working directory,
    as the seed read it; else the shipped model whose name is ``parameters["net"]``
    (case-insensitive)."""
    model = parameters.get("model")
    if model is not None:
        return model
    local = Path(os.getcwd()) / "model.pt"
    if local.is_file():
        return local
    net = parameters.get("net")
    from ..models import list_shipped_models, shipped_model_path

    if net:
        for name in list_shipped_models():
            if name.lower() == str(net).lower():
                try:
                    return shipped_model_path(name, "npz")  # no torch needed
                except FileNotFoundError:
                    return shipped_model_path(name)
    raise FileNotFoundError(
        f"no model: parameters have no 'model' (an nn.Sequential or a model file), there is no ./model.pt in "
        f"{os.getcwd()}, and {net!r} is not a shipped model (shipped: {', '.join(list_shipped_models())})")


def local_execution(data: Any, parameters: Union[Mapping[str, Any], str, os.PathLike], debug: bool = False) -> np.ndarray:
    """Encrypts ``data`` (``[N, C, H, W]`` numbers: numpy, nested lists or a torch
    tensor), runs the encrypted layers ``parameters["layers"]`` (torch module
    indices; all if absent) of the model (see :func:`find_model`) and returns the
    decrypted outputs (float64 ``[N, ...]``).

    ``parameters`` is the seed's dict (or the path of its JSON file):
    ``encryption_parameters``, ``max_threads`` (the engine's threads for this
    call; the seed split the images over processes, the engine runs all images
    in one pass with that many threads) and ``layers``. ``debug=True`` prints
    each layer's time, shape and noise budget.
    """
    if not isinstance(parameters, Mapping):
        with open(parameters, "r", encoding="utf-8") as fh:
            parameters = json.load(fh)
    HE = pyfhel_from_parameters(parameters)
    from ..net_builder import build_from_pytorch

    layers = parameters.get("layers")
    selection: Optional[range] = None
    if layers:
        idx = [int(i) for i in layers]
        selection = range(min(idx), max(idx) + 1)
    encoded_net = build_from_pytorch(HE, find_model(parameters), layers=selection)
    threads = parameters.get("max_threads")
    previous = get_num_threads()
    if threads:
        set_num_threads(int(threads))
    try:
        encrypted = encrypt_matrix(HE, data)
        result = encoded_net(encrypted, debug=debug)
        return decrypt_matrix(HE, result)
    finally:
        if threads:
            set_num_threads(previous)
