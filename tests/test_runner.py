"""One model runner: EncodedModel, predict, the server's /compute and the
parameter tester all run models through the engine's ``Model``; its
callback sees every layer, may cancel, and errors carry structured fields."""
import numpy as np
import pytest

import pycrcnn
import pycrcnn.model as model_module
from pycrcnn import _engine, datasets, protocol
from pycrcnn.client import Client
from pycrcnn.models import shipped_model_path


def _keyed(**kw):
    ctx = pycrcnn.Context(**kw)
    ctx.keygen()
    return ctx


def _digits(n):
    images, labels = datasets.sample_digits()
    return datasets.normalize(images[:n]).astype(np.float64), labels[:n]


class SpyModel:
    """Stands in for ``_engine.Model`` and records what runs through it."""

    calls = []

    def __init__(self, steps):
        self.inner = _engine.Model(steps)
        self.steps = [index for index, _ in steps]

    def run(self, *args, **kwargs):
        SpyModel.calls.append(("run", self.steps))
        return self.inner.run(*args, **kwargs)

    def predict(self, *args, **kwargs):
        SpyModel.calls.append(("predict", self.steps))
        return self.inner.predict(*args, **kwargs)

    def segments(self):
        return self.inner.segments()


@pytest.fixture
def spy(monkeypatch):
    SpyModel.calls = []
    monkeypatch.setattr(model_module, "Model", SpyModel)
    return SpyModel.calls


@pytest.fixture(scope="module")
def batch_ctx():
    return _keyed(m=4096, encoding="batch", scale_bits=6, weight_scale_bits=6)


def test_callback_sees_every_layer_and_reports_match(batch_ctx, spy):
    model = pycrcnn.build_from_pytorch(batch_ctx, shipped_model_path("tiny_cnn"), rencrypt_positions=[1])
    x, labels = _digits(6)
    seen = []

    def callback(report, tensor):
        seen.append((report["index"], report["name"], tuple(tensor.shape)))

    out = model(batch_ctx.encrypt(x), callback=callback)
    assert spy and spy[-1][0] == "run"
    names = [layer.name for layer in model]
    assert [s[1] for s in seen] == names == ["Conv2d", "Rencryption", "Square", "Flatten", "Linear"]
    assert seen[-1][2] == (6, 10)
    assert [e["name"] for e in model.last_report] == names
    assert all(e["seconds"] >= 0 and "growth" in e and "level" in e for e in model.last_report)
    assert (batch_ctx.decrypt(out).argmax(1) == labels).mean() >= 0.8
    # the seed's loop over the same layers gives the same values
    y = batch_ctx.encrypt(x)
    for layer in model:
        y = layer(y)
    np.testing.assert_array_equal(batch_ctx.decrypt(y), batch_ctx.decrypt(out))


def test_cancel_stops_with_a_clear_error(batch_ctx):
    model = pycrcnn.build_from_pytorch(batch_ctx, shipped_model_path("tiny_mlp"))
    x, _ = _digits(2)
    seen = []
    with pytest.raises(pycrcnn.RunCancelled) as info:
        model(batch_ctx.encrypt(x), callback=lambda r, t: seen.append(r["name"]) or r["name"] != "Flatten")
    assert seen == ["AvgPool2d", "Flatten"]
    assert info.value.layer == 1 and info.value.layer_name == "Flatten"
    assert str(info.value).startswith("layer 1 (Flatten): ")
    # an exception raised by the callback propagates as it is
    with pytest.raises(KeyError, match="stop here"):
        model(batch_ctx.encrypt(x), callback=lambda r, t: (_ for _ in ()).throw(KeyError("stop here")))


def test_errors_carry_layer_bound_and_limit():
    ctx = _keyed(m=2048, encoding="batch", scale_bits=12, weight_scale_bits=12)
    model = pycrcnn.build_from_pytorch(ctx, shipped_model_path("tiny_cnn"))
    x, _ = _digits(2)
    with pytest.raises(pycrcnn.PlaintextOverflow) as info:
        model(ctx.encrypt(x))
    exc = info.value
    assert exc.layer is not None and exc.layer_name in ("Conv2d", "Square", "Linear")
    assert exc.bound > exc.limit > 0
    assert str(exc).startswith(f"layer {exc.layer} ({exc.layer_name}): ")
    assert model.last_report[-1]["error_type"] == "PlaintextOverflow"
    # outside a model: the same class, no layer
    with pytest.raises(pycrcnn.PlaintextOverflow) as info:
        ctx.encrypt(np.full((1, 2), 1e9))
    assert info.value.layer is None and info.value.bound > info.value.limit


def test_run_range_predict_and_segments_use_the_runner(spy):
    ctx = _keyed(m=4096, p=953983721, encoding="fractional")
    model = pycrcnn.build_from_pytorch(ctx, shipped_model_path("tiny_mlp"), rencrypt_positions=[1])
    assert model.segments() == [(0, 1), (1, 3)]
    x, labels = _digits(1)
    enc = ctx.encrypt(x)
    part = model.run_range(enc, *model.segments()[0])
    out = model.run_range(ctx.rencrypt(part), *model.segments()[1])
    assert [c[0] for c in spy] == ["run", "run"]
    predicted = model.predict(input_bound=1.0)
    assert spy[-1][0] == "predict" and [e["name"] for e in predicted] == [layer.name for layer in model]
    assert all(e["ok"] for e in predicted)
    assert ctx.decrypt(out).argmax(1)[0] == labels[0]


def test_server_compute_timings_come_from_the_runner(server_models_dir, spy, batch_ctx):
    from pycrcnn.server import create_app

    app = create_app(server_models_dir)
    x, labels = _digits(4)
    body, ctype = Client("http://unused").build_request(batch_ctx, batch_ctx.encrypt(x), "tiny_mlp")
    with app.test_client() as tc:
        resp = tc.post("/compute", data=body, content_type=ctype)
    assert resp.status_code == 200, resp.data[:300]
    header, data = protocol.decode_response(resp.data)
    assert [c[0] for c in spy] == ["run"]
    assert [t["type"] for t in header["timings"]] == ["AvgPool2d", "Flatten", "Linear"]
    assert [t["index"] for t in header["timings"]] == spy[0][1]
    out = pycrcnn.CipherTensor.from_bytes(data, batch_ctx)
    assert (batch_ctx.decrypt(out).argmax(1) == labels).mean() >= 0.75


def test_parameter_tester_runs_through_the_runner(spy):
    from pycrcnn.parameters_tester import run_tests

    report = run_tests({"encryption_parameters": [{"m": 4096, "p": 953983721}], "debug": "y"},
                       model="tiny_mlp", images=1)
    result = report["results"][0]
    assert result["status"] == "ok", result
    assert [c[0] for c in spy] == ["run"]
    assert [e["layer_name"] for e in result["layers"]] == ["start", "AvgPool2d", "Flatten", "Linear"]
