"""The original PyCrCNN module path for model building, kept as a face.

What it re-exports lives in one module per idea: :mod:`pycrcnn.spec` (the
torch-free model format and its ``.npz`` file), :mod:`pycrcnn.torch_import`
(torch → spec, BatchNorm folding), :mod:`pycrcnn.reference` (the float numpy
forward) and :mod:`pycrcnn.model` (:class:`EncodedModel` and the builders).
"""
from ..model import EncodedModel, build_from_pytorch, build_from_spec
from ..spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_TYPES,
    LayerSpec,
    ModelSpec,
    UnsupportedLayerError,
    export_model,
    load_model_spec,
)
from ..torch_import import spec_from_torch

__all__ = [
    "LayerSpec",
    "ModelSpec",
    "UnsupportedLayerError",
    "EncodedModel",
    "spec_from_torch",
    "export_model",
    "load_model_spec",
    "build_from_spec",
    "build_from_pytorch",
    "SUPPORTED_TYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]
