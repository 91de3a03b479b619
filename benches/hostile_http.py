"""Malformed HTTP requests for a live pycrcnn server, and a raw-socket client
that counts what it answers: shared by ``benches/robustness.py`` (10^4
requests) and ``tests/test_robustness.py`` (a few hundred).

Every request is a pure function of ``(seed, index)`` and the material of
:mod:`hostile` (the tiny_mlp key holder ``batch``, the CRT holder ``crt``
whose tensor runs tiny_cnn's square with its relinearization keys). Requests
are raw bytes on a socket, so that lengths can lie, headers can be huge and
bodies can stop early.

Outcomes: ``clear`` (a 4xx answer), ``accepted`` (2xx: e.g. a forged context
that kept its public key computes garbage for its sender), ``5xx``,
``no_response`` (the connection closed without an answer) and ``hang`` (no
answer within the time limit).
"""
from __future__ import annotations

import base64
import json
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import hostile

#: request families and their weights
FAMILIES = {
    "bad_json": 10,
    "field_types": 16,
    "binary_frame": 12,
    "content_type": 6,
    "http_level": 10,
    "unknown_names": 6,
    "layer_ranges": 6,
    "secret_key": 4,
    "forged_context": 10,
    "forged_data": 10,
    "contexts_endpoint": 8,
    "body_limit": 2,
}

FIELDS = ("encryption_parameters", "net", "layers", "public_context", "context_id", "data",
          "switch_to_last_level", "max_threads", "address")


@dataclass
class Request:
    index: int
    family: str
    raw: bytes
    shutdown: bool = True  # half-close after sending (a body shorter than its length then ends)


@dataclass
class HttpMaterial:
    """What requests are made of: the holders' public contexts, small valid
    tensors and the context ids the server was given."""

    blobs: Dict[str, bytes]
    params: Dict[str, Dict[str, Any]]
    context_ids: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_material(cls, m: "hostile.Material") -> "HttpMaterial":
        from pycrcnn.client import request_parameters

        return cls(dict(m.blobs), {k: request_parameters(m.clients[k]) for k in ("batch", "crt")})

    def upload(self, url: str) -> None:
        """Uploads the two public contexts (``POST /contexts``)."""
        import requests

        for name in ("batch", "crt"):
            resp = requests.post(url + "/contexts", data=self.blobs[f"pub_{name}"], timeout=120)
            resp.raise_for_status()
            self.context_ids[name] = resp.json()["context_id"]

    def valid(self, holder: str = "batch", inline: bool = False) -> Tuple[Dict[str, Any], bytes, bytes]:
        """A valid request: (header, public context or b"", data)."""
        net, layers = ("tiny_mlp", [2]) if holder == "batch" else ("tiny_cnn", [1])
        header: Dict[str, Any] = {"encryption_parameters": [self.params[holder]], "net": net, "layers": layers,
                                  "switch_to_last_level": "auto"}
        if not inline:
            header["context_id"] = self.context_ids[holder]
        return header, self.blobs[f"pub_{holder}"] if inline else b"", self.blobs[f"data_{holder}"]


# ---------------------------------------------------------------------------
# building raw requests


def http(method: str, path: str, body: bytes = b"", content_type: Optional[str] = "application/json",
         headers: Optional[List[Tuple[str, str]]] = None, length: Optional[Any] = "auto") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length == "auto":
        lines.append(f"Content-Length: {len(body)}")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def json_body(header: Dict[str, Any], pub: bytes, data: bytes) -> bytes:
    doc = dict(header)
    if pub:
        doc["public_context"] = base64.b64encode(pub).decode()
    doc["data"] = base64.b64encode(data).decode()
    return json.dumps(doc).encode()


