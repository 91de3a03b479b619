"""The original PyCrCNN's module paths and public names (notes/original-api.md),
on the kinds of inputs the original passed them: object arrays of ciphertexts,
nested lists, numpy arrays, torch tensors and modules. Results are compared
with PyTorch or numpy.

Most inputs and weights are dyadic (k/8, k/4): their fractional encodings
have a few digits, products and sums of them are exact, so encrypted results
must equal the float64 reference up to float rounding (``EXACT``). Where
weights are torch's random floats, each value is truncated to 32 binary
fractional digits and the bound is the layer's Σ|w|·2^-32-style error, well
below ``TRUNC``.
"""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pycrcnn
from pycrcnn import CipherTensor, Context, HEError, PyCtxt, PyPtxt, Pyfhel, SecretKeyRequired

EXACT = 1e-9
TRUNC = 1e-6
RNG = np.random.default_rng(8)

#: module path -> public names, as in the original PyCrCNN (notes/original-api.md); the
#: net builder and the parameter tester's utils are wired separately
ORIGINAL_API = {
    "pycrcnn.convolutional.convolutional_layer": ["ConvolutionalLayer", "convolute2d"],
    "pycrcnn.crypto.crypto": ["encode_matrix", "decode_matrix", "encrypt_matrix", "decrypt_matrix"],
    "pycrcnn.functional.average_pool": ["AveragePoolLayer", "_avg"],
    "pycrcnn.functional.flatten_layer": ["FlattenLayer"],
    "pycrcnn.functional.padding": ["apply_padding"],
    "pycrcnn.functional.rencryption_layer": ["RencryptionLayer"],
    "pycrcnn.functional.square_layer": ["SquareLayer", "square"],
    "pycrcnn.linear.linear_layer": ["LinearLayer"],
    "pycrcnn.local_execution.local_execution": ["local_execution"],
}


@pytest.fixture(scope="module")
def HE():
    he = Pyfhel()
    he.contextGen(65537, m=4096)  # a square with 45 bits of budget left; dyadic values never wrap p
    he.keyGen()
    he.relinKeyGen(20, 5)
    return he


def dyadic(shape, k=8, denom=8):
    return RNG.integers(-k, k + 1, size=shape) / denom


