"""The engine through Python, with real encryption (no mocks).

Covers the acceptance criteria of the engine: round trips in both encodings
for m in {2048, 4096, 8192}; arithmetic against numpy; squares and the noise
budget; a server-side Context built from a public context; parameter
validation; indexing; pickling; threads; secret-key files; the exception
hierarchy.
"""
from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pycrcnn
from pycrcnn import (
    CipherTensor,
    Context,
    FormatError,
    HEError,
    LinearLayer,
    NoiseBudgetExhausted,
    ParameterError,
    PlaintextOverflow,
    PyCtxt,
    SecretKeyRequired,
)

RNG = np.random.default_rng(20261123)


def keyed(**kw) -> Context:
    ctx = Context(**kw)
    ctx.keygen()
    return ctx


_CACHE: dict = {}


def ctx_for(encoding: str, m: int, **kw) -> Context:
    """Contexts are expensive (keys): one per parameter set for the whole module."""
    key = (encoding, m, tuple(sorted(kw.items())))
    if key not in _CACHE:
        if encoding == "fractional" and m == 2048 and "p" not in kw:
            kw = dict(kw, p=65537)
        _CACHE[key] = keyed(m=m, encoding=encoding, **kw)
    return _CACHE[key]


def quant(x, bits: int):
    """What the batch encoding stores: round(x · 2^bits) / 2^bits."""
    s = 2.0 ** bits
    return np.round(np.asarray(x, dtype=np.float64) * s) / s


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("m", [2048, 4096, 8192])
def test_fractional_round_trip(m):
    ctx = ctx_for("fractional", m)
    x = RNG.uniform(-1000, 1000, size=(2, 3))
    t = ctx.encrypt(x)
    assert isinstance(t, CipherTensor) and t.shape == (2, 3) and t.encoding == "fractional"
    d = ctx.decrypt(t)
    assert d.dtype == np.float64 and d.shape == (2, 3)
    assert np.max(np.abs(d - x)) <= 2.0 ** -32
    ints = np.array([[0, 1, -1, 2**40, -(2**40) + 3, 123456789]], dtype=np.int64)
    assert np.array_equal(ctx.decrypt(ctx.encrypt(ints)), ints.astype(np.float64))


def test_fractional_precision_follows_frac_digits():
    ctx = ctx_for("fractional", 2048, frac_digits=12, int_digits=20)
    x = RNG.uniform(-100, 100, size=(20,))
    err = np.max(np.abs(ctx.decrypt(ctx.encrypt(x)) - x))
    assert err <= 2.0 ** -12
    assert err > 2.0 ** -30  # really truncated at 12 digits
    with pytest.raises(PlaintextOverflow, match="int_digits"):
        ctx.encrypt(np.array([2.0 ** 21]))


@pytest.mark.parametrize("m", [2048, 4096, 8192])
def test_batch_round_trip(m):
    ctx = ctx_for("batch", m)
    assert ctx.encoding == "batch"
    x = RNG.uniform(-50, 50, size=(5, 2, 3))
    t = ctx.encrypt(x)
    assert t.shape == (5, 2, 3) and len(t) == 5
    assert t.n_ciphertexts == 6 and t.scale == 2.0 ** 16
    d = ctx.decrypt(t)
    assert d.shape == x.shape
    assert np.max(np.abs(d - x)) <= 0.5 / t.scale + 1e-12
    assert np.array_equal(d, quant(x, 16))


def test_batch_full_batch_and_limits():
    ctx = ctx_for("batch", 2048)
    x = RNG.uniform(-1, 1, size=(2048, 1))
    assert np.array_equal(ctx.decrypt(ctx.encrypt(x)), quant(x, 16))
    with pytest.raises(HEError, match="2048"):
        ctx.encrypt(np.zeros((2049, 1)))
    with pytest.raises(PlaintextOverflow):
        ctx.encrypt(np.array([[1e12]]))
    with pytest.raises(HEError, match="finite"):
        ctx.encrypt(np.array([[np.nan]]))


