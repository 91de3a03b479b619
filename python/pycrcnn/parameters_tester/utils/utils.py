"""The original PyCrCNN's parameter-testing helpers: :func:`get_max_error`,
:func:`get_min_noise`, :func:`test_net`.

The seed's module path, ``pycrcnn.parameters_tester.utils.utils``, over the engine.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np

from ..._engine import HEError
from ...crypto import as_cipher_tensor, as_numbers, decrypt_matrix, encrypt_matrix
from ...crypto.crypto import each_ciphertext
from ...he import context_of
from ...layers import FlattenLayer, RencryptionLayer

__all__ = ["get_max_error", "get_min_noise", "test_net"]


def get_max_error(HE: Any, p_matrix: Any, c_matrix: Any) -> Tuple[float, Tuple[int, ...]]:
    """The largest ``|plain - decrypted|`` between ``p_matrix`` (numbers: numpy,
    nested lists or a torch tensor) and ``c_matrix`` (ciphertexts of the same
    shape: a CipherTensor or an object array of PyCtxt), and its position as a
    tuple index into ``p_matrix``: ``(max_error, position)``."""
    plain = as_numbers(p_matrix)
    dec = decrypt_matrix(HE, c_matrix)
    if dec.shape != plain.shape:
        raise ValueError(f"get_max_error: plain shape {list(plain.shape)} and cipher shape {list(dec.shape)} differ")
    err = np.abs(plain - dec)
    flat = int(np.argmax(err))
    position = tuple(int(i) for i in np.unravel_index(flat, plain.shape))
    return float(err.reshape(-1)[flat]), position


def get_min_noise(HE: Any, matrix: Any) -> int:
    """The smallest invariant noise budget (bits) among the ciphertexts of
    ``matrix`` (a CipherTensor, a PyCtxt or an object array / nested lists of
    PyCtxt). Needs the secret key they were encrypted under, in ``HE``."""
    ctx = context_of(HE)
    try:
        t = as_cipher_tensor(matrix)
    except HEError:
        each = each_ciphertext(matrix, ctx.noise_budget, np.int64)
        if each is None:
            raise
        return int(each.min())
    return int(ctx.noise_budget(t))


def _torch_steps(net: Any, encoded_layers: List[Any]) -> List[List[Any]]:
    """For each encoded layer, the torch modules that compute the same thing.

    Layers of a :func:`~pycrcnn.net_builder.build_from_pytorch` model carry
    their torch module index (and fold BatchNorm, skip Dropout/Identity), so
    they take the modules of their index range; hand-built lists take one
    module per layer, in order, as the seed did. Rencryption layers take none.
    """
    modules = list(net.children()) if hasattr(net, "children") else list(net)
    kept = [layer for layer in encoded_layers if not isinstance(layer, RencryptionLayer)]
    indexed = all(getattr(layer, "spec", None) is not None for layer in kept) and kept and \
        max(layer.spec.end_index for layer in kept) < len(modules)
    steps: List[List[Any]] = []
    if indexed:
        nxt = kept[0].spec.index
        for layer in encoded_layers:
            if isinstance(layer, RencryptionLayer):
                steps.append([])
                continue
            stop = layer.spec.end_index + 1
            steps.append(modules[nxt:stop])
            nxt = stop
    else:
        it = iter(modules)
        for layer in encoded_layers:
            if isinstance(layer, RencryptionLayer):
                steps.append([])
                continue
            module = next(it, None)
            if module is None:
                raise ValueError(f"test_net: the net has {len(modules)} modules, fewer than its encoded layers")
            steps.append([module])
    return steps


def test_net(HE: Any, net: Any, encoded_layers: Any, images: Any, verbose: bool = False) -> float:
    """Runs ``encoded_layers`` on encrypted ``images`` and the torch ``net`` on the
    plain ones side by side; returns the largest absolute error of the final
    outputs. With ``verbose``, prints after every layer (but Flatten and
    rencryption) the largest error, where it is, the plain and decrypted values
    there, the mean plain value and the smallest noise budget.

    ``images`` is a torch tensor (or numbers) ``[N, C, H, W]``; ``net`` the
    ``nn.Sequential`` the layers were built from (a ``build_from_pytorch``
    model, or a list of layers made one per module as in the seed).
    """
    import torch

    plain = images if isinstance(images, torch.Tensor) else torch.as_tensor(as_numbers(images))
    plain = plain.detach().to(torch.float64)
    layers = list(encoded_layers)
    steps = _torch_steps(net, layers)
    net64 = [[_float64_module(m) for m in step] for step in steps]
    encrypted: Any = encrypt_matrix(HE, plain.numpy())

    def stats(where: str) -> None:
        p = plain.numpy()
        err, pos = get_max_error(HE, p, encrypted)
        dec = decrypt_matrix(HE, encrypted)
        print(f"\n--- {where} ---")
        print(f"max error {err:.6g} at {pos}: plain {p[pos]:.6g}, decrypted {dec[pos]:.6g}")
        print(f"mean plain value {float(np.mean(p)):.6g}; smallest noise budget {get_min_noise(HE, encrypted)} bits")

    if verbose:
        print(f"smallest noise budget of the encrypted input: {get_min_noise(HE, encrypted)} bits")
    with torch.no_grad():
        for k, (layer, modules) in enumerate(zip(layers, net64)):
            encrypted = layer(encrypted)
            for module in modules:
                plain = module(plain)
            if verbose and not isinstance(layer, (FlattenLayer, RencryptionLayer)):
                stats(f"after layer {k} ({type(layer).__name__})")
    final = decrypt_matrix(HE, encrypted)
    p = plain.numpy()
    error = float(np.max(np.abs(p.reshape(final.shape) - final)))
    if verbose:
        print("\n--- final outputs ---")
        print("plain:", p, sep="\n")
        print("decrypted:", final, sep="\n")
        print(f"largest error: {error:.6g}")
    return error


def _float64_module(module: Any) -> Any:
    """A float64 copy of a torch module (the plain reference runs in float64)."""
    import copy

    m = copy.deepcopy(module)
    return m.double() if hasattr(m, "double") else m


# pytest would take test_net for a test
test_net.__test__ = False  # type: ignore[attr-defined]