def enc_objects(HE, x):
    """The seed's object array of PyCtxt, one encryptFrac per value."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=object)
    for idx, v in np.ndenumerate(x):
        out[idx] = HE.encryptFrac(v)
    return out


def dec(HE, objs):
    objs = np.asarray(objs, dtype=object)
    out = np.empty(objs.shape)
    for idx, c in np.ndenumerate(objs):
        out[idx] = HE.decryptFrac(c)
    return out


def t64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ---------------------------------------------------------------------------
# module paths


@pytest.mark.parametrize("module", sorted(ORIGINAL_API))
def test_module_paths_and_names(module):
    mod = importlib.import_module(module)
    for name in ORIGINAL_API[module]:
        assert callable(getattr(mod, name)), f"{module}.{name}"


def test_faces_are_the_engine_classes():
    from pycrcnn.convolutional.convolutional_layer import ConvolutionalLayer
    from pycrcnn.crypto import crypto
    from pycrcnn.functional.average_pool import AveragePoolLayer
    from pycrcnn.functional.flatten_layer import FlattenLayer
    from pycrcnn.functional.rencryption_layer import RencryptionLayer
    from pycrcnn.functional.square_layer import SquareLayer
    from pycrcnn.linear.linear_layer import LinearLayer

    assert ConvolutionalLayer is pycrcnn.ConvolutionalLayer and LinearLayer is pycrcnn.LinearLayer
    assert FlattenLayer is pycrcnn.FlattenLayer and SquareLayer is pycrcnn.SquareLayer
    assert RencryptionLayer is pycrcnn.RencryptionLayer
    assert issubclass(AveragePoolLayer, pycrcnn.AveragePoolLayer)  # only the seed's default stride differs
    # the package keeps its names, the module path holds the same functions
    import pycrcnn.crypto as package

    for name in ("encrypt_matrix", "decrypt_matrix", "encode_matrix", "decode_matrix", "as_cipher_tensor"):
        assert getattr(package, name) is getattr(crypto, name) is getattr(pycrcnn, name, getattr(crypto, name))


# ---------------------------------------------------------------------------
# pycrcnn.crypto.crypto


def test_crypto_any_shape_and_kind(HE):
    from pycrcnn.crypto.crypto import decode_matrix, decrypt_matrix, encode_matrix, encrypt_matrix

    x4 = dyadic((2, 1, 2, 3))
    cases = [x4, x4.tolist(), x4.astype(np.float32), torch.tensor(x4, requires_grad=True),
             dyadic((5,)), dyadic((2, 3, 2)), [[0.5, -1.25]], dyadic((1, 1, 1, 2, 2))]
    for m in cases:
        want = np.asarray(m.detach() if isinstance(m, torch.Tensor) else m, dtype=np.float64)
        t = encrypt_matrix(HE, m)
        assert t.shape == want.shape
        assert isinstance(t[(0,) * want.ndim], PyCtxt)  # indexes like the seed's object array
        got = decrypt_matrix(HE, t)
        assert got.shape == want.shape and np.max(np.abs(got - want)) <= EXACT
        # object arrays and nested lists of PyCtxt, as the seed's layers returned them
        objs = t.to_numpy()
        assert np.max(np.abs(decrypt_matrix(HE, objs) - want)) <= EXACT
        assert np.max(np.abs(decrypt_matrix(HE, objs.tolist()) - want)) <= EXACT
        assert np.max(np.abs(decrypt_matrix(HE, enc_objects(HE, want)) - want)) <= EXACT
        encoded = encode_matrix(HE, m)
        assert encoded.dtype == object and encoded.shape == want.shape
        assert all(isinstance(p, PyPtxt) for p in encoded.flat)
        assert HE.decodeFrac(encoded[(0,) * want.ndim]) == want[(0,) * want.ndim]
        assert np.array_equal(decode_matrix(HE, encoded), want)
    # element by element like the seed: decryptFrac of one element of the tensor
    t = encrypt_matrix(HE, x4)
    assert HE.decryptFrac(t[1][0][1][2]) == pytest.approx(x4[1, 0, 1, 2], abs=EXACT)
    # element-wise Pyfhel arithmetic can leave ciphertexts at different modulus levels
    objs = t.to_numpy()
    HE.square(objs[0, 0, 0, 0])
    want = x4.copy()
    want[0, 0, 0, 0] **= 2
    assert np.max(np.abs(decrypt_matrix(HE, objs) - want)) <= EXACT
    with pytest.raises(HEError):
        decrypt_matrix(HE, np.array([objs[0, 0, 0, 0], 1.5], dtype=object))


# ---------------------------------------------------------------------------
# layers built the seed's way: torch modules' weights, the original constructors


def test_convolutional_layer_from_a_torch_module(HE):
    from pycrcnn.convolutional.convolutional_layer import ConvolutionalLayer
    from pycrcnn.crypto.crypto import decode_matrix, decrypt_matrix, encrypt_matrix

    conv = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)).double()
    with torch.no_grad():
        conv.weight.copy_(t64(dyadic(conv.weight.shape, 4, 4)))
        conv.bias.copy_(t64(dyadic(conv.bias.shape)))
    x = dyadic((2, 2, 5, 4))
    layer = ConvolutionalLayer(HE, conv.weight.detach().numpy(), stride=conv.stride, padding=conv.padding,
                               bias=conv.bias.detach().numpy())
    # the seed's attributes
    assert layer.HE is HE and layer.stride == (2, 1) and layer.padding == (1, 0)
    assert layer.weights.dtype == object and layer.weights.shape == (3, 2, 3, 2)
    assert isinstance(layer.weights[0][0][0][0], PyPtxt)
    assert HE.decodeFrac(layer.weights[0][0][0][0]) == conv.weight[0, 0, 0, 0].item()
    assert np.array_equal(decode_matrix(HE, layer.weights), conv.weight.detach().numpy())
    assert np.array_equal(decode_matrix(HE, layer.bias), conv.bias.detach().numpy())
    with pytest.raises(AttributeError, match="new layer"):
        layer.weights = np.zeros((3, 2, 3, 2))
    want = conv(t64(x)).detach().numpy()
    for given in (enc_objects(HE, x), enc_objects(HE, x).tolist(), encrypt_matrix(HE, x)):
        out = layer(given)
        assert np.max(np.abs(decrypt_matrix(HE, out) - want)) <= EXACT
    # weights as torch tensors (with grad) or as the seed's encoded arrays; no bias
    no_bias = ConvolutionalLayer(HE, conv.weight, stride=conv.stride, padding=conv.padding)
    assert no_bias.bias is None
    again = ConvolutionalLayer(HE, layer.weights, conv.stride, conv.padding, layer.bias)
    assert np.max(np.abs(decrypt_matrix(HE, again(encrypt_matrix(HE, x))) - want)) <= EXACT
    want_nb = F.conv2d(t64(x), conv.weight.detach(), stride=conv.stride, padding=conv.padding).numpy()
    assert np.max(np.abs(decrypt_matrix(HE, no_bias(encrypt_matrix(HE, x))) - want_nb)) <= EXACT


def test_convolute2d_one_image_one_filter(HE):
    from pycrcnn.convolutional.convolutional_layer import convolute2d
    from pycrcnn.crypto.crypto import encode_matrix, encrypt_matrix

    image = dyadic((5, 6))
    filt = dyadic((3, 2), 4, 4)
    for stride in ((1, 1), (2, 3), [1, 2]):
        want = F.conv2d(t64(image)[None, None], t64(filt)[None, None], stride=tuple(stride)).numpy()[0, 0]
        for f in (filt, encode_matrix(HE, filt), filt.tolist()):
            out = convolute2d(enc_objects(HE, image), f, stride)
            assert isinstance(out, np.ndarray) and out.dtype == object and out.shape == want.shape
            assert all(isinstance(c, PyCtxt) for c in out.flat)
            assert np.max(np.abs(dec(HE, out) - want)) <= EXACT
    # a CipherTensor in, a CipherTensor out
    out = convolute2d(encrypt_matrix(HE, image), filt, (1, 1))
    assert isinstance(out, CipherTensor) and out.shape == (3, 5)
    # torch's random float weights: truncation errors only
    filt = torch.randn(3, 3, dtype=torch.float64).numpy()
    want = F.conv2d(t64(image)[None, None], t64(filt)[None, None]).numpy()[0, 0]
    assert np.max(np.abs(dec(HE, convolute2d(enc_objects(HE, image), filt, (1, 1))) - want)) <= TRUNC
    with pytest.raises(HEError, match="2-d"):
        convolute2d(enc_objects(HE, image[None]), filt, (1, 1))
    with pytest.raises(HEError, match="encrypt"):
        convolute2d(image, filt, (1, 1))


def test_linear_layer_from_a_torch_module(HE):
    from pycrcnn.crypto.crypto import decode_matrix, decrypt_matrix
    from pycrcnn.linear.linear_layer import LinearLayer

    lin = nn.Linear(6, 4).double()
    x = dyadic((3, 6))
    layer = LinearLayer(HE, lin.weight.detach().numpy(), lin.bias.detach().numpy())
    assert layer.HE is HE and layer.weights.shape == (4, 6) and layer.bias.shape == (4,)
    assert np.array_equal(decode_matrix(HE, layer.weights), lin.weight.detach().numpy())
    assert HE.decodeFrac(layer.bias[2]) == lin.bias[2].item()
    want = lin(t64(x)).detach().numpy()
    out = layer(enc_objects(HE, x))
    assert out.shape == (3, 4) and np.max(np.abs(decrypt_matrix(HE, out) - want)) <= TRUNC
    assert LinearLayer(HE, lin.weight).bias is None


def test_average_pool_layer_and_avg(HE):
    from pycrcnn.crypto.crypto import decrypt_matrix
    from pycrcnn.functional.average_pool import AveragePoolLayer, _avg

    x = dyadic((2, 2, 5, 5))
    layer = AveragePoolLayer(HE, (2, 2))  # the seed's default stride is 1, not the kernel size
    assert layer.HE is HE and layer.kernel_size == (2, 2) and layer.stride == (1, 1) and layer.padding == (0, 0)
    out = layer(enc_objects(HE, x))
    assert np.max(np.abs(decrypt_matrix(HE, out) - F.avg_pool2d(t64(x), 2, stride=1).numpy())) <= EXACT
    # as the seed's builder made it from a torch module (ints), with padding
    pool = nn.AvgPool2d(2, padding=1)
    layer = AveragePoolLayer(HE, pool.kernel_size, pool.stride, (pool.padding, pool.padding))
    assert layer.stride == (2, 2)
    assert np.max(np.abs(decrypt_matrix(HE, layer(enc_objects(HE, x))) - pool(t64(x)).numpy())) <= EXACT
    # _avg on one 2-D image
    image = x[1, 0]
    for k, s in (((2, 2), (1, 1)), ((3, 2), (2, 1)), (2, 2)):
        want = F.avg_pool2d(t64(image)[None, None], k, stride=s).numpy()[0, 0]
        out = _avg(HE, enc_objects(HE, image), k, s)
        assert out.dtype == object and out.shape == want.shape
        assert np.max(np.abs(dec(HE, out) - want)) <= EXACT


def test_flatten_layer(HE):
    from pycrcnn.crypto.crypto import decrypt_matrix
    from pycrcnn.functional.flatten_layer import FlattenLayer

    x = dyadic((2, 3, 2, 2))
    out = FlattenLayer()(enc_objects(HE, x))
    assert out.shape == (2, 12)
    assert np.max(np.abs(decrypt_matrix(HE, out) - torch.flatten(t64(x), 1).numpy())) <= EXACT


def test_apply_padding(HE):
    from pycrcnn.convolutional.convolutional_layer import ConvolutionalLayer
    from pycrcnn.crypto.crypto import decrypt_matrix, encrypt_matrix
    from pycrcnn.functional.padding import apply_padding

    x = dyadic((2, 2, 3, 4))
    objs = enc_objects(HE, x)
    for padding in ((1, 2), (0, 1), 1):
        out = apply_padding(objs, padding)
        py, px = (padding, padding) if isinstance(padding, int) else padding
        want = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)))
        assert out.dtype == object and out.shape == want.shape
        assert np.array_equal(decrypt_matrix(HE, out), want)  # zeros are exact
        assert all(isinstance(c, PyCtxt) for c in out.flat)
        # every padded element is its own ciphertext (in-place Pyfhel ops on one leave the others alone)
        if py:
            assert out[0, 0, 0, 0] is not out[0, 0, 0, 1]
            HE.add(out[0, 0, 0, 0], out[0, 0, py, px])
            assert HE.decryptFrac(out[0, 0, 0, 1]) == 0.0
    assert apply_padding(objs, (0, 0)) is objs
    # nested lists and CipherTensors too; a padded image convolves like torch's padding
    padded = apply_padding(encrypt_matrix(HE, x), (1, 1))
    assert isinstance(padded, CipherTensor) and padded.shape == (2, 2, 5, 6)
    assert apply_padding(objs.tolist(), (1, 1)).shape == (2, 2, 5, 6)
    w = dyadic((1, 2, 3, 3), 4, 4)
    got = decrypt_matrix(HE, ConvolutionalLayer(HE, w)(padded))
    assert np.max(np.abs(got - F.conv2d(t64(x), t64(w), padding=1).numpy())) <= EXACT
    with pytest.raises(HEError, match="encrypt"):
        apply_padding(x, (1, 1))
    with pytest.raises(HEError, match="4-d"):
        apply_padding(objs[0], (1, 1))


def test_square_layer_and_square(HE):
    from pycrcnn.crypto.crypto import decrypt_matrix, encrypt_matrix
    from pycrcnn.functional.square_layer import SquareLayer, square

    x = dyadic((2, 3, 2))
    objs = enc_objects(HE, x)
    out = SquareLayer(HE)(objs)
    assert np.max(np.abs(decrypt_matrix(HE, out) - x ** 2)) <= EXACT
    for shape in ((4,), (2, 3), (1, 2, 2, 2)):
        v = dyadic(shape)
        o = enc_objects(HE, v)
        got = square(HE, o)
        assert isinstance(got, np.ndarray) and got.dtype == object and got.shape == shape
        assert np.max(np.abs(dec(HE, got) - v ** 2)) <= EXACT
        assert np.max(np.abs(dec(HE, o) - v)) <= EXACT  # the inputs are left as they were
    assert square(HE, objs.tolist()).shape == x.shape
    sq = square(HE, encrypt_matrix(HE, x))
    assert isinstance(sq, CipherTensor) and np.max(np.abs(decrypt_matrix(HE, sq) - x ** 2)) <= EXACT


def test_rencryption_layer(HE):
    from pycrcnn.crypto.crypto import decrypt_matrix, encrypt_matrix
    from pycrcnn.functional.rencryption_layer import RencryptionLayer
    from pycrcnn.functional.square_layer import SquareLayer

    x = dyadic((1, 4))
    squared = SquareLayer(HE)(encrypt_matrix(HE, x))
    fresh = RencryptionLayer(HE)(squared)
    assert HE.noiseLevel(fresh) > HE.noiseLevel(squared) + 20
    assert np.max(np.abs(decrypt_matrix(HE, fresh) - x ** 2)) <= EXACT
    # where only the public context is (a server), rencryption needs the client
    public = Pyfhel()
    public.context = Context.from_public(HE.context.public_context())
    with pytest.raises(SecretKeyRequired):
        RencryptionLayer(public)(CipherTensor.from_bytes(squared.to_bytes(), public.context))


def test_batch_tensors_name_the_layer_to_use():
    ctx = Context(m=4096, encoding="batch", scale_bits=4, weight_scale_bits=4)
    ctx.keygen()
    from pycrcnn.convolutional.convolutional_layer import convolute2d
    from pycrcnn.functional.average_pool import _avg
    from pycrcnn.functional.padding import apply_padding
    from pycrcnn.functional.square_layer import square

    t = ctx.encrypt(np.ones((2, 1, 4, 4)) / 2)
    with pytest.raises(HEError, match="ConvolutionalLayer"):
        convolute2d(t[:, 0, 0], np.ones((2, 2)), (1, 1))
    with pytest.raises(HEError, match="AveragePoolLayer"):
        _avg(ctx, t[:, 0, 0], 2, 2)
    with pytest.raises(HEError, match="padding argument"):
        apply_padding(t, 1)
    # square needs no layout: a batch tensor is squared as it is
    assert np.max(np.abs(ctx.decrypt(square(ctx, t)) - 0.25)) <= EXACT


# ---------------------------------------------------------------------------
# a torch nn.Sequential, layer by layer with the original classes


def test_sequential_built_with_the_original_classes(HE):
    from pycrcnn.convolutional.convolutional_layer import ConvolutionalLayer
    from pycrcnn.crypto.crypto import decrypt_matrix, encrypt_matrix
    from pycrcnn.functional.average_pool import AveragePoolLayer
    from pycrcnn.functional.flatten_layer import FlattenLayer
    from pycrcnn.functional.square_layer import SquareLayer
    from pycrcnn.linear.linear_layer import LinearLayer

    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), pycrcnn_square(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(t64(dyadic(p.shape, 2, 4)))
    conv, _, pool, _, lin = net
    encoded = [
        ConvolutionalLayer(HE, conv.weight.detach().numpy(), conv.stride, conv.padding, conv.bias.detach().numpy()),
        SquareLayer(HE),
        AveragePoolLayer(HE, pool.kernel_size, pool.stride),
        FlattenLayer(),
        LinearLayer(HE, lin.weight.detach().numpy(), lin.bias.detach().numpy()),
    ]
    x = dyadic((2, 1, 4, 4))
    y = encrypt_matrix(HE, x)
    for layer in encoded:
        y = layer(y)
    assert np.max(np.abs(decrypt_matrix(HE, y) - net(t64(x)).detach().numpy())) <= EXACT


def pycrcnn_square():
    import pycrcnn.nn

    return pycrcnn.nn.Square()


# ---------------------------------------------------------------------------
# pycrcnn.local_execution.local_execution


def _params(m=4096, p=65537, layers=None, **extra):
    d = {"encryption_parameters": [{"m": m, "p": p, "sec": 128, "base": 2}], "max_threads": 1}
    if layers is not None:
        d["layers"] = layers
    d.update(extra)
    return d


def test_local_execution_with_model_pt_in_the_working_directory(tmp_path, monkeypatch):
    from pycrcnn.local_execution.local_execution import local_execution

    net = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), pycrcnn_square(), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.as_tensor(dyadic(p.shape, 2, 4), dtype=torch.float32))
    torch.save(net, tmp_path / "model.pt")  # the seed read ./model.pt
    monkeypatch.chdir(tmp_path)
    x = dyadic((3, 1, 4, 4)).astype(np.float32)
    want = net.double()(t64(x)).detach().numpy()
    for data in (x, torch.from_numpy(x), x.tolist()):
        out = local_execution(data, _params(layers=[0, 1, 2, 3]))
        assert out.shape == (3, 3) and np.max(np.abs(out - want)) <= EXACT
    # a prefix of the layers, and the parameters from a JSON file
    (tmp_path / "parameters.json").write_text(json.dumps(_params(layers=[0, 1])))
    out = local_execution(x, str(tmp_path / "parameters.json"), debug=True)
    assert np.max(np.abs(out - net[:2](t64(x)).detach().numpy())) <= EXACT
    assert pycrcnn.get_num_threads() >= 1


def test_local_execution_finds_shipped_models_by_net_name(tmp_path, monkeypatch):
    from pycrcnn.local_execution.local_execution import local_execution
    from pycrcnn.models import load_shipped_spec

    monkeypatch.chdir(tmp_path)  # no ./model.pt here
    x = (RNG.integers(0, 256, size=(1, 1, 28, 28)) / 256)
    out = local_execution(x, _params(m=2048, net="TINY_MLP"))  # names match case-insensitively
    want = load_shipped_spec("tiny_mlp").forward_numpy(x)
    assert out.shape == (1, 10) and np.max(np.abs(out - want)) <= TRUNC
    with pytest.raises(FileNotFoundError, match="MNIST"):
        local_execution(x, _params(net="MNIST"))
    with pytest.raises(HEError, match="encryption_parameters"):
        local_execution(x, {"net": "tiny_mlp"})


# ---------------------------------------------------------------------------
# a script written the original's way, real MNIST digits, a shipped model


def test_original_style_script_classifies_mnist_digits():
    """tests/original_style/classify_mnist.py: the original classes built from
    a torch model's modules, ``for layer in encoded_net``, four real test digits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pycrcnn.models import INFO, shipped_model_path

    script = Path(__file__).resolve().parent / "original_style" / "classify_mnist.py"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(pycrcnn.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(script), str(shipped_model_path("tiny_cnn")), "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["labels"] == [7, 2, 1, 0]  # the first MNIST test digits
    assert result["encrypted_argmax"] == result["plain_argmax"] == result["labels"]
    # float32 torch against 32 fractional digits, logits of size ~10: agreement to ~1e-5
    assert result["max_error"] < 1e-4, result
    assert INFO["tiny_cnn"]["test_accuracy"] > 0.9
