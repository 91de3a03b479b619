"""The packed layout over the wire: ``GET /models/<name>`` publishes the saved
packed plan (no weights) or why there is none; a real server on 127.0.0.1
runs packed requests of the shipped single-square LeNet-1 exactly (the
decrypted integers equal the plan's reference) and in agreement with torch
on real MNIST digits; bad packed requests get 4xx; the CLI's ``--layout
packed``."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import requests

import pycrcnn
from pycrcnn import Context, datasets
from pycrcnn.client import Client, ServerError
from pycrcnn.models import load_torch_model, shipped_model_path
from pycrcnn.planner import load_plan
from pycrcnn.planner.packed import packed_model_from_info

NET = "lenet1_square"


@pytest.fixture(scope="module")
def saved_plan():
    """The whole packed plan saved in the shipped .npz (weights included)."""
    info = load_plan(shipped_model_path(NET, "npz"))
    assert info is not None and info["layout"] == "packed"
    return info


def reference(info, x):
    """The plan's exact output integers for one image ``x`` [1, C, H, W]."""
    pm = packed_model_from_info(info)
    s_in = pm.scales[0]
    return [int(v) for v in pm.reference(np.round(np.asarray(x, np.float64) * 2.0 ** s_in).astype(np.int64)[0])]


@pytest.fixture(scope="module")
def client(server):
    return Client(server)


@pytest.fixture(scope="module")
def packed_ctx(client):
    """A key holder made from what the server publishes, as a user would."""
    ctx = Context.from_plan(client.plan(NET))
    ctx.keygen()
    return ctx


def digits(n):
    images, labels = datasets.load_mnist(split="test", limit=n)
    return datasets.normalize(images).astype(np.float64), labels


def test_models_endpoint_publishes_the_plan_without_weights(server, saved_plan):
    entry = requests.get(f"{server}/models/{NET}", timeout=30).json()
    packed = entry["packed"]
    assert packed["available"] is True
    plan = packed["plan"]
    assert plan["layout"] == "packed" and plan["public"] is True
    assert "weights" not in plan
    assert plan["parameters"] == saved_plan["parameters"]
    assert plan["scales"] == saved_plan["scales"]
    assert plan["weights_published"] == {k: {"shape": list(np.shape(v))} for k, v in saved_plan["weights"].items()}
    # the rotation keys a context made from the whole plan makes
    whole = Context.from_plan(saved_plan)
    whole.keygen()
    assert [(lvl, steps) for lvl, steps in plan["rotation_steps"]] == [(lvl, list(s)) for lvl, s in whole.rotation_steps]
    assert plan["input_ciphertexts"] == 5 and plan["classes"] == 10
    # GET /models lists the same
    listed = {m["name"]: m for m in requests.get(f"{server}/models", timeout=30).json()["models"]}
    assert listed[NET]["packed"] == packed
    # a model the packed planner refuses says why; a .pt has no saved plan
    assert listed["tiny_mlp"]["packed"]["available"] is False
    assert "refuses" in listed["tiny_mlp"]["packed"]["reason"] and "AvgPool2d" in listed["tiny_mlp"]["packed"]["reason"]
    if "LeNet1_Approx_single_square" in listed:
        assert ".npz" in listed["LeNet1_Approx_single_square"]["packed"]["reason"]


def test_packed_round_trip_is_exact_and_agrees_with_torch(client, packed_ctx, saved_plan):
    import torch

    x, labels = digits(3)
    with torch.no_grad():
        torch_logits = load_torch_model(shipped_model_path(NET))(torch.tensor(x, dtype=torch.float32)).numpy()
    for i in range(len(x)):
        out, report = client.compute(packed_ctx, packed_ctx.encrypt(x[i:i + 1]), NET, layout="packed")
        assert report["layout"] == "packed" and [t["type"] for t in report["timings"]] == \
            ["PackedConv2d", "PackedSquare", "PackedLinear"]
        assert [int(v) for v in packed_ctx.decrypt_integers(out)[0]] == reference(saved_plan, x[i:i + 1])
    logits, report = client.classify(packed_ctx, x, NET)
    assert logits.shape == (3, 10)
    assert (logits.argmax(1) == torch_logits.argmax(1)).all()
    assert np.abs(logits - torch_logits).max() < 0.5
    assert report["layout"] == "packed" and len(report["per_image"]) == 3 and report["context_upload_bytes"] == 0
    for image in report["per_image"]:
        assert image["upload_bytes"] <= 2.5e6 and image["download_bytes"] < 0.3e6


