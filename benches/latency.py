#!/usr/bin/env python3
"""Benchmark: one MNIST digit at a time through LeNet-1 in the packed layout
(``pycrcnn.plan(..., layout="packed")``), 128-bit security.

For the shipped ``lenet1_square``, the seed's
``LeNet1_Approx_single_square.pt`` and the shipped ``lenet1_two_square``
(while the packed planner refuses it, its column says why; it runs, with no
change here, once the planner accepts it), on ``--digits`` real MNIST test
digits one at a time:

* client: encryption time, upload bytes (the packed input ciphertexts; the
  public context is sent once per session and listed apart), decryption time,
  download bytes;
* server: a separate, torch-free process that loads only the public context
  and the plan, runs every digit with 1 and with 2 engine threads (seconds per
  digit, median and max) and reports its peak RSS;
* end to end through a real server on 127.0.0.1 (``python -m pycrcnn.server``,
  one worker process with 2 engine threads, the model's ``.npz`` exported
  with the plan): the client makes its context from the plan the server
  publishes (``GET /models/<name>``), uploads the public context once
  (``POST /contexts``), then per digit encrypts, serializes, sends, waits for
  the server (parse, compute, serialize), receives, parses and decrypts
  (``Client.classify_packed``); the first request, which binds the plan to the
  context and encodes its masks, is listed apart;
* exactness: every decrypted result equals ``plan.reference(x)``; argmax
  agreement with float torch on the digits run and, through the exact
  reference, on ``--agreement`` consecutive test digits;
* in the same run: plain torch on one digit, and the fractional path (the
  seed's setting, ``benches/lenet1.py --encoding fractional``) on one digit.

Prints a Markdown table with the date and the machine (paste it into the
README). Usage::

    python benches/latency.py                 # 20 digits, agreement on 1,000
    python benches/latency.py --digits 5 --agreement 100 --no-fractional
    python benches/latency.py --only two_square --no-fractional
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import pycrcnn  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "python"))

import pycrcnn  # noqa: E402
from pycrcnn import datasets  # noqa: E402


def serve(folder: Path) -> None:
    """The serving process: public context + plan only, no torch."""
    from pycrcnn import CipherTensor, Context, set_num_threads
    from pycrcnn.planner.packed import build_packed, packed_model_from_info

    info = json.loads((folder / "plan.json").read_text())
    server = Context.from_public((folder / "public_context.bin").read_bytes())
    server.attach_packed(packed_model_from_info(info))
    model = build_packed(server)
    inputs = sorted(folder.glob("in_*.bin"))
    result = {"torch_imported": "torch" in sys.modules}
    for threads in (1, 2):
        set_num_threads(threads)
        times, cpu = [], []
        for path in inputs:
            x = CipherTensor.from_bytes(path.read_bytes(), server)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(x)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if threads == 2:
                (folder / path.name.replace("in_", "out_")).write_bytes(out.to_bytes())
        result[f"server_s_{threads}"] = times
        result[f"server_cpu_s_{threads}"] = cpu
        result[f"stages_{threads}"] = [(r["name"], r["seconds"]) for r in model.last_report]  # names may repeat
    # VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the forking parent's size across exec.
    result["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    result["torch_imported"] = result["torch_imported"] or "torch" in sys.modules
    print("RESULT " + json.dumps(result))


def start_server(models_dir: Path, context_dir: Path):
    """``python -m pycrcnn.server`` on a free port of 127.0.0.1: one worker with 2 engine threads."""
    import select

    import requests

    proc = subprocess.Popen([sys.executable, "-m", "pycrcnn.server", "--models", str(models_dir), "--host",
                             "127.0.0.1", "--port", "0", "--workers", "1", "--threads", "2", "--quiet",
                             "--context-dir", str(context_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line, deadline = b"", time.monotonic() + 120
    while b"\n" not in line and proc.poll() is None and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line += os.read(proc.stdout.fileno(), 4096)
    url = line.decode().split("listening on ", 1)[-1].split()[0] if b"listening on" in line else None
    while url and time.monotonic() < deadline:
        try:
            if requests.get(url + "/", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start: {line!r}")


def end_to_end(name: str, net, plan, x: np.ndarray, n_digits: int) -> dict:
    """The packed path through a real server (see the module's docstring)."""
    from pycrcnn.client import Client
    from pycrcnn.net_builder import export_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "models").mkdir()
        export_model(net, folder / "models" / f"{name}.npz", name=name, plan=plan)
        proc, url = start_server(folder / "models", folder / "contexts")
        try:
            client = Client(url)
            ctx = pycrcnn.Context.from_plan(client.plan(name))  # published: no weights
            ctx.keygen()
            _, context_bytes = client.upload_context(ctx)
            t0 = time.perf_counter()
            client.classify_packed(ctx, x[:1], name)
            first_s = time.perf_counter() - t0
            per, exact = [], 0
            for i in range(n_digits):
                t0 = time.perf_counter()
                e = ctx.encrypt(x[i:i + 1])
                t1 = time.perf_counter()
                out, r = client.compute(ctx, e, name, layout="packed")
                t2 = time.perf_counter()
                ctx.decrypt(out)
                t3 = time.perf_counter()
                exact += bool((ctx.decrypt_integers(out) == plan.reference(x[i:i + 1])).all())
                per.append({"total": t3 - t0, "encrypt": t1 - t0, "serialize": r["serialize_seconds_client"],
                            "request": r["request_seconds"], "compute": r["server_seconds"],
                            "server_parse": r["parse_seconds"], "server_serialize": r["serialize_seconds"],
                            "client_parse": t2 - t1 - r["serialize_seconds_client"] - r["request_seconds"],
                            "decrypt": t3 - t2, "upload": r["upload_bytes"], "download": r["download_bytes"]})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"e2e": per, "e2e_exact": exact, "e2e_first_s": first_s, "e2e_context_bytes": context_bytes,
            "e2e_load": os.getloadavg()[0]}


