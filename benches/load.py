#!/usr/bin/env python3
"""Benchmark: concurrent clients, each with its own keys, against the gunicorn
server on 127.0.0.1, driven by locust (as a library: ``Environment`` +
``LocalRunner``).

``--users`` (default 16) locust users each make their own key (batch
encoding, m=2048: tiny_mlp's parameters), upload their public context once
(``POST /contexts``) and encrypt ``--images`` real test digits (their own
slice of MNIST) once; then, for ``--seconds`` (default 60), each sends its
request to ``POST /compute`` (binary frame, ``context_id``), retries 503
(busy) answers, decrypts the answer and checks it. When the time is up, every request in flight is finished
(``stop_timeout``), so no request is cut off. An answer is right when it
decrypts to exactly the logits the engine computes for the same ciphertexts
in this process (so to the model's classes at these scales).

Prints requests/s, latency percentiles of ``/compute`` answers and of whole
classifications (503 retries included), errors by status, the answers that
decrypted to the right classes, requests lost, the peak RSS of every server
worker and of the server in total (sampled every 0.5 s) against its cache
bounds, and writes ``benches/results/load.{json,md}``. Exits 1 if any answer
was wrong or any request was lost.

Usage::

    python benches/load.py                              # 16 users, 60 s
    python benches/load.py --users 3 --seconds 8        # what tests/test_robustness.py runs
"""
# locust first: importing it patches the standard library for gevent
from locust import User, constant, task  # noqa: I001
from locust.env import Environment

import argparse
import datetime
import json
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gevent
import numpy as np
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import live  # noqa: E402

NET = "tiny_mlp"


class Setup:
    """What the users share: the server's URL, their prepared requests, the tallies."""

    url = ""
    prepared: list = []
    answers = Counter()  # right / wrong answers
    images = Counter()  # right / wrong digits
    lost = 0
    busy = 0


class _Busy(Exception):
    pass


class _Failed(Exception):
    pass


class ClassifyUser(User):
    """One client: its own key; sends, retries 503, decrypts, checks."""

    wait_time = constant(0)

    def on_start(self) -> None:
        from pycrcnn.client import Client

        self.ctx, self.body, self.ctype, self.expected, self.float_classes = Setup.prepared.pop()
        self.session = requests.Session()
        t0 = time.perf_counter()
        _, sent = Client(Setup.url, session=self.session).upload_context(self.ctx)  # the id the body names
        self._fire("POST", "/contexts", t0, sent)

    def _fire(self, method: str, name: str, t0: float, length: int = 0, exc: Exception = None) -> None:
        self.environment.events.request.fire(request_type=method, name=name,
                                             response_time=(time.perf_counter() - t0) * 1000,
                                             response_length=length, exception=exc, context={})

    @task
    def classify(self) -> None:
        from pycrcnn import CipherTensor, protocol

        start = time.perf_counter()
        broken = 0
        while True:
            t0 = time.perf_counter()
            try:
                resp = self.session.post(Setup.url + "/compute", data=self.body,
                                         headers={"Content-Type": self.ctype, "Connection": "close"},
                                         timeout=600)  # as pycrcnn.client does: see Client._post
                content = resp.content
            except requests.RequestException as exc:
                self._fire("POST", "/compute", t0, exc=exc)
                broken += 1
                if broken <= 2:
                    continue
                Setup.lost += 1
                return
            if resp.status_code == 503:
                Setup.busy += 1
                self._fire("POST", "/compute (503 busy, retried)", t0, len(content), _Busy("503 busy"))
                gevent.sleep(random.uniform(0.05, 0.3))
                continue
            if resp.status_code != 200:
                self._fire("POST", "/compute", t0, len(content), _Failed(f"HTTP {resp.status_code}: {content[:200]!r}"))
                Setup.lost += 1
                return
            self._fire("POST", "/compute", t0, len(content))
            break
        _, data = protocol.decode_response(content)
        logits = self.ctx.decrypt(CipherTensor.from_bytes(data, self.ctx))
        right = logits.argmax(1) == self.expected.argmax(1)
        exact = np.array_equal(logits, self.expected)
        Setup.images.update({"right": int(right.sum()), "wrong": int((~right).sum()),
                             "same_as_float_model": int((logits.argmax(1) == self.float_classes).sum())})
        Setup.answers["right" if right.all() and exact else "wrong"] += 1
        self._fire("classify", "send + 503 retries + decrypt", start, len(content),
                   None if right.all() else _Failed("wrong class"))


def prepare(users: int, per_request: int) -> list:
    """Per user: its own key, the request of its own digits encrypted (binary
    frame naming its public context by id), the logits the engine computes
    for them here (the server's answer must decrypt to exactly these: the
    right classes of the model at these scales) and the float model's classes
    (the fixed point may flip a near tie: digit 66 of the test set has a float
    margin of 0.006)."""
    from pycrcnn import Context, datasets
    from pycrcnn.client import Client
    from pycrcnn.model import build_from_spec
    from pycrcnn.models import load_shipped_spec

    try:
        images, _ = datasets.load_mnist(split="test", limit=users * per_request)
    except FileNotFoundError:
        images, _ = datasets.sample_digits(users * per_request)
    x = datasets.normalize(images)
    spec = load_shipped_spec(NET)
    float_classes = spec.forward_numpy(x).argmax(1)
    out = []
    for u in range(users):
        ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
        ctx.keygen()
        part = slice(u * per_request, (u + 1) * per_request)
        client = Client("http://unused")
        enc = ctx.encrypt(x[part])
        body, ctype = client.build_request(ctx, enc, NET, context_id=client.context_id(ctx))
        expected = ctx.decrypt(build_from_spec(ctx, spec, rencrypt_positions=[])(enc))
        out.append((ctx, body, ctype, expected, float_classes[part]))
    return out


