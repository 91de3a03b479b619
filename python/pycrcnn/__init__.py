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
    "PlaintextOverflow", "PolynomialLayer", "PyCtxt", "PyPtxt", "Pyfhel", "RencryptionLayer",
    "SecretKeyRequired", "SquareLayer", "build_from_pytorch", "decode_matrix", "decrypt_matrix",
    "encode_matrix", "encrypt_matrix", "get_num_threads", "load_torch_model", "set_num_threads",
]


def __getattr__(name):
    # The model-building names pull in the net builder lazily so that importing
    # pycrcnn never imports torch.
    if name in ("build_from_pytorch", "EncodedModel", "UnsupportedLayerError", "build_from_spec", "export_model",
                "load_model_spec", "spec_from_torch", "ModelSpec", "LayerSpec"):
        from . import net_builder
        return getattr(net_builder, name)
    if name == "load_torch_model":
        from .models import load_torch_model
        return load_torch_model
    raise AttributeError(f"module 'pycrcnn' has no attribute {name!r}")
