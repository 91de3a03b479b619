"""Hostile blobs for every pycrcnn loader and what each loader makes of them
(run in isolated worker processes by :mod:`isolated`): shared by ``benches/robustness.py`` (10^5 blobs) and
``tests/test_robustness.py`` (a fast slice).

Every case is a pure function of ``(seed, index)``: a worker process
regenerates the blob it was told to load, so the parent only sends numbers and
knows which case a crashed or hung worker was on. Half of the cases (the odd
indices) are *forged*: the corrupted payload gets a recomputed, valid length
field and SHA-256 (``src/he/serialize.rs``: ``PCRN | u16 version | u8 kind |
16 fingerprint | 16 key id | u64 payload length | payload | SHA-256 of
everything before it``), so fhe.rs's own parsers are reached; for ``.npz``
models the forged cases are well-formed zip files with valid CRCs around a
corrupted description or corrupted arrays.

Outcomes: ``clear`` (a ValueError / pycrcnn.HEError with a message),
``accepted`` (loaded, and the follow-up use -- decrypt, add, describe --
worked or failed clearly), ``panic`` (a Rust panic caught at the boundary:
the backstop, reported as a bug), ``unexpected:<Type>`` (any other
exception), and from the runner ``crash:<signal or code>`` and ``hang``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

# the frame of src/he/serialize.rs
MAGIC = b"PCRN"
HEADER = 4 + 2 + 1 + 16 + 16 + 8
CHECKSUM = 32
LEN_AT = HEADER - 8

#: loaders and how often each is the target (weights)
LOADERS = {
    "Context.from_public": 22,
    "Context.from_secret_bytes": 12,
    "Context.load_secret_key": 3,
    "CipherTensor.from_bytes(client)": 16,
    "CipherTensor.from_bytes(server)": 16,
    "PyCtxt.from_bytes": 11,
    "load_model_spec(.npz)": 20,
}

MUTATIONS = ("flip", "bytes", "int", "truncate", "extend", "splice", "delete", "duplicate", "random",
             "foreign", "header")

_INTERESTING = (0, 1, 2, 3, 7, 8, 255, 256, 1023, 1024, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


# ---------------------------------------------------------------------------
# material: the valid blobs everything starts from


def make_material(folder: Path) -> Path:
    """Writes the base blobs into ``folder``: three key holders (fractional
    m=1024; batch m=2048; batch m=2048 with two CRT primes and rotation keys),
    another key under the batch parameters, their public contexts, secret keys,
    tensors and single ciphertexts, and the shipped tiny models' ``.npz``."""
    from pycrcnn import Context
    from pycrcnn.models import shipped_model_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    holders = {
        "frac": Context(m=1024, p=257, encoding="fractional", int_digits=16, frac_digits=16),
        "batch": Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6),
        "crt": Context(m=2048, encoding="batch", n_plaintext_moduli=2, scale_bits=4, weight_scale_bits=4),
        "other": Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6),
    }
    rng = np.random.default_rng(1)
    for name, ctx in holders.items():
        ctx.keygen(rotations=[(0, [1, 2])] if name == "crt" else None)
        (folder / f"sk_{name}.bin").write_bytes(bytes(ctx.secret_key_bytes()))
        (folder / f"pub_{name}.bin").write_bytes(bytes(ctx.public_context()))
        shape = (2, 3) if name == "frac" else (3, 2, 2)
        (folder / f"tensor_{name}.bin").write_bytes(bytes(ctx.encrypt(rng.uniform(-1, 1, shape)).to_bytes()))
        if name == "frac":
            (folder / f"ctxt_{name}.bin").write_bytes(bytes(ctx.encrypt(np.float64(0.75)).to_bytes()))
    # the server's requests (hostile_http): tiny_mlp's last layer [2, 49], tiny_cnn's square [2, 2]
    (folder / "data_batch.bin").write_bytes(bytes(holders["batch"].encrypt(rng.uniform(0, 1, (2, 49))).to_bytes()))
    (folder / "data_crt.bin").write_bytes(bytes(holders["crt"].encrypt(rng.uniform(-1, 1, (2, 2))).to_bytes()))
    for model in ("tiny_mlp", "tiny_cnn"):
        src = shipped_model_path(model).with_suffix(".npz")
        (folder / f"npz_{model}.npz").write_bytes(src.read_bytes())
    return folder


