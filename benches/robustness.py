#!/usr/bin/env python3
"""Benchmark: how far the loaders and the server hold against hostile input.

1. ``--blobs`` (default 100,000) corrupted blobs through every loader
   (``Context.from_public``, ``Context.from_secret_bytes`` /
   ``load_secret_key``, ``CipherTensor.from_bytes`` with a client's and a
   server's context, ``PyCtxt.from_bytes``, the ``.npz`` model loader): bit
   flips, byte damage, lying integers, truncations, extensions, splices,
   deletions, duplications, random bytes, blobs of other kinds, keys and
   parameters, damaged headers; half of them forged (a valid length and
   SHA-256 recomputed over the corrupted payload, a valid zip around a
   corrupted model), so fhe.rs's parsers and the model validation are
   reached. Each runs in an isolated worker process (``benches/hostile.py``):
   a crash is counted, not fatal; a blob taking longer than ``--time-limit``
   seconds is a hang.
2. ``--requests`` (default 10,000) malformed HTTP requests
   (``benches/hostile_http.py``) against ``python -m pycrcnn.server``
   (gunicorn, 2 workers, never recycled so that a dead worker shows) on
   127.0.0.1; the workers' RSS is sampled throughout; then 40 connections
   that stall mid-request must be dropped after ``--io-timeout`` while the
   server answers; then a real request (tiny_mlp on real digits) must still
   decrypt to the right classes.

Prints counts by outcome (clear error, accepted, crash, hang, 5xx) per loader
and per request family, the peak RSS of the bench, of its loader workers and
of the server's workers, and writes ``benches/results/robustness.{json,md}``.
Exits 1 if anything crashed, hung or answered 5xx.

Usage::

    python benches/robustness.py                        # the full run (minutes)
    python benches/robustness.py --blobs 5000 --requests 500
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hostile  # noqa: E402
import isolated  # noqa: E402
import hostile_http  # noqa: E402
import live  # noqa: E402

OUTCOMES = ("clear", "accepted", "panic", "unexpected", "crash", "hang")
HTTP_OUTCOMES = ("clear", "accepted", "5xx", "no_response", "hang")
#: the server's --io-timeout in this bench (default 30 s): stalled connections are dropped after it
IO_TIMEOUT = 5


def _table(rows, cols, title):
    lines = [f"| {title} | " + " | ".join(cols) + " | total |", "|---" * (len(cols) + 2) + "|"]
    for name, counts in rows:
        agg = Counter()
        for k, v in counts.items():
            agg[next((c for c in cols if k == c or k.startswith(c + ":")), k)] += v
        lines.append(f"| {name} | " + " | ".join(f"{agg.get(c, 0):,}" for c in cols) + f" | {sum(agg.values()):,} |")
    return lines


def real_request(material: hostile.Material, url: str, n: int = 8):
    """tiny_mlp on ``n`` real digits through the client: (predicted, float reference)."""
    from pycrcnn import datasets
    from pycrcnn.client import Client
    from pycrcnn.models import load_shipped_spec

    try:
        images, _ = datasets.load_mnist(split="test", limit=n)
    except FileNotFoundError:
        images, _ = datasets.sample_digits(n)
    ctx = material.clients["batch"]
    out, _ = Client(url, busy_timeout=120).compute(ctx, ctx.encrypt(datasets.normalize(images)), "tiny_mlp")
    return ctx.decrypt(out).argmax(1), load_shipped_spec("tiny_mlp").forward_numpy(datasets.normalize(images)).argmax(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blobs", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    ap.add_argument("--clients", type=int, default=2, help="HTTP client threads (default 2)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds per blob / request before a hang")
    ap.add_argument("--out", default=str(HERE / "results" / "robustness"), help="results path without suffix")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    from pycrcnn.models import MODELS_DIR

    load_before = live.loadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="pycrcnn-robustness-"))
    folder = hostile.make_material(tmp / "material")
    material = hostile.Material.load(folder)
    report = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": live.machine(), "seed": args.seed,
              "load_before": load_before}
    lines = [f"robustness, {report['date']}, {report['machine']}, load average before {load_before}", ""]

    # -- 1. blobs -------------------------------------------------------------------
    with tqdm(total=args.blobs, desc="blobs", unit="blob", mininterval=2) as bar:
        blobs = isolated.run_cases(folder, args.seed, 0, args.blobs, workers=args.workers, time_limit=args.time_limit,
                                  progress=bar.update, describe=lambda i: hostile.make_case(material, args.seed, i))
    child_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rss = sorted(blobs.worker_rss_kb)
    lines += [f"## {blobs.n:,} hostile blobs in {blobs.seconds:.0f} s ({blobs.n / blobs.seconds:,.0f}/s, "
              f"{args.workers} isolated worker processes, {args.time_limit:g} s limit per blob)", ""]
    lines += _table(sorted(blobs.by_loader.items()), OUTCOMES, "loader")
    lines += [""] + _table([("forged (valid checksum)", blobs.by_forged.get(True, Counter())),
                            ("plain corruption", blobs.by_forged.get(False, Counter())),
                            ("all", blobs.counts)], OUTCOMES, "blobs")
    lines += ["", f"loader workers: RSS {rss[0][1] / 1024:.0f} MiB after the first {rss[0][0]:,} blobs, "
                  f"{rss[-1][1] / 1024:.0f} MiB after {rss[-1][0]:,}; peak {max(p for _, _, p in rss) / 1024:.0f} MiB "
                  f"(largest child by getrusage: {child_peak_kb / 1024:.0f} MiB)" if rss else ""]
    for f in blobs.failures[:20]:
        lines.append(f"FAILURE blob {f[0]}: {f[1]} in {f[2]} ({f[3]}, forged={f[4]})")
    report["blobs"] = {"n": blobs.n, "seconds": blobs.seconds, "counts": dict(blobs.counts),
                       "by_loader": {k: dict(v) for k, v in blobs.by_loader.items()},
                       "forged": dict(blobs.by_forged.get(True, Counter())),
                       "worker_rss_kb": rss, "failures": [list(map(str, f)) for f in blobs.failures[:100]]}
    print("\n".join(lines), flush=True)

    # -- 2. requests ------------------------------------------------------------------
    log = tmp / "server.log"
    proc, url = live.start_server(MODELS_DIR, log, "--workers", "2", "--threads", "1", "--max-concurrent",
                                  str(args.clients), "--max-requests", "0", "--max-request-mb", "64", "--quiet",
                                  "--io-timeout", str(IO_TIMEOUT),
                                  "--context-dir", str(tmp / "contexts"))
    http_lines = []
    try:
        workers = live.wait_for_workers(proc.pid, 2)
        hm = hostile_http.HttpMaterial.from_material(material)
        hm.upload(url)
        with live.MemorySampler(proc.pid) as mem, tqdm(total=args.requests, desc="requests", mininterval=2) as bar:
            http = hostile_http.run_requests(hm, url, args.seed, 0, args.requests, clients=args.clients,
                                             timeout=args.time_limit, progress=bar.update)
            slow = hostile_http.slow_clients(url, 40, IO_TIMEOUT)
        after = live.worker_pids(proc.pid)
        dead = sorted(set(workers) - set(after))
        predicted, expected = real_request(material, url)
        real_ok = bool((predicted == expected).all())
        import requests

        stats = [requests.get(url + "/stats", timeout=10).json() for _ in range(4)]
    finally:
        live.stop_server(proc)
    wk = mem.workers_kb()
    http_lines += [f"## {args.requests:,} malformed requests in {http.seconds:.0f} s "
                   f"({args.requests / http.seconds:,.0f}/s, {args.clients} clients) against gunicorn "
                   "(2 workers, 1 engine thread each, never recycled)", ""]
    http_lines += _table(sorted(http.by_family.items()) + [("all", http.counts)], HTTP_OUTCOMES, "family")
    http_lines += ["", "statuses: " + ", ".join(f"{s}: {n:,}" for s, n in sorted(http.statuses.items())),
                   f"then {slow['stalled']} stalled connections (half mid-headers, half mid-body; --io-timeout "
                   f"{IO_TIMEOUT}): GET / answered after "
                   + (f"{slow['probe_seconds']:.1f} s" if slow["probe_seconds"] is not None else "NEVER")
                   + f"; {slow['dropped']} of {slow['stalled']} dropped by the server",
                   f"worker processes that died: {len(dead)} {dead if dead else ''}",
                   "server workers' peak RSS: " + ", ".join(f"{kb / 1024:.0f} MiB" for kb in wk.values())
                   + f"; peak of master + workers together {mem.peak_total_kb / 1024:.0f} MiB",
                   f"then a real request (tiny_mlp, 8 real digits): {'correct' if real_ok else 'WRONG'} "
                   f"({list(predicted)} vs the float model's {list(expected)})"]
    for f in http.failures[:20]:
        http_lines.append(f"FAILURE request {f[0]} ({f[1]}): {f[2]} {f[3]} {f[4][:200]!r}")
    bench_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    http_lines += ["", f"bench process peak RSS {bench_peak_kb / 1024:.0f} MiB; load average after {live.loadavg()}"]
    print("\n".join(http_lines), flush=True)
    report["requests"] = {"n": args.requests, "seconds": http.seconds, "counts": dict(http.counts),
                          "by_family": {k: dict(v) for k, v in http.by_family.items()},
                          "statuses": {str(k): v for k, v in http.statuses.items()}, "dead_workers": dead,
                          "worker_peak_rss_kb": list(wk.values()), "server_peak_total_kb": mem.peak_total_kb,
                          "real_request_correct": real_ok, "slow_clients": slow, "caches": [s.get("context_cache") for s in stats],
                          "failures": [[str(x) for x in f] for f in http.failures[:100]]}
    report["bench_peak_rss_kb"] = bench_peak_kb
    report["load_after"] = live.loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines + [""] + http_lines) + "\n")
    slow_bad = slow["probe_seconds"] is None or slow["dropped"] < slow["stalled"]
    bad = blobs.bad() + http.bad() + len(dead) + (not real_ok) + slow_bad
    print(f"\n{'OK' if not bad else 'FAILED'}: {blobs.bad()} bad blob outcomes, {http.bad()} bad answers, "
          f"{len(dead)} dead workers, real request {'correct' if real_ok else 'wrong'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