def _post(server, ctx, tensor, net=NET, **fields):
    """A binary /compute request with the public context whole (no session state)."""
    from pycrcnn import protocol

    header = {"net": net, "layers": None, **fields}
    body = protocol.encode_request(header, ctx.public_context(), tensor.to_bytes())
    return requests.post(f"{server}/compute", data=body, timeout=120,
                         headers={"Content-Type": protocol.BINARY_CONTENT_TYPE})


def _refused(resp, status, *words):
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    message = resp.json()["error"]
    for w in words:
        assert w in message, (w, message)
    return message


def test_bad_packed_requests_get_4xx(server, client, packed_ctx, saved_plan):
    x, _ = digits(1)
    packed = packed_ctx.encrypt(x)
    # a layout the server does not know; a model without a packed plan
    _refused(_post(server, packed_ctx, packed, layout="diagonal"), 400, "layout")
    _refused(_post(server, packed_ctx, packed, net="tiny_mlp", layout="packed"), 422, "no packed plan", "tiny_mlp")
    # part of the model
    _refused(_post(server, packed_ctx, packed, layout="packed", layers=[0, 1]), 400, "whole model")
    # a packed input sent for the batch layout
    _refused(_post(server, packed_ctx, packed), 400, "layout")
    # another model's packed input size (tiny_cnn's plan has the same parameters and steps)
    _refused(_post(server, packed_ctx, packed, net="tiny_cnn", layout="packed"), 400, "packed input")
    # a batch-encoded tensor with a batch context
    batch = Context(m=2048, encoding="batch", scale_bits=4, weight_scale_bits=4)
    batch.keygen()
    _refused(_post(server, batch, batch.encrypt(x), layout="packed"), 400, "not the model's packed plan")
    # a public context without the rotation keys
    bare = Context.from_plan(client.plan(NET))
    bare.keygen(rotations=False)
    _refused(_post(server, bare, bare.encrypt(x), layout="packed"), 400, "rotation keys")
    # ciphertexts under another key than the public context's
    other = Context.from_plan(client.plan(NET))
    other.keygen()
    _refused(_post(server, other, packed, layout="packed"), 400, "data rejected", "key")
    # the client says why before sending anything
    with pytest.raises(ServerError) as err:
        client.plan("tiny_mlp")
    assert err.value.status == 422 and "refuses" in err.value.message
    # and the server still serves
    assert requests.get(server + "/", timeout=10).status_code == 200


def test_client_cli_packed_layout(server):
    run = subprocess.run([sys.executable, "-m", "pycrcnn.client", "--address", server, "--net", NET,
                          "--layout", "packed", "--mnist", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "accuracy: 100.0 % (2/2)" in run.stdout, run.stdout
    assert "packed layout, per image" in run.stdout
    run = subprocess.run([sys.executable, "-m", "pycrcnn.client", "--address", server, "--net", "tiny_mlp",
                          "--layout", "packed", "--mnist", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "no packed plan" in run.stderr, run.stderr


def test_a_published_plan_makes_the_same_context_as_the_whole_plan(saved_plan):
    from pycrcnn.planner.public import public_plan

    public = public_plan(saved_plan)
    assert "weights" not in public
    ctx = pycrcnn.Context.from_plan(public)
    whole = pycrcnn.Context.from_plan(saved_plan)
    assert ctx.parameters() == whole.parameters()
    assert ctx.packed_model.in_shape == whole.packed_model.in_shape
    assert ctx.packed_model.classes == whole.packed_model.classes
    for bad in ({"conv_weight": {"shape": "big"}}, {"conv_weight": {"shape": [1 << 20, 1 << 20]}}, {"conv_weight": 3}):
        with pytest.raises(pycrcnn.FormatError):
            pycrcnn.Context.from_plan(dict(public, weights_published=bad))
    # a sparse map (deeper plans' hidden maps): its pattern is published, its values and bias are not
    from pycrcnn.planner.public import with_placeholder_weights

    maps = [{"out_shape": [2, 3, 3], "in_features": 4, "indptr": [0, 1, 2], "indices": [0, 3], "values": [7, -5],
             "bias": [11, 12]}]
    published = public_plan(dict(saved_plan, weights=dict(saved_plan["weights"], maps=maps)))
    assert published["weights_published"]["maps"] == {"sparse": [
        {"out_shape": [2, 3, 3], "in_features": 4, "indptr": [0, 1, 2], "indices": [0, 3], "n_values": 2, "n_bias": 2}]}
    assert with_placeholder_weights(published)["weights"]["maps"] == [dict(maps[0], values=[1, 1], bias=[0, 0])]