@dataclass
class Material:
    """The base blobs, loaded (and the contexts made from them) in one process."""

    folder: Path
    blobs: Dict[str, bytes] = field(default_factory=dict)
    clients: Dict[str, object] = field(default_factory=dict)
    servers: Dict[str, object] = field(default_factory=dict)
    tmp: Optional[Path] = None

    @classmethod
    def load(cls, folder: Path, contexts: bool = True) -> "Material":
        m = cls(Path(folder))
        for path in sorted(m.folder.iterdir()):
            if path.is_file():
                m.blobs[path.stem] = path.read_bytes()
        if contexts:
            from pycrcnn import Context

            for name in ("frac", "batch", "crt"):
                m.clients[name] = Context.from_secret_bytes(m.blobs[f"sk_{name}"])
                m.servers[name] = Context.from_public(m.blobs[f"pub_{name}"])
        m.tmp = Path(tempfile.mkdtemp(prefix="pycrcnn-hostile-"))
        return m

    def of(self, prefix: str) -> List[str]:
        return [k for k in self.blobs if k.startswith(prefix)]


# ---------------------------------------------------------------------------
# byte mutations


def _frame_parts(blob: bytes) -> Optional[Tuple[bytes, bytes]]:
    """(header without its length field, payload) of a well-framed blob."""
    if len(blob) < HEADER + CHECKSUM or blob[:4] != MAGIC:
        return None
    return blob[:LEN_AT], blob[HEADER:-CHECKSUM]


def reframe(head: bytes, payload: bytes, length: Optional[int] = None) -> bytes:
    """A frame with a valid checksum: what a forger (not a bit flip) writes."""
    n = len(payload) if length is None else length
    body = head + struct.pack("<Q", n) + payload
    return body + hashlib.sha256(body).digest()


def mutate_bytes(rng: random.Random, data: bytes, others: List[bytes], kind: str) -> bytes:
    """One generic corruption of ``data``."""
    b = bytearray(data)
    n = len(b)
    if kind in ("foreign", "header"):  # the frame-aware kinds, on bytes that are not a frame
        kind = "flip"
    if kind == "flip" and n:
        for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
            i = rng.randrange(n * 8)
            b[i // 8] ^= 1 << (i % 8)
    elif kind == "bytes" and n:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif kind == "int" and n >= 8:
        width = rng.choice((4, 8))
        value = rng.choice(_INTERESTING + (n, n + 1, n - 1, rng.randrange(2**32)))
        value %= 2 ** (8 * width)
        i = rng.randrange(max(1, n - width))
        b[i:i + width] = value.to_bytes(width, rng.choice(("little", "big")))
    elif kind == "truncate":
        return bytes(b[:rng.randrange(n + 1)] if rng.random() < 0.7 else b[:max(0, n - rng.randint(1, 64))])
    elif kind == "extend":
        tail = rng.choice((b"\0", bytes(rng.randrange(256) for _ in range(rng.randint(1, 512))), bytes(b[:64])))
        return bytes(b) + tail
    elif kind == "splice" and others:
        other = rng.choice(others)
        i, j = rng.randrange(n + 1), rng.randrange(len(other) + 1)
        return bytes(b[:i]) + other[j:]
    elif kind == "delete" and n:
        i = rng.randrange(n)
        return bytes(b[:i] + b[i + rng.randint(1, min(4096, n - i)):])
    elif kind == "duplicate" and n:
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 4096))
        return bytes(b[:j] + b[i:j] + b[j:])
    elif kind == "random":
        return rng.randbytes(rng.choice((0, 1, 7, 46, 79, 80, 100, 1000, rng.randrange(20000))))
    return bytes(b)


