"""The packed single-image layout: exact integers against plan.reference on
real models and real MNIST digits, architectures built here (stride 2,
padding, 3 input channels, BatchNorm), refusals (missing rotation key,
models outside the family), blobs (corrupted, foreign) and saved plans."""
from __future__ import annotations

import numpy as np
import pytest

import pycrcnn
import pycrcnn.nn  # noqa: F401  (the Square and Polynomial modules the built models use)
from pycrcnn import datasets
from pycrcnn import FormatError, HEError
from pycrcnn.models import load_torch_model, shipped_model_path
from pycrcnn.planner import load_plan
from pycrcnn.spec import UnsupportedLayerError

import torch  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    imgs, labels = datasets.load_mnist(limit=40)
    return datasets.normalize(imgs).astype(np.float64), labels


def _check(net, x, calibration, **options):
    """Plans, keys, encrypts each image of x, runs, and compares with the reference and torch."""
    plan = pycrcnn.plan(net, calibration, layout="packed", **options)
    ctx = plan.context
    ctx.keygen()
    model = pycrcnn.build_from_pytorch(ctx, net)
    for xi in x:
        xi = xi[None]
        out = model(ctx.encrypt(xi))
        ints = ctx.decrypt_integers(out)
        assert ints.dtype == object and ints.shape == plan.reference(xi).shape
        assert (ints == plan.reference(xi)).all()
        logits = ctx.decrypt(out)
        with torch.no_grad():
            expect = net(torch.tensor(xi, dtype=torch.float32)).numpy()
        assert logits.shape == expect.shape
        assert np.abs(logits - expect).max() < 0.25 * max(1.0, np.abs(expect).max())
    return plan, ctx, model


@pytest.mark.parametrize("name", ["lenet1_square", "tiny_cnn"])
def test_shipped_single_square_models_are_exact(name, digits):
    x, labels = digits
    net = load_torch_model(shipped_model_path(name))
    plan, ctx, model = _check(net, x[:2], x)
    assert [r["stage"] for r in plan.report] == ["pack", "conv", "square", "linear"]
    assert all(r["noise_budget"] > 0 and r["fits"] for r in plan.report)
    assert sum(r["rotations"] for r in plan.report) > 0
    assert [r["name"] for r in model.last_report] == ["PackedConv2d", "PackedSquare", "PackedLinear"]
    # The plan's integers agree with torch on the argmax of real digits.
    with torch.no_grad():
        t = net(torch.tensor(x, dtype=torch.float32)).numpy().argmax(1)
    ob = plan.info["scales"]["output_bits"]
    ref = np.array([[int(v) for v in plan.reference(xi[None])[0]] for xi in x], dtype=float) / 2.0 ** ob
    assert (ref.argmax(1) == t).sum() >= len(x) - 1


def test_seed_single_square_lenet_is_exact(digits, shared_dir):
    path = shared_dir / "models" / "pycrcnn-original" / "LeNet1_Approx_single_square.pt"
    x, _ = digits
    _check(load_torch_model(path), x[:1], x)