def binary_body(header: Dict[str, Any], pub: bytes, data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return b"PCRQ" + struct.pack(">I", len(head)) + head + struct.pack(">Q", len(pub)) + pub + \
        struct.pack(">Q", len(data)) + data


def _body(rng: random.Random, header, pub, data) -> Tuple[bytes, str]:
    if rng.random() < 0.5:
        return json_body(header, pub, data), "application/json"
    return binary_body(header, pub, data), "application/x-pycrcnn"


def make_request(material: HttpMaterial, seed: int, index: int) -> Request:
    rng = random.Random(seed * 7_000_003 + index)
    names = list(FAMILIES)
    family = rng.choices(names, weights=[FAMILIES[n] for n in names])[0]
    holder = "batch" if rng.random() < 0.7 else "crt"
    header, pub, data = material.valid(holder, inline=rng.random() < 0.2)
    raw = globals()[f"_{family}"](rng, material, holder, header, pub, data)
    if isinstance(raw, Request):
        raw.index, raw.family = index, family
        return raw
    return Request(index, family, raw)


def _bad_json(rng, m, holder, header, pub, data) -> bytes:
    good = json_body(header, pub, data)
    how = rng.choice(("truncated", "random", "deep", "utf8", "toplevel", "nan", "dupkeys", "huge_number", "empty"))
    if how == "truncated":
        body = good[:rng.randrange(len(good))]
    elif how == "random":
        body = rng.randbytes(rng.randrange(1, 2000))
    elif how == "deep":
        body = rng.choice((b"[" * 100000, b'{"a":' * 50000, b'{"net": "tiny_mlp", "layers": ' + b"[" * 30000,
                           b'{"data": ' + b"[" * 20000 + b"]" * 20000 + b"}"))
    elif how == "utf8":
        body = b'{"net": "\xff\xfe\xc3", "data": "AAAA"}'
    elif how == "toplevel":
        body = rng.choice((b"[1, 2, 3]", b"null", b"12", b'"a string"', b"true", b"1e999"))
    elif how == "nan":
        body = good.replace(b'"layers": [', b'"layers": [NaN, Infinity, ')
    elif how == "dupkeys":
        body = b'{"net": "tiny_mlp", "net": 12, ' + good[1:]
    elif how == "huge_number":
        body = good.replace(b'"layers": [', b'"layers": [' + b"9" * 5000 + b", ")
    else:
        body = b""
    return http("POST", "/compute", body, rng.choice(("application/json", None)))


def _field_types(rng, m, holder, header, pub, data) -> bytes:
    doc = dict(header)
    doc["data"] = base64.b64encode(data).decode()
    if pub:
        doc["public_context"] = base64.b64encode(pub).decode()
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(FIELDS + ("unknown_field", "py/object"))
        if rng.random() < 0.2:
            doc.pop(key, None)
        elif key in ("data", "public_context") and rng.random() < 0.5:
            doc[key] = rng.choice(("not*base64!", "QUFB", "=" * 8, base64.b64encode(rng.randbytes(100)).decode(),
                                   "A" * 4001, " ", "\u00e9"))
        else:
            doc[key] = hostile._weird_value(rng)
    try:
        body = json.dumps(doc).encode()
    except ValueError:
        body = b"{}"
    return http("POST", "/compute", body)


def _binary_frame(rng, m, holder, header, pub, data) -> bytes:
    good = binary_body(header, pub, data)
    how = rng.choice(("truncate", "header_len", "blob_len", "header_json", "trailing", "magic", "mutate", "deep"))
    head = json.dumps(header).encode()
    if how == "truncate":
        body = good[:rng.randrange(len(good))]
    elif how == "header_len":
        n = rng.choice((0, 1, len(head) - 1, len(head) + 1, 2**20, 2**20 + 1, 2**32 - 1))
        body = good[:4] + struct.pack(">I", n) + good[8:]
    elif how == "blob_len":
        at = 8 + len(head) + (0 if rng.random() < 0.5 else 8 + len(pub))
        n = rng.choice((0, 1, 2**63, 2**64 - 1, len(data) + 1, len(data) - 1, len(good)))
        body = good[:at] + struct.pack(">Q", n % 2**64) + good[at + 8:]
    elif how == "header_json":
        bad = rng.choice((b"{", b"[]", b"null", b"\xff\xfe", b'"x"', json.dumps(hostile._weird_value(rng)).encode()))
        body = b"PCRQ" + struct.pack(">I", len(bad)) + bad + good[8 + len(head):]
    elif how == "trailing":
        body = good + rng.randbytes(rng.randint(1, 100))
    elif how == "magic":
        body = rng.choice((b"PCRS", b"PCRN", b"\0\0\0\0", b"pcrq")) + good[4:]
    elif how == "deep":
        bad = b"[" * 100000
        body = b"PCRQ" + struct.pack(">I", len(bad)) + bad + good[8 + len(head):]
    else:
        body = hostile.mutate_bytes(rng, good, [], rng.choice(("flip", "bytes", "int", "delete", "duplicate")))
    return http("POST", "/compute", body, rng.choice(("application/x-pycrcnn", "application/x-pycrcnn", None)))


def _content_type(rng, m, holder, header, pub, data) -> bytes:
    body, ctype = _body(rng, header, pub, data)
    wrong = rng.choice(("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
                        "multipart/form-data", "application/json; charset=latin-1", "application/octet-stream",
                        "image/png", "\x01\x02", "application/x-pycrcnn" if ctype == "application/json"
                        else "application/json", None, "", ";;;", "a" * 1000))
    return http("POST", "/compute", body, wrong)


def _http_level(rng, m, holder, header, pub, data):
    body, ctype = _body(rng, header, pub, data)
    how = rng.choice(("huge_header", "many_headers", "long_url", "bad_method", "bad_version", "bad_length",
                      "two_lengths", "chunked", "chunked_bad", "cl_te", "short_body", "long_body", "nul_header",
                      "query", "absolute_url"))
    if how == "huge_header":
        return http("POST", "/compute", body, ctype, [("X-Pad", "a" * rng.choice((9000, 70000, 300000)))])
    if how == "many_headers":
        return http("POST", "/compute", body, ctype, [(f"X-H{i}", "v") for i in range(rng.choice((101, 500, 5000)))])
    if how == "long_url":
        return http("GET", "/models/" + "a" * rng.choice((5000, 9000, 100000)), b"", None)
    if how == "bad_method":
        return http(rng.choice(("BREW", "GET", "DELETE", "PATCH", "OPTIONS", "X" * 300, "P\x00ST")), "/compute",
                    body, ctype)
    if how == "bad_version":
        version = rng.choice(("HTTP/9.9", "HTTP/1", "FTP/1.0", ""))
        return f"POST /compute {version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    if how == "bad_length":
        return http("POST", "/compute", body, ctype, length=rng.choice(("abc", "-1", "1e3", "0x10", " ", "99999999999999999999999")))
    if how == "two_lengths":
        return http("POST", "/compute", body, ctype, [("Content-Length", str(len(body) + 5))])
    if how == "chunked":
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i:i + 65536] for i in range(0, len(body), 65536)))
        return http("POST", "/compute", chunks + b"0\r\n\r\n", ctype, [("Transfer-Encoding", "chunked")], length=None)
    if how == "chunked_bad":
        bad = rng.choice((b"zz\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffff\r\nabc", b"5\r\nab", b"-1\r\n\r\n"))
        return http("POST", "/compute", bad, ctype, [("Transfer-Encoding", "chunked")], length=None)
    if how == "cl_te":
        return http("POST", "/compute", body, ctype, [("Transfer-Encoding", "chunked")])
    if how == "short_body":  # Content-Length larger than what is sent, then the client half-closes
        return http("POST", "/compute", body[:rng.randrange(len(body))], ctype, length=len(body))
    if how == "long_body":  # more bytes than Content-Length: the rest is not a request
        return http("POST", "/compute", body + rng.randbytes(rng.randint(1, 200)), ctype, length=len(body))
    if how == "nul_header":
        return http("POST", "/compute", body, ctype, [("X-Bad\x00Name", "v"), ("X-Ok", "\x00\x7f\xff")])
    if how == "query":
        return http("POST", "/compute?net=" + "%00%ff" * 50 + "&x=" + "y" * 1000, body, ctype)
    return http("POST", "http://127.0.0.1/compute", body, ctype)