def mutate_blob(rng: random.Random, blob: bytes, others: List[bytes], kind: str, forged: bool) -> bytes:
    """A corrupted pycrcnn blob. ``forged``: the corruption is in the header
    fields or the payload, then the length and checksum are made valid again
    (for ``truncate``/``extend``/... the length field follows the payload, so
    the parsers see a shorter or longer payload rather than a length error)."""
    parts = _frame_parts(blob)
    if not forged or parts is None:
        if kind == "header":
            kind = "bytes"
            b = bytearray(blob)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(min(len(b), HEADER))] = rng.randrange(256)
            return bytes(b)
        return mutate_bytes(rng, blob, others, kind)
    head, payload = parts
    if kind == "header":
        h = bytearray(head)
        what = rng.choice(("version", "kind", "fingerprint", "key_id", "magic"))
        if what == "version":
            h[4:6] = rng.choice((0, 2, 0xFFFF)).to_bytes(2, "little")
        elif what == "kind":
            h[6] = rng.choice((0, 1, 2, 3, 4, 255))
        elif what == "fingerprint":
            src = _frame_parts(rng.choice(others)) if others and rng.random() < 0.5 else None
            h[7:23] = src[0][7:23] if src else rng.randbytes(16)
        elif what == "key_id":
            src = _frame_parts(rng.choice(others)) if others and rng.random() < 0.5 else None
            h[23:39] = src[0][23:39] if src else rng.randbytes(16)
        else:
            h[:4] = rng.choice((b"PCRQ", b"\0\0\0\0", b"pcrn"))
        length = None
        if rng.random() < 0.2:  # a length field that lies, under a valid checksum
            length = rng.choice((0, len(payload) + 1, len(payload) - 1, 2**63, 2**64 - 1)) % 2**64
        return reframe(bytes(h), payload, length)
    if kind == "foreign" and others:
        # another blob's payload under this blob's header (or the reverse)
        src = _frame_parts(rng.choice(others))
        if src is not None:
            return reframe(head, src[1]) if rng.random() < 0.5 else reframe(src[0], payload)
    if kind == "random":
        return reframe(head, rng.randbytes(rng.choice((0, 1, 8, 17, 100, 1000, rng.randrange(50000)))))
    new = mutate_bytes(rng, payload, [p[1] for p in map(_frame_parts, others) if p], kind)
    return reframe(head, new)


# ---------------------------------------------------------------------------
# .npz models


def _zip_members(data: bytes) -> Dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name) for name in z.namelist()}


def _zip(members: Dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr, allow_pickle=False)
    return out.getvalue()


def _weird_value(rng: random.Random, depth: int = 0):
    choices = [None, True, False, 0, -1, 1, 2**31, 10**30, -(10**30), 1.5, float("nan"), float("inf"), "", "x" * 1000,
               "Conv2d", "Linear", [], [1], [0, 0], [10**9, 10**9], [-3, 2], {}, {"a": 1}, "\u00e9\u0000"]
    if depth < 3 and rng.random() < 0.2:
        return [_weird_value(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    if depth < 3 and rng.random() < 0.1:
        return {str(rng.randrange(5)): _weird_value(rng, depth + 1)}
    return rng.choice(choices)


def _mutate_json(rng: random.Random, doc):
    """Replaces one random node of a JSON document (or deletes a key)."""
    nodes = []

    def walk(x, parent, key):
        nodes.append((parent, key))
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, x, k)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, x, i)

    walk(doc, None, None)
    parent, key = rng.choice(nodes)
    if parent is None:
        return _weird_value(rng)
    if isinstance(parent, dict) and rng.random() < 0.25:
        del parent[key]
    else:
        parent[key] = _weird_value(rng)
    return doc


