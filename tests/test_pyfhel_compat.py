"""The seed-compatible face: Pyfhel 2's API (as the original PyCrCNN used it)
over the Rust engine, with real encryption."""
from __future__ import annotations


import numpy as np
import pytest

import pycrcnn
import pycrcnn.crypto
from pycrcnn import CipherTensor, HEError, ParameterError, PyCtxt, PyPtxt, Pyfhel, SecretKeyRequired

EPS = 2.0 ** -30
RNG = np.random.default_rng(3)






@pytest.fixture(scope="module")
def HE():
    he = Pyfhel()
    he.contextGen(65537)  # the seed's defaults: m=2048, base 2, 64 integer and 32 fractional digits
    he.keyGen()
    he.relinKeyGen(20, 5)
    return he


def dec(HE, c):
    return HE.decryptFrac(c)


def test_context_gen_defaults(HE):
    assert HE.getm() == 2048 and HE.getp() == 65537 and HE.getsec() == 128 and HE.getbase() == 2
    assert HE.getflagBatch() is False
    params = HE.context.parameters()
    assert params["int_digits"] == 64 and params["frac_digits"] == 32 and params["encoding"] == "fractional"
    he = Pyfhel()
    he.contextGen(p=953983721, m=4096, flagBatching=False, base=2, sec=192, intDigits=32, fracDigits=16)
    assert he.getm() == 4096 and he.getsec() == 192
    assert he.context.parameters()["frac_digits"] == 16
    with pytest.raises(HEError, match="contextGen"):
        Pyfhel().keyGen()
    with pytest.raises(ParameterError):
        HE.relinKeyGen(0, 5)


def test_encrypt_decrypt_encode_decode(HE):
    for v in (0.0, 1.25, -3.5, 0.1, 123.456, -98765.4321):
        c = HE.encryptFrac(v)
        assert isinstance(c, PyCtxt)
        assert abs(dec(HE, c) - v) <= 2.0 ** -32 * max(1, abs(v))
        p = HE.encodeFrac(v)
        assert isinstance(p, PyPtxt) and HE.decodeFrac(p) == v
        assert abs(dec(HE, HE.encryptPtxt(p)) - v) <= 2.0 ** -32 * max(1, abs(v))
    for i in (0, 1, -1, 2**40, -(2**31)):
        c = HE.encryptInt(i)
        out = HE.decryptInt(c)
        assert out == i and isinstance(out, int)
        assert HE.decodeInt(HE.encodeInt(i)) == i


def test_in_place_operations_return_their_first_argument(HE):
    a, b = 1.5, -2.25
    cases = [
        ("add", lambda c1, c2: HE.add(c1, c2), a + b),
        ("sub", lambda c1, c2: HE.sub(c1, c2), a - b),
        ("multiply", lambda c1, c2: HE.multiply(c1, c2), a * b),
        ("multiply_plain", lambda c1, c2: HE.multiply_plain(c1, HE.encodeFrac(b)), a * b),
        ("add_plain", lambda c1, c2: HE.add_plain(c1, HE.encodeFrac(b)), a + b),
        ("sub_plain", lambda c1, c2: HE.sub_plain(c1, HE.encodeFrac(b)), a - b),
        ("square", lambda c1, c2: HE.square(c1), a * a),
        ("power", lambda c1, c2: HE.power(c1, 2), a * a),
        ("negate", lambda c1, c2: HE.negate(c1), -a),
    ]
    for name, op, expect in cases:
        c1, c2 = HE.encryptFrac(a), HE.encryptFrac(b)
        out = op(c1, c2)
        assert out is c1, name
        assert abs(dec(HE, c1) - expect) < 1e-6, name
        assert abs(dec(HE, c2) - b) < EPS, name  # the second argument is untouched
        HE.relinearize(c1)
        assert HE.relinearize(c1) is c1
        assert abs(dec(HE, c1) - expect) < 1e-6, name


def test_in_new_ctxt_leaves_the_argument_alone(HE):
    a, b = 0.75, 3.0
    c1, c2 = HE.encryptFrac(a), HE.encryptFrac(b)
    for op, expect in [
        (lambda: HE.add(c1, c2, in_new_ctxt=True), a + b),
        (lambda: HE.sub(c1, c2, in_new_ctxt=True), a - b),
        (lambda: HE.multiply(c1, c2, in_new_ctxt=True), a * b),
        (lambda: HE.multiply_plain(c1, HE.encodeFrac(b), in_new_ctxt=True), a * b),
        (lambda: HE.square(c1, in_new_ctxt=True), a * a),
        (lambda: HE.power(c1, 2, in_new_ctxt=True), a * a),
        (lambda: HE.power(c1, 1, in_new_ctxt=True), a),
    ]:
        out = op()
        assert out is not c1
        assert abs(dec(HE, out) - expect) < 1e-6
        assert abs(dec(HE, c1) - a) < EPS and abs(dec(HE, c2) - b) < EPS
    with pytest.raises(HEError):
        HE.power(c1, 0)


