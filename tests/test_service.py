"""The deployable service: gunicorn worker processes, public contexts uploaded
once (``POST /contexts``, ``context_id``), a worker killed mid-request, and the
bytes a rencryption round trip puts on the wire."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from pycrcnn import Context, datasets, protocol
from pycrcnn.client import Client, ServerError, ServerUnavailable
from pycrcnn.models import load_shipped_spec

from conftest import _start_server, _stop_server
from live import wait_for_workers, worker_pids


def cnn_context():
    """A key for tiny_cnn in one batch pass: its square needs m=4096 and two
    plaintext moduli; a request takes seconds on one engine thread."""
    ctx = Context(m=4096, encoding="batch", n_plaintext_moduli=2, scale_bits=6, weight_scale_bits=6)
    ctx.keygen()
    return ctx


def digits(n):
    try:
        return datasets.load_mnist(split="test", limit=n)
    except FileNotFoundError:
        return datasets.sample_digits(n)


def float_logits(name, images):
    """The shipped model's float forward pass (numpy, from its .npz): no torch."""
    return load_shipped_spec(name).forward_numpy(datasets.normalize(images))


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def computing_worker(workers, idle, thread, timeout=60.0):
    """The worker that burns CPU (> 0.3 s since ``idle``, its CPU seconds)
    while ``thread``'s request is in flight; None if the request ended first."""
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
        grown = {pid: cpu_seconds(pid) - idle[pid] for pid in workers}
        pid, seconds = max(grown.items(), key=lambda kv: kv[1])
        if seconds > 0.3:
            return pid
    return None


@pytest.fixture(scope="module")
def gunicorn_server(server_models_dir, tmp_path_factory):
    """``python -m pycrcnn.server --workers 2 --threads 1``: (process, url, context dir)."""
    tmp = tmp_path_factory.mktemp("service")
    proc, url = _start_server(server_models_dir, tmp / "server.log", "--workers", "2", "--threads", "1",
                              "--quiet", "--context-dir", str(tmp / "contexts"))
    try:
        yield proc, url, tmp / "contexts"
    finally:
        _stop_server(proc)


# ---------------------------------------------------------------------------
# worker processes


def test_two_worker_processes_serve_concurrent_clients(gunicorn_server):
    """2 gunicorn workers, 6 clients at once, each with its own keys: tiny_mlp
    (batch encoding, m=2048) and tiny_cnn (its square needs m=4096 and two
    plaintext moduli): every answer is correct, and both worker processes
    answer."""
    proc, url, _ = gunicorn_server
    workers = wait_for_workers(proc.pid, 2)
    images, _ = digits(4)
    refs = {name: float_logits(name, images).argmax(1) for name in ("tiny_mlp", "tiny_cnn")}
    n = 6
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def run(i):
        net = "tiny_cnn" if i % 3 == 0 else "tiny_mlp"
        try:
            if net == "tiny_cnn":
                ctx = cnn_context()
            else:
                ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
                ctx.keygen()
            client = Client(url, busy_timeout=240)
            barrier.wait(timeout=60)
            logits, report = client.classify(ctx, images, net, rencrypt_positions=[])
            results[i] = (net, logits.argmax(1), report)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for net, pred, report in results:
        np.testing.assert_array_equal(pred, refs[net], err_msg=net)
        assert report["context_upload_bytes"] > 0  # each client's own keys, uploaded once
    computed_by = {r["requests"][0]["worker_pid"] for _, _, r in results}
    assert computed_by <= set(workers), (computed_by, workers)
    answered_by = set()
    for _ in range(200):  # new connections: the workers race to accept them
        answered_by.add(requests.get(url + "/stats", timeout=10).json()["pid"])
        if len(answered_by) == 2:
            break
    assert answered_by == set(workers), (answered_by, workers)
    busy = sum(r["requests"][0]["busy_retries"] for _, _, r in results)
    print(f"\n{n} clients on 2 workers: busy retries {busy}")