def mutate_npz(rng: random.Random, data: bytes, others: List[bytes], kind: str, forged: bool) -> bytes:
    """A corrupted ``.npz`` model: raw byte damage to the zip, or (``forged``)
    a valid zip around a corrupted ``__spec__`` or corrupted arrays."""
    if not forged:
        return mutate_bytes(rng, data, others, kind if kind not in ("header", "foreign") else "splice")
    members = _zip_members(data)
    target = rng.random()
    if target < 0.5:  # the JSON description
        doc = json.loads(np.load(io.BytesIO(members["__spec__.npy"]), allow_pickle=False)[()])
        for _ in range(rng.randint(1, 3)):
            doc = _mutate_json(rng, doc)
        try:
            text = json.dumps(doc)
        except (TypeError, ValueError):
            text = "{"
        if rng.random() < 0.1:
            text = rng.choice(("[" * 100000, '{"format": "pycrcnn-model", "version": 1, "layers": ' + "[" * 50000,
                               text[: rng.randrange(len(text) + 1)]))
        members["__spec__.npy"] = _npy(np.array(text))
    elif target < 0.8:  # an array: other shape, dtype or values
        names = [n for n in members if n not in ("__spec__.npy", "__plan__.npy")]  # the JSON strings
        name = rng.choice(names)
        arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
        how = rng.choice(("shape", "dtype", "values", "empty", "scalar", "bytes"))
        if how == "shape":
            arr = np.resize(arr, tuple(rng.choice((1, 2, 3, 5, 0)) for _ in range(rng.randint(0, 4))))
        elif how == "dtype":
            arr = arr.astype(rng.choice((np.int8, np.int64, np.float16, np.complex128, np.bool_, "U3")))
        elif how == "values":
            arr = np.array(arr, dtype=np.float64)
            flat = arr.reshape(-1)
            if flat.size:
                flat[rng.randrange(flat.size)] = rng.choice((np.nan, np.inf, -np.inf, 1e308, -1e308, 1e-320))
        elif how == "empty":
            arr = np.zeros((0,))
        elif how == "scalar":
            arr = np.float64(rng.random())
        members[name] = _npy(np.asarray(arr)) if how != "bytes" else mutate_bytes(rng, members[name], [], "bytes")
    else:  # members: deleted, renamed, duplicated, or a npy header that lies
        name = rng.choice(list(members))
        how = rng.choice(("delete", "rename", "header", "huge"))
        if how == "delete":
            del members[name]
        elif how == "rename":
            members[name + "x"] = members.pop(name)
        elif how == "header":
            raw = bytearray(members[name])
            end = raw.find(b"\n")
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(10, max(11, end))] = rng.choice(b"(),: '0123456789<f8FT")
            members[name] = bytes(raw)
        else:  # a header declaring a huge shape over a short body
            shape = rng.choice(("(1099511627776,)", "(4294967296, 4294967296)", "(100000000,)", "(-1,)"))
            header = "{'descr': '<f8', 'fortran_order': False, 'shape': %s, }" % shape
            header = header.ljust(118) + "\n"
            members[name] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    return _zip(members)


# ---------------------------------------------------------------------------
# cases


@dataclass
class Case:
    index: int
    loader: str
    base: str
    mutation: str
    forged: bool
    blob: bytes


def _pick_loader(rng: random.Random) -> str:
    names = list(LOADERS)
    return rng.choices(names, weights=[LOADERS[n] for n in names])[0]