def test_crt_plaintext_moduli():
    ctx = ctx_for("batch", 4096, n_plaintext_moduli=3)
    assert isinstance(ctx.p, list) and len(ctx.p) == 3
    x = np.array([[2.0 ** 50, -(2.0 ** 52) + 1024], [3.5, -7.25]])
    t = ctx.encrypt(x)
    assert t.n_ciphertexts == 6
    assert np.array_equal(ctx.decrypt(t), x)
    y = RNG.uniform(-1000, 1000, size=(4, 3))
    w = -777.5
    d = ctx.decrypt(ctx.encrypt(y) * w)
    assert np.allclose(d, quant(y, 16) * quant(w, 8), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# arithmetic against numpy


def _check(d, expect, atol):
    d = np.asarray(d)
    assert d.shape == np.shape(expect), (d.shape, np.shape(expect))
    assert np.max(np.abs(d - expect)) <= atol, np.max(np.abs(d - expect))


def test_fractional_arithmetic_matches_numpy():
    ctx = ctx_for("fractional", 2048)
    x = RNG.uniform(-5, 5, size=(2, 3, 4))
    y = RNG.uniform(-5, 5, size=(2, 3, 4))
    tx, ty = ctx.encrypt(x), ctx.encrypt(y)
    atol = 1e-6
    _check(ctx.decrypt(tx + ty), x + y, atol)
    _check(ctx.decrypt(tx - ty), x - y, atol)
    _check(ctx.decrypt(ty - tx), y - x, atol)
    _check(ctx.decrypt(-tx), -x, atol)
    _check(ctx.decrypt(tx * ty), x * y, atol)
    _check(ctx.decrypt(tx + 2.5), x + 2.5, atol)
    _check(ctx.decrypt(2.5 + tx), x + 2.5, atol)
    _check(ctx.decrypt(tx - 1.25), x - 1.25, atol)
    _check(ctx.decrypt(1.25 - tx), 1.25 - x, atol)
    _check(ctx.decrypt(tx * -0.75), x * -0.75, atol)
    _check(ctx.decrypt(3 * tx), 3 * x, atol)
    _check(ctx.decrypt(tx * np.float64(0.5)), x * 0.5, atol)
    # numpy arrays, with broadcasting
    w = RNG.uniform(-2, 2, size=(2, 3, 4))
    _check(ctx.decrypt(tx * w), x * w, atol)
    _check(ctx.decrypt(tx + w), x + w, atol)
    _check(ctx.decrypt(tx - w), x - w, atol)
    row = RNG.uniform(-2, 2, size=(4,))
    _check(ctx.decrypt(tx * row), x * row, atol)
    col = RNG.uniform(-2, 2, size=(3, 1))
    _check(ctx.decrypt(tx + col), x + col, atol)
    _check(ctx.decrypt(tx * [1.0, -1.0, 0.5, 0.0]), x * np.array([1.0, -1.0, 0.5, 0.0]), atol)
    # multiplying by zero gives an encryption of 0
    _check(ctx.decrypt(tx * 0), np.zeros_like(x), 0)
    with pytest.raises(HEError, match="broadcast"):
        tx * np.ones((5,))
    with pytest.raises(HEError, match="shape"):
        tx + ctx.encrypt(np.zeros((2, 3)))


def test_batch_arithmetic_matches_numpy():
    ctx = ctx_for("batch", 4096)
    x = RNG.uniform(-1, 1, size=(3, 2, 4))
    y = RNG.uniform(-1, 1, size=(3, 2, 4))
    qx, qy = quant(x, 16), quant(y, 16)
    tx, ty = ctx.encrypt(x), ctx.encrypt(y)
    exact = 1e-12
    _check(ctx.decrypt(tx + ty), qx + qy, exact)
    _check(ctx.decrypt(tx - ty), qx - qy, exact)
    _check(ctx.decrypt(-tx), -qx, exact)
    _check(ctx.decrypt(tx + 0.5), qx + 0.5, exact)
    _check(ctx.decrypt(0.5 - tx), 0.5 - qx, exact)
    # ciphertext products: the scale multiplies and nothing is rounded
    p = tx * ty
    assert p.scale == 2.0 ** 32
    _check(ctx.decrypt(p), qx * qy, exact)
    # plaintext products: weights at 2^weight_scale_bits
    s = tx * -0.3
    assert s.scale == 2.0 ** 24
    _check(ctx.decrypt(s), qx * quant(-0.3, 8), exact)
    _check(ctx.decrypt(2 * tx), 2 * qx, exact)
    w = RNG.uniform(-2, 2, size=(2, 4))  # one image's shape: broadcast over the batch
    _check(ctx.decrypt(tx * w), qx * quant(w, 8), exact)
    _check(ctx.decrypt(tx + w), qx + quant(w, 16), exact)
    row = RNG.uniform(-2, 2, size=(4,))
    _check(ctx.decrypt(tx * row), qx * quant(row, 8), exact)
    # constants may differ per image (slot): added, not multiplied
    per_image = RNG.uniform(-2, 2, size=(3, 1, 1))
    _check(ctx.decrypt(tx + per_image), qx + quant(per_image, 16), exact)
    _check(ctx.decrypt(tx - per_image), qx - quant(per_image, 16), exact)
    # a constant added after a product lands at the product's scale
    _check(ctx.decrypt(s + 1.0), qx * quant(-0.3, 8) + 1.0, exact)
    # per-image values vary across the batch: refused with a reason
    with pytest.raises(HEError, match="same weights"):
        tx * RNG.uniform(size=(3, 2, 4))
    # different scales cannot be added
    with pytest.raises(HEError, match="scale"):
        s + tx


def test_reflected_numpy_operands():
    ctx = ctx_for("fractional", 2048)
    x = RNG.uniform(-5, 5, size=(2, 3))
    w = RNG.uniform(-2, 2, size=(2, 3))
    tx = ctx.encrypt(x)
    r = w * tx
    assert isinstance(r, CipherTensor)
    _check(ctx.decrypt(r), x * w, 1e-6)
    _check(ctx.decrypt(w + tx), x + w, 1e-6)
    _check(ctx.decrypt(w - tx), w - x, 1e-6)


# ---------------------------------------------------------------------------
# squares and noise


def test_one_square_at_2048_fractional():
    ctx = ctx_for("fractional", 2048)
    assert ctx.p == 65537
    x = RNG.uniform(-10, 10, size=(1, 8))
    t = ctx.encrypt(x)
    s = ctx.square(t)
    assert ctx.noise_budget(s) > 0
    _check(ctx.decrypt(s), x * x, 1e-6)


def test_two_squares_at_8192():
    ctx = ctx_for("fractional", 8192)
    x = RNG.uniform(-3, 3, size=(1, 3))
    t = ctx.square(ctx.square(ctx.encrypt(x)))
    assert ctx.noise_budget(t) > 0
    _check(ctx.decrypt(t), x ** 4, 1e-5)
    # batch, two plaintext moduli for the scale 2^(4·8)
    b = ctx_for("batch", 8192, scale_bits=8, n_plaintext_moduli=2)
    y = RNG.uniform(-2, 2, size=(4, 3))
    tb = b.square(b.square(b.encrypt(y)))
    assert tb.scale == 2.0 ** 32
    _check(b.decrypt(tb), quant(y, 8) ** 4, 1e-9)


def test_polynomial_activation():
    ctx = ctx_for("fractional", 4096)
    x = RNG.uniform(-2, 2, size=(2, 3))
    y = ctx.polynomial(ctx.encrypt(x), [0.1, 0.5, 0.25])
    _check(ctx.decrypt(y), 0.1 + 0.5 * x + 0.25 * x * x, 1e-6)
    y = pycrcnn.PolynomialLayer(ctx, [0.0, 1.0, -0.125])(ctx.encrypt(x))
    _check(ctx.decrypt(y), x - 0.125 * x * x, 1e-6)


def test_m1024_has_no_ciphertext_products():
    ctx = keyed(m=1024, p=257, encoding="fractional")
    t = ctx.encrypt(np.array([[1.5, -2.0]]))
    _check(ctx.decrypt(t * 2.0 + t), np.array([[4.5, -6.0]]), 1e-6)
    with pytest.raises(ParameterError, match="m ≥ 2048"):
        ctx.square(t)


def test_noise_budget_falls_then_exhausts():
    ctx = ctx_for("fractional", 4096)
    x = RNG.uniform(-2, 2, size=(1, 3))
    t = ctx.encrypt(x)
    expect = x.copy()
    budgets = [ctx.noise_budget(t)]
    assert t.noise_budget() == budgets[0] > 40
    for _ in range(5):
        t = ctx.square(t)
        expect = expect * expect
        budgets.append(ctx.noise_budget(t))
        assert budgets[-1] < budgets[-2], budgets
        if budgets[-1] > 0:
            _check(ctx.decrypt(t), expect, 1e-4 * max(1.0, np.abs(expect).max()))
        else:
            with pytest.raises(NoiseBudgetExhausted, match="noise budget"):
                ctx.decrypt(t)
            with pytest.raises(NoiseBudgetExhausted):
                t.decrypt()
            break
    else:
        pytest.fail(f"the budget never ran out: {budgets}")
    # plaintext products cost budget too
    u = ctx.encrypt(x)
    assert ctx.noise_budget(u * 0.123) < ctx.noise_budget(u)


# ---------------------------------------------------------------------------
# client / server


def _server_pair(encoding, m, **kw):
    client = ctx_for(encoding, m, **kw)
    server = Context.from_public(client.public_context())
    return client, server


def test_server_context_computes_and_cannot_decrypt():
    # (m=2048 has room for one square and nothing after it: a square then a layer needs m=4096)
    client, server = _server_pair("fractional", 4096)
    assert client.has_secret_key and not server.has_secret_key
    assert server.key_id == client.key_id and server.fingerprint == client.fingerprint
    x = RNG.uniform(-3, 3, size=(2, 5))
    t = CipherTensor.from_bytes(client.encrypt(x).to_bytes(), server)
    assert t.context is server
    sq = server.square(t)
    W = RNG.uniform(-1, 1, size=(3, 5))
    b = RNG.uniform(-1, 1, size=(3,))
    y = LinearLayer(server, W, b)(sq)
    assert y.shape == (2, 3)
    for call in (lambda: server.decrypt(y), lambda: server.noise_budget(y), lambda: server.rencrypt(y),
                 y.decrypt, y.noise_budget):
        with pytest.raises(SecretKeyRequired, match="secret key"):
            call()
    back = CipherTensor.from_bytes(y.to_bytes(), client)
    _check(client.decrypt(back), (x * x) @ W.T + b, 1e-5)


def test_server_batch_weighted_sum():
    client, server = _server_pair("batch", 4096)
    x = RNG.uniform(-1, 1, size=(6, 4))
    t = CipherTensor.from_bytes(client.encrypt(x).to_bytes(), server)
    w = RNG.uniform(-1, 1, size=(4,))
    y = t * w
    z = y[:, 0] + y[:, 1] + y[:, 2] + y[:, 3] + 0.25
    back = CipherTensor.from_bytes(z.to_bytes(), client)
    _check(client.decrypt(back), quant(x, 16) @ quant(w, 8) + 0.25, 1e-9)
    with pytest.raises(SecretKeyRequired):
        z.decrypt()


# ---------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize("kw, pattern", [
    (dict(m=3000), "power of two"),
    (dict(m=512), "1024 to 32768"),
    (dict(m=65536), "1024 to 32768"),
    (dict(m=4096, sec=100), "128, 192, 256"),
    (dict(m=4096, sec=80), "128, 192, 256"),
    (dict(m=2048, p=2**40, encoding="fractional"), "p"),
    (dict(m=1024, p=2**26, encoding="fractional"), "p"),
    (dict(m=4096, moduli_sizes=[60, 60]), "109"),
    (dict(m=2048, moduli_sizes=[30, 30], encoding="fractional", p=65537), "54"),
    (dict(m=4096, encoding="ckks"), "batch.*fractional"),
    (dict(m=4096, encoding="fractional", p=2), "p"),
    (dict(m=4096, encoding="fractional", p=[257, 65537]), "one plaintext modulus"),
    (dict(m=4096, encoding="fractional", base=1), "base"),
    (dict(m=4096, encoding="fractional", int_digits=0), "int_digits"),
    (dict(m=4096, scale_bits=50), "scale_bits"),
    (dict(m=4096, n_plaintext_moduli=0), "n_plaintext_moduli"),
])
def test_bad_parameters(kw, pattern):
    with pytest.raises(ParameterError, match=pattern) as info:
        Context(**kw)
    assert isinstance(info.value, HEError) and isinstance(info.value, ValueError)
    assert len(str(info.value)) > 20


