"""Fuzzing the byte formats: corrupted, truncated, foreign or forged blobs must
raise a ValueError (pycrcnn.FormatError or HEError) with a message, never
crash the interpreter and never load.

Frame (src/he/serialize.rs): magic ``PCRN`` | version u16 | kind u8 |
fingerprint 16 | key id 16 | payload length u64 | payload | SHA-256 32.
"""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pycrcnn
from pycrcnn import CipherTensor, Context, FormatError, HEError, PyCtxt

HEADER = 4 + 2 + 1 + 16 + 16 + 8
RNG = np.random.default_rng(7)


def keyed(**kw) -> Context:
    c = Context(**kw)
    c.keygen()
    return c


@pytest.fixture(scope="module")
def small():
    """m=1024: the smallest blobs (one seeded ciphertext ≈ 3.6 kB)."""
    ctx = keyed(m=1024, p=257, encoding="fractional")
    blob = ctx.encrypt(np.array([0.625])).to_bytes()
    return ctx, blob


@pytest.fixture(scope="module")
def pair():
    a = keyed(m=2048, p=65537, encoding="fractional")
    b = keyed(m=2048, p=65537, encoding="fractional")
    return a, b


def refused(fn, *args):
    """Calls fn and returns the exception it must raise (a ValueError with a message)."""
    try:
        fn(*args)
    except ValueError as exc:
        assert isinstance(exc, HEError), type(exc)
        assert str(exc), "an error without a message"
        return exc
    raise AssertionError("a corrupted blob was accepted")


def frame(kind: int, fingerprint: bytes, key_id: bytes, payload: bytes, version: int = 1) -> bytes:
    body = b"PCRN" + struct.pack("<HB", version, kind) + fingerprint + key_id + struct.pack("<Q", len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def parts(blob: bytes):
    kind = blob[6]
    return kind, blob[7:23], blob[23:39], blob[HEADER:-32]


# ---------------------------------------------------------------------------


def test_round_trip(small):
    ctx, blob = small
    t = CipherTensor.from_bytes(blob, ctx)
    assert t.shape == (1,)
    assert abs(float(ctx.decrypt(t)[0]) - 0.625) < 1e-9
    e = CipherTensor.from_bytes(t[0].to_bytes(), ctx)
    assert isinstance(e, PyCtxt)
    assert isinstance(PyCtxt.from_bytes(t[0].to_bytes(), ctx), PyCtxt)
    assert blob.startswith(b"PCRN") and len(blob) < 8000
    assert t.to_bytes() == blob  # deterministic re-serialization of a loaded ciphertext


def test_every_single_bit_flip(small):
    ctx, blob = small
    bad = bytearray(blob)
    kinds = {}
    for i in range(len(blob) * 8):
        bad[i // 8] ^= 1 << (i % 8)
        try:
            CipherTensor.from_bytes(bytes(bad), ctx)
        except FormatError as exc:
            kinds[str(exc).split(":")[0]] = kinds.get(str(exc).split(":")[0], 0) + 1
        else:
            raise AssertionError(f"bit {i} flipped and the blob still loaded")
        bad[i // 8] ^= 1 << (i % 8)
    assert sum(kinds.values()) == len(blob) * 8
    assert any("checksum" in k for k in kinds), kinds
    assert CipherTensor.from_bytes(bytes(bad), ctx) is not None  # restored


def test_truncations_and_extensions(small):
    ctx, blob = small
    for n in range(len(blob)):
        refused(CipherTensor.from_bytes, blob[:n], ctx)
    for extra in (b"\0", b"x" * 31, blob):
        refused(CipherTensor.from_bytes, blob + extra, ctx)
        refused(CipherTensor.from_bytes, extra + blob, ctx)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=5000))
def test_random_bytes(small, data):
    ctx, _ = small
    refused(CipherTensor.from_bytes, data, ctx)
    refused(Context.from_public, data)
    refused(Context.from_secret_bytes, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=0, max_size=3000), kind=st.integers(0, 255), valid_checksum=st.booleans(),
       keep_ids=st.booleans())
def test_random_payload_behind_a_valid_header(small, payload, kind, valid_checksum, keep_ids):
    ctx, blob = small
    _, fp, kid, _ = parts(blob)
    if not keep_ids:
        fp, kid = bytes(16), bytes(16)
    data = frame(kind, fp, kid, payload)
    if not valid_checksum:
        data = data[:-1] + bytes([data[-1] ^ 0x55])
    refused(CipherTensor.from_bytes, data, ctx)
    refused(Context.from_public, data)
    refused(Context.from_secret_bytes, data)