def _unknown_names(rng, m, holder, header, pub, data) -> bytes:
    h = dict(header)
    how = rng.choice(("net", "context_id", "endpoint", "model_page"))
    if how == "net":
        h["net"] = rng.choice(("no_such_model", "../../etc/passwd", "TINY_MLP ", "\u00e9t\u00e9", "x" * 10000,
                               "tiny_mlp\x00", ".hidden", "tiny_mlp.npz", "*"))
    elif how == "context_id":
        h["context_id"] = rng.choice((rng.randbytes(32).hex(), "A" * 64, "0" * 63, "g" * 64, rng.randbytes(32).hex().upper()))
        pub = b""
    elif how == "endpoint":
        return http(rng.choice(("GET", "POST", "PUT")), rng.choice(("/compute/x", "/context", "/%00", "/models/../x",
                                                                      "//compute", "/stats/x")), b"x", None)
    else:
        return http("GET", "/models/" + rng.choice(("nope", "..%2f..%2fetc", "%ff", "tiny_mlp/x")), b"", None)
    body, ctype = _body(rng, h, pub, data)
    return http("POST", "/compute", body, ctype)


def _layer_ranges(rng, m, holder, header, pub, data) -> bytes:
    h = dict(header)
    h["layers"] = rng.choice(([0, 99], [-1], [5], [2, 0], [0, 2], [1, 3], [10**20], [-(10**20)], [0, 1, 1, 5],
                              list(range(1000)), [3], [0.5], [[0]], [True], "0-2", {"start": 0}, [], [2**63]))
    body, ctype = _body(rng, h, pub, data)
    return http("POST", "/compute", body, ctype)


