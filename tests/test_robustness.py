"""Hostile input, a fast slice of ``benches/robustness.py`` (same generators:
``benches/hostile.py``, ``benches/hostile_http.py``), and regression tests for
what the full runs found: the ``.npz`` loader's damaged zips, huge declared
arrays and malformed descriptions; JSON nested too deep and malformed chunked
bodies answered 500; caches bounded in entries only."""
from __future__ import annotations

import io
import json
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pycrcnn import Context, FormatError
from pycrcnn.models import MODELS_DIR, shipped_model_path
from pycrcnn.spec import load_model_spec

BENCHES = Path(__file__).resolve().parents[1] / "benches"
sys.path.insert(0, str(BENCHES))

import hostile  # noqa: E402
import isolated  # noqa: E402
import hostile_http  # noqa: E402
import live  # noqa: E402

SEED = 2026


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    folder = hostile.make_material(tmp_path_factory.mktemp("hostile") / "material")
    return folder, hostile.Material.load(folder)


# ---------------------------------------------------------------------------
# regressions: the .npz model loader


def _members():
    with zipfile.ZipFile(shipped_model_path("tiny_cnn").with_suffix(".npz")) as z:
        return {name: z.read(name) for name in z.namelist()}


def _spec_doc(members):
    return json.loads(np.load(io.BytesIO(members["__spec__.npy"]), allow_pickle=False)[()])


def _with_doc(members, doc):
    out = dict(members)
    out["__spec__.npy"] = hostile._npy(np.array(json.dumps(doc) if not isinstance(doc, str) else doc))
    return out


def _load(tmp_path, data):
    path = tmp_path / "model.npz"
    path.write_bytes(data if isinstance(data, bytes) else hostile._zip(data))
    return load_model_spec(path)