def test_saturated_worker_answers_503_at_once(server_models_dir, tmp_path):
    """One worker computing its one request: another request gets 503 with
    Retry-After at once, not after the first one ends."""
    proc, url = _start_server(server_models_dir, tmp_path / "server.log", "--workers", "1", "--threads", "1",
                              "--quiet", "--context-dir", str(tmp_path / "contexts"))
    try:
        images, _ = digits(4)
        ctx = cnn_context()
        slow = Client(url)
        slow.upload_context(ctx)
        x = ctx.encrypt(datasets.normalize(images))
        body, ctype = Client(url).build_request(ctx, x, "tiny_cnn", context_id=slow.context_id(ctx))
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", slow.compute(ctx, x, "tiny_cnn")))
        t.start()
        deadline = time.monotonic() + 120
        while requests.get(url + "/stats", timeout=10).json()["computing"] == 0:
            assert time.monotonic() < deadline and t.is_alive(), "the first request never started computing"
            time.sleep(0.02)
        t0 = time.monotonic()
        resp = requests.post(url + "/compute", data=body, headers={"Content-Type": ctype}, timeout=60)
        waited = time.monotonic() - t0
        t.join(timeout=300)
        assert "r" in done
        assert resp.status_code == 503 and resp.headers["Retry-After"], resp.text[:300]
        assert "busy" in resp.json()["error"]
        assert waited < 0.5 * done["r"][1]["request_seconds"] + 1.0, (waited, done["r"][1]["request_seconds"])
    finally:
        _stop_server(proc)


def test_worker_killed_mid_request(gunicorn_server):
    """SIGKILL to the workers while a request computes: the master replaces
    them; a client that does not retry gets a retryable error (never a wrong
    answer), one that retries gets the correct answer."""
    proc, url, _ = gunicorn_server
    before = wait_for_workers(proc.pid, 2)
    images, _ = digits(4)
    ref = float_logits("tiny_cnn", images).argmax(1)
    ctx = cnn_context()
    x = ctx.encrypt(datasets.normalize(images))
    once = Client(url, retries=0)
    once.upload_context(ctx)
    outcome = {}

    def run():
        try:
            out, _ = once.compute(ctx, x, "tiny_cnn")
            outcome["answer"] = ctx.decrypt(out)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    idle = {pid: cpu_seconds(pid) for pid in before}
    t = threading.Thread(target=run)
    t.start()
    busy = computing_worker(before, idle, t)
    if busy is not None:
        os.kill(busy, signal.SIGKILL)
    t.join(timeout=300)
    assert outcome, "the client never returned"
    if "answer" in outcome:
        np.testing.assert_array_equal(outcome["answer"].argmax(1), ref)
        print("\nthe request ended before the kill: a correct answer")
    else:
        err = outcome["error"]
        assert isinstance(err, (ServerUnavailable, ServerError)) and err.retryable, repr(err)
        print(f"\nkilled mid-request: {type(err).__name__}: {err}")
    if busy is not None:
        after = wait_for_workers(proc.pid, 2, exclude=[busy])
        assert busy not in after
    # the same request, with the client's default retry: correct
    out, report = Client(url).compute(ctx, x, "tiny_cnn")
    np.testing.assert_array_equal(ctx.decrypt(out).argmax(1), ref)