def test_noise_level(HE):
    c = HE.encryptFrac(2.5)
    fresh = HE.noiseLevel(c)
    assert isinstance(fresh, int) and fresh > 20
    HE.square(c)
    after = HE.noiseLevel(c)
    assert 0 < after < fresh
    assert abs(dec(HE, c) - 6.25) < 1e-6


def test_pyctxt_operators(HE):
    a, b = 2.5, -1.25
    ca, cb = HE.encryptFrac(a), HE.encryptFrac(b)
    pb = HE.encodeFrac(b)
    cases = [
        (ca + cb, a + b), (ca - cb, a - b), (ca * cb, a * b),
        (ca + pb, a + b), (ca - pb, a - b), (ca * pb, a * b),
        (pb + ca, a + b), (pb - ca, b - a), (pb * ca, a * b),
        (ca + 3, a + 3), (ca - 3, a - 3), (ca * 3, a * 3),
        (3 + ca, a + 3), (3 - ca, 3 - a), (3 * ca, a * 3),
        (ca + 0.5, a + 0.5), (ca * -0.5, -a / 2), (0.5 - ca, 0.5 - a), (-0.5 * ca, -a / 2),
        (-ca, -a),
    ]
    for i, (c, expect) in enumerate(cases):
        assert isinstance(c, PyCtxt), i
        assert abs(dec(HE, c) - expect) < 1e-6, (i, dec(HE, c), expect)
    assert abs(dec(HE, ca) - a) < EPS and abs(dec(HE, cb) - b) < EPS


def test_multiply_by_an_encoded_zero(HE):
    """SEAL refuses this ('result ciphertext is transparent'); here it is an encryption of 0."""
    c = HE.encryptFrac(7.75)
    z = HE.multiply_plain(c, HE.encodeFrac(0.0), in_new_ctxt=True)
    assert dec(HE, z) == 0.0
    assert dec(HE, c * HE.encodeFrac(0)) == 0.0
    assert dec(HE, c * 0) == 0.0 and dec(HE, 0.0 * c) == 0.0
    assert dec(HE, HE.multiply_plain(c, HE.encodeInt(0))) == 0.0
    assert dec(HE, c + 1.0) == 1.0  # c itself became 0 in place, and still works
    assert HE.noiseLevel(c) > 0


def test_pyctxt_save_load_bytes(HE, tmp_path):
    c = HE.encryptFrac(-4.125)
    path = tmp_path / "c.ctxt"
    c.save(str(path))
    d = HE.encryptFrac(0.0)
    assert d.load(str(path)) is None
    assert abs(dec(HE, d) - -4.125) < EPS
    data = c.to_bytes()
    assert isinstance(data, bytes)
    e = PyCtxt.from_bytes(data, HE)
    assert isinstance(e, PyCtxt) and abs(dec(HE, e) - -4.125) < EPS
    e2 = PyCtxt.from_bytes(data, HE.context)
    assert abs(dec(HE, e2) - -4.125) < EPS
    path.write_bytes(HE.encryptFrac(1.0).to_bytes()[:-1])
    with pytest.raises(HEError):
        d.load(str(path))
    assert abs(dec(HE, d) - -4.125) < EPS  # a failed load leaves it as it was
    # a tensor is not a single ciphertext
    path.write_bytes(pycrcnn.encrypt_matrix(HE, [[1.0, 2.0]]).to_bytes())
    with pytest.raises(HEError, match="single"):
        d.load(path)


