"""pycrcnn: privacy-preserving CNN inference with BFV homomorphic encryption.

A Rust engine (fhe.rs) behind the PyCrCNN API: the client encrypts, a server
runs a trained CNN's layers on ciphertexts with public keys only, the client
decrypts. See the README for the threat model.
"""
from ._engine import (
    CipherTensor,
    Context,
    FormatError,
    HEError,
    NoiseBudgetExhausted,
    ParameterError,
    PlaintextOverflow,
    PyCtxt,
    RunCancelled,
    SecretKeyRequired,
    get_num_threads,
    set_num_threads,
)
from .crypto import decode_matrix, decrypt_matrix, encode_matrix, encrypt_matrix
from .he import Pyfhel, PyPtxt
from .layers import (
    AveragePoolLayer,
    Conv1dLayer,
    ConvolutionalLayer,
    FlattenLayer,
    LinearLayer,
    PolynomialLayer,
    RencryptionLayer,
    SquareLayer,
)

__version__ = "0.1.0"

__all__ = [
    "AveragePoolLayer", "CipherTensor", "Context", "Conv1dLayer", "ConvolutionalLayer", "EncodedModel",
    "FlattenLayer", "FormatError", "HEError", "LinearLayer", "NoiseBudgetExhausted", "ParameterError",
    "PlaintextOverflow", "PolynomialLayer", "PyCtxt", "PyPtxt", "Pyfhel", "RencryptionLayer", "RunCancelled",
    "SecretKeyRequired", "SquareLayer", "build_from_pytorch", "decode_matrix", "decrypt_matrix",
    "encode_matrix", "encrypt_matrix", "get_num_threads", "load_torch_model", "plan", "Plan", "PlanError",
    "set_num_threads",
]


#: the model-building names and the module each lives in, imported on first use
_LAZY = {
    "build_from_pytorch": "model", "build_from_spec": "model", "EncodedModel": "model",
    "export_model": "spec", "load_model_spec": "spec", "ModelSpec": "spec", "LayerSpec": "spec",
    "UnsupportedLayerError": "spec", "spec_from_torch": "torch_import", "load_torch_model": "models",
    "plan": "planner", "Plan": "planner", "PlanError": "planner",
}


def __getattr__(name):
    # On first use: importing pycrcnn loads the engine and the layers only, and
    # torch is imported only where a torch model is read.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pycrcnn' has no attribute {name!r}")
