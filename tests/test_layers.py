"""Every encrypted layer against torch.nn.functional on the same inputs, in both encodings.

Error bounds (stated per assertion, derived from how values are encoded):

* fractional encoding (the seed's, m=4096, p=953983721): inputs and weights
  keep 32 binary fractional digits (truncated), so each carries an error
  below δ = 2^-32; products and sums of the encodings are exact while no
  coefficient wraps mod p. For an affine layer y = Σ w·x + b the error is at
  most Σ |ŵ|·δ + Σ |x|·δ + δ, computed below with the layer itself applied to
  |x| and |ŵ| — around 1e-8 for the values here, i.e. ~1e-9 relative.
* batch encoding: inputs are round(x·2^s)/2^s (error ≤ 2^-(s+1)), weights
  round(w·2^ws)/2^ws (≤ 2^-(ws+1)), the bias is added at the output scale
  (≤ 1/(2·2^s·2^ws)); the arithmetic on these integers is exact. Same formula
  with those δs.

Tensors are small (a few hundred ciphertexts at most) so the file runs in
seconds; the LeNet-1 prefix in the seed-notebook test is the one heavier case.
"""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import torch
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import pycrcnn  # noqa: E402
import pycrcnn.datasets  # noqa: E402
import pycrcnn.nn  # noqa: E402
from pycrcnn import (  # noqa: E402
    AveragePoolLayer,
    Context,
    Conv1dLayer,
    ConvolutionalLayer,
    FlattenLayer,
    HEError,
    LinearLayer,
    PolynomialLayer,
    RencryptionLayer,
    SquareLayer,
)
from pycrcnn.net_builder import (  # noqa: E402
    EncodedModel,
    ModelSpec,
    UnsupportedLayerError,
    build_from_pytorch,
    build_from_spec,
    spec_from_torch,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _float64_reference():
    """float64 torch references for this module only (the default dtype is global)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)

FRAC_DELTA = 2.0 ** -32  # truncation error of one fractional encoding (32 fractional digits)
SLACK = 1e-9  # float64 rounding in decoding and in the reference
SB, WSB = 10, 8  # batch scales of the layer tests


# ---------------------------------------------------------------------------
# contexts (keys are made once per module)


@pytest.fixture(scope="module")
def frac():
    ctx = Context(m=4096, p=953983721, sec=128, encoding="fractional")
    ctx.keygen()
    return ctx


@pytest.fixture(scope="module")
def batch():
    # one plaintext prime ≈ 2^35 (chosen by the engine), inputs at 2^10, weights at 2^8
    ctx = Context(m=4096, sec=128, encoding="batch", scale_bits=SB, weight_scale_bits=WSB)
    ctx.keygen()
    return ctx


@pytest.fixture(scope="module", params=["fractional", "batch"])
def ctx(request, frac, batch):
    return frac if request.param == "fractional" else batch


def deltas(ctx, in_scale=None):
    """(δx, δw, δb): encoding errors of inputs, weights and bias for this context."""
    if ctx.encoding == "fractional":
        return FRAC_DELTA, FRAC_DELTA, FRAC_DELTA
    s = in_scale if in_scale is not None else 2.0 ** SB
    return 0.5 / s, 2.0 ** -(WSB + 1), 0.5 / (s * 2.0 ** WSB)


def quantized_weights(ctx, w):
    if ctx.encoding == "fractional":
        return w
    return np.round(w * 2.0 ** WSB) / 2.0 ** WSB


def affine_bound(ctx, fn, x, w, has_bias, in_scale=None):
    """max-norm error bound of fn(x, w) + b computed on encoded x, w, b:
    Σ|ŵ|·δx + Σ|x|·δw + δb, evaluated with fn itself."""
    dx, dw, db = deltas(ctx, in_scale)
    wt = torch.as_tensor(np.abs(quantized_weights(ctx, w)))
    xt = torch.as_tensor(np.abs(x))
    b = fn(torch.full_like(xt, dx), wt) + fn(xt, torch.full_like(wt, dw))
    return b.numpy() + (db if has_bias else 0.0) + SLACK


def n_images(ctx):
    # fractional: one ciphertext per value, keep it to one or two images; batch: images are free
    return 2 if ctx.encoding == "fractional" else 8


def rng(seed):
    return np.random.default_rng(seed)


def check(dec, ref, bound, what):
    err = np.abs(dec - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: error {err[worst]:.3g} at {worst} exceeds the bound {np.broadcast_to(bound, err.shape)[worst]:.3g}")


# ---------------------------------------------------------------------------
# convolutions, linear, pooling


CONV2D_CASES = [
    # in, out, HxW, kernel, stride, padding, dilation, groups, bias
    dict(cin=1, cout=2, hw=(5, 5), k=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=True),
    dict(cin=2, cout=3, hw=(6, 6), k=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1, bias=False),
    dict(cin=2, cout=2, hw=(7, 6), k=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=1, bias=True),
    dict(cin=2, cout=4, hw=(5, 5), k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2, bias=True),
    dict(cin=3, cout=3, hw=(4, 5), k=(2, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=3, bias=False),
]


@pytest.mark.parametrize("case", CONV2D_CASES, ids=lambda c: f"{c['cin']}to{c['cout']}-s{c['stride']}-p{c['padding']}"
                         f"-d{c['dilation']}-g{c['groups']}-b{int(c['bias'])}")
def test_conv2d(ctx, case):
    r = rng(1)
    n = n_images(ctx)
    x = r.uniform(-1, 1, (n, case["cin"], *case["hw"]))
    w = r.uniform(-1, 1, (case["cout"], case["cin"] // case["groups"], *case["k"]))
    b = r.uniform(-1, 1, case["cout"]) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    layer = ConvolutionalLayer(ctx, w, bias=b, **kw)
    out = layer(ctx.encrypt(x))
    ref = F.conv2d(torch.as_tensor(x), torch.as_tensor(w), None if b is None else torch.as_tensor(b), **kw).numpy()
    assert tuple(out.shape) == ref.shape
    bound = affine_bound(ctx, lambda a, v: F.conv2d(a, v, None, **kw), x, w, b is not None)
    check(ctx.decrypt(out), ref, bound, f"Conv2d {case} ({ctx.encoding})")


@pytest.mark.parametrize("case", [
    dict(cin=2, cout=3, length=10, k=3, stride=2, padding=1, dilation=1, groups=1, bias=True),
    dict(cin=2, cout=2, length=9, k=2, stride=1, padding=0, dilation=3, groups=2, bias=False),
], ids=["s2p1", "d3g2"])
def test_conv1d(ctx, case):
    r = rng(2)
    n = n_images(ctx)
    x = r.uniform(-1, 1, (n, case["cin"], case["length"]))
    w = r.uniform(-1, 1, (case["cout"], case["cin"] // case["groups"], case["k"]))
    b = r.uniform(-1, 1, case["cout"]) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    out = Conv1dLayer(ctx, w, bias=b, **kw)(ctx.encrypt(x))
    ref = F.conv1d(torch.as_tensor(x), torch.as_tensor(w), None if b is None else torch.as_tensor(b), **kw).numpy()
    bound = affine_bound(ctx, lambda a, v: F.conv1d(a, v, None, **kw), x, w, b is not None)
    check(ctx.decrypt(out), ref, bound, f"Conv1d {case} ({ctx.encoding})")


@pytest.mark.parametrize("in_shape,bias", [((12,), True), ((12,), False), ((3, 2, 2), True)],
                         ids=["flat-bias", "flat-nobias", "image-flattened"])
def test_linear(ctx, in_shape, bias):
    r = rng(3)
    n = n_images(ctx)
    x = r.uniform(-1, 1, (n, *in_shape))
    w = r.uniform(-1, 1, (5, int(np.prod(in_shape))))
    b = r.uniform(-1, 1, 5) if bias else None
    out = LinearLayer(ctx, w, b)(ctx.encrypt(x))
    assert tuple(out.shape) == (n, 5)
    xf = x.reshape(n, -1)
    ref = F.linear(torch.as_tensor(xf), torch.as_tensor(w), None if b is None else torch.as_tensor(b)).numpy()
    bound = affine_bound(ctx, lambda a, v: F.linear(a, v), xf, w, bias)
    check(ctx.decrypt(out), ref, bound, f"Linear {in_shape} ({ctx.encoding})")


@pytest.mark.parametrize("kernel,stride,padding", [
    ((2, 2), (2, 2), (0, 0)),
    ((3, 3), (2, 2), (1, 1)),   # padded zeros count in the average (count_include_pad=True)
    ((2, 3), (1, 2), (1, 1)),
], ids=["k2s2", "k3s2p1", "k2x3s1x2p1"])
def test_avg_pool2d(ctx, kernel, stride, padding):
    r = rng(4)
    n = n_images(ctx)
    x = r.uniform(-1, 1, (n, 2, 6, 5))
    out = AveragePoolLayer(ctx, kernel, stride, padding)(ctx.encrypt(x))
    ref = F.avg_pool2d(torch.as_tensor(x), kernel, stride, padding, count_include_pad=True).numpy()
    dx, dw, _ = deltas(ctx)
    if ctx.encoding == "fractional":
        # weight 1/(kh·kw) truncated to 32 digits, inputs truncated
        k = kernel[0] * kernel[1]
        bound = dx + F.avg_pool2d(torch.as_tensor(np.abs(x)), kernel, stride, padding).numpy() * k * dw + SLACK
    else:
        # the divisor is tracked exactly in the scale: only the input rounding remains
        bound = dx + SLACK
    check(ctx.decrypt(out), ref, bound, f"AvgPool2d {kernel} {stride} {padding} ({ctx.encoding})")


def test_avg_pool2d_default_stride(frac):
    x = rng(5).uniform(-1, 1, (1, 1, 4, 4))
    layer = AveragePoolLayer(frac, 2)
    assert layer.stride == (2, 2)
    ref = F.avg_pool2d(torch.as_tensor(x), 2).numpy()
    check(frac.decrypt(layer(frac.encrypt(x))), ref, 2 * FRAC_DELTA + SLACK, "AvgPool2d(2)")


# ---------------------------------------------------------------------------
# activations, flatten, rencryption


def test_square(ctx):
    r = rng(6)
    n = n_images(ctx)
    x = r.uniform(-2, 2, (n, 2, 3, 3))
    out = SquareLayer(ctx)(ctx.encrypt(x))
    dx, _, _ = deltas(ctx)
    # (x̂)² − x² = (x̂ − x)(x̂ + x): at most δ(2|x| + δ); the product itself is exact
    check(ctx.decrypt(out), x * x, dx * (2 * np.abs(x) + dx) + SLACK, f"Square ({ctx.encoding})")


def poly_bound(ctx, x, coeffs, in_scale):
    """Σ_k |c_k|·k(|x|+δ)^(k-1)·δ + δc_k·(|x|+δ)^k + δc_0 for Σ c_k x^k on encoded x."""
    dx, _, _ = deltas(ctx, in_scale)
    d = len(coeffs) - 1
    ax = np.abs(x) + dx
    total = np.zeros_like(x)
    for k in range(1, d + 1):
        if ctx.encoding == "fractional":
            dc = FRAC_DELTA
        else:
            # every term is brought to scale s^d·2^ws with an integer coefficient
            dc = 0.5 / (2.0 ** WSB * in_scale ** (d - k))
        total += abs(coeffs[k]) * k * ax ** (k - 1) * dx + dc * ax ** k
    c0 = FRAC_DELTA if ctx.encoding == "fractional" else 0.5 / (2.0 ** WSB * in_scale ** d)
    return total + c0 + SLACK


@pytest.mark.parametrize("coeffs", [[0.1, 0.5, 0.25], [0.0, -1.0, 0.125]], ids=["c0b", "noc0"])
def test_polynomial(ctx, coeffs):
    from pycrcnn.nn import Polynomial

    r = rng(7)
    n = n_images(ctx)
    x = r.uniform(-2, 2, (n, 2, 3, 3))
    out = PolynomialLayer(ctx, coeffs)(ctx.encrypt(x))
    ref = Polynomial(coeffs)(torch.as_tensor(x)).numpy()
    check(ctx.decrypt(out), ref, poly_bound(ctx, x, coeffs, 2.0 ** SB), f"Polynomial {coeffs} ({ctx.encoding})")


def test_polynomial_degree3_batch():
    """Degree 3 needs two ciphertext products: m=8192 in the batch encoding, small scales."""
    from pycrcnn.nn import Polynomial

    sb, coeffs = 8, [0.0, 1.0, 0.0, -0.125]
    ctx = Context(m=8192, encoding="batch", scale_bits=sb, weight_scale_bits=WSB)
    ctx.keygen()
    x = rng(8).uniform(-2, 2, (16, 2, 2))
    out = PolynomialLayer(ctx, coeffs)(ctx.encrypt(x))
    ref = Polynomial(coeffs)(torch.as_tensor(x)).numpy()
    dx = 0.5 / 2 ** sb
    ax = np.abs(x) + dx
    bound = dx + 0.125 * 3 * ax ** 2 * dx + 2.0 ** -(WSB + 1) * ax ** 3 + SLACK
    check(ctx.decrypt(out), ref, bound, "Polynomial degree 3 (batch, m=8192)")


def test_flatten(ctx):
    x = rng(9).uniform(-1, 1, (n_images(ctx), 2, 2, 3))
    out = FlattenLayer(ctx)(ctx.encrypt(x))
    assert tuple(out.shape) == (x.shape[0], 12)
    dx, _, _ = deltas(ctx)
    check(ctx.decrypt(out), x.reshape(x.shape[0], -1), dx + SLACK, f"Flatten ({ctx.encoding})")
    # the seed's FlattenLayer() without a context works too
    out2 = FlattenLayer()(ctx.encrypt(x))
    assert tuple(out2.shape) == (x.shape[0], 12)


def test_rencryption_restores_noise_budget(ctx):
    x = rng(10).uniform(-2, 2, (n_images(ctx), 1, 2, 2))
    e = ctx.encrypt(x)
    fresh = ctx.noise_budget(e)
    sq = SquareLayer(ctx)(e)
    used = ctx.noise_budget(sq)
    assert used < fresh - 10, (fresh, used)  # a ciphertext product costs tens of bits
    re = RencryptionLayer(ctx)(sq)
    restored = ctx.noise_budget(re)
    assert restored >= fresh - 2, (fresh, used, restored)  # back to a fresh encryption's budget
    dx, _, _ = deltas(ctx)
    # the square's error, plus (batch) the rounding of re-encoding at the input scale
    bound = dx * (2 * np.abs(x) + dx) + dx + SLACK
    check(ctx.decrypt(re), x * x, bound, f"Rencryption ({ctx.encoding})")
    if ctx.encoding == "batch":
        assert re.scale == 2.0 ** SB  # back to the input scale


def test_layers_chain_batch_crt():
    """conv → square → pool → linear in one pass with two plaintext primes (CRT)."""
    ctx = Context(m=4096, encoding="batch", scale_bits=8, weight_scale_bits=8, n_plaintext_moduli=2)
    ctx.keygen()
    assert isinstance(ctx.p, list) and len(ctx.p) == 2
    r = rng(11)
    x = r.uniform(0, 1, (32, 1, 6, 6))
    net = nn.Sequential(nn.Conv2d(1, 2, 3), pycrcnn.nn.Square(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.as_tensor(r.uniform(-0.5, 0.5, tuple(p.shape))))
        ref = net(torch.as_tensor(x)).numpy()
    model = build_from_pytorch(ctx, net)
    dec = ctx.decrypt(model(ctx.encrypt(x)))
    # 8-bit inputs and weights: conv error ≤ ~0.02 here, squared values ≤ ~4, linear weights ≤ 0.5
    assert np.abs(dec - ref).max() < 0.1, np.abs(dec - ref).max()


# ---------------------------------------------------------------------------
# the seed's object arrays and the notebook


def test_layers_take_the_seeds_object_array(frac):
    x = rng(12).uniform(-1, 1, (1, 1, 4, 4))
    enc = frac.encrypt(x)
    arr = enc.to_numpy()
    assert arr.dtype == object and arr.shape == (1, 1, 4, 4)
    out = AveragePoolLayer(frac, 2)(arr)
    ref = F.avg_pool2d(torch.as_tensor(x), 2).numpy()
    check(pycrcnn.decrypt_matrix(frac, out), ref, 2 * FRAC_DELTA + SLACK, "AvgPool2d on an object array")


@pytest.fixture(scope="module")
def seed_net():
    path = pycrcnn.datasets.shared_dir() / "models" / "pycrcnn-original" / "LeNet1_Approx_single_square.pt"
    if not path.is_file():
        pytest.fail(f"{path} not found: set PYCRCNN_SHARED to the shared folder")
    return pycrcnn.load_torch_model(path)


def test_seed_notebook_code(seed_net):
    """The seed's notebook code with only its import lines changed."""
    from pycrcnn import ConvolutionalLayer, Pyfhel, build_from_pytorch, decrypt_matrix, encrypt_matrix
    from pycrcnn.datasets import load_mnist, normalize

    net = seed_net.float()
    images, _ = load_mnist(limit=1)
    image = normalize(images)  # [1, 1, 28, 28], pixels / 255

    HE = Pyfhel()
    HE.contextGen(p=953983721, m=4096)
    HE.keyGen()
    HE.relinKeyGen(20, 5)
    encrypted_image = encrypt_matrix(HE, image)

    conv = net[0]
    encodedLayer = ConvolutionalLayer(HE, weights=conv.weight.detach().numpy(), stride=conv.stride,
                                      padding=conv.padding, bias=conv.bias.detach().numpy())
    out = encodedLayer(encrypted_image)
    with torch.no_grad():
        timage = torch.as_tensor(image)
        ref = conv(timage).double().numpy()
    # torch computes in float32 here (the seed's model): ~1e-6 absolute on values up to ~4
    assert np.abs(decrypt_matrix(HE, out) - ref).max() < 1e-5

    layers = build_from_pytorch(HE, net[0:3])
    assert isinstance(layers, list) and len(layers) == 3
    x = encrypted_image
    for layer in layers:
        x = layer(x)
    with torch.no_grad():
        ref3 = net[0:3](timage).double().numpy()
    # conv error ~1e-8 (float32 reference ~1e-6), squared values up to ~14: ~1e-5 absolute
    assert np.abs(decrypt_matrix(HE, x) - ref3).max() < 1e-4


# ---------------------------------------------------------------------------
# refused modules, BatchNorm folding, shapes


@pytest.mark.parametrize("module,alternative", [
    (nn.ReLU(), "pycrcnn.nn.Square or pycrcnn.nn.Polynomial"),
    (nn.Tanh(), "pycrcnn.nn.Square or pycrcnn.nn.Polynomial"),
    (nn.Sigmoid(), "pycrcnn.nn.Square or pycrcnn.nn.Polynomial"),
    (nn.MaxPool2d(2), "AvgPool2d"),
    (nn.AvgPool2d(2, ceil_mode=True), "ceil_mode=False"),
    (nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), "count_include_pad=True"),
    (nn.Softmax(dim=1), "after decrypting"),
], ids=["ReLU", "Tanh", "Sigmoid", "MaxPool2d", "ceil_mode", "count_include_pad", "Softmax"])
def test_unsupported_modules_are_refused(frac, module, alternative):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), module, nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedLayerError) as info:
        build_from_pytorch(frac, net)
    msg = str(info.value)
    assert isinstance(info.value, HEError) and isinstance(info.value, ValueError)
    assert "layer 1 " in msg, msg
    assert type(module).__name__ in msg, msg
    assert alternative in msg, msg
    assert info.value.index == 1
    # the exception is also reachable from the top-level package
    assert pycrcnn.UnsupportedLayerError is UnsupportedLayerError
    # the layers before it still build
    model = build_from_pytorch(frac, net, layers=[0])
    assert [l.name for l in model] == ["Conv2d"]