def _secret_key(rng, m, holder, header, pub, data) -> bytes:
    sk = m.blobs[f"sk_{holder}"]
    if rng.random() < 0.3:
        sk = hostile.mutate_blob(rng, sk, [], rng.choice(("flip", "header", "truncate")), True)
    if rng.random() < 0.4:
        return http("POST", "/contexts", sk, "application/octet-stream")
    h = {k: v for k, v in header.items() if k != "context_id"}
    body, ctype = _body(rng, h, sk, data)
    return http("POST", "/compute", body, ctype)


def _forged_context(rng, m, holder, header, pub, data) -> bytes:
    """A public context corrupted under a valid checksum, inline or uploaded:
    one that keeps its public key (and so its key id) reaches the engine with
    the holder's own data."""
    others = [m.blobs[k] for k in m.blobs if k.startswith(("pub_", "sk_", "tensor_"))]
    forged = hostile.mutate_blob(rng, m.blobs[f"pub_{holder}"], others,
                                 rng.choice(hostile.MUTATIONS), rng.random() < 0.8)
    if rng.random() < 0.3:
        return http("POST", "/contexts", forged, "application/octet-stream")
    h = {k: v for k, v in header.items() if k != "context_id"}
    body, ctype = _body(rng, h, forged, data)
    return http("POST", "/compute", body, ctype)


def _forged_data(rng, m, holder, header, pub, data) -> bytes:
    others = [m.blobs[k] for k in m.blobs if k.startswith(("tensor_", "data_"))]
    bad = hostile.mutate_blob(rng, data, others, rng.choice(hostile.MUTATIONS), rng.random() < 0.7)
    body, ctype = _body(rng, header, pub, bad)
    return http("POST", "/compute", body, ctype)


def _contexts_endpoint(rng, m, holder, header, pub, data) -> bytes:
    choice = rng.choice(("random", "empty", "tensor", "mutated", "json"))
    if choice == "random":
        blob = rng.randbytes(rng.randrange(1, 5000))
    elif choice == "empty":
        blob = b""
    elif choice == "tensor":
        blob = m.blobs[f"data_{holder}"]
    elif choice == "mutated":
        blob = hostile.mutate_blob(rng, m.blobs[f"pub_{holder}"], [], rng.choice(hostile.MUTATIONS), False)
    else:
        blob = json_body(header, pub, data)
    return http(rng.choice(("POST", "POST", "POST", "PUT", "GET")), "/contexts", blob,
                rng.choice(("application/octet-stream", "application/json", None)))


