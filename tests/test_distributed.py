"""pycrcnn.distributed on a real local Ray cluster (2 worker processes, started
once per session): real MNIST digits, real encryption, a task failing once and
retried, failures reported by batch index, and no secret key in anything the
client sends to the cluster."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import ray  # noqa: E402  (a test dependency: the Makefile installs it)

import pycrcnn  # noqa: E402
import pycrcnn.distributed as distributed  # noqa: E402
from pycrcnn import CipherTensor, Context, FormatError, HEError, datasets  # noqa: E402
from pycrcnn.models import shipped_model_path  # noqa: E402

BATCH = 16


def _fault_hook(control_dir: str):
    """A worker-process setup hook (pickled by value: it is nested) that wraps
    the model runner so that faults described in ``control_dir`` happen inside
    the workers: ``fail_once`` (a file, removed by the first run that sees it)
    makes one run raise; ``fail_batch_size`` (JSON) fails every run of a batch
    with that many images."""

    def hook():
        import os

        from pycrcnn import model as model_module

        original = model_module.EncodedModel.run

        def run(self, x, *args, **kwargs):
            once = os.path.join(control_dir, "fail_once")
            try:
                os.remove(once)  # atomic: exactly one run across the workers claims it
                raise RuntimeError("injected fault: this worker lost its batch once")
            except FileNotFoundError:
                pass
            always = os.path.join(control_dir, "fail_batch_size")
            if os.path.exists(always):
                with open(always) as fh:
                    if int(x.shape[0]) == json.load(fh):
                        raise RuntimeError("injected fault: this batch always fails")
            return original(self, x, *args, **kwargs)

        model_module.EncodedModel.run = run

    return hook


@pytest.fixture(scope="session")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray_faults")


@pytest.fixture(scope="session")
def cluster(fault_dir):
    """A local Ray cluster with 2 worker CPUs for the whole session."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _fault_hook(str(fault_dir))})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ctx():
    c = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
    c.keygen()
    return c


@pytest.fixture(scope="module")
def digits():
    images, labels = datasets.load_mnist(limit=3 * BATCH)
    return datasets.normalize(images), labels


def test_classifies_mnist_in_batches_with_a_task_failing_once_and_retried(cluster, ctx, digits, fault_dir):
    x, labels = digits
    (fault_dir / "fail_once").touch()
    batches = [ctx.encrypt(x[k:k + BATCH]) for k in range(0, len(x), BATCH)]
    result = distributed.classify_dataset(shipped_model_path("tiny_mlp", "npz"), ctx, batches, progress=False)
    assert not (fault_dir / "fail_once").exists(), "the injected fault did not happen"
    assert len(result.outputs) == 3 and len(result.compute_seconds) == 3
    logits = [ctx.decrypt(t) for t in result.outputs]
    assert [lg.shape for lg in logits] == [(BATCH, 10)] * 3
    accuracy = (np.concatenate(logits).argmax(1) == labels).mean()
    assert accuracy >= 0.85, accuracy
    # in order, and the same values as the same model run here without Ray
    model = pycrcnn.build_from_spec(ctx, shipped_model_path("tiny_mlp", "npz"))
    for batch, got in zip(batches, logits):
        np.testing.assert_array_equal(ctx.decrypt(model.run(batch)[0]), got)
    assert result.broadcast_bytes > 0 and all(b > 0 for b in result.batch_bytes)


def test_a_batch_that_keeps_failing_is_reported_with_its_index(cluster, ctx, digits, fault_dir):
    x, labels = digits
    (fault_dir / "fail_batch_size").write_text(json.dumps(5))
    try:
        sizes = [4, 5, 4]  # batch 1 always fails; an engine error (batch 2: bad bytes) is not retried
        batches = [ctx.encrypt(x[:n]) for n in sizes]
        batches[2] = b"PCRN" + bytes(100)
        with pytest.raises(distributed.BatchesFailed) as info:
            distributed.classify_dataset(shipped_model_path("tiny_mlp", "npz"), ctx, batches, max_retries=1,
                                         progress=False)
    finally:
        (fault_dir / "fail_batch_size").unlink()
    exc = info.value
    assert sorted(exc.failures) == [1, 2]
    assert "always fails" in exc.failures[1] and "after 2 attempts" in exc.failures[1]
    assert "FormatError" in exc.failures[2]
    assert "batch 1:" in str(exc) and "batch 2:" in str(exc)
    assert exc.outputs[1] is None and exc.outputs[2] is None
    assert (ctx.decrypt(exc.outputs[0]).argmax(1) == labels[:4]).mean() >= 0.75