def test_unsupported_outside_the_slice_does_not_matter(frac):
    net = nn.Sequential(nn.Conv2d(1, 1, 2), pycrcnn.nn.Square(), nn.Flatten(), nn.ReLU(), nn.Linear(4, 2))
    model = build_from_pytorch(frac, net[0:3])
    assert [l.torch_index for l in model] == [0, 1, 2]
    model = build_from_pytorch(frac, net, layers=range(0, 3))
    assert [l.torch_index for l in model] == [0, 1, 2]
    with pytest.raises(UnsupportedLayerError, match=r"layer 3 \(ReLU"):
        build_from_pytorch(frac, net, layers=[0, 4])


def test_dropout_and_identity_are_dropped(frac):
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Identity(), pycrcnn.nn.Square(), nn.Linear(3, 2)).eval()
    model = build_from_pytorch(frac, net)
    assert [l.torch_index for l in model] == [0, 3, 4]
    x = rng(13).uniform(-1, 1, (1, 4))
    with torch.no_grad():
        ref = net(torch.as_tensor(x)).numpy()
    assert np.abs(frac.decrypt(model(frac.encrypt(x))) - ref).max() < 1e-7


def _random_bn(bn, r):
    with torch.no_grad():
        bn.running_mean.copy_(torch.as_tensor(r.uniform(-1, 1, bn.num_features)))
        bn.running_var.copy_(torch.as_tensor(r.uniform(0.2, 2.0, bn.num_features)))
        bn.weight.copy_(torch.as_tensor(r.uniform(0.5, 1.5, bn.num_features)))
        bn.bias.copy_(torch.as_tensor(r.uniform(-0.5, 0.5, bn.num_features)))
    return bn


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "linear", "conv2d-nobias"])
def test_batchnorm_folding_matches_torch(frac, kind):
    r = rng(14)
    if kind.startswith("conv2d"):
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=kind == "conv2d"), _random_bn(nn.BatchNorm2d(3), r))
        x = r.uniform(-1, 1, (1, 2, 4, 4))
    elif kind == "conv1d":
        net = nn.Sequential(nn.Conv1d(2, 3, 3), _random_bn(nn.BatchNorm1d(3), r))
        x = r.uniform(-1, 1, (1, 2, 6))
    else:
        net = nn.Sequential(nn.Linear(5, 4), _random_bn(nn.BatchNorm1d(4), r))
        x = r.uniform(-1, 1, (1, 5))
    net.eval()
    with torch.no_grad():
        ref = net(torch.as_tensor(x)).numpy()
    spec = spec_from_torch(net)
    assert len(spec.layers) == 1 and spec.layers[0].params["folded_batchnorm"] == 1
    # the folding itself is exact up to float64 rounding
    assert np.abs(spec.forward_numpy(x) - ref).max() < 1e-12
    # encrypted: the folded weights' and inputs' 32-digit truncation (≈ Σ|w'|·2^-32 + Σ|x|·2^-32)
    model = build_from_spec(frac, spec)
    assert [l.torch_index for l in model] == [0]
    assert np.abs(frac.decrypt(model(frac.encrypt(x))) - ref).max() < 1e-7
    # a slice that separates the layer from its BatchNorm is refused, not silently unfolded
    with pytest.raises(HEError, match="BatchNorm"):
        spec.select([0])


