"""The wheel ``make wheel`` built (``dist/pycrcnn-*.whl``), installed into a
fresh venv with only its runtime dependencies and no ``cargo`` on the PATH,
runs ``tests/wheel_smoke.py``: encrypt, a shipped model through the server,
decrypt. ``make test`` builds the wheel first and sets
``PYCRCNN_TEST_WHEEL=1``, which turns a missing wheel into a failure."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def newest_wheel():
    wheels = sorted((REPO / "dist").glob("pycrcnn-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def path_without_cargo():
    """PATH minus every directory that holds a ``cargo``."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    return [d for d in dirs if not (Path(d) / "cargo").exists()]


def test_wheel_installs_and_serves_without_cargo(tmp_path):
    wheel = newest_wheel()
    if wheel is None:
        if os.environ.get("PYCRCNN_TEST_WHEEL"):
            pytest.fail("no dist/pycrcnn-*.whl: `make wheel` did not build one")
        pytest.skip("no wheel in dist/ (run `make wheel`)")
    tag = wheel.name.rsplit("-", 3)[1:]
    assert tag[1] == "abi3", wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for needed in ("pycrcnn/models/tiny_mlp.npz", "pycrcnn/data/mnist_sample.npz", "pycrcnn/server.py",
                   "pycrcnn/_gunicorn.py"):
        assert needed in names, needed
    assert any(n.startswith("pycrcnn/_engine") and n.endswith(".so") for n in names)

    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CARGO", "RUSTUP", "VIRTUAL_ENV", "PYTHONPATH", "MATURIN"))}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path_without_cargo()])
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
                             env=env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    run = subprocess.run([str(venv / "bin" / "python"), str(REPO / "tests" / "wheel_smoke.py")],
                         env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    assert "wheel smoke: ok" in run.stdout
    print(f"\n{wheel.name}: {run.stdout.strip()}")