# -- the secret key never enters the cluster ---------------------------------------
def _frames(blob: bytes):
    """Every pycrcnn frame inside ``blob`` (at any offset: also inside pickles)."""
    data = bytes(blob)
    at = data.find(b"PCRN")
    while at >= 0:
        if at + 47 <= len(data):
            length = int.from_bytes(data[at + 39:at + 47], "little")
            yield data[at:at + 47 + length + 32]
        at = data.find(b"PCRN", at + 1)


def _secret_keys_in(blob: bytes) -> int:
    """How many frames in ``blob`` the engine's parser reads as a context
    holding a secret key."""
    found = 0
    for frame in _frames(blob):
        try:
            found += Context.from_secret_bytes(frame).has_secret_key
        except HEError:  # a tensor, or not a frame at all
            pass
    return found


def test_the_check_finds_a_secret_key_where_there_is_one(ctx):
    assert _secret_keys_in(pickle.dumps(ctx)) == 1  # pickling a key holder's Context carries its key
    assert _secret_keys_in(b"xx" + ctx.secret_key_bytes() + b"yy") == 1
    assert _secret_keys_in(ctx.public_context()) == 0
    with pytest.raises(FormatError):
        distributed.public_context_bytes(ctx.secret_key_bytes())


def test_the_secret_key_never_reaches_the_object_store(cluster, ctx, digits, monkeypatch):
    sent = []
    real_put, real_submit = ray.put, distributed._submit

    def put(value, *args, **kwargs):
        sent.append(("put", value))
        return real_put(value, *args, **kwargs)

    def submit(task, shared, batch_ref, threads):
        sent.append(("task args", ray.cloudpickle.dumps((shared, batch_ref, threads))))
        return real_submit(task, shared, batch_ref, threads)

    monkeypatch.setattr(ray, "put", put)
    monkeypatch.setattr(distributed, "_submit", submit)
    x, labels = digits
    batches = [ctx.encrypt(x[k:k + 8]) for k in range(0, 16, 8)]
    result = distributed.classify_dataset(shipped_model_path("tiny_mlp", "npz"), ctx, batches, progress=False)
    assert (np.concatenate([ctx.decrypt(t) for t in result.outputs]).argmax(1) == labels[:16]).mean() >= 0.75
    kinds = [kind for kind, _ in sent]
    assert kinds.count("put") == 2 + 2 and kinds.count("task args") == 2  # context + model once, one per batch
    for kind, value in sent:
        assert isinstance(value, bytes), (kind, type(value))  # nothing but bytes: no Context is pickled
        assert _secret_keys_in(value) == 0, kind
    # what was put: one public context, the model's .npz, and ciphertext tensors
    puts = [value for kind, value in sent if kind == "put"]
    assert Context.from_public(puts[0]).has_secret_key is False
    assert puts[1][:2] == b"PK"  # a zip: the .npz
    assert [tuple(CipherTensor.from_bytes(p, ctx).shape) for p in puts[2:]] == [(8, 1, 28, 28)] * 2


def test_models_with_rencryption_and_bad_inputs_are_refused(ctx):
    from pycrcnn.spec import load_model_spec

    spec = load_model_spec(shipped_model_path("tiny_cnn", "npz"))
    spec.rencrypt_positions = [1]
    with pytest.raises(HEError, match="rencryption positions"):
        distributed.model_bytes(spec)
    with pytest.raises(TypeError, match="Context or public-context bytes"):
        distributed.public_context_bytes("not a context")
    with pytest.raises(TypeError, match="encrypted CipherTensor"):
        distributed._batch_blob(np.zeros((2, 1, 28, 28)))


def test_the_command_classifies_mnist_on_the_running_cluster(cluster):
    import os
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    run = subprocess.run([sys.executable, "-m", "pycrcnn.distributed", "--model", "tiny_mlp", "--mnist", "24",
                          "--batch-size", "12", "--address", address, "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("24 digits in 2 batches of ≤ 12: accuracy "), line
    assert float(line.split("accuracy ")[1].split(",")[0]) >= 0.75 and "images/s" in line


def test_everything_else_works_without_ray():
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"
            "import pycrcnn, pycrcnn.distributed as d\n"
            "from pycrcnn.models import shipped_model_path\n"
            "ctx = pycrcnn.Context(m=2048, encoding='batch', scale_bits=6, weight_scale_bits=6); ctx.keygen()\n"
            "assert d.model_bytes(shipped_model_path('tiny_mlp', 'npz'))[:2] == b'PK'\n"
            "try:\n"
            "    d.classify_dataset(shipped_model_path('tiny_mlp', 'npz'), ctx, [], progress=False)\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "pip install 'pycrcnn[ray]'" in run.stdout