def test_batchnorm_without_a_layer_before_is_refused(frac):
    net = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 1, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer 0 \(BatchNorm2d.*directly after a Conv2d"):
        build_from_pytorch(frac, net)


def test_shape_mismatches_raise_heerror(frac, batch):
    for ctx in (frac, batch):
        x = ctx.encrypt(np.zeros((1, 3, 4, 4)))
        with pytest.raises(HEError, match="Conv2d"):
            ConvolutionalLayer(ctx, np.zeros((2, 2, 3, 3)))(x)  # expects 2 channels
        with pytest.raises(HEError, match="Linear"):
            LinearLayer(ctx, np.zeros((2, 47)))(x)  # 48 features
        with pytest.raises(HEError):
            AveragePoolLayer(ctx, 5)(x)  # kernel larger than the image
        with pytest.raises(HEError):
            ConvolutionalLayer(ctx, np.zeros((2, 3, 3)))  # weights of the wrong rank
        with pytest.raises(HEError):
            ConvolutionalLayer(ctx, np.zeros((2, 3, 3, 3)), bias=np.zeros(3))  # 3 biases for 2 outputs
        net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 2))
        model = build_from_pytorch(ctx, net)
        with pytest.raises(HEError, match=r"layer 0 \(Conv2d\)"):
            model(x)
        with pytest.raises(HEError, match="encrypt"):
            model(np.zeros((1, 2, 4, 4)))  # plain data is refused with a hint