def plain_torch_s(net, x) -> float:
    import torch

    xt = torch.tensor(x, dtype=torch.float32)
    with torch.no_grad():
        net(xt)
        best = float("inf")
        for _ in range(50):
            t0 = time.perf_counter()
            net(xt)
            best = min(best, time.perf_counter() - t0)
    return best


def bench_model(name: str, path: Path, n_digits: int, n_agree: int) -> dict:
    import torch

    from pycrcnn.models import load_torch_model

    net = load_torch_model(path)
    try:
        cal_imgs, _ = datasets.load_mnist(split="train", limit=200)
    except Exception:  # only the test split available: calibrate on its last digits
        cal_imgs = datasets.load_mnist(split="test")[0][-200:]
    calibration = datasets.normalize(cal_imgs).astype(np.float64)
    imgs, labels = datasets.load_mnist(split="test", limit=max(n_digits, n_agree))
    x = datasets.normalize(imgs).astype(np.float64)
    res = {"model": name}
    t0 = time.perf_counter()
    try:
        plan = pycrcnn.plan(net, calibration, layout="packed")
    except (pycrcnn.HEError, NotImplementedError) as exc:  # PlanError, UnsupportedLayerError: the reason
        res["refused"] = f"{type(exc).__name__}: {exc}"
        return res
    res["plan_s"] = time.perf_counter() - t0
    res["scales"] = plan.info["scales"]
    res["primes"] = plan.info["parameters"]["p"]
    res["report"] = plan.report
    ctx = plan.context
    t0 = time.perf_counter()
    ctx.keygen()
    res["keygen_s"] = time.perf_counter() - t0
    public = ctx.public_context()
    bare = pycrcnn.Context.from_plan(plan.info)
    bare.keygen(rotations=False)
    res["public_context_bytes"] = len(public)
    res["rotation_key_bytes"] = len(public) - len(bare.public_context())
    with torch.no_grad():
        torch_logits = net(torch.tensor(x, dtype=torch.float32)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "public_context.bin").write_bytes(public)
        (folder / "plan.json").write_text(json.dumps(plan.info))
        enc_s, up = [], []
        for i in range(n_digits):
            t0 = time.perf_counter()
            e = ctx.encrypt(x[i:i + 1])
            blob = e.to_bytes()
            enc_s.append(time.perf_counter() - t0)
            up.append(len(blob))
            (folder / f"in_{i:04d}.bin").write_bytes(blob)
        proc = subprocess.run([sys.executable, __file__, "--serve", str(folder)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"the serving process failed:\n{proc.stderr[-3000:]}")
        res.update(json.loads(line[len("RESULT "):]))
        dec_s, down, exact, agree = [], [], 0, 0
        for i in range(n_digits):
            blob = (folder / f"out_{i:04d}.bin").read_bytes()
            down.append(len(blob))
            t0 = time.perf_counter()
            out = pycrcnn.CipherTensor.from_bytes(blob, ctx)
            logits = ctx.decrypt(out)
            dec_s.append(time.perf_counter() - t0)
            exact += bool((ctx.decrypt_integers(out) == plan.reference(x[i:i + 1])).all())
            agree += int(logits.argmax() == torch_logits[i].argmax())
    res.update(encrypt_s=enc_s, upload_bytes=up, decrypt_s=dec_s, download_bytes=down, exact=exact,
               agree=agree, digits=n_digits)
    ob = plan.info["scales"]["output_bits"]
    ref = np.array([[int(v) for v in plan.reference(x[i:i + 1])[0]] for i in range(n_agree)], dtype=float) / 2.0 ** ob
    res["agree_reference"] = int((ref.argmax(1) == torch_logits[:n_agree].argmax(1)).sum())
    res["agree_n"] = n_agree
    res["torch_s"] = plain_torch_s(net, x[:1])
    try:
        res.update(end_to_end(path.stem, net, plan, x, n_digits))
    except Exception as exc:  # noqa: BLE001 - the other figures still print; the table says what failed
        res["e2e_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return res


def fractional() -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "benches" / "lenet1.py"), "--encoding", "fractional",
                               "--json", f.name], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr[-500:]}
        r = json.loads(Path(f.name).read_text())["results"][0]
        return {"forward_s": r["forward_s"], "peak_rss_mb": r["peak_rss_mb"], "encrypt_s": r["encrypt_s"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return f"{cpu}, {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"


def table(results, frac) -> str:
    med = statistics.median

    def e2e(key, unit=1e3, fmt="{:.0f}"):
        return lambda r: fmt.format(med(d[key] for d in r["e2e"]) * unit)

    rows = [
        ("**end to end through a server on 127.0.0.1, per digit (median / max)**",
         lambda r: f"**{med(d['total'] for d in r['e2e']) * 1e3:.0f} / {max(d['total'] for d in r['e2e']) * 1e3:.0f} ms**"),
        ("  client encrypt / serialize", lambda r: e2e("encrypt")(r) + " / " + e2e("serialize")(r) + " ms"),
        ("  HTTP exchange (upload, server, download)", lambda r: e2e("request")(r) + " ms"),
        ("    server: parse / compute / serialize",
         lambda r: e2e("server_parse")(r) + " / " + e2e("compute")(r) + " / " + e2e("server_serialize")(r) + " ms"),
        ("  client parse / decrypt", lambda r: e2e("client_parse")(r) + " / " + e2e("decrypt", fmt="{:.1f}")(r) + " ms"),
        ("  upload / download per digit", lambda r: f"{med(d['upload'] for d in r['e2e']) / 1e6:.2f} MB / "
                                                   f"{med(d['download'] for d in r['e2e']) / 1e3:.0f} KB"),
        ("  first request (binds the plan to the context, encodes masks)", lambda r: f"{r['e2e_first_s'] * 1e3:.0f} ms"),
        ("  exact through the server / load average", lambda r: f"{r['e2e_exact']}/{r['digits']} / {r['e2e_load']:.1f}"),
        ("server, 2 threads (median / max)", lambda r: f"{med(r['server_s_2']) * 1e3:.0f} / {max(r['server_s_2']) * 1e3:.0f} ms"),
        ("server, 1 thread (median / max)", lambda r: f"{med(r['server_s_1']) * 1e3:.0f} / {max(r['server_s_1']) * 1e3:.0f} ms"),
        ("server CPU time, 1 thread (median; load-independent)",
         lambda r: f"{med(r['server_cpu_s_1']) * 1e3:.0f} ms"),
        ("stages, 2 threads (ms)",
         lambda r: ", ".join(f"{k.replace('Packed', '')} {v * 1e3:.0f}" for k, v in r["stages_2"])),
        ("client encryption (median)", lambda r: f"{med(r['encrypt_s']) * 1e3:.0f} ms"),
        ("upload per digit", lambda r: f"{med(r['upload_bytes']) / 1e6:.2f} MB"),
        ("download per digit", lambda r: f"{med(r['download_bytes']) / 1e3:.0f} KB"),
        ("client decryption (median)", lambda r: f"{med(r['decrypt_s']) * 1e3:.1f} ms"),
        ("public context (once per session)", lambda r: f"{r['public_context_bytes'] / 1e6:.1f} MB"),
        ("of which rotation keys", lambda r: f"{r['rotation_key_bytes'] / 1e6:.1f} MB"),
        ("serving process peak RSS (torch-free)",
         lambda r: f"{r['peak_rss_mb']:.0f} MB" + (" (torch imported!)" if r["torch_imported"] else "")),
        ("exact (= plan.reference)", lambda r: f"{r['exact']}/{r['digits']}"),
        ("argmax = torch, digits run", lambda r: f"{r['agree']}/{r['digits']}"),
        ("argmax = torch, exact reference", lambda r: f"{r['agree_reference']}/{r['agree_n']}"),
        ("plaintext primes / scales (in, w, map)",
         lambda r: f"{len(r['primes'])}×{np.log2(r['primes'][0]):.0f} bits / "
                   f"2^{r['scales']['input_bits']}, 2^{r['scales']['weight_bits']}, 2^{r['scales']['map_bits']}"),
        ("noise budget left at the output", lambda r: f"{r['report'][-1].get('noise_budget', '?')} bits"),
        ("plain torch, one digit", lambda r: f"{r['torch_s'] * 1e3:.2f} ms"),
    ]
    refused = [r for r in results if "refused" in r]
    results = [r for r in results if "refused" not in r]
    head = "| packed layout, m=8192, 128-bit | " + " | ".join(r["model"] for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for label, fn in rows:
        through_server = label.startswith(("**end to end", "  "))
        cells = [fn(r) if "e2e" in r or not through_server else
                 (f"failed: {r.get('e2e_error')}" if label.startswith("**") else "–") for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if frac and "forward_s" in frac:
        lines.append(f"| fractional path (seed's setting, m=4096), same run | "
                     f"{frac['forward_s']:.2f} s server, {frac['peak_rss_mb']:.0f} MB peak RSS (seed model) |"
                     + " |" * (len(results) - 1))
    for r in refused:
        lines.append(f"\n{r['model']}: not run, the packed planner refuses it: {r['refused']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digits", type=int, default=20)
    ap.add_argument("--agreement", type=int, default=1000)
    ap.add_argument("--no-fractional", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--only", metavar="NAME", help="run only the models whose name contains NAME (e.g. two_square)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(Path(args.serve))
        return 0
    from pycrcnn.models import shipped_model_path

    models = [("lenet1_square (shipped)", shipped_model_path("lenet1_square"))]
    seed = datasets.shared_dir() / "models" / "pycrcnn-original" / "LeNet1_Approx_single_square.pt"
    if seed.is_file():
        models.append(("LeNet1_Approx_single_square (seed)", seed))
    models.append(("lenet1_two_square (shipped)", shipped_model_path("lenet1_two_square")))
    if args.only:
        models = [(n, p) for n, p in models if args.only in n]
    results = [bench_model(n, p, args.digits, args.agreement) for n, p in models]
    frac = None if args.no_fractional else fractional()
    print(f"\nLatency, {args.digits} MNIST test digits one at a time; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}\n")
    print(table(results, frac))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results, "fractional": frac},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
