"""The original PyCrCNN's service configuration runs as it is: a client
parameters.json in the original's format (no ``encoding`` key: fractional)
against a server serving the original models, and a server that serves the
shipped models in a process where ``import torch`` fails."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import _start_server, _stop_server
from pycrcnn import Context, datasets
from pycrcnn.client import Client
from pycrcnn.models import load_torch_model


@pytest.fixture(scope="module")
def original_server(shared_dir, tmp_path_factory):
    """A real server process serving the original PyCrCNN's model folder as it is."""
    log = tmp_path_factory.mktemp("original_server") / "server.log"
    proc, url = _start_server(shared_dir / "models" / "pycrcnn-original", log, "--quiet")
    try:
        yield url
    finally:
        _stop_server(proc)


def _client_cli(config, tmp_path, n):
    cfg = tmp_path / "parameters.json"
    cfg.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "pycrcnn.client", "--config", str(cfg), "--mnist", str(n)],
                          capture_output=True, text=True, timeout=600)


def test_original_config_classifies_digits_on_the_original_models(original_server, tmp_path, shared_dir):
    # The original format: a list of parameter sets, no encoding key, the seed's
    # published LeNet-1 setting, the net named as the original file.
    config = {"address": original_server + "/compute",
              "encryption_parameters": [{"m": 4096, "p": 953983721, "sec": 128, "base": 2}],
              "net": "LeNet1_Approx_single_square", "layers": None, "max_threads": 2}
    run = _client_cli(config, tmp_path, 2)
    assert run.returncode == 0, run.stderr
    assert "fractional" in run.stdout and run.stdout.count("predicted") == 2
    images, labels = datasets.load_mnist(split="test", limit=2)
    net = load_torch_model(shared_dir / "models" / "pycrcnn-original" / "LeNet1_Approx_single_square.pt")
    import torch

    want = net(torch.tensor(datasets.normalize(images))).argmax(1).tolist()
    for label, predicted in zip(labels, want):
        assert f"predicted {predicted}" in run.stdout, run.stdout


def test_the_literal_original_config_is_refused_with_what_would_work(original_server, tmp_path):
    # "MNIST" finds mnist.pt; its layers 0..3 hold a MaxPool2d, which cannot run encrypted.
    config = {"address": original_server + "/compute",
              "encryption_parameters": [{"m": 2048, "p": 13513511, "sec": 128, "base": 2}],
              "net": "MNIST", "layers": [0, 1, 2, 3]}
    run = _client_cli(config, tmp_path, 1)
    assert run.returncode == 1
    assert "MaxPool2d" in run.stderr and "AvgPool2d" in run.stderr, run.stderr
    assert "no model" not in run.stderr and "unknown net" not in run.stderr


def test_shipped_models_are_served_without_torch(tmp_path):
    from pycrcnn.server import _shipped_models_dir

    launcher = ("-c", "import sys; sys.modules['torch'] = None; from pycrcnn.server import main; "
                      "sys.exit(main(sys.argv[1:]))")
    proc, url = _start_server(_shipped_models_dir(), tmp_path / "server.log", "--quiet", launcher=launcher)
    try:
        client = Client(url)
        served = {m["name"]: m for m in client.models()}
        assert {"tiny_mlp", "lenet1_square"} <= set(served)
        assert all("error" not in m for m in served.values()), served
        ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
        ctx.keygen()
        images, labels = datasets.sample_digits()
        logits, _ = client.classify(ctx, images[:8], "tiny_mlp")
        assert (np.asarray(logits).argmax(1) == labels[:8]).mean() >= 0.75
    finally:
        _stop_server(proc)
    assert "torch" not in (tmp_path / "server.log").read_text().lower().replace("torch-free", "")