def _pct(entry, p: float) -> float:
    return float(entry.get_response_time_percentile(p)) if entry.num_requests else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--images", type=int, default=8, help="digits per request (one batch pass)")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes")
    ap.add_argument("--out", default=str(HERE / "results" / "load"), help="results path without suffix")
    args = ap.parse_args(argv)
    from pycrcnn.models import MODELS_DIR

    load_before = live.loadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    Setup.prepared = prepare(args.users, args.images)
    tmp = Path(tempfile.mkdtemp(prefix="pycrcnn-load-"))
    proc, url = live.start_server(MODELS_DIR, tmp / "server.log", "--workers", str(args.workers), "--threads", "1",
                                  "--quiet", "--context-dir", str(tmp / "contexts"))
    Setup.url = url
    try:
        live.wait_for_workers(proc.pid, args.workers)
        env = Environment(user_classes=[ClassifyUser], host=url, stop_timeout=600)
        runner = env.create_local_runner()
        with live.MemorySampler(proc.pid) as mem:
            t0 = time.perf_counter()
            runner.start(args.users, spawn_rate=args.users)
            gevent.spawn_later(args.seconds, runner.quit)
            runner.greenlet.join()
            window = time.perf_counter() - t0
        caches = {}
        for _ in range(4 * args.workers):
            s = requests.get(url + "/stats", timeout=30).json()
            caches[s["pid"]] = {"context_cache": s["context_cache"], "weight_cache": s["weight_cache"]}
        info = requests.get(url + "/", timeout=30).json()
    finally:
        live.stop_server(proc)

    stats = env.stats
    compute = stats.get("/compute", "POST")
    whole = stats.get("send + 503 retries + decrypt", "classify")
    busy = stats.get("/compute (503 busy, retried)", "POST")
    errors = Counter()
    for e in stats.errors.values():
        errors[f"{e.name}: {e.error}"] += e.occurrences
    workers = mem.workers_kb()
    done = Setup.answers["right"] + Setup.answers["wrong"]
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": live.machine(), "load_before": load_before,
        "load_after": live.loadavg(), "users": args.users, "seconds": window, "images_per_request": args.images,
        "server": f"gunicorn, {args.workers} workers x 1 engine thread, max 1 request computing per worker",
        "requests_per_s": done / window, "images_per_s": done * args.images / window,
        "compute_ms": {p: _pct(compute, p / 100) for p in (50, 90, 95, 99, 100)},
        "classify_ms": {p: _pct(whole, p / 100) for p in (50, 90, 95, 99, 100)},
        "answers": dict(Setup.answers), "images": dict(Setup.images), "lost": Setup.lost,
        "busy_503_retried": busy.num_requests, "errors": dict(errors),
        "worker_peak_rss_mib": [round(kb / 1024) for kb in workers.values()],
        "server_peak_total_rss_mib": round(mem.peak_total_kb / 1024),
        "caches_per_worker": caches, "max_request_bytes": info.get("max_request_bytes"),
        "bench_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    cc = next(iter(caches.values()))["context_cache"] if caches else {}
    wc = next(iter(caches.values()))["weight_cache"] if caches else {}
    lines = [
        f"load, {report['date']}, {report['machine']}, load average {load_before} before, {report['load_after']} after",
        f"{args.users} locust users (own keys, m=2048 batch, {args.images} digits per request) for {window:.0f} s "
        f"against {report['server']}",
        f"answers: {done:,} ({report['requests_per_s']:.2f} requests/s, {report['images_per_s']:.1f} digits/s); "
        f"right (exactly the logits the engine computes locally): {Setup.answers['right']:,} of {done:,} answers, "
        f"{Setup.images['right']:,} of {Setup.images['right'] + Setup.images['wrong']:,} digits "
        f"({Setup.images['same_as_float_model']:,} agree with the float model); lost: {Setup.lost}",
        "/compute answer latency ms (p50 p90 p95 p99 max): "
        + " ".join(f"{v:.0f}" for v in report["compute_ms"].values()),
        "whole classification incl. 503 retries and decrypt, ms (p50 p90 p95 p99 max): "
        + " ".join(f"{v:.0f}" for v in report["classify_ms"].values()),
        f"503 busy answers retried: {busy.num_requests:,}; errors by status: "
        + (", ".join(f"{k} x{v}" for k, v in errors.items()) or "none"),
        "peak RSS per worker: " + ", ".join(f"{v} MiB" for v in report["worker_peak_rss_mib"])
        + f"; master + workers together {report['server_peak_total_rss_mib']} MiB",
        f"caches per worker: contexts {cc.get('entries')} entries / {cc.get('bytes', 0) / 2**20:.0f} MiB of "
        f"{(cc.get('capacity_bytes') or 0) / 2**20:.0f} MiB; encoded models {wc.get('entries')} / "
        f"{wc.get('bytes', 0) / 2**20:.1f} MiB of {(wc.get('capacity_bytes') or 0) / 2**20:.0f} MiB",
    ]
    print("\n".join(lines), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    ok = Setup.lost == 0 and Setup.answers["wrong"] == 0 and done > 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