def _body_limit(rng, m, holder, header, pub, data):
    """A Content-Length over the body limit (only the first bytes are sent)."""
    n = rng.choice((2**30, 2**40, 10**18, 600 * 2**20))
    return Request(0, "", http("POST", rng.choice(("/compute", "/contexts")), b"x" * 1000,
                               "application/x-pycrcnn", length=n))


# ---------------------------------------------------------------------------
# sending


def send(host: str, port: int, raw: bytes, shutdown: bool = True, timeout: float = 60.0) -> Tuple[str, int, bytes]:
    """(outcome, status, first bytes of the answer) of one raw request."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return "no_response", 0, repr(exc).encode()
    chunks: List[bytes] = []
    try:
        try:
            sock.sendall(raw)
            if shutdown:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered (e.g. 413) and closed before reading everything
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return "hang", 0, b"".join(chunks)[:300]
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > 64 << 20:
                break
    finally:
        sock.close()
    answer = b"".join(chunks)
    if not answer.startswith(b"HTTP/"):
        return "no_response", 0, answer[:300]
    try:
        status = int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return "no_response", 0, answer[:300]
    if status >= 500:
        return "5xx", status, answer[:600]
    if status >= 400:
        return "clear", status, answer[:300]
    return "accepted", status, answer[:300]


@dataclass
class HttpResult:
    counts: Counter = field(default_factory=Counter)
    by_family: Dict[str, Counter] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    failures: List[Tuple[int, str, str, int, bytes]] = field(default_factory=list)
    seconds: float = 0.0

    BAD = ("5xx", "no_response", "hang")

    def bad(self) -> int:
        return sum(v for k, v in self.counts.items() if k in self.BAD)


def run_requests(material: HttpMaterial, url: str, seed: int, start: int, stop: int, clients: int = 2,
                 timeout: float = 60.0, progress=None) -> HttpResult:
    """Sends requests ``[start, stop)`` from ``clients`` threads."""
    import threading

    host, port = url.split("//", 1)[1].split(":")
    port = int(port)
    result = HttpResult()
    lock = threading.Lock()
    todo = iter(range(start, stop))
    t0 = time.perf_counter()

    def loop() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            req = make_request(material, seed, i)
            outcome, status, answer = send(host, port, req.raw, req.shutdown, timeout)
            with lock:
                result.counts[outcome] += 1
                result.by_family.setdefault(req.family, Counter())[outcome] += 1
                result.statuses[status] += 1
                if outcome in HttpResult.BAD:
                    result.failures.append((i, req.family, outcome, status, answer))
            if progress:
                progress(1)

    threads = [threading.Thread(target=loop) for _ in range(max(1, clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    return result


def slow_clients(url: str, n: int, io_timeout: float, probe_timeout: float = 120.0,
                 drop_within: Optional[float] = None) -> Dict[str, Any]:
    """``n`` connections that send part of a request and stall (half of them
    mid-headers, half mid-body), never closing: how long ``GET /`` then takes,
    and how many stalled connections the server dropped within
    ``drop_within`` seconds (default ``10 * io_timeout + 30``; the rest would
    hold a thread for good)."""
    host, port = url.split("//", 1)[1].split(":")
    socks = []
    for i in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /compute HTTP/1.1\r\nHo" if i % 2 else
                  b"POST /compute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"n")
        socks.append(s)
    t0 = time.perf_counter()
    answered = None
    try:
        probe = socket.create_connection((host, int(port)), timeout=probe_timeout)
        probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if probe.recv(12).startswith(b"HTTP/1.1 200"):
            answered = time.perf_counter() - t0
        probe.close()
    except OSError:
        pass
    dropped = 0
    deadline = t0 + (drop_within if drop_within is not None else 10 * io_timeout + 30)
    for s in socks:
        s.settimeout(max(0.1, deadline - time.perf_counter()))
        try:
            s.recv(4096)  # an error answer (400 for a body cut short) or EOF: dropped
            dropped += 1
        except socket.timeout:
            pass
        except OSError:
            dropped += 1
        s.close()
    return {"stalled": n, "probe_seconds": answered, "dropped": dropped,
            "all_dropped_seconds": time.perf_counter() - t0 if dropped == n else None}