def make_case(material: Material, seed: int, index: int) -> Case:
    """Case ``index`` of run ``seed``: deterministic, odd indices forged."""
    rng = random.Random(seed * 1_000_003 + index)
    forged = index % 2 == 1
    loader = _pick_loader(rng)
    mutation = rng.choice(MUTATIONS)
    if loader.startswith("load_model_spec"):
        base = rng.choice(material.of("npz_"))
        others = [material.blobs[k] for k in material.of("npz_") + material.of("pub_") if k != base]
        blob = mutate_npz(rng, material.blobs[base], others, mutation, forged)
        return Case(index, loader, base, mutation, forged, blob)
    if loader.startswith("Context."):
        own = "pub_" if loader == "Context.from_public" else "sk_"
    elif loader == "PyCtxt.from_bytes":
        own = "ctxt_"
    else:
        own = "tensor_"
    pool = material.of(own)
    # a blob of another kind, key or parameters a fifth of the time
    base = rng.choice(pool) if rng.random() < 0.8 else rng.choice([k for k in material.blobs if not k.startswith("npz")])
    others = [material.blobs[k] for k in material.blobs if k != base and not k.startswith("npz")]
    if mutation == "foreign" and not forged:
        blob = rng.choice(others)  # whole, unmutated, but not what this loader expects
    else:
        blob = mutate_blob(rng, material.blobs[base], others, mutation, forged)
    return Case(index, loader, base, mutation, forged, blob)


# ---------------------------------------------------------------------------
# loading one case


def _classify(exc: BaseException) -> str:
    msg = str(exc)
    if "caught panic" in msg:
        return "panic"
    if isinstance(exc, ValueError) and msg.strip():
        return "clear"
    return f"unexpected:{type(exc).__name__}"


def _key_of(material: Material, case: Case) -> str:
    """Which key holder's context a tensor case is loaded with: the base blob's
    own holder where it has one (so that forged payloads get past the key id)."""
    for name in ("frac", "batch", "crt"):
        if case.base.endswith("_" + name):
            return name
    return "frac" if case.loader == "PyCtxt.from_bytes" else "batch"


def load_case(material: Material, case: Case) -> str:
    """Runs the case's loader and, when it accepts, a cheap use of the result."""
    from pycrcnn import CipherTensor, Context, PyCtxt
    from pycrcnn.model import build_from_spec
    from pycrcnn.spec import load_model_spec

    try:
        if case.loader == "Context.from_public":
            ctx = Context.from_public(case.blob)
            ctx.public_context()
            _ = ctx.parameters()
            # a forged context that kept its public keys (and so its key id) is used: its
            # relinearization keys square the holder's tensor
            holder = _key_of(material, case)
            try:
                t = CipherTensor.from_bytes(material.blobs[f"tensor_{holder}"], ctx)
            except ValueError:
                t = None
            if t is not None:
                ctx.square(t).to_bytes()
        elif case.loader == "Context.from_secret_bytes":
            ctx = Context.from_secret_bytes(case.blob)
            ctx.decrypt(ctx.encrypt(np.zeros((1, 2)) if ctx.encoding == "batch" else np.zeros(2)))
        elif case.loader == "Context.load_secret_key":
            path = material.tmp / f"sk-{os.getpid()}.bin"
            path.write_bytes(case.blob)
            Context.load_secret_key(str(path))
        elif case.loader.startswith("CipherTensor.from_bytes"):
            holder = _key_of(material, case)
            server = case.loader.endswith("(server)")
            ctx = (material.servers if server else material.clients)[holder]
            t = CipherTensor.from_bytes(case.blob, ctx)
            if server:
                _ = (t + t) * 3
                t.to_bytes()
            else:
                t.decrypt()
        elif case.loader == "PyCtxt.from_bytes":
            t = PyCtxt.from_bytes(case.blob, material.clients[_key_of(material, case)])
            t.decrypt()
        elif case.loader.startswith("load_model_spec"):
            path = material.tmp / f"m-{os.getpid()}.npz"
            path.write_bytes(case.blob)
            spec = load_model_spec(path)
            if spec.input_shape is not None:
                spec.output_shape(spec.input_shape)
            spec.describe()
            build_from_spec(material.servers["batch"], spec, rencrypt_positions=[])
        else:
            raise AssertionError(case.loader)
    except Exception as exc:  # noqa: BLE001 - classified, that is the point
        return _classify(exc)
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return _classify(exc)
    return "accepted"
