"""The parameters tester: CLI and run_tests, on the shipped tiny models (seconds, not minutes).

A fractional-encoding run of the seed's single-square LeNet-1 at m=4096 takes
≈ 10–20 s per digit on two cores (the 2,304 ciphertext squares dominate); the
tests here use ``tiny_cnn`` (conv 1→2 3×3 stride 3, Square, Flatten, Linear
162→10: 162 squares) and ``tiny_mlp`` (no ciphertext products), which exercise
the same code paths.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import matplotlib  # noqa: F401  (a test dependency: --plot)
import pycrcnn
from pycrcnn import datasets  # noqa: E402
from pycrcnn.parameters_tester import main, run_tests  # noqa: E402

SEED_EXAMPLE = {"m": 2048, "p": 13513511, "sec": 128, "base": 2, "rencrypt_positions": []}  # the seed's README config
SANE = {"m": 4096, "p": 953983721, "sec": 128, "base": 2}  # the seed's published setting

PER_LAYER_KEYS = {"index", "layer_name", "min_noise", "max_error", "max_error_position", "cipher_value", "plain_value",
                  "avg_error", "seconds", "coeff_bound", "limit", "wrap_error_bound", "fits"}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(pycrcnn.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("MPLBACKEND", "Agg")
    return env


def test_cli_seed_example_and_sane_set(tmp_path):
    cfg = {"encryption_parameters": [SEED_EXAMPLE, SANE], "debug": "y", "layers": None,
           "model_path": "tiny_cnn", "max_threads": 2}
    cfg_path = tmp_path / "encryption_parameters.json"
    cfg_path.write_text(json.dumps(cfg))
    out, png = tmp_path / "results.json", tmp_path / "noise.png"
    data = datasets.mnist_dir()
    r = subprocess.run([sys.executable, "-m", "pycrcnn.parameters_tester", str(cfg_path), "--data", str(data),
                        "--out", str(out), "--plot", str(png), "--images", "1"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads(out.read_text())
    assert report["images"] == 1 and report["labels"] == [7] and "MNIST" in report["data"]
    assert report["reference"].startswith("torch")
    seed, sane = report["results"]
    assert seed["encryption_parameters"] == SEED_EXAMPLE and sane["encryption_parameters"] == SANE

    # m=2048, p=13513511 (≈ 24 bits): the square uses up the noise budget, at a named layer
    assert seed["status"] == "noise_budget_exhausted", seed
    assert seed["failed_layer"] == {"index": 1, "layer_name": "Square"}
    assert "NoiseBudgetExhausted" in seed["error"] and seed["final_max_error"] is None
    assert "noise_budget_exhausted at layer 1 (Square)" in r.stdout

    # m=4096, p=953983721: the values are right, layer by layer (the seed's per-layer entries)
    assert sane["status"] in ("ok", "wrap_possible") and sane["error"] is None
    assert sane["final_max_error"] < 1e-6 and sane["argmax_equal"] is True
    layers = sane["layers"]
    assert [e["layer_name"] for e in layers] == ["start", "Conv2d", "Square", "Flatten", "Linear"]
    for e in layers[1:]:
        assert PER_LAYER_KEYS <= set(e), set(e) ^ PER_LAYER_KEYS
        assert e["min_noise"] > 0 and e["max_error"] < 1e-6
        assert e["limit"] == pytest.approx(953983721 / 2)
        assert abs(e["cipher_value"] - e["plain_value"]) == pytest.approx(e["max_error"])
    assert layers[2]["min_noise"] < layers[1]["min_noise"] - 20  # the square costs tens of bits


def test_too_small_p_and_m_are_reported_not_raised(tmp_path):
    cfg = {"encryption_parameters": [
        {"m": 4096, "p": 257, "sec": 128, "base": 2},           # coefficients wrap mod p
        {"m": 1024, "p": 953983721, "sec": 128, "base": 2},     # no context: p ≥ the first ciphertext prime
        {"m": 4096, "p": 953983721, "sec": 100, "base": 2},     # no such security level
    ], "debug": True, "model_path": "tiny_cnn", "max_threads": 2}
    report = run_tests(cfg, layers=[0, 1], out=tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["layers"] == [0, 1]
    small_p, small_m, bad_sec = report["results"]

    assert small_p["status"] == "wrap_possible" and small_p["coefficients_fit"] is False
    assert small_p["first_wrap_layer"]["layer_name"] in ("Conv2d", "Square")
    fw = small_p["first_wrap_layer"]
    assert any(w.startswith(f"layer {fw['index']} ({fw['layer_name']}): coefficient bound") for w in small_p["warnings"])
    # and the damage is measured, not hidden
    assert small_p["final_max_error"] > 0.1
    assert small_p["measured_wrap_layer"] is not None
    square = small_p["layers"][-1]
    assert square["fits"] is False and square["coeff_bound"] > square["limit"] == 128.5

    for res in (small_m, bad_sec):
        assert res["status"] == "context_error" and res["failed_layer"]["layer_name"] == "context"
        assert "ParameterError" in res["error"]
    assert "m=1024" in small_m["error"] and "128" in bad_sec["error"]


def test_run_tests_without_debug_and_with_rencryption():
    cfg = {"encryption_parameters": [dict(SANE, rencrypt_positions=[2])], "debug": "n", "max_threads": 1}
    report = run_tests(cfg, model="tiny_cnn", images=2)
    res = report["results"][0]
    assert report["debug"] is False and report["images"] == 2
    assert res["status"] in ("ok", "wrap_possible") and res["final_max_error"] < 1e-6
    names = [e["layer_name"] for e in res["layers"]]
    assert names == ["start", "Conv2d", "Square", "Rencryption", "Flatten", "Linear"]
    renc = res["layers"][3]
    assert renc["noise_sampled"] is True and renc["min_noise"] > res["layers"][2]["min_noise"] + 20
    assert "max_error" not in res["layers"][1]  # only the final output is decrypted
    assert len(res["predictions"]) == 2


def test_numpy_reference_for_exported_models(tmp_path):
    """An .npz model (no torch needed) is compared with the spec's numpy forward."""
    from pycrcnn.models import shipped_model_path
    from pycrcnn.net_builder import export_model, load_model_spec

    npz = export_model(load_model_spec(shipped_model_path("tiny_mlp")), tmp_path / "tiny_mlp.npz")
    report = run_tests({"encryption_parameters": [SANE], "debug": True}, model=str(npz))
    res = report["results"][0]
    assert report["reference"].startswith("numpy")
    assert res["status"] == "ok" and res["final_max_error"] < 1e-6 and res["argmax_equal"] is True


def test_cli_bad_config_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"debug": True}))
    assert main([str(bad), "--model", "tiny_mlp", "--out", str(tmp_path / "o.json")]) == 2
    assert "encryption_parameters" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main([str(bad), "--model", "tiny_mlp"]) == 2
