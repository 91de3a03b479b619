"""pycrcnn.plan (batch layout): automatic parameters, exact integers, streaming.

Real models (shipped ones and two architectures built here), real MNIST
digits, real encryption; small m and small batches.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import pycrcnn
from pycrcnn import Context, Plan, PlanError, datasets
from pycrcnn.models import list_shipped_models, load_shipped_spec
from pycrcnn.spec import LayerSpec, ModelSpec
from pycrcnn.planner.batch_plan import BatchPlan


@pytest.fixture(scope="module")
def digits():
    images, labels = datasets.load_mnist(limit=96)
    return datasets.normalize(images).astype(np.float64), labels


def _spec(name, layers, input_shape):
    return ModelSpec(name=name, layers=layers, input_shape=input_shape)


def conv_square_pool_net(seed=0):
    """conv 1→3 4×4 stride 2, Square, AvgPool 2, Flatten, Linear 108→10 (built here, random weights)."""
    rng = np.random.default_rng(seed)
    return _spec("conv_square_pool", [
        LayerSpec(0, "Conv2d", {"in_channels": 1, "out_channels": 3, "kernel_size": (4, 4), "stride": (2, 2),
                                "padding": (0, 0), "dilation": (1, 1), "groups": 1, "bias": True},
                  rng.normal(0, 0.3, (3, 1, 4, 4)), rng.normal(0, 0.1, 3)),
        LayerSpec(1, "Square", {}),
        LayerSpec(2, "AvgPool2d", {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)}),
        LayerSpec(3, "Flatten", {}),
        LayerSpec(4, "Linear", {"in_features": 108, "out_features": 10, "bias": True},
                  rng.normal(0, 0.2, (10, 108)), rng.normal(0, 0.1, 10)),
    ], (1, 28, 28))


def poly_mlp(seed=1):
    """AvgPool 7, Flatten, Linear 16→8, Polynomial 0.1 + 0.5x + 0.25x², Linear 8→4 (built here)."""
    rng = np.random.default_rng(seed)
    return _spec("poly_mlp", [
        LayerSpec(0, "AvgPool2d", {"kernel_size": (7, 7), "stride": (7, 7), "padding": (0, 0)}),
        LayerSpec(1, "Flatten", {}),
        LayerSpec(2, "Linear", {"in_features": 16, "out_features": 8, "bias": True},
                  rng.normal(0, 0.5, (8, 16)), rng.normal(0, 0.1, 8)),
        LayerSpec(3, "Polynomial", {"coefficients": [0.1, 0.5, 0.25]}),
        LayerSpec(4, "Linear", {"in_features": 8, "out_features": 4, "bias": True},
                  rng.normal(0, 0.5, (4, 8)), None),
    ], (1, 28, 28))


def _exact(a, b) -> bool:
    return np.array_equal(np.asarray(a).astype(object), np.asarray(b).astype(object))


@pytest.mark.parametrize("build", [conv_square_pool_net, poly_mlp, lambda: load_shipped_spec("tiny_cnn"),
                                   lambda: load_shipped_spec("tiny_mlp")], ids=["conv_square_pool", "poly_mlp",
                                                                                "tiny_cnn", "tiny_mlp"])
def test_encrypted_batch_equals_the_reference_and_agrees_with_torch(build, digits):
    x, _ = digits
    spec = build()
    plan = pycrcnn.plan(spec, x[:64], input_range=(0.0, 1.0))
    assert isinstance(plan, Plan) and plan.m <= 8192
    assert len(plan.report) == len(spec.layers)
    assert all(r["bits"] < r["plaintext_bits"] for r in plan.report), plan.table()
    ctx = plan.context
    ctx.keygen()
    model = plan.model(ctx)
    t = ctx.encrypt(x[:24])
    y, reports = model.run(t, measure_noise=True)
    got = ctx.decrypt_integers(y)
    want = plan.reference(x[:24])
    assert _exact(got, want), "encrypted batch results must equal plan.reference exactly"
    # Argmax agreement with the float model (the planner demanded it on the calibration inputs).
    real = spec.forward_numpy(x[:24])
    if real.shape[1] > 1:
        assert np.mean(np.argmax(plan.decode(got), 1) == np.argmax(real, 1)) >= 0.95
    # The predicted noise budget is within 2 bits of the real one (or conservative), layer by layer.
    for predicted, measured in zip(plan.report, reports):
        assert predicted["noise_budget"] - measured["noise_budget"] <= 2, (predicted, measured)
        assert measured["noise_budget"] > 0


def test_every_shipped_model_gets_auto_parameters(digits):
    x, _ = digits
    for name in list_shipped_models():
        spec = load_shipped_spec(name)
        # 32 digits cannot predict 1-in-2,000 disagreements: ask that all of them agree
        plan = pycrcnn.plan(spec, x[:32], input_range=(0.0, 1.0), min_agreement=1.0)
        assert plan.report[-1]["noise_budget"] >= 6, (name, plan.table())
        assert all(r["bits"] < r["plaintext_bits"] for r in plan.report), (name, plan.table())
        # The reference agrees with the float model on the calibration digits.
        ints = plan.reference(x[:32])
        assert np.array_equal(np.argmax(plan.decode(ints), 1), np.argmax(spec.forward_numpy(x[:32]), 1)), name
        # The plan survives a JSON round trip with its context's parameters.
        again = BatchPlan.from_dict(plan.to_dict(), spec)
        assert again.context.moduli == plan.context.moduli and again.context.p == plan.context.p


def test_crt_recombination_at_the_edges_of_the_range():
    ctx = Context(m=4096, encoding="batch", scale_bits=0, weight_scale_bits=0, p_bits=20, n_plaintext_moduli=2)
    ctx.keygen()
    T = math.prod(ctx.p)
    edge = (T // 2) & ~0xFF  # exactly representable in float64, just inside ±T/2
    values = np.array([[edge], [-edge], [edge - 256], [1 - edge], [0], [1], [-1], [(T // 4) & ~0xFF]], dtype=np.float64)
    got = ctx.decrypt_integers(ctx.encrypt(values))
    assert [int(v) for v in got.ravel()] == [int(v) for v in values.ravel()]
    # A product whose values exceed each prime but not their product comes back exactly.
    small = np.array([[3 << 17], [-(5 << 16)], [12345]], dtype=np.float64)
    sq = ctx.decrypt_integers(ctx.square(ctx.encrypt(small)))
    assert [int(v) for v in sq.ravel()] == [int(v) ** 2 for v in small.ravel()]
    # Beyond 63 bits the integers are Python ints in an object array.
    big = Context(m=4096, encoding="batch", scale_bits=0, p_bits=30, n_plaintext_moduli=3)
    big.keygen()
    v = np.array([[float(1 << 70)], [-float(1 << 70) - float(1 << 30)]])
    out = big.decrypt_integers(big.encrypt(v))
    assert out.dtype == object and [int(a) for a in out.ravel()] == [1 << 70, -(1 << 70) - (1 << 30)]


def test_refusal_names_the_layer_and_the_fix(digits):
    x, _ = digits
    rng = np.random.default_rng(2)
    layers = [LayerSpec(0, "AvgPool2d", {"kernel_size": (7, 7), "stride": (7, 7), "padding": (0, 0)}),
              LayerSpec(1, "Flatten", {}),
              LayerSpec(2, "Linear", {"in_features": 16, "out_features": 4, "bias": False}, rng.normal(0, 1, (4, 16)))]
    for i in range(3, 8):
        layers.append(LayerSpec(i, "Square", {}))
    spec = _spec("deep", layers, (1, 28, 28))
    with pytest.raises(PlanError) as info:
        pycrcnn.plan(spec, x[:8], input_range=(0.0, 1.0), scale_bits=8, weight_scale_bits=8)
    assert info.value.layer is not None and info.value.layer_name == "Square"
    assert f"layer {info.value.layer} (Square)" in str(info.value) and "rencrypt" in str(info.value)
    # The noise budget, not the plaintext range, runs out when m is capped.
    shallow = _spec("two", layers[:6], (1, 28, 28))
    with pytest.raises(PlanError) as info:
        pycrcnn.plan(shallow, x[:8], input_range=(0.0, 1.0), scale_bits=2, weight_scale_bits=2, m=2048)
    assert info.value.layer_name == "Square" and "layer" in str(info.value)
    # The packed layout refuses models outside its family, saying why.
    with pytest.raises(pycrcnn.UnsupportedLayerError, match="layout='packed' runs Conv2d"):
        pycrcnn.plan(shallow, x[:8], layout="packed")


def test_a_batch_larger_than_m_is_split_and_streamed(digits):
    x, _ = digits
    spec = load_shipped_spec("tiny_mlp")
    plan = pycrcnn.plan(spec, x[:32], input_range=(0.0, 1.0), m=2048)
    assert plan.m == 2048
    ctx = plan.context
    ctx.keygen()
    many = np.concatenate([x] * 23)[:2100]  # 2,100 images: one full batch of 2,048 and a partial one of 52
    parts = list(plan.stream(many, ctx))
    assert [p.stop - p.start for p, _ in parts] == [2048, 52]
    got = np.concatenate([ints for _, ints in parts])
    assert _exact(got, plan.reference(many))
    # batch_size below m streams in smaller pieces, with a progress bar.
    got = plan.run(many[:40], ctx, batch_size=16, progress=True)
    assert _exact(got, plan.reference(many[:40]))


def test_an_unknown_mode_is_refused_clearly(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="calibrated"):
        pycrcnn.plan(conv_square_pool_net(), x[:8], mode="optimistic")


def test_auto_parameters_in_the_tester_and_the_client_config(tmp_path):
    from pycrcnn.client import context_from_config
    from pycrcnn.models import shipped_model_path
    from pycrcnn.parameters_tester import run_tests

    report = run_tests({"encryption_parameters": "auto", "model_path": str(shipped_model_path("tiny_cnn", "npz")),
                        "images": 8})
    (result,) = report["results"]
    assert result["status"] == "ok" and result["exact"] and result["argmax_equal"], result
    assert result["planned"]["m"] >= 2048 and report["encoding"] == "batch"
    ctx = context_from_config({"encryption_parameters": "auto", "net": "TINY_MLP"})
    assert ctx.encoding == "batch" and ctx.p
    with pytest.raises(ValueError, match="model_path"):
        context_from_config({"encryption_parameters": ["auto"], "net": "no_such_model"})


def test_square_and_pooling_are_fused_when_the_model_is_built(digits):
    """The conv, square and pooling of conv_square_pool_net run as one engine
    step (the square unrelinearized, the squares of a window added before BFV
    scales them back); a loop over the layers computes the same integers as
    model(x), both equal to plan.reference."""
    x, _ = digits
    spec = conv_square_pool_net()
    plan = pycrcnn.plan(spec, x[:32], input_range=(0.0, 1.0), m=4096)
    ctx = plan.context
    ctx.keygen()
    model = plan.model(ctx)
    assert [layer._layer.name for layer in model][:3] == ["Conv2d+Square+AvgPool2d", "Square", "AvgPool2d"]
    want = plan.reference(x[:16])
    t = ctx.encrypt(x[:16])
    y, reports = model.run(t)
    assert _exact(ctx.decrypt_integers(y), want)
    assert [r["shape"] for r in reports][:3] == [[16, 3, 6, 6]] * 3
    for layer in model:
        t = layer(t)
    assert _exact(ctx.decrypt_integers(t), want)


def two_block_net(seed=2):
    """conv 1→2 5×5 stride 2, Square, AvgPool 2, conv 2→6 3×3, Square, AvgPool 2, Flatten, Linear 24→10
    (built here): the second conv has more outputs (96) than inputs (72) per image."""
    rng = np.random.default_rng(seed)
    conv = lambda i, o, k, s: {"in_channels": i, "out_channels": o, "kernel_size": (k, k), "stride": (s, s),  # noqa: E731
                               "padding": (0, 0), "dilation": (1, 1), "groups": 1, "bias": True}
    pool = {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)}
    return _spec("two_block", [
        LayerSpec(0, "Conv2d", conv(1, 2, 5, 2), rng.normal(0, 0.3, (2, 1, 5, 5)), rng.normal(0, 0.1, 2)),
        LayerSpec(1, "Square", {}),
        LayerSpec(2, "AvgPool2d", pool),
        LayerSpec(3, "Conv2d", conv(2, 6, 3, 1), rng.normal(0, 0.3, (6, 2, 3, 3)), rng.normal(0, 0.1, 6)),
        LayerSpec(4, "Square", {}),
        LayerSpec(5, "AvgPool2d", pool),
        LayerSpec(6, "Flatten", {}),
        LayerSpec(7, "Linear", {"in_features": 24, "out_features": 10, "bias": True},
                  rng.normal(0, 0.2, (10, 24)), rng.normal(0, 0.1, 10)),
    ], (1, 28, 28))


def test_second_square_relinearizes_before_its_conv(digits):
    """Two fused conv+square+pool blocks: the second relinearizes the first's
    pooled (three-part) output before its conv, which has more outputs than
    inputs; the results equal plan.reference exactly, each fused step switches
    down in the square's own scaling, and the probes' noise prediction stays
    within 2 bits or on the safe side."""
    x, _ = digits
    spec = two_block_net()
    plan = pycrcnn.plan(spec, x[:32], input_range=(0.0, 1.0), min_agreement=1.0)  # 32 digits: all agree
    ctx = plan.context
    ctx.keygen()
    model = plan.model(ctx)
    names = [layer._layer.name for layer in model]
    assert names[0] == names[3] == "Conv2d+Square+AvgPool2d", names
    t = ctx.encrypt(x[:16])
    y, reports = model.run(t, measure_noise=True)
    assert _exact(ctx.decrypt_integers(y), plan.reference(x[:16]))
    levels = [r["level"] for r in reports]
    assert levels[0] == 1 and levels[3] == min(2, len(ctx.moduli) - 1), levels
    for predicted, measured in zip(plan.report, reports):
        assert predicted["noise_budget"] - measured["noise_budget"] <= 2, (predicted, measured)
        assert measured["noise_budget"] > 0
    # A loop over the layers takes the same path.
    for layer in model:
        t = layer(t)
    assert _exact(ctx.decrypt_integers(t), plan.reference(x[:16]))
