"""Trained HE-friendly models shipped with pycrcnn, and loading of PyTorch models.

Shipped models
--------------
This folder holds small MNIST networks (``*.pt``) built only from
``torch.nn`` modules and :class:`pycrcnn.nn.Square`, saved with
``torch.save(model)`` by ``scripts/train_lenet1.py``, and ``models.json``
describing them.  :data:`INFO` maps each name to its metadata (``file``,
``input_shape``, ``test_accuracy`` on the 10,000 MNIST test digits,
``description``, ...).  Inputs are ``pycrcnn.datasets.normalize(images)``
(pixels / 255).

Loading
-------
:func:`load_torch_model` loads a model pickled by ``torch.save(model)`` --
the shipped ones and those of the original PyCrCNN.

.. warning::
   A ``.pt`` file saved with ``torch.save(model)`` is a Python *pickle*.
   Loading it (``weights_only=False``) can execute arbitrary code chosen by
   whoever wrote the file.  Only load model files whose author you trust
   (the shipped ones, your own, the seed's reference models).  Never load a
   model file received from a client or downloaded from an unknown source.

Importing this module does not import torch; the functions that need it
import it when called (``pip install pycrcnn[torch]``).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = [
    "MODELS_DIR",
    "INFO",
    "load_torch_model",
    "load_shipped_model",
    "shipped_model_path",
    "list_shipped_models",
]

#: the folder of the shipped models (this package's directory)
MODELS_DIR = Path(__file__).resolve().parent


def _read_info() -> Dict[str, Dict[str, Any]]:
    meta = MODELS_DIR / "models.json"
    if not meta.is_file():
        return {}
    with open(meta, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{meta}: expected a JSON object name -> metadata")
    return data


#: name -> {"file", "input_shape", "test_accuracy", "description", ...},
#: read from ``models.json`` in this folder
INFO: Dict[str, Dict[str, Any]] = _read_info()


def list_shipped_models() -> List[str]:
    """Names of the models shipped with the package (sorted)."""
    return sorted(name for name in INFO if (MODELS_DIR / INFO[name]["file"]).is_file())


def shipped_model_path(name: str) -> Path:
    """Path of the shipped model ``name`` (see :func:`list_shipped_models`).

    Raises ``KeyError`` listing the available names for an unknown name.
    """
    if name not in INFO:
        raise KeyError(
            f"no shipped model named {name!r}; available: {', '.join(list_shipped_models()) or 'none'}"
        )
    path = MODELS_DIR / INFO[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"shipped model {name!r}: file {path} is missing")
    return path


# ---------------------------------------------------------------------------
# loading pickled torch models


def _default_main_aliases() -> Dict[str, Any]:
    from .. import nn as pnn  # imports torch

    # The original PyCrCNN defined `class Square(nn.Module): forward(t) = t**2`
    # in its notebooks/scripts, so its pickles reference `__main__.Square`.
    return {"Square": pnn.Square}


def _make_pickle_module(aliases: Mapping[str, Any]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose Unpickler redirects
    ``__main__.<name>`` to ``aliases[name]``.

    torch.load uses ``pickle_module.Unpickler`` (zip format, and the main
    object of the legacy format) and ``pickle_module.load`` (the legacy
    format's header records); both are provided.  Nothing global is changed:
    ``sys.modules['__main__']`` is never touched.
    """

    class _CompatUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "__main__":
                if name in aliases:
                    return aliases[name]
                main = sys.modules.get("__main__")
                if main is not None and hasattr(main, name):
                    # a class the caller's own script defines (the usual
                    # pickle behaviour)
                    return super().find_class(module, name)
                raise pickle.UnpicklingError(
                    f"the model file references __main__.{name}, a class defined in "
                    f"the script that saved it. Known: {sorted(aliases)}. Pass "
                    f"classes={{'{name}': YourClass}} to load_torch_model."
                )
            return super().find_class(module, name)

    def load(file: Any, **kwargs: Any) -> Any:
        return _CompatUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        import io

        return _CompatUnpickler(io.BytesIO(data), **kwargs).load()

    mod = types.ModuleType("pycrcnn_compat_pickle")
    mod.Unpickler = _CompatUnpickler  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.loads = loads  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return mod


def load_torch_model(
    path: Union[str, "os.PathLike[str]", Any],
    map_location: Any = "cpu",
    classes: Optional[Mapping[str, Any]] = None,
):
    """Load a full model saved with ``torch.save(model)``, in ``eval()`` mode.

    Handles both of torch's formats: the zip format (torch >= 1.6) and the
    legacy pickle stream (e.g. the original PyCrCNN's ``model.pt``,
    ``mnist.pt``).  Classes the saving script defined at top level are
    pickled as ``__main__.<Name>``; ``__main__.Square`` is resolved to
    :class:`pycrcnn.nn.Square` (same ``forward``: ``t ** 2``), without
    modifying the caller's ``__main__``.

    .. warning::
       This unpickles with ``weights_only=False``: **loading a pickle runs
       code chosen by its author**.  Only load files from authors you trust;
       never a file a client sent you.

    Args:
        path: a file path or a binary file object.
        map_location: passed to ``torch.load`` (default ``"cpu"``).
        classes: extra ``{name: class}`` resolutions for ``__main__.<name>``
            references, taking precedence over the defaults.  Unresolved
            ``__main__`` names fall back to the caller's ``__main__`` (plain
            pickle behaviour), else raise ``pickle.UnpicklingError``.

    Returns:
        the ``torch.nn.Module`` (typically an ``nn.Sequential``), in eval mode.

    Raises:
        TypeError: the file holds something other than a module (e.g. a
            ``state_dict``: rebuild the architecture and ``load_state_dict``).
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "load_torch_model needs PyTorch: pip install 'pycrcnn[torch]'"
        ) from exc

    aliases = _default_main_aliases()
    if classes:
        aliases.update(classes)
    pickle_module = _make_pickle_module(aliases)
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    model = torch.load(
        path,
        map_location=map_location,
        pickle_module=pickle_module,
        weights_only=False,  # full-model pickle: see the warning above
    )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"{path} holds a {type(model).__name__}, not a torch.nn.Module; "
            "save the full model with torch.save(model) (a state_dict has no "
            "architecture)"
        )
    model.eval()
    return model


def load_shipped_model(name: str):
    """:func:`load_torch_model` of the shipped model ``name``, in eval mode."""
    return load_torch_model(shipped_model_path(name))
