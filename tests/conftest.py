"""Shared fixtures: the shared data/model folder and a real pycrcnn server process."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: seed model files linked into the server's models folder (when the shared folder has them)
SEED_MODELS = ("LeNet1_Approx_single_square.pt", "mnist.pt", "LeNet1.pt")
#: shipped models linked into the server's models folder
SHIPPED_MODELS = ("tiny_cnn", "tiny_mlp", "lenet1_square")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``$PYCRCNN_SHARED`` or the ``shared`` folder beside the repository."""
    from pycrcnn.datasets import shared_dir as _shared_dir

    return _shared_dir()


@pytest.fixture(scope="session")
def server_models_dir(tmp_path_factory, shared_dir) -> Path:
    """A models folder for the server: shipped models (``.pt`` and ``.npz``), an exported ``.npz``
    (``tiny_cnn_rencrypt.npz``: tiny_cnn with rencryption positions [1, 2]) and
    symlinks to the seed's model files."""
    from pycrcnn.models import shipped_model_path

    folder = tmp_path_factory.mktemp("server_models")
    for name in SHIPPED_MODELS:  # links: their models.json metadata (input shape, ...) still applies
        for fmt in ("pt", "npz"):  # the server serves the .npz (with its packed plan), the .pt is beside it
            src = shipped_model_path(name, fmt)
            (folder / src.name).symlink_to(src)
    try:
        from pycrcnn.net_builder import export_model, load_model_spec

        spec = load_model_spec(shipped_model_path("tiny_cnn"))
        export_model(spec, folder / "tiny_cnn_rencrypt.npz", name="tiny_cnn_rencrypt", rencrypt_positions=[1, 2])
    except ImportError:  # torch missing: no export
        pass
    seed = shared_dir / "models" / "pycrcnn-original"
    for fname in SEED_MODELS:
        if (seed / fname).is_file():
            (folder / fname).symlink_to(seed / fname)
    return folder


# one place starts and stops a server process: the benches' (tests/test_robustness.py
# and the fast slices import the benches' modules too)
sys.path.insert(0, str(REPO / "benches"))
from live import start_server as _start_server  # noqa: E402
from live import stop_server as _stop_server  # noqa: E402


@pytest.fixture(scope="session")
def server(server_models_dir, tmp_path_factory):
    """Base URL (``http://127.0.0.1:PORT``) of a real ``python -m pycrcnn.server``
    (gunicorn) serving :func:`server_models_dir` with 2 worker processes."""
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    # each worker may use every core: most tests send one request at a time
    proc, url = _start_server(server_models_dir, log_path, "--workers", "2", "--threads", str(os.cpu_count() or 1),
                              "--quiet", "--context-dir", str(log_path.parent / "contexts"))
    try:
        yield url
    finally:
        _stop_server(proc)
