"""Smoke test of an installed pycrcnn wheel, run by tests/test_wheel.py in a
fresh venv where ``cargo`` is not on the PATH and the checkout is not on
``sys.path``: encrypt, classify real digits with a shipped model through a
real ``python -m pycrcnn.server`` (gunicorn), decrypt, compare with the
model's float forward pass. Needs numpy, flask, requests, gunicorn; no torch.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time


def main() -> int:
    assert shutil.which("cargo") is None, f"cargo is on the PATH: {shutil.which('cargo')}"
    import pycrcnn
    from pycrcnn import Context, datasets
    from pycrcnn.client import Client
    from pycrcnn.models import load_shipped_spec

    where = os.path.realpath(pycrcnn.__file__)
    assert os.path.realpath(sys.prefix) in where, f"pycrcnn imported from {where}, not from the venv {sys.prefix}"
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("torch is installed in the smoke venv; the wheel must work without it")

    # encrypt / decrypt in process
    ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
    ctx.keygen()
    images, labels = datasets.sample_digits(8)
    x = datasets.normalize(images)
    back = ctx.decrypt(ctx.encrypt(x))
    assert abs(back - x).max() < 2 ** -5, abs(back - x).max()

    # a shipped model through the server
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pycrcnn.server", "--port", "0", "--workers", "1", "--threads", "1", "--quiet",
             "--context-dir", os.path.join(tmp, "contexts")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = b""
            deadline = time.monotonic() + 60
            while b"\n" not in line and time.monotonic() < deadline and proc.poll() is None:
                if select.select([proc.stdout], [], [], 0.5)[0]:
                    line += os.read(proc.stdout.fileno(), 4096)
            match = re.search(rb"listening on (http://[\d.]+:\d+)", line)
            assert match, (line, proc.stderr.read() if proc.poll() is not None else b"")
            url = match.group(1).decode()
            client = Client(url)
            while True:
                try:
                    client.info()
                    break
                except ConnectionError:
                    assert time.monotonic() < deadline, "the server does not answer"
                    time.sleep(0.2)
            logits, report = client.classify(ctx, images, "tiny_mlp")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ref = load_shipped_spec("tiny_mlp").forward_numpy(x)
    assert (logits.argmax(1) == ref.argmax(1)).all(), (logits.argmax(1), ref.argmax(1))
    print(f"wheel smoke: ok (pycrcnn {pycrcnn.__version__} from {os.path.dirname(where)}; tiny_mlp on 8 digits "
          f"through the server: predictions {logits.argmax(1).tolist()}, labels {labels.tolist()}; "
          f"upload {report['upload_bytes']} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