@pytest.mark.parametrize("p", [12289 * 3, 65539, 40961 + 2 * 8192 * 3, 2**61 - 1])
def test_batch_p_must_be_a_valid_prime(p):
    with pytest.raises(ParameterError) as info:
        Context(m=4096, p=p, encoding="batch")
    msg = str(info.value)
    if "Nearest valid primes" in msg:
        suggested = [int(s) for s in msg.split("Nearest valid primes: [")[1].rstrip("]").split(", ")]
        assert suggested
        for q in suggested:
            assert q % 8192 == 1
            Context(m=4096, p=q, encoding="batch")  # each one is accepted
    else:
        assert "smaller" in msg or "bits" in msg


def test_p_close_to_a_ciphertext_prime_is_refused():
    # fhe.rs decrypts wrongly once p ≥ 2/3 of the first ciphertext prime: p must stay below half.
    probe = Context(m=2048, moduli_sizes=[27, 27], encoding="batch")
    q0 = min(probe.moduli)
    assert probe.p < q0 // 2
    for frac in (0.55, 0.8, 0.99):
        with pytest.raises(ParameterError, match="half"):
            Context(m=2048, p=_prime_below(2048, int(q0 * frac)), moduli_sizes=[27, 27], encoding="batch")


def _is_prime(n):
    if n < 2 or n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _prime_below(m, bound):
    c = (bound - 1) // (2 * m) * (2 * m) + 1
    while not _is_prime(c):
        c -= 2 * m
    return c