def test_graceful_restart_finishes_the_request(gunicorn_server):
    """SIGHUP to the master while a worker computes: new workers start, the
    old one finishes its request, and the client gets the correct answer."""
    proc, url, _ = gunicorn_server
    before = wait_for_workers(proc.pid, 2)
    images, _ = digits(4)
    ctx = cnn_context()
    x = ctx.encrypt(datasets.normalize(images))
    client = Client(url, retries=0)
    client.upload_context(ctx)
    outcome = {}
    idle = {pid: cpu_seconds(pid) for pid in before}
    t = threading.Thread(target=lambda: outcome.setdefault("r", client.compute(ctx, x, "tiny_cnn")))
    t.start()
    busy = computing_worker(before, idle, t)
    os.kill(proc.pid, signal.SIGHUP)
    t.join(timeout=300)
    out, report = outcome["r"]  # no error: the old worker finished its request
    np.testing.assert_array_equal(ctx.decrypt(out).argmax(1), float_logits("tiny_cnn", images).argmax(1))
    assert busy is None or report["worker_pid"] == busy
    after = wait_for_workers(proc.pid, 2, exclude=before)
    assert not set(after) & set(before)


# ---------------------------------------------------------------------------
# keys once per session


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that records every byte a client sends upstream."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.sent = bytearray()
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(conn, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, conn, False), daemon=True).start()

    def _pipe(self, src, dst, record):
        try:
            while True:
                chunk = src.recv(1 << 16)
                if not chunk:
                    break
                if record:
                    with self._lock:
                        self.sent += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._stop = True
        self.listener.close()