def test_forged_payload_flips_never_crash(small):
    """A valid checksum over corrupted content (a forger, not line noise) reaches the parsers."""
    ctx, blob = small
    kind, fp, kid, payload = parts(blob)
    positions = list(range(120 * 8)) + list(RNG.integers(0, len(payload) * 8, size=2000))
    outcomes = {"ok": 0, "error": 0}
    p = bytearray(payload)
    for i in positions:
        i = int(i)
        p[i // 8] ^= 1 << (i % 8)
        try:
            CipherTensor.from_bytes(frame(kind, fp, kid, bytes(p)), ctx)
            outcomes["ok"] += 1  # e.g. a flip inside a coefficient: still a well-formed ciphertext
        except ValueError as exc:
            assert isinstance(exc, HEError) and str(exc)
            outcomes["error"] += 1
        p[i // 8] ^= 1 << (i % 8)
    assert outcomes["error"] > 100, outcomes
    # hostile shapes: huge dimensions and counts are refused before allocating
    for dims in ([1 << 40, 1 << 40, 0], [1 << 20], [1 << 62, 4], [2, 2, 2, 2, 2, 2, 2, 2, 2]):
        meta = b"\0" + struct.pack("<d", 1.0) + b"\x01" + struct.pack("<I", 0) + struct.pack("<I", len(dims))
        meta += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<I", 1)
        try:
            CipherTensor.from_bytes(frame(kind, fp, kid, meta), ctx)
        except ValueError as exc:
            assert isinstance(exc, HEError)


def test_foreign_key_and_parameters(pair, small):
    a, b = pair
    x = RNG.uniform(-1, 1, size=(2, 2))
    blob = a.encrypt(x).to_bytes()
    exc = refused(CipherTensor.from_bytes, blob, b)
    assert isinstance(exc, FormatError) and "another key" in str(exc)
    exc = refused(PyCtxt.from_bytes, a.encrypt(np.float64(1.0)).to_bytes(), b)
    assert "another key" in str(exc)
    for other in (small[0], keyed(m=2048, p=40961, encoding="fractional"), keyed(m=2048, encoding="batch")):
        exc = refused(CipherTensor.from_bytes, blob, other)
        assert isinstance(exc, FormatError) and "parameters" in str(exc)
    # the same key through its public context is fine
    server = Context.from_public(a.public_context())
    assert CipherTensor.from_bytes(blob, server).shape == (2, 2)
    # a forged key id (valid checksum) does not make a foreign ciphertext load
    kind, fp, _, payload = parts(blob)
    exc = refused(CipherTensor.from_bytes, frame(kind, fp, bytes.fromhex(b.key_id), payload), a)
    assert "another key" in str(exc)


def test_blob_kinds_are_not_interchangeable(pair):
    a, _ = pair
    tensor = a.encrypt(np.ones((1, 2))).to_bytes()
    public = a.public_context()
    secret = a.secret_key_bytes()
    assert isinstance(refused(CipherTensor.from_bytes, public, a), FormatError)
    assert isinstance(refused(CipherTensor.from_bytes, secret, a), FormatError)
    assert isinstance(refused(Context.from_public, tensor), FormatError)
    assert isinstance(refused(Context.from_secret_bytes, tensor), FormatError)
    exc = refused(Context.from_public, secret)
    assert isinstance(exc, FormatError) and "secret key" in str(exc)
    # relabelling a secret-key blob as a public context breaks its checksum
    relabelled = secret[:6] + b"\x02" + secret[7:]
    assert isinstance(refused(Context.from_public, relabelled), FormatError)
    # and re-framed with a valid checksum, the trailing secret key is rejected as extra bytes
    _, fp, kid, payload = parts(secret)
    refused(Context.from_public, frame(2, fp, kid, payload))
    # a future format version is named
    _, fp, kid, payload = parts(tensor)
    exc = refused(CipherTensor.from_bytes, frame(1, fp, kid, payload, version=2), a)
    assert "version" in str(exc)


def test_public_context_flips_sampled(small):
    ctx, _ = small
    pub = ctx.public_context()
    bad = bytearray(pub)
    for i in RNG.integers(0, len(pub) * 8, size=1500):
        i = int(i)
        bad[i // 8] ^= 1 << (i % 8)
        refused(Context.from_public, bytes(bad))
        bad[i // 8] ^= 1 << (i % 8)
    for n in RNG.integers(0, len(pub), size=300):
        refused(Context.from_public, pub[: int(n)])
    assert Context.from_public(bytes(bad)).key_id == ctx.key_id


def test_pickled_tensor_with_corrupted_bytes():
    ctx = keyed(m=1024, p=257, encoding="fractional")
    blob = ctx.encrypt(np.array([0.625])).to_bytes()
    pub = ctx.public_context()
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x10
    refused(pycrcnn._engine._tensor_from_pickle, bytes(bad), pub)
    bad = bytearray(pub)
    bad[len(bad) // 2] ^= 0x10
    # the live context holding the key is found by key id first: the public context is not needed
    t = pycrcnn._engine._tensor_from_pickle(blob, bytes(bad))
    assert t.context.key_id == ctx.key_id
    # with no live context holding the key, a corrupted public context is refused
    other = keyed(m=1024, p=257, encoding="fractional")
    oblob = other.encrypt(np.array([1.0])).to_bytes()
    opub = bytearray(other.public_context())
    del other
    opub[len(opub) // 3] ^= 0x01
    refused(pycrcnn._engine._tensor_from_pickle, oblob, bytes(opub))


def test_interpreter_survives_in_a_subprocess(tmp_path):
    """Part of the fuzzing in a fresh interpreter: it must exit 0."""
    script = textwrap.dedent(f"""
        import sys, random
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "python")!r})
        import numpy as np
        import pycrcnn
        from pycrcnn import CipherTensor, Context
        ctx = Context(m=1024, p=257, encoding="fractional"); ctx.keygen()
        blob = ctx.encrypt(np.array([1.5, -2.0])).to_bytes()
        pub = ctx.public_context()
        rnd = random.Random(1)
        n = 0
        for _ in range(3000):
            data = bytearray(blob if rnd.random() < 0.7 else pub)
            for _ in range(rnd.randint(1, 4)):
                i = rnd.randrange(len(data) * 8)
                data[i // 8] ^= 1 << (i % 8)
            if rnd.random() < 0.2:
                data = data[: rnd.randrange(len(data))]
            for fn in (lambda d: CipherTensor.from_bytes(d, ctx), Context.from_public, Context.from_secret_bytes):
                try:
                    fn(bytes(data))
                except ValueError:
                    n += 1
        print(n)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) == 3000 * 3  # every corrupted blob refused by every loader