def test_good_parameters_and_accessors():
    ctx = Context(m=4096, p=953983721, encoding="fractional")
    assert ctx.m == 4096 and ctx.p == 953983721 and ctx.sec == 128 and ctx.encoding == "fractional"
    assert len(ctx.moduli) >= 3 and min(ctx.moduli) > 2 * 953983721
    params = ctx.parameters()
    assert params["log_q"] <= 109 and params["frac_digits"] == 32 and params["int_digits"] == 64
    assert ctx.key_id is None
    with pytest.raises(SecretKeyRequired, match="keygen"):
        ctx.encrypt(np.zeros(1))
    for sec, bound in [(128, 218), (192, 152), (256, 118)]:
        c = Context(m=8192, sec=sec)
        assert c.parameters()["log_q"] <= bound
    assert "Context(" in repr(ctx)


# ---------------------------------------------------------------------------
# indexing, shapes, to_numpy






def test_scalar_ciphertexts():
    ctx = ctx_for("fractional", 2048)
    c = ctx.encrypt(2.5)
    assert isinstance(c, PyCtxt) and c.shape == ()
    t = ctx.encrypt(np.array([[1.0, -2.0]]))
    e = t[0, 1]
    for r, expect in [(e * 2.0, -4.0), (e + 1, -1.0), (1 - e, 3.0), (e * np.float64(0.5), -1.0), (c * e, -5.0),
                      (e + np.array(3.0), 1.0)]:
        assert isinstance(r, PyCtxt)
        assert abs(float(ctx.decrypt(r)) - expect) < 1e-6