def test_rencryption_round_trip_sends_the_context_once(server):
    """A two-segment run (tiny_mlp, rencrypted before its Linear layer) through
    a byte-counting proxy: the public context crosses the wire once, the
    second segment sends ciphertexts only, and the client's report adds up."""
    port = int(server.rsplit(":", 1)[1])
    proxy = CountingProxy(port)
    try:
        images, _ = digits(4)
        ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
        ctx.keygen()
        pub = bytes(ctx.public_context())
        client = Client(f"http://127.0.0.1:{proxy.port}")
        logits, report = client.classify(ctx, images, "tiny_mlp", rencrypt_positions=[2])
    finally:
        proxy.close()
    np.testing.assert_array_equal(logits.argmax(1), float_logits("tiny_mlp", images).argmax(1))
    assert report["segments"] == [(0, 2), (2, 3)] and report["round_trips"] == 2
    wire = bytes(proxy.sent)
    probe = pub[len(pub) // 2: len(pub) // 2 + 4096]  # key material: no ciphertext holds it
    assert wire.count(probe) == 1
    first, second = report["requests"]
    assert first["context_upload_bytes"] == len(pub) and second["context_upload_bytes"] == 0
    assert report["context_upload_bytes"] == len(pub)
    # every body byte counted by the client crossed the wire, plus HTTP headers only
    http_overhead = len(wire) - report["upload_bytes"]
    assert 0 < http_overhead < 4096, (len(wire), report["upload_bytes"])
    print(f"\ntwo segments: public context {len(pub)} B once; requests {first['upload_bytes'] - len(pub)} B and "
          f"{second['upload_bytes']} B; on the wire {len(wire)} B in all (HTTP headers {http_overhead} B)")


def test_unknown_context_id_is_404_and_the_client_uploads_again(server):
    ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
    ctx.keygen()
    images, _ = digits(2)
    x = ctx.encrypt(datasets.normalize(images))
    client = Client(server)
    cid = client.context_id(ctx)
    body, ctype = client.build_request(ctx, x, "tiny_mlp", context_id=cid)
    resp = requests.post(server + "/compute", data=body, headers={"Content-Type": ctype}, timeout=60)
    assert resp.status_code == 404 and resp.json()["context_id"] == cid
    assert "POST /contexts" in resp.json()["error"]
    client._uploaded.add(cid)  # the client believes the server has it (as after a server restart)
    out, report = client.compute(ctx, x, "tiny_mlp")
    assert report["context_upload_bytes"] == len(ctx.public_context())
    np.testing.assert_array_equal(ctx.decrypt(out).argmax(1), float_logits("tiny_mlp", images).argmax(1))
    # JSON form: context_id instead of public_context
    body, ctype = client.build_request(ctx, x, "tiny_mlp", binary=False, context_id=cid)
    resp = requests.post(server + "/compute", data=body, headers={"Content-Type": ctype}, timeout=60)
    assert resp.status_code == 200, resp.text[:300]


def test_context_store_is_bounded_and_validates(server_models_dir, tmp_path):
    """In process: the store holds what fits its bound (least recently used go
    first); a bad blob, a secret key or a bad id is a 400."""
    from pycrcnn.server import create_app

    ctxs = []
    for _ in range(3):
        c = Context(m=1024, encoding="batch", scale_bits=4, weight_scale_bits=4)
        c.keygen()
        ctxs.append(c)
    size = len(ctxs[0].public_context())
    app = create_app(server_models_dir, context_dir=tmp_path / "ctx", context_store_mb=2.5 * size / (1 << 20))
    ids = []
    with app.test_client() as tc:
        for c in ctxs:
            resp = tc.post("/contexts", data=bytes(c.public_context()), content_type="application/octet-stream")
            assert resp.status_code == 201, resp.data[:300]
            ids.append(resp.get_json()["context_id"])
            time.sleep(0.01)  # distinct modification times
        assert ids == [Client("http://unused").context_id(c) for c in ctxs]
        stats = tc.get("/stats").get_json()["context_store"]
        assert stats["entries"] == 2 and stats["bytes"] <= stats["capacity_bytes"]
        store = app.extensions["pycrcnn"].store
        assert store.get(ids[0]) is None and store.get(ids[2]) is not None
        assert tc.post("/contexts", data=b"garbage", content_type="application/octet-stream").status_code == 400
        resp = tc.post("/contexts", data=bytes(ctxs[0].secret_key_bytes()), content_type="application/octet-stream")
        assert resp.status_code == 400
        x = ctxs[0].encrypt(np.zeros((1, 1, 28, 28)))
        for bad in ("../../etc/passwd", "ab" * 40, 7):
            body = protocol.encode_request({"net": "tiny_mlp", "context_id": bad}, b"", x.to_bytes())
            resp = tc.post("/compute", data=body, content_type=protocol.BINARY_CONTENT_TYPE)
            assert resp.status_code == 400 and "context_id" in resp.get_json()["error"], resp.data[:300]
        body = protocol.encode_request({"net": "tiny_mlp", "context_id": ids[0]},
                                       bytes(ctxs[0].public_context()), x.to_bytes())
        resp = tc.post("/compute", data=body, content_type=protocol.BINARY_CONTENT_TYPE)
        assert resp.status_code == 400 and "not both" in resp.get_json()["error"]


def test_plain_gunicorn_serves_create_app(server_models_dir, tmp_path):
    """``gunicorn 'pycrcnn.server:create_app()'`` as the README shows it, with
    the models and the context store from the environment."""
    import re
    import select
    import subprocess
    import sys

    import gunicorn

    env = dict(os.environ, PYCRCNN_MODELS=str(server_models_dir), PYCRCNN_CONTEXT_DIR=str(tmp_path / "ctx"))
    # gunicorn >= 25 opens a control socket at one path per user, which another server may hold
    no_control = ["--no-control-socket"] if gunicorn.version_info >= (25,) else []
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "2",
                             *no_control, "-b", "127.0.0.1:0", "pycrcnn.server:create_app()"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:
        log, url = b"", None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 0.5)[0]:
                log += os.read(proc.stderr.fileno(), 4096)
                match = re.search(rb"Listening at: (http://127\.0\.0\.1:\d+)", log)
                url = match.group(1).decode() if match else None
        assert url, log.decode(errors="replace")
        client = Client(url)
        while True:
            try:
                client.info()
                break
            except ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        images, _ = digits(4)
        ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
        ctx.keygen()
        logits, report = client.classify(ctx, images, "tiny_mlp")
        np.testing.assert_array_equal(logits.argmax(1), float_logits("tiny_mlp", images).argmax(1))
        assert len(list((tmp_path / "ctx").glob("*.ctx"))) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
