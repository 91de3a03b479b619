"""PyTorch modules for training HE-friendly networks.

Homomorphic encryption (BFV) evaluates additions and multiplications only, so
activations must be polynomials.  The two modules here are what users put in
an ``nn.Sequential`` in place of ``ReLU`` / ``Tanh``; ``build_from_pytorch``
turns them into encrypted layers (``Square`` -> a ciphertext square,
``Polynomial`` -> ``PolynomialLayer``).

Every square multiplies the multiplicative depth (and the plaintext
coefficient growth) of the network: keep the number of activations small.

This module requires torch (``pip install pycrcnn[torch]``); nothing else in
:mod:`pycrcnn` imports torch when it is imported.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["Square", "Polynomial"]


class Square(nn.Module):
    """Element-wise square, ``forward(x) = x * x``.

    The HE-friendly activation of CryptoNets and of the original PyCrCNN
    models (whose pickles reference it as ``__main__.Square``; see
    :func:`pycrcnn.models.load_torch_model`).  Costs one ciphertext
    multiplication (plus relinearization) per element.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * x

    def extra_repr(self) -> str:
        return ""


class Polynomial(nn.Module):
    """Element-wise polynomial activation ``c0 + c1*x + c2*x**2 + ...``.

    Args:
        coefficients: the coefficients, **lowest degree first**
            (``[c0, c1, c2]`` is ``c0 + c1*x + c2*x**2``).  A list, tuple or
            1-D tensor with at least one entry.
        trainable: if ``True`` the coefficients are an ``nn.Parameter`` and
            are learned with the rest of the network; otherwise (default) they
            are a buffer: saved with the model and moved with ``.to()``, but
            not trained.

    The degree (``len(coefficients) - 1``) sets the multiplicative depth the
    encrypted layer needs: degree 2 costs one ciphertext square, degree 3 or
    4 two levels, and so on.  Evaluation uses Horner's rule.

    Example:
        >>> act = Polynomial([0.0, 0.5, 0.25])   # 0.5 x + 0.25 x^2
        >>> act(torch.tensor([2.0]))
        tensor([2.])
    """

    coefficients: torch.Tensor

    def __init__(
        self,
        coefficients: Union[Sequence[float], torch.Tensor],
        trainable: bool = False,
    ) -> None:
        super().__init__()
        coeffs = torch.as_tensor(coefficients, dtype=torch.get_default_dtype())
        coeffs = coeffs.detach().clone().reshape(-1)
        if coeffs.numel() == 0:
            raise ValueError("Polynomial needs at least one coefficient (c0)")
        if not torch.isfinite(coeffs).all():
            raise ValueError("Polynomial coefficients must be finite")
        self.trainable = bool(trainable)
        if self.trainable:
            self.coefficients = nn.Parameter(coeffs)
        else:
            self.register_buffer("coefficients", coeffs)

    @property
    def degree(self) -> int:
        """The polynomial's degree, ``len(coefficients) - 1``."""
        return int(self.coefficients.numel()) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        c = self.coefficients.to(dtype=x.dtype)
        out = torch.zeros_like(x) + c[-1]
        for k in range(c.numel() - 2, -1, -1):
            out = out * x + c[k]
        return out

    def extra_repr(self) -> str:
        vals = ", ".join(f"{float(v):.6g}" for v in self.coefficients.detach().cpu())
        return f"coefficients=[{vals}], trainable={self.trainable}"