def _bad_npz_files():
    """Each one raised something other than a clear FormatError before the fix."""
    m = _members()
    good = shipped_model_path("tiny_cnn").with_suffix(".npz").read_bytes()
    cases = {
        "damaged zip (BadZipFile)": good[:200] + b"\0" * 100 + good[300:],
        "truncated zip (BadZipFile)": good[: len(good) // 2],
    }
    huge = "{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }".ljust(118) + "\n"
    cases["npy header declaring 8 TiB (MemoryError)"] = dict(
        m, **{"layer0_weight.npy": b"\x93NUMPY\x01\x00" + struct.pack("<H", len(huge)) + huge.encode() + b"\0" * 64})
    bad_header = bytearray(m["layer0_weight.npy"])
    bad_header[20:24] = b"(((("
    cases["npy header that is not a literal (TokenError / SyntaxError)"] = dict(m, **{"layer0_weight.npy": bytes(bad_header)})
    cases["__spec__ nested 100,000 deep (RecursionError)"] = _with_doc(m, "[" * 100000)
    doc = _spec_doc(m)
    doc["layers"][0] = 12
    cases["a layer that is not an object (AttributeError)"] = _with_doc(m, doc)
    doc = _spec_doc(m)
    doc["layers"][0]["params"]["groups"] = 0
    cases["groups=0 (ZeroDivisionError)"] = _with_doc(m, doc)
    doc = _spec_doc(m)
    doc["layers"][0]["params"]["in_channels"] = "1"
    cases["a string channel count (TypeError)"] = _with_doc(m, doc)
    doc = _spec_doc(m)
    doc["input_shape"] = [1, "x", None]
    cases["input_shape of strings (ValueError outside the checks)"] = _with_doc(m, doc)
    doc = _spec_doc(m)
    doc["rencrypt_positions"] = [{"a": 1}]
    cases["rencrypt_positions of objects (TypeError)"] = _with_doc(m, doc)
    weights = np.load(io.BytesIO(m["layer0_weight.npy"]))
    weights.reshape(-1)[0] = np.nan
    cases["NaN weights (accepted silently)"] = dict(m, **{"layer0_weight.npy": hostile._npy(weights)})
    cases["string weights"] = dict(m, **{"layer0_weight.npy": hostile._npy(weights.astype("U3"))})
    return cases


@pytest.mark.parametrize("name", list(_bad_npz_files()))
def test_npz_loader_refuses_damaged_models_clearly(tmp_path, name):
    with pytest.raises(FormatError):
        _load(tmp_path, _bad_npz_files()[name])


def test_npz_loader_still_reads_every_shipped_model(tmp_path):
    for path in sorted(MODELS_DIR.glob("*.npz")):
        spec = load_model_spec(path)
        assert spec.layers and spec.output_shape(spec.input_shape)


# ---------------------------------------------------------------------------
# regressions: the server (Flask test client and the real gunicorn below)


def test_deep_json_and_unreadable_bodies_are_400(tmp_path):
    from pycrcnn.server import create_app

    app = create_app(MODELS_DIR, context_dir=tmp_path / "contexts")
    with app.test_client() as tc:
        for body, ctype in ((b"[" * 100000, "application/json"), (b'{"a":' * 50000, "application/json"),
                            (b"PCRQ" + struct.pack(">I", 100000) + b"[" * 100000 + b"\0" * 16, "application/x-pycrcnn")):
            resp = tc.post("/compute", data=body, content_type=ctype)
            assert resp.status_code == 400, resp.data[:300]
            assert "JSON" in resp.get_json()["error"]


def test_context_cache_is_bounded_in_bytes(tmp_path):
    """A parsed m=2048 public context holds ~5 MB (fhe.rs's multiplication
    tables): a 12 MB cache keeps two of four, whatever its entry count."""
    from pycrcnn.registry import heap_bytes
    from pycrcnn.server import create_app

    app = create_app(MODELS_DIR, context_dir=tmp_path / "contexts", context_cache_size=16, context_cache_mb=12)
    with app.test_client() as tc:
        for _ in range(4):
            ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
            ctx.keygen()
            assert tc.post("/contexts", data=bytes(ctx.public_context())).status_code == 201
        cache = tc.get("/stats").get_json()["context_cache"]
    assert cache["capacity_bytes"] == 12 << 20
    assert 0 < cache["bytes"] <= 12 << 20 and cache["entries"] <= 2, cache
    if heap_bytes() is not None:  # measured, not estimated: ~5 MB each
        assert cache["bytes"] / cache["entries"] > 3 << 20, cache


def test_a_context_larger_than_the_cache_is_kept_alone():
    """Regression (latency bench, two-square LeNet-1 packed): a parsed context
    larger than the whole byte bound (~1.7 GB against 512 MB) was never
    cached, so every request of that client parsed it again (1.1 s) and bound
    the plan's masks again (3 s). It is kept alone now, until the next put."""
    from pycrcnn.registry import LRU

    cache = LRU(8, max_bytes=100)
    cache.put("small", 1, 40)
    cache.put("huge", 2, 1000)
    assert cache.get("huge") == 2 and cache.get("small") is None and cache.bytes == 1000
    cache.put("other", 3, 40)
    assert cache.get("huge") is None and cache.get("other") == 3 and cache.bytes == 40


# ---------------------------------------------------------------------------
# the fast slice: a few thousand blobs, a few hundred malformed requests


def test_hostile_blobs_fast_slice(material):
    folder, m = material
    n = 3000
    result = isolated.run_cases(folder, SEED, 0, n, workers=2, describe=lambda i: hostile.make_case(m, SEED, i))
    assert sum(result.counts.values()) == n
    assert result.bad() == 0, result.failures[:10]
    forged = result.by_forged[True]
    assert sum(forged.values()) == n // 2
    # forged blobs get past the checksum: some load, the rest are refused by the parsers
    assert forged["accepted"] > 0 and forged["clear"] > 0
    assert set(result.by_loader) == set(hostile.LOADERS)
    assert result.worker_rss_kb and max(p for _, _, p in result.worker_rss_kb) < 1 << 20  # KiB: under 1 GiB


def test_the_runner_counts_crashes_and_hangs(material, monkeypatch):
    """A loader that aborts the process or never returns is counted, and the run goes on."""
    folder, m = material
    monkeypatch.setenv("HOSTILE_SELFTEST_ABORT", "3")
    monkeypatch.setenv("HOSTILE_SELFTEST_HANG", "7")
    result = isolated.run_cases(folder, SEED, 0, 10, workers=1, time_limit=3,
                               describe=lambda i: hostile.make_case(m, SEED, i))
    assert result.counts["crash"] == 1 and result.counts["hang"] == 1
    assert sum(result.counts.values()) == 10
    assert sorted(f[0] for f in result.failures) == [3, 7]


@pytest.fixture(scope="module")
def robust_server(tmp_path_factory):
    """gunicorn, 2 workers never recycled (a worker that dies shows)."""
    tmp = tmp_path_factory.mktemp("robust_server")
    proc, url = live.start_server(MODELS_DIR, tmp / "server.log", "--workers", "2", "--threads", "1",
                                  "--max-concurrent", "2", "--max-requests", "0", "--max-request-mb", "64",
                                  "--quiet", "--context-dir", str(tmp / "contexts"))
    try:
        yield proc, url
    finally:
        live.stop_server(proc)


def test_malformed_requests_fast_slice(material, robust_server):
    folder, m = material
    proc, url = robust_server
    workers = live.wait_for_workers(proc.pid, 2)
    hm = hostile_http.HttpMaterial.from_material(m)
    hm.upload(url)
    result = hostile_http.run_requests(hm, url, SEED, 0, 400, clients=2, timeout=60)
    assert result.bad() == 0, [f[:4] + (f[4][:200],) for f in result.failures[:10]]
    assert result.counts["clear"] > 250
    assert live.worker_pids(proc.pid) == workers  # no worker died
    # the regressions, against the real server: a malformed chunked body, JSON nested too deep
    host, port = url.split("//")[1].split(":")
    for raw in (hostile_http.http("POST", "/compute", b"zz\r\nabc\r\n0\r\n\r\n", headers=[("Transfer-Encoding", "chunked")],
                                  length=None),
                hostile_http.http("POST", "/compute", b"[" * 100000)):
        outcome, status, answer = hostile_http.send(host, int(port), raw)
        assert status == 400, answer
    # and it still answers a real request correctly
    from robustness import real_request

    predicted, expected = real_request(m, url)
    np.testing.assert_array_equal(predicted, expected)


def test_stalled_connections_are_dropped(tmp_path):
    """Found while measuring: a connection that sends part of a request and
    stalls (a client stopped or dead mid-upload) held a worker thread for
    good; 16 of them made a 2-worker server answer nothing. With --io-timeout
    they are dropped, and the server answers meanwhile."""
    proc, url = live.start_server(MODELS_DIR, tmp_path / "server.log", "--workers", "2", "--threads", "1",
                                  "--quiet", "--io-timeout", "1", "--context-dir", str(tmp_path / "contexts"))
    try:
        slow = hostile_http.slow_clients(url, 16, io_timeout=1, probe_timeout=60, drop_within=60)
    finally:
        live.stop_server(proc)
    assert slow["dropped"] == slow["stalled"], slow
    assert slow["probe_seconds"] is not None, slow  # with --io-timeout 0 (as before): never, nothing dropped


# ---------------------------------------------------------------------------
# concurrent clients: a fast slice of benches/load.py, and the regression it found


def test_a_busy_answer_is_retried_on_a_new_connection():
    """Found by benches/load.py: over a kept-alive connection a client retrying
    503 asked the same (busy) gunicorn worker again and again while the other
    idled (one worker served every request). The client now closes the
    connection after each POST, so a retry may reach any worker."""
    import http.server
    import threading

    from pycrcnn.client import Client

    peers = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            peers.append(self.client_address[1])
            body = b'{"error": "busy", "status": 503}' if len(peers) < 3 else b'{"ok": 1}'
            self.send_response(503 if len(peers) < 3 else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_address[1]}", busy_timeout=30)
        resp, _, busy, _, _ = client._post("/compute", b"x" * 100, "application/x-pycrcnn")
    finally:
        server.shutdown()
    assert resp.status_code == 200 and busy == 2
    assert len(set(peers)) == 3, peers  # three connections, not one kept alive


def test_concurrent_clients_with_their_own_keys(tmp_path):
    """benches/load.py with 3 locust users for 6 s (in its own process: locust
    patches the standard library for gevent): every answer decrypts to the
    float model's classes, no request is lost, both workers answer."""
    import subprocess

    out = tmp_path / "load"
    proc = subprocess.run([sys.executable, str(BENCHES / "load.py"), "--users", "3", "--seconds", "6",
                           "--images", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["lost"] == 0 and report["answers"].get("wrong", 0) == 0
    assert report["answers"]["right"] >= 3
    assert len(report["worker_peak_rss_mib"]) == 2 and all(v > 0 for v in report["worker_peak_rss_mib"])