def test_fractional_indexing():
    ctx = ctx_for("fractional", 2048)
    x = RNG.uniform(-9, 9, size=(2, 3, 4))
    t = ctx.encrypt(x)
    assert t.shape == (2, 3, 4) and t.ndim == 3 and len(t) == 2
    e = t[1, 2, 3]
    assert isinstance(e, PyCtxt) and e.shape == ()
    assert abs(float(ctx.decrypt(e)) - x[1, 2, 3]) <= 2.0 ** -32
    for key in [0, -1, (1, 2), (slice(None), 1), (slice(None), slice(1, 3)), (Ellipsis, 1), (0, Ellipsis, -1),
                (slice(None, None, 2), slice(None, None, -1)), (-1, -1, slice(1, None)), Ellipsis,
                (slice(None), slice(None), slice(None))]:
        sub = t[key]
        assert sub.shape == x[key].shape, key
        assert np.max(np.abs(ctx.decrypt(sub) - x[key])) <= 2.0 ** -32, key
    assert isinstance(t[-1, -1, -1], PyCtxt)
    with pytest.raises(IndexError):
        t[2]
    with pytest.raises(IndexError):
        t[0, 0, 0, 0]
    with pytest.raises(IndexError):
        t["a"]
    with pytest.raises(IndexError):
        e[0]
    with pytest.raises(TypeError):
        len(e)