def test_built_architectures_stride_padding_channels_batchnorm():
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2), pycrcnn.nn.Square(),
        nn.AvgPool2d(2), nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 2 * 2, 5),
    ).eval()
    with torch.no_grad():
        for bn in (net[1], net[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(6, 3, 11, 11))
    _check(net, x[:2], x)
    # Kernel 5 with stride 2 (Horner over two row phases), padding 2, one channel, 1 class.
    net = nn.Sequential(nn.Conv2d(1, 3, 5, stride=2, padding=2), pycrcnn.nn.Square(), nn.Flatten(),
                        nn.Linear(3 * 7 * 7, 1)).eval()
    x = rng.uniform(0, 1, size=(4, 1, 14, 14))
    _check(net, x[:1], x)


def test_models_outside_the_family_are_refused():
    with pytest.raises(UnsupportedLayerError, match="layout='packed' runs Conv2d → Square/Polynomial"):
        pycrcnn.plan(load_torch_model(shipped_model_path("tiny_mlp")), np.zeros((1, 1, 28, 28)), layout="packed")
    nn = torch.nn
    with pytest.raises(HEError, match="ReLU"):
        pycrcnn.plan(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)),
                     np.zeros((1, 1, 8, 8)), layout="packed")
    with pytest.raises(ValueError, match="layout"):
        pycrcnn.plan(nn.Sequential(nn.Linear(2, 2)), np.zeros((1, 2)), layout="diagonal")
    # A cubic activation, two activations in a row: refused naming the layer.
    cubic = nn.Sequential(nn.Conv2d(1, 2, 3), pycrcnn.nn.Polynomial([0.0, 1.0, 0.5, 0.1]), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(Polynomial of degree 3\)") as exc:
        pycrcnn.plan(cubic, np.zeros((1, 1, 8, 8)), layout="packed")
    assert exc.value.index == 1
    twice = nn.Sequential(nn.Conv2d(1, 2, 3), pycrcnn.nn.Square(), pycrcnn.nn.Square(), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer 2 \(Square\) follows another activation"):
        pycrcnn.plan(twice, np.zeros((1, 1, 8, 8)), layout="packed")


def test_too_deep_is_refused_naming_the_stage():
    nn = torch.nn

    def net(squares):
        layers = [nn.Conv2d(1, 2, 3, padding=1), pycrcnn.nn.Square()]
        for _ in range(squares - 1):
            layers += [nn.Conv2d(2, 2, 3, padding=1), pycrcnn.nn.Square()]
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(2 * 8 * 8, 2)).eval()

    x = np.random.default_rng(0).uniform(0, 1, (2, 1, 8, 8))
    # Three squares at m=8192: its 4 moduli give levels to two activations only.
    with pytest.raises(pycrcnn.PlanError, match=r"moduli run out at layer 5 \(Square\)") as exc:
        pycrcnn.plan(net(3), x, layout="packed", m=8192, measure=False, input_bits=3, weight_bits=3, map_bits=3)
    assert exc.value.layer == 5 and exc.value.layer_name == "Square" and "larger m" in exc.value.fix
    # Seven squares: the integers outgrow the range at the activation that doubles them past it.
    with pytest.raises(pycrcnn.PlanError, match=r"pass 120 bits at layer \d+ \(Square\)") as exc:
        pycrcnn.plan(net(7), x, layout="packed", measure=False)
    assert exc.value.layer is not None and exc.value.fix


def test_two_square_lenet_is_exact(digits):
    x, labels = digits
    net = load_torch_model(shipped_model_path("lenet1_two_square"))
    plan, ctx, model = _check(net, x[:2], x, measure=False)
    assert [r["stage"] for r in plan.report] == ["pack", "conv", "square", "map1", "square2", "linear"]
    assert [r["name"] for r in model.last_report] == ["PackedConv2d", "PackedSquare", "PackedMap", "PackedSquare",
                                                      "PackedLinear"]
    assert plan.report[-1]["argmax_agreement"] >= 0.95
    assert plan.info["version"] == 2 and len(plan.context.p) >= 3


def test_built_deep_architecture_two_convolutions_polynomial_channels():
    nn = torch.nn
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), pycrcnn.nn.Square(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), pycrcnn.nn.Polynomial([0.1, 0.5, 0.25]),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).eval()
    with torch.no_grad():
        net[3].running_mean.uniform_(-0.5, 0.5)
        net[3].running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(3).uniform(-1, 1, size=(5, 2, 15, 15))
    plan, ctx, model = _check(net, x[:2], x)
    assert [r["stage"] for r in plan.report] == ["pack", "conv", "square", "map1", "polynomial2", "linear"]
    assert all(r["noise_budget"] > 0 for r in plan.report)
    # The saved plan (version 2) makes the same context elsewhere.
    client = pycrcnn.Context.from_plan(plan.info)
    client.keygen()
    out = pycrcnn.build_from_pytorch(client, net)(client.encrypt(x[4:5]))
    assert (client.decrypt_integers(out) == plan.reference(x[4:5])).all()
    with pytest.raises(FormatError, match="newer than this build"):
        pycrcnn.Context.from_plan({**plan.info, "version": 99})
    # A server holding only the public context (special-prime baby-step keys included) computes it.
    server = pycrcnn.Context.from_public(client.public_context())
    server.attach_packed(pycrcnn.planner.packed.packed_model_from_info(plan.info))
    e = pycrcnn.CipherTensor.from_bytes(client.encrypt(x[3:4]).to_bytes(), server)
    out = pycrcnn.build_from_pytorch(server, net)(e)
    back = pycrcnn.CipherTensor.from_bytes(out.to_bytes(), client)
    assert (client.decrypt_integers(back) == plan.reference(x[3:4])).all()


