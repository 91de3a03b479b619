"""EncodedModel.predict(): predicting, before running, whether a model fits the parameters."""
import numpy as np
import torch

import pycrcnn
from pycrcnn import datasets
from pycrcnn.models import load_torch_model

SEED_LENET = datasets.shared_dir() / "models" / "pycrcnn-original" / "LeNet1_Approx_single_square.pt"


def _keyed(**kw):
    ctx = pycrcnn.Context(**kw)
    ctx.keygen()
    return ctx


def test_predict_predicts_the_budget_of_a_real_run():
    ctx = _keyed(m=4096, p=953983721, encoding="fractional")
    model = pycrcnn.build_from_pytorch(ctx, SEED_LENET)
    predicted = model.predict(input_bound=1.0)
    assert [e["name"] for e in predicted] == ["Conv2d", "Square", "AvgPool2d", "Conv2d", "AvgPool2d", "Flatten", "Linear"]
    assert all(e["ok"] for e in predicted)
    # the real pass on a real digit: the probes are conservative, within a few bits
    images, _ = datasets.load_mnist(split="test", limit=1)
    x = ctx.encrypt(datasets.normalize(images).astype(np.float64))
    out = model(x, debug=False)
    real = ctx.noise_budget(out)
    assert abs(predicted[-1]["noise_budget"] - real) <= 4, (predicted[-1], real)
    net = load_torch_model(SEED_LENET)
    ref = net(torch.tensor(datasets.normalize(images))).detach().numpy()
    assert np.abs(ctx.decrypt(out) - ref).max() < 0.05


def test_predict_names_the_layer_that_would_fail():
    # The seed's example config (m=2048, p=13513511): the square exhausts the budget.
    ctx = _keyed(m=2048, p=13513511, encoding="fractional")
    predicted = pycrcnn.build_from_pytorch(ctx, SEED_LENET).predict()
    assert predicted[-1]["name"] == "Square" and not predicted[-1]["ok"]
    assert "noise budget" in predicted[-1]["error"]
    assert all(e["ok"] for e in predicted[:-1])
    # Batch with too large plaintext primes: the budget runs out before the end.
    ctx = _keyed(m=4096, encoding="batch", scale_bits=8, weight_scale_bits=8, n_plaintext_moduli=3)
    predicted = pycrcnn.build_from_pytorch(ctx, SEED_LENET).predict()
    assert not predicted[-1]["ok"]
    # Batch with a plaintext space that is too small: a PlaintextOverflow names the layer.
    ctx = _keyed(m=4096, encoding="batch", scale_bits=8, weight_scale_bits=8, p_bits=25)
    predicted = pycrcnn.build_from_pytorch(ctx, SEED_LENET).predict()
    assert not predicted[-1]["ok"] and "PlaintextOverflow" in predicted[-1]["error"], predicted[-1]


def test_predict_needs_the_secret_key():
    ctx = _keyed(m=2048, p=65537, encoding="fractional")
    server = pycrcnn.Context.from_public(ctx.public_context())
    model = pycrcnn.build_from_pytorch(server, SEED_LENET)
    try:
        model.predict()
    except pycrcnn.HEError as exc:
        assert "secret key" in str(exc)
    else:
        raise AssertionError("a public context predicted without the secret key")
