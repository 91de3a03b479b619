"""pycrcnn.parameters_tester.utils.utils: the original parameter tester's get_max_error,
get_min_noise and test_net, on the original's kinds of inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pycrcnn.nn
from pycrcnn import Pyfhel
from pycrcnn.parameters_tester.utils.utils import get_max_error, get_min_noise, test_net as run_test_net
from pycrcnn.crypto.crypto import encrypt_matrix
from pycrcnn.layers import ConvolutionalLayer, FlattenLayer, LinearLayer, RencryptionLayer, SquareLayer
from pycrcnn.net_builder import build_from_pytorch

RNG = np.random.default_rng(21)


@pytest.fixture(scope="module")
def HE():
    he = Pyfhel()
    he.contextGen(65537, m=4096)
    he.keyGen()
    return he


def dyadic(shape, k=4, denom=4):
    return RNG.integers(-k, k + 1, size=shape) / denom


def test_get_max_error(HE):
    x = dyadic((2, 3, 4))
    plain = x.copy()
    plain[1, 2, 0] += 0.75
    plain[0, 0, 3] -= 0.5
    t = encrypt_matrix(HE, x)
    for p in (plain, torch.from_numpy(plain), plain.tolist()):
        for c in (t, t.to_numpy(), t.to_numpy().tolist()):
            err, pos = get_max_error(HE, p, c)
            assert err == pytest.approx(0.75, abs=1e-9)
            assert pos == (1, 2, 0) and all(type(i) is int for i in pos)
            assert np.asarray(p)[pos] - HE.decryptFrac(t.to_numpy()[pos]) == pytest.approx(0.75, abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        get_max_error(HE, plain[0], t)


def test_get_min_noise(HE):
    t = encrypt_matrix(HE, dyadic((2, 3)))
    objs = t.to_numpy()
    objs[1, 1] = HE.square(objs[1, 1], in_new_ctxt=True)
    each = [HE.noiseLevel(c) for c in objs.flat]
    assert get_min_noise(HE, objs) == min(each) == HE.noiseLevel(objs[1, 1]) < max(each)
    assert get_min_noise(HE, objs.tolist()) == min(each)
    assert get_min_noise(HE, t) == min(HE.noiseLevel(c) for c in t.to_numpy().flat)
    assert get_min_noise(HE.context, objs[1, 1]) == HE.noiseLevel(objs[1, 1])


def _net():
    net = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), pycrcnn.nn.Square(), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(8, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in list(net[0].parameters()) + list(net[4].parameters()):
            p.copy_(torch.as_tensor(dyadic(p.shape), dtype=torch.float32))
        net[5].running_mean.copy_(torch.tensor([0.5, -1.0, 0.25]))
        net[5].running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    return net.eval()


def test_test_net_with_built_models(HE, capsys):
    net = _net()
    images = torch.as_tensor(dyadic((2, 1, 4, 4)), dtype=torch.float32)
    model = build_from_pytorch(HE, net)  # Dropout dropped, BatchNorm folded into the Linear
    assert len(model) == 4
    err = run_test_net(HE, net, model, images, False)
    assert 0 <= err < 1e-6
    assert capsys.readouterr().out == ""
    # with a rencryption before the Flatten, verbose
    model = build_from_pytorch(HE, net, [3])
    assert any(isinstance(layer, RencryptionLayer) for layer in model)
    err = run_test_net(HE, net, model, images.numpy(), True)
    assert err < 1e-6
    out = capsys.readouterr().out
    assert "noise budget of the encrypted input" in out
    assert out.count("max error") == 3  # conv, square, linear: not after Flatten or the rencryption
    assert "final outputs" in out and "largest error" in out


def test_test_net_with_layers_built_one_per_module(HE):
    """The seed's way: one encoded layer per torch module, in order."""
    net = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), pycrcnn.nn.Square(), nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.as_tensor(dyadic(p.shape), dtype=torch.float32))
    conv, _, _, lin = net
    layers = [ConvolutionalLayer(HE, conv.weight.detach().numpy(), conv.stride, conv.padding, conv.bias.detach().numpy()),
              SquareLayer(HE), RencryptionLayer(HE), FlattenLayer(),
              LinearLayer(HE, lin.weight.detach().numpy(), lin.bias.detach().numpy())]
    images = torch.as_tensor(dyadic((3, 1, 4, 4)), dtype=torch.float32)
    assert run_test_net(HE, net, layers, images, False) < 1e-9
    with pytest.raises(ValueError, match="fewer"):
        run_test_net(HE, net[:2], layers, images, False)