@pytest.fixture(scope="module")
def tiny(digits):
    x, _ = digits
    net = load_torch_model(shipped_model_path("tiny_cnn"))
    plan = pycrcnn.plan(net, x, layout="packed", measure=False)
    plan.context.keygen()
    return net, plan, x


def test_missing_rotation_key_is_refused_naming_the_step(tiny):
    net, plan, x = tiny
    ctx = pycrcnn.Context.from_plan(plan.info)
    ctx.keygen(rotations=[(1, [1])])  # not the steps the plan needs
    model = pycrcnn.build_from_pytorch(ctx, net)
    with pytest.raises(HEError, match=r"no rotation key for step \d+ at ciphertext level \d"):
        model(ctx.encrypt(x[:1]))
    assert ctx.rotation_steps == [(1, [1])]
    # Without a plan, rotations=True gives the power-of-two steps.
    plain = pycrcnn.Context(m=2048, encoding="batch", n_plaintext_moduli=1)
    plain.keygen(rotations=True)
    assert plain.rotation_steps == [(0, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512])]


def test_server_computes_from_the_public_context(tiny):
    net, plan, x = tiny
    ctx = plan.context
    blob = ctx.public_context()
    server = pycrcnn.Context.from_public(blob)
    assert server.rotation_steps == ctx.rotation_steps and not server.has_secret_key
    server.attach_packed(ctx.packed_model)
    e = ctx.encrypt(x[:1])
    out = pycrcnn.build_from_pytorch(server, net)(pycrcnn.CipherTensor.from_bytes(e.to_bytes(), server))
    back = pycrcnn.CipherTensor.from_bytes(out.to_bytes(), ctx)
    assert (ctx.decrypt_integers(back) == plan.reference(x[:1])).all()


def test_corrupted_and_foreign_packed_blobs_are_refused(tiny):
    net, plan, x = tiny
    ctx = plan.context
    e = ctx.encrypt(x[:1])
    data = bytearray(e.to_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(data) * 8, size=20):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(FormatError):
            pycrcnn.CipherTensor.from_bytes(bytes(bad), ctx)
    with pytest.raises(FormatError):
        pycrcnn.CipherTensor.from_bytes(bytes(data[:-100]), ctx)
    other = pycrcnn.Context.from_plan(plan.info)
    other.keygen()
    with pytest.raises(FormatError, match="another key"):
        pycrcnn.CipherTensor.from_bytes(bytes(data), other)
    pc = bytearray(ctx.public_context())
    for i in rng.integers(len(pc) // 2 * 8, len(pc) * 8, size=10):  # the rotation keys sit in the second half
        bad = bytearray(pc)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(FormatError):
            pycrcnn.Context.from_public(bytes(bad))
    # A packed input is not a result: decrypt_integers refuses it; plain contexts refuse it too.
    with pytest.raises(HEError):
        ctx.decrypt_integers(e)
    with pytest.raises(HEError, match=r"encrypt one image \[1, 1, 28, 28\]"):
        ctx.encrypt(x[:2])


def test_plan_saved_with_the_model(tiny, tmp_path):
    net, plan, x = tiny
    path = pycrcnn.export_model(net, tmp_path / "tiny.npz", plan=plan)
    info = load_plan(path)
    assert info == plan.info
    assert load_plan(pycrcnn.export_model(net, tmp_path / "bare.npz")) is None
    client = pycrcnn.Context.from_plan(info)
    assert client.packed_model is not None and client.moduli == plan.context.moduli
    client.keygen()
    model = pycrcnn.build_from_pytorch(client, path)
    out = model(client.encrypt(x[3:4]))
    assert (client.decrypt_integers(out) == plan.reference(x[3:4])).all()
    with pytest.raises(FormatError):
        pycrcnn.Context.from_plan({"format": "something else"})
