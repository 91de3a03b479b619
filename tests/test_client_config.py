"""Client configs: the original PyCrCNN's parameters.json (no ``encoding`` key)
means the seed's fractional encoding."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pycrcnn.client import config_encoding, context_from_config, main

#: the original client's parameters.json, as it was
ORIGINAL_CONFIG = {
    "address": "http://127.0.0.1:5000/compute",
    "encryption_parameters": [{"m": 2048, "p": 13513511, "sec": 128, "base": 2}],
    "net": "MNIST",
    "layers": [0, 1, 2, 3],
}


def test_a_config_without_encoding_is_fractional():
    assert config_encoding(ORIGINAL_CONFIG) == "fractional"
    ctx = context_from_config(ORIGINAL_CONFIG)
    assert ctx.encoding == "fractional" and ctx.m == 2048 and ctx.p == 13513511 and ctx.sec == 128
    assert ctx.parameters()["base"] == 2
    ctx.keygen()
    x = np.array([[0.25, -1.5]])
    assert np.max(np.abs(ctx.decrypt(ctx.encrypt(x)) - x)) < 1e-9
    # the seed's Pyfhel spellings of the digits
    cfg = {"encryption_parameters": [{"m": 2048, "p": 13513511, "intDigits": 32, "fracDigits": 16}]}
    assert context_from_config(cfg).parameters()["frac_digits"] == 16


def test_encoding_named_in_the_config_or_overridden():
    batch = {"encryption_parameters": [{"m": 2048, "sec": 128, "scale_bits": 6, "weight_scale_bits": 6}]}
    assert config_encoding(dict(batch, encoding="batch")) == "batch"
    assert config_encoding({"encryption_parameters": [dict(batch["encryption_parameters"][0], encoding="batch")]}) \
        == "batch"
    assert config_encoding(batch, "batch") == "batch"
    assert config_encoding(dict(ORIGINAL_CONFIG, encoding="batch"), "fractional") == "fractional"
    assert context_from_config(batch, "batch").encoding == "batch"
    assert config_encoding({}) == "fractional"  # nothing at all: the seed's encoding too
    with pytest.raises(ValueError, match="unknown encoding"):
        config_encoding(dict(ORIGINAL_CONFIG, encoding="ckks"))
    with pytest.raises(ValueError, match="encryption_parameters"):
        config_encoding({"encryption_parameters": [42]})


def test_cli_takes_the_original_config_as_it_is(tmp_path, capsys):
    cfg = tmp_path / "parameters.json"
    cfg.write_text(json.dumps(dict(ORIGINAL_CONFIG, address="http://127.0.0.1:9/compute")))  # nobody listens
    assert main(["--config", str(cfg), "--mnist", "1"]) == 1
    captured = capsys.readouterr()
    assert "fractional" in captured.out  # keys made for the seed's encoding
    assert "cannot reach" in captured.err or "failed" in captured.err
    assert "prime" not in captured.err
    cfg.write_text(json.dumps(dict(ORIGINAL_CONFIG, encoding="rot13")))
    assert main(["--config", str(cfg), "--mnist", "1"]) == 2
    assert "unknown encoding" in capsys.readouterr().err


def test_client_finds_original_net_names_case_insensitively(monkeypatch):
    from pycrcnn.client import Client

    client = Client("http://127.0.0.1:9")
    listing = {"models": [{"name": "mnist", "n_modules": 4}, {"name": "Tiny", "n_modules": 2},
                          {"name": "tiny", "n_modules": 3}]}
    monkeypatch.setattr(client, "_get", lambda path: listing)
    assert client.model("MNIST")["name"] == "mnist"  # the original configs' spelling of mnist.pt
    assert client.model("mnist")["name"] == "mnist"
    assert client.model("Tiny")["n_modules"] == 2  # an exact match wins
    with pytest.raises(KeyError, match="TINY"):
        client.model("TINY")  # two models differ only in case: no guessing
    with pytest.raises(KeyError, match="lenet"):
        client.model("lenet")
