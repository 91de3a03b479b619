"""Per-layer weight scales, the planner's precision choice and calibrated plans.

Real shipped models, real MNIST digits, real encryption (small m), a real
server for the round trip.
"""
from __future__ import annotations

import numpy as np
import pytest

import pycrcnn
from pycrcnn import Context, HEError, datasets
from pycrcnn.client import Client
from pycrcnn.model import build_from_spec
from pycrcnn.models import load_shipped_spec
from pycrcnn.planner.batch import _Layers

# lenet1_square: conv 1→4 5×5, square, pool, conv 4→12 5×5, pool, flatten, linear 192→10
SCALES = dict(scale_bits=4, weight_scale_bits=[5, 6, 7])


@pytest.fixture(scope="module")
def digits():
    images, _ = datasets.load_mnist(limit=32)
    return datasets.normalize(images).astype(np.float64)


def _exact(a, b) -> bool:
    return np.array_equal(np.asarray(a).astype(object), np.asarray(b).astype(object))


@pytest.fixture(scope="module")
def per_layer_ctx():
    ctx = Context(m=4096, encoding="batch", n_plaintext_moduli=3, p_bits=25, **SCALES)
    ctx.keygen()
    return ctx


def test_per_layer_scales_run_exactly_as_the_reference(per_layer_ctx, digits):
    spec = load_shipped_spec("lenet1_square")
    ctx = per_layer_ctx
    assert ctx.parameters()["weight_scale_bits"] == [5, 6, 7]
    model = build_from_spec(ctx, spec)
    ints, scale = model.runner().reference(digits[:8], 4, 7)
    # every layer at its own scale: 4 + 5, squared, +2 (pool), +6, +2, +7
    assert scale == 2.0 ** 35
    got = ctx.decrypt_integers(model(ctx.encrypt(digits[:8])))
    assert _exact(got, ints)
    real = spec.forward_numpy(digits[:8])
    assert np.mean(np.argmax(np.asarray(got, dtype=np.float64), 1) == np.argmax(real, 1)) >= 0.75
    # A uniform context is another fingerprint (the list is part of the parameters).
    uniform = Context(m=4096, encoding="batch", n_plaintext_moduli=3, p_bits=25, scale_bits=4, weight_scale_bits=7)
    assert uniform.fingerprint != ctx.fingerprint and uniform.parameters()["weight_scale_bits"] == 7


def test_a_list_of_the_wrong_length_is_refused_naming_both_counts():
    spec = load_shipped_spec("lenet1_square")
    with pytest.raises(HEError, match=r"2 per-layer weight scales.*3 weighted layers"):
        build_from_spec(Context(m=1024, encoding="batch", weight_scale_bits=[5, 6]), spec)
    with pytest.raises(pycrcnn.ParameterError, match="at most 40"):
        Context(m=1024, encoding="batch", weight_scale_bits=[5, 41, 3])
    with pytest.raises(pycrcnn.ParameterError, match="batch encoding"):
        Context(m=1024, encoding="fractional", weight_scale_bits=[5, 6])


def test_a_layer_range_takes_its_own_entries(per_layer_ctx, digits):
    """A selection (what /compute's ``layers`` builds) keeps the whole model's list."""
    spec = load_shipped_spec("lenet1_square")
    whole = build_from_spec(per_layer_ctx, spec).runner()
    head = build_from_spec(per_layer_ctx, spec, layers=range(0, 3)).runner()
    tail = build_from_spec(per_layer_ctx, spec, layers=range(3, 7))
    assert head.reference(digits[:2], 4, 7)[1] == 2.0 ** 20
    t = per_layer_ctx.encrypt(digits[:2])
    y = build_from_spec(per_layer_ctx, spec, layers=range(0, 3))(t)
    assert _exact(per_layer_ctx.decrypt_integers(tail(y)), whole.reference(digits[:2], 4, 7)[0])


def test_the_planners_bound_is_the_engines(per_layer_ctx):
    """Worst-case bounds with per-layer scales: the planner's (exact Python
    integers) and the engine's growth tracking agree layer by layer."""
    spec = load_shipped_spec("lenet1_square")
    model = build_from_spec(per_layer_ctx, spec)
    engine = [r["growth"] for r in model.predict(1.0)]
    planner = _Layers(spec, (1, 28, 28)).bounds(1.0, 4, [5, 6, 7])
    assert len(engine) == len(planner)
    # fused steps (conv+square+pool) report the bound after their last layer
    assert engine[-1]["coeff_bound"] == pytest.approx(float(planner[-1]), rel=1e-9), (engine, planner)
    for e in engine:
        assert any(e["coeff_bound"] == pytest.approx(float(p), rel=1e-9) for p in planner), (engine, planner)


def test_per_layer_context_through_a_real_server(server, per_layer_ctx, digits):
    spec = load_shipped_spec("lenet1_square")
    logits, report = Client(server).classify(per_layer_ctx, digits[:4], "lenet1_square", rencrypt_positions=[])
    ints, scale = build_from_spec(per_layer_ctx, spec).runner().reference(digits[:4], 4, 7)
    np.testing.assert_array_equal(logits, np.asarray(ints, dtype=np.float64) / scale)


def test_the_planner_chooses_per_layer_scales_and_states_its_prediction(digits):
    spec = load_shipped_spec("tiny_cnn")
    plan = pycrcnn.plan(spec, digits, input_range=(0.0, 1.0), min_agreement=0.999, m=4096)
    w = plan.weight_scale_bits
    assert isinstance(w, (int, list))
    assert any("predicted argmax agreement" in n and "0.999" in n for n in plan.notes), plan.notes
    # explicit per-layer overrides are kept
    n_weighted = sum(1 for l in spec.layers if l.type in ("Conv2d", "Conv1d", "Linear"))
    fixed = pycrcnn.plan(spec, digits, input_range=(0.0, 1.0), scale_bits=6, weight_scale_bits=[7] * (n_weighted - 1) + [8],
                         m=4096)
    assert fixed.scale_bits == 6 and fixed.weight_scale_bits == [7] * (n_weighted - 1) + [8]
    with pytest.raises(ValueError, match="weighted"):
        pycrcnn.plan(spec, digits, input_range=(0.0, 1.0), scale_bits=6, weight_scale_bits=[7] * (n_weighted + 1))


def test_a_calibrated_plan_runs_exactly_on_its_calibration_digits(digits):
    spec = load_shipped_spec("tiny_cnn")
    worst = pycrcnn.plan(spec, digits, input_range=(0.0, 1.0), scale_bits=6, weight_scale_bits=8, m=4096)
    plan = pycrcnn.plan(spec, digits, input_range=(0.0, 1.0), scale_bits=6, weight_scale_bits=8, m=4096,
                        mode="calibrated", margin_bits=1)
    assert plan.mode == "calibrated" and plan.margin_bits == 1
    assert any("times 2^1" in n and "calibrated" in n for n in plan.notes), plan.notes
    # fewer plaintext bits than the worst case
    assert max(r["bits"] for r in plan.report) < max(r["bits"] for r in worst.report)
    ctx = plan.context
    assert ctx.parameters()["calibrated_bound_bits"] == pytest.approx(plan.parameters["calibrated_bound_bits"])
    ctx.keygen()
    got = ctx.decrypt_integers(plan.model(ctx)(ctx.encrypt(digits)))
    assert _exact(got, plan.reference(digits))
    # the declared bound must fit the plaintext modulus
    with pytest.raises(pycrcnn.ParameterError, match="calibrated_bound_bits"):
        Context(m=4096, encoding="batch", p_bits=30, calibrated_bound_bits=40.0)