# ---------------------------------------------------------------------------
# the EncodedModel itself


def test_encoded_model_api(frac, capsys):
    net = nn.Sequential(nn.Conv2d(1, 2, 2), pycrcnn.nn.Square(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 3))
    model = build_from_pytorch(frac, net, rencrypt_positions=[2])
    assert isinstance(model, EncodedModel) and isinstance(model, list)
    assert [type(l).__name__ for l in model] == ["ConvolutionalLayer", "SquareLayer", "RencryptionLayer",
                                                  "AveragePoolLayer", "FlattenLayer", "LinearLayer"]
    assert model.indices == [0, 1, 2, 2, 3, 4]  # the rencryption runs before module 2
    assert model.segments() == [(0, 2), (2, 5)]
    d = model.describe()
    assert d[2] == {"index": 2, "type": "Rencryption", "params": {}}
    assert d[0]["type"] == "Conv2d" and d[0]["params"]["kernel_size"] == [2, 2]
    assert [s.type for s in model.specs] == ["Conv2d", "Square", "AvgPool2d", "Flatten", "Linear"]

    x = rng(15).uniform(-1, 1, (1, 1, 3, 3))
    with torch.no_grad():
        ref = net(torch.as_tensor(x)).numpy()
    enc = frac.encrypt(x)
    out = model(enc, debug=True)
    printed = capsys.readouterr().out
    assert re.search(r"\[\s*1\] Square .* noise budget \d+ bits .*coeff bound", printed), printed
    assert len(model.last_report) == 6 and all("seconds" in e for e in model.last_report)
    assert "noise_budget" in model.last_report[0]
    assert np.abs(frac.decrypt(out) - ref).max() < 1e-7

    # segments: what a server runs between round trips; the client rencrypts in between
    part = model.run_range(enc, 0, 2)
    part = frac.rencrypt(part)
    out2 = model.run_range(part, 2, 5, progress=True)
    assert np.abs(frac.decrypt(out2) - ref).max() < 1e-7
    assert [e["name"] for e in model.last_report] == ["AvgPool2d", "Flatten", "Linear"]
    with pytest.raises(HEError, match="outside"):
        build_from_pytorch(frac, net, rencrypt_positions=[7])