@pytest.mark.parametrize("mod", [pycrcnn, pycrcnn.crypto])
def test_matrix_helpers(HE, mod):
    nested = [[1.5, -2.0, 0.25], [3.0, 0.0, -7.125]]
    arr = np.array(nested)
    for m in (nested, arr, arr.astype(np.float32), arr.tolist()):
        t = mod.encrypt_matrix(HE, m)
        assert isinstance(t, CipherTensor) and t.shape == (2, 3)
        out = mod.decrypt_matrix(HE, t)
        assert out.dtype == np.float64 and np.max(np.abs(out - arr)) < EPS
        # the seed's object arrays of PyCtxt work both ways
        objs = t.to_numpy()
        assert objs.dtype == object and isinstance(objs[0, 0], PyCtxt)
        assert np.max(np.abs(mod.decrypt_matrix(HE, objs) - arr)) < EPS
        assert np.max(np.abs(mod.decrypt_matrix(HE, objs.tolist()) - arr)) < EPS
        assert mod.encrypt_matrix(HE, objs).shape == (2, 3)
    enc = mod.encode_matrix(HE, nested)
    assert enc.dtype == object and enc.shape == (2, 3) and isinstance(enc[1, 2], PyPtxt)
    assert np.array_equal(mod.decode_matrix(HE, enc), arr)
    assert np.max(np.abs(mod.decrypt_matrix(HE, mod.encrypt_matrix(HE, enc)) - arr)) < EPS
    # 4-d images as the seed fed them to its layers
    img = RNG.uniform(0, 1, size=(1, 1, 3, 3))
    t = mod.encrypt_matrix(HE, img)
    assert t.shape == (1, 1, 3, 3)
    assert np.max(np.abs(mod.decrypt_matrix(HE, t) - img)) < EPS
    # with the native Context too
    assert np.max(np.abs(mod.decrypt_matrix(HE.context, mod.encrypt_matrix(HE.context, arr)) - arr)) < EPS


def test_public_key_makes_a_compute_only_pyfhel(HE, tmp_path):
    path = tmp_path / "pub.key"
    HE.savepublicKey(str(path))
    server = Pyfhel()
    server.restorepublicKey(str(path))
    assert server.getm() == 2048 and not server.context.has_secret_key
    c = PyCtxt.from_bytes(HE.encryptFrac(1.5).to_bytes(), server)
    server.square(c)
    server.multiply_plain(c, server.encodeFrac(-2.0))
    server.add_plain(c, server.encodeFrac(0.5))
    with pytest.raises(SecretKeyRequired):
        server.decryptFrac(c)
    with pytest.raises(SecretKeyRequired):
        server.noiseLevel(c)
    back = PyCtxt.from_bytes(c.to_bytes(), HE)
    assert abs(dec(HE, back) - (1.5 * 1.5 * -2.0 + 0.5)) < 1e-6
    # saveContext/restoreContext are the same thing
    other = Pyfhel()
    HE.saveContext(tmp_path / "ctx")
    other.restoreContext(tmp_path / "ctx")
    assert other.context.key_id == HE.context.key_id


def test_secret_key_round_trip(HE, tmp_path):
    path = tmp_path / "sec.key"
    HE.savesecretKey(str(path))
    other = Pyfhel()
    other.restoresecretKey(str(path))
    c = HE.encryptFrac(2.75)
    assert abs(other.decryptFrac(PyCtxt.from_bytes(c.to_bytes(), other)) - 2.75) < EPS


def test_flag_batching_validates_p():
    he = Pyfhel()
    he.contextGen(p=786433, m=4096, flagBatching=True)  # 786433 = 96 · 8192 + 1, prime
    assert he.getflagBatch() is True and he.getp() == 786433
    he.keyGen()
    # Pyfhel's batching encodes integers (no fixed-point scale): p/2 = 393216 bounds |x|.
    x = [[1.0, 2.0], [3.0, -4000.0]]
    t = pycrcnn.encrypt_matrix(he, x)
    assert t.shape == (2, 2)
    assert np.allclose(pycrcnn.decrypt_matrix(he, t), x)
    with pytest.raises(pycrcnn.PlaintextOverflow):
        pycrcnn.encrypt_matrix(he, [[400000.0]])
    he.contextGen(p=65537, m=2048, flagBatching=True)  # 65537 = 16 · 4096 + 1: valid at m=2048
    for bad in (65539, 65536, 12289 * 5):
        with pytest.raises(ParameterError, match="prime") as info:
            Pyfhel().contextGen(p=bad, m=2048, flagBatching=True)
        assert "Nearest valid primes" in str(info.value)
    auto = Pyfhel()
    auto.contextGen(p=None, m=4096, flagBatching=True)
    assert auto.getp() % 8192 == 1


def test_products_of_ciphertexts_at_different_levels():
    # Every product switches down a modulus level; later products must bring
    # the other operand down to match (Pyfhel's power, x² · y).
    he = Pyfhel()
    he.contextGen(p=65537, m=8192)
    he.keyGen()
    c = he.encryptFrac(2.0)
    assert abs(he.decryptFrac(he.power(c, 3, in_new_ctxt=True)) - 8.0) < 1e-6
    a, b = he.encryptFrac(1.5), he.encryptFrac(-2.0)
    assert abs(he.decryptFrac(he.multiply(he.square(a, in_new_ctxt=True), b)) + 4.5) < 1e-6