def test_batch_indexing():
    ctx = ctx_for("batch", 2048)
    x = RNG.uniform(-9, 9, size=(3, 2, 4))
    t = ctx.encrypt(x)
    qx = quant(x, 16)
    for key in [(slice(None), 1), (slice(None), -1, slice(1, 3)), (Ellipsis, 0), (slice(None), slice(None), -2),
                slice(None), (slice(None), slice(None, None, -1))]:
        sub = t[key]
        assert sub.shape == qx[key].shape, key
        assert np.array_equal(ctx.decrypt(sub), qx[key]), key
    for key in [0, -1, slice(1, None), slice(0, 3, 2), (1, 0)]:
        with pytest.raises(IndexError, match="batch") as info:
            t[key]
        assert "':'" in str(info.value) or ":" in str(info.value)
    with pytest.raises(IndexError):
        t[:, 5]


def test_to_numpy_and_back():
    ctx = ctx_for("fractional", 2048)
    x = RNG.uniform(-9, 9, size=(2, 3))
    t = ctx.encrypt(x)
    arr = t.to_numpy()
    assert isinstance(arr, np.ndarray) and arr.dtype == object and arr.shape == (2, 3)
    assert all(isinstance(c, PyCtxt) for c in arr.flat)
    back = CipherTensor(arr)
    assert back.shape == (2, 3)
    assert np.max(np.abs(ctx.decrypt(back) - x)) <= 2.0 ** -32
    # a sub-array and a list of PyCtxt work too
    assert np.max(np.abs(ctx.decrypt(CipherTensor(arr[:, 1])) - x[:, 1])) <= 2.0 ** -32
    assert CipherTensor([t[0, 0], t[1, 1]]).shape == (2,)
    # batch: the physical [C, W] array of per-position ciphertexts
    b = ctx_for("batch", 2048)
    y = RNG.uniform(-9, 9, size=(5, 2, 3))
    tb = b.encrypt(y)
    arr = tb.to_numpy()
    assert arr.dtype == object and arr.shape == (2, 3)
    assert all(isinstance(c, CipherTensor) and c.shape == (5,) for c in arr.flat)
    assert np.array_equal(b.decrypt(arr[1, 2]), quant(y[:, 1, 2], 16))
    back = CipherTensor(arr)
    assert back.shape == (5, 2, 3)
    assert np.array_equal(b.decrypt(back), quant(y, 16))
    with pytest.raises(HEError):
        CipherTensor(np.array([1.0, 2.0], dtype=object))
    with pytest.raises(HEError):
        CipherTensor(np.array([t[0, 0], arr[0, 0]], dtype=object))


# ---------------------------------------------------------------------------
# pickling


def test_pickle_context_and_tensor():
    ctx = keyed(m=2048, p=65537, encoding="fractional")
    x = RNG.uniform(-5, 5, size=(2, 2))
    t = ctx.encrypt(x)
    # a tensor lands in the live context holding its key
    t3 = pickle.loads(pickle.dumps(t))
    assert t3.shape == (2, 2) and t3.context.has_secret_key
    assert np.max(np.abs(t3.decrypt() - x)) <= 2.0 ** -32
    e = pickle.loads(pickle.dumps(t[0, 1]))
    assert isinstance(e, PyCtxt)
    assert abs(float(e.decrypt()) - x[0, 1]) <= 2.0 ** -32
    # a context pickles with its secret key (it is the client's own object)
    ctx2 = pickle.loads(pickle.dumps(ctx))
    assert ctx2.has_secret_key and ctx2.key_id == ctx.key_id
    t2 = CipherTensor.from_bytes(t.to_bytes(), ctx2)
    assert np.max(np.abs(ctx2.decrypt(t2) - x)) <= 2.0 ** -32
    # a public context pickles as a public context
    pub = pickle.loads(pickle.dumps(Context.from_public(ctx.public_context())))
    assert not pub.has_secret_key and pub.key_id == ctx.key_id


def test_unpickled_tensor_prefers_the_secret_key_context():
    ctx = keyed(m=1024, p=257, encoding="fractional")
    t = ctx.encrypt(np.array([1.5, 2.5]))
    server = Context.from_public(ctx.public_context())  # e.g. an in-process server
    t2 = pickle.loads(pickle.dumps(t))
    assert t2.context.has_secret_key
    del server, t2
    Context.from_public(ctx.public_context())  # made and dropped at once
    t3 = pickle.loads(pickle.dumps(t))
    assert t3.context.has_secret_key