def test_encoded_model_seed_loop_and_public_context(frac):
    """A server with only the public context runs the segments; rencryption needs the key."""
    net = nn.Sequential(nn.Conv2d(1, 1, 2), pycrcnn.nn.Square(), nn.Flatten(), nn.Linear(4, 2))
    server_ctx = Context.from_public(frac.public_context())
    model = build_from_pytorch(server_ctx, net, rencrypt_positions=[2])
    x = rng(16).uniform(-1, 1, (1, 1, 3, 3))
    enc = pycrcnn.CipherTensor.from_bytes(frac.encrypt(x).to_bytes(), server_ctx)
    part = model.run_range(enc, *model.segments()[0])
    with pytest.raises(pycrcnn.SecretKeyRequired):
        model(enc)  # the rencryption layer needs the secret key
    back = pycrcnn.CipherTensor.from_bytes(part.to_bytes(), frac)
    fresh = pycrcnn.CipherTensor.from_bytes(frac.rencrypt(back).to_bytes(), server_ctx)
    out = model.run_range(fresh, *model.segments()[1])
    with torch.no_grad():
        ref = net(torch.as_tensor(x)).numpy()
    dec = frac.decrypt(pycrcnn.CipherTensor.from_bytes(out.to_bytes(), frac))
    assert np.abs(dec - ref).max() < 1e-7


def test_layer_selection_formats():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), pycrcnn.nn.Square(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 2))
    spec = spec_from_torch(net)
    assert isinstance(spec, ModelSpec) and spec.n_modules == 5
    assert spec.select([1, 2, 3]).indices == [1, 2, 3]
    assert spec.select([0, 3]).indices == [0, 1, 2, 3]  # the seed's min..max
    assert spec.select(range(2, 5)).indices == [2, 3, 4]
    assert spec.select(slice(1, 3)).indices == [1, 2]
    with pytest.raises(HEError, match="0..4"):
        spec.select([3, 9])
    with pytest.raises(HEError):
        spec.select([])