def test_pickle_through_a_fresh_process(tmp_path):
    ctx = keyed(m=2048, p=65537, encoding="fractional")
    x = RNG.uniform(-3, 3, size=(1, 4))
    (tmp_path / "in.pkl").write_bytes(pickle.dumps(ctx.encrypt(x)))
    script = textwrap.dedent(f"""
        import pickle, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "python")!r})
        import pycrcnn
        t = pickle.loads(open({str(tmp_path / "in.pkl")!r}, "rb").read())
        assert not t.context.has_secret_key, "the tensor must land in a public context"
        try:
            t.decrypt()
        except pycrcnn.SecretKeyRequired:
            pass
        else:
            raise SystemExit("decrypted without the secret key")
        y = t.context.square(t) * 0.5 + 1.0
        open({str(tmp_path / "out.pkl")!r}, "wb").write(pickle.dumps(y))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    y = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert y.context.has_secret_key
    _check(y.decrypt(), x * x * 0.5 + 1.0, 1e-6)


# ---------------------------------------------------------------------------
# threads, keys on disk, exceptions


def test_num_threads():
    before = pycrcnn.get_num_threads()
    try:
        pycrcnn.set_num_threads(1)
        assert pycrcnn.get_num_threads() == 1
        ctx = ctx_for("batch", 2048)
        x = RNG.uniform(-1, 1, size=(2, 3))
        assert np.array_equal(ctx.decrypt(ctx.encrypt(x) + 1.0), quant(x, 16) + 1.0)
        pycrcnn.set_num_threads(2)
        assert pycrcnn.get_num_threads() == 2
        pycrcnn.set_num_threads(0)
        assert pycrcnn.get_num_threads() >= 1
    finally:
        pycrcnn.set_num_threads(before)


def test_secret_key_file(tmp_path):
    ctx = ctx_for("fractional", 2048)
    x = RNG.uniform(-5, 5, size=(3,))
    blob = ctx.encrypt(x).to_bytes()
    path = tmp_path / "client.key"
    ctx.save_secret_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Context.load_secret_key(str(path))
    assert loaded.has_secret_key and loaded.key_id == ctx.key_id
    assert np.max(np.abs(loaded.decrypt(CipherTensor.from_bytes(blob, loaded)) - x)) <= 2.0 ** -32
    # the same through bytes
    again = Context.from_secret_bytes(ctx.secret_key_bytes())
    assert again.has_secret_key
    # a public context refuses a secret key blob, and vice versa a file of junk fails cleanly
    with pytest.raises(FormatError, match="secret key"):
        Context.from_public(path.read_bytes())
    (tmp_path / "junk.key").write_bytes(b"junk" * 100)
    with pytest.raises(FormatError):
        Context.load_secret_key(tmp_path / "junk.key")
    with pytest.raises(HEError):
        Context.load_secret_key(tmp_path / "missing.key")


def test_exception_hierarchy():
    assert issubclass(HEError, ValueError)
    for exc in (SecretKeyRequired, NoiseBudgetExhausted, PlaintextOverflow, ParameterError, FormatError):
        assert issubclass(exc, HEError) and issubclass(exc, ValueError)
        assert exc is getattr(pycrcnn._engine, exc.__name__)
    with pytest.raises(ValueError):
        Context(m=3)
    with pytest.raises(FormatError):
        CipherTensor.from_bytes(b"nope", ctx_for("batch", 2048))
    with pytest.raises(PlaintextOverflow):
        ctx_for("batch", 2048).encrypt(np.array([[1e9]]))


def test_sums_of_tensors_at_different_levels():
    # A product sits one modulus level lower; adding a fresh tensor to it
    # brings the fresh one down (SEAL allowed this too).
    ctx = pycrcnn.Context(m=4096, p=953983721, encoding="fractional")
    ctx.keygen()
    x = np.array([[0.5, -1.25]])
    e = ctx.encrypt(x)
    s = ctx.square(e)
    assert s.level > e.level
    assert np.allclose(ctx.decrypt(s + e), x ** 2 + x, atol=1e-6)
    assert np.allclose(ctx.decrypt(e - s), x - x ** 2, atol=1e-6)
