"""The shipped models also ship as torch-free ``.npz`` (scripts/export_models.py):
every one exists, is packaged, loads where torch cannot be imported, and
computes what its ``.pt`` computes."""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pycrcnn
from pycrcnn import datasets
from pycrcnn.models import INFO, MODELS_DIR, list_shipped_models, load_torch_model, shipped_model_path
from pycrcnn.net_builder import load_model_spec

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(INFO)


def _maturin_include():
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import re

        line = re.search(r"^include\s*=\s*\[(.*)\]", text.split("[tool.maturin]", 1)[1], re.M).group(1)
        return re.findall(r'"([^"]+)"', line)
    return tomllib.loads(text)["tool"]["maturin"]["include"]


def test_every_shipped_model_has_an_npz_that_is_packaged():
    assert NAMES == list_shipped_models() and len(NAMES) >= 4
    include = _maturin_include()
    for name in NAMES:
        path = shipped_model_path(name, "npz")
        assert path == MODELS_DIR / INFO[name]["npz"] and path.suffix == ".npz" and path.stem == name
        rel = path.relative_to(REPO).as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in include), (rel, include)
    with pytest.raises(ValueError):
        shipped_model_path(NAMES[0], "onnx")


def test_npz_describes_the_pt():
    for name in NAMES:
        npz, pt = load_model_spec(shipped_model_path(name, "npz")), load_model_spec(shipped_model_path(name))
        assert npz.name == pt.name == name
        for field in ("input_shape", "normalization", "accuracy", "rencrypt_positions", "n_modules"):
            assert getattr(npz, field) == getattr(pt, field), (name, field)
        assert npz.metadata.get("description") == INFO[name]["description"]
        assert [(l.index, l.type, l.params) for l in npz.layers] == [(l.index, l.type, l.params) for l in pt.layers]
        for a, b in zip(npz.layers, pt.layers):
            for w1, w2 in ((a.weight, b.weight), (a.bias, b.bias)):
                assert (w1 is None and w2 is None) or np.array_equal(w1, w2)


def test_npz_loads_without_torch_and_matches_the_pt(tmp_path):
    import torch

    images, _ = datasets.load_mnist(split="test", limit=8)
    x = datasets.normalize(images).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from pycrcnn.models import load_shipped_spec
        x = np.load({str(tmp_path / 'x.npy')!r})
        outs = {{name: load_shipped_spec(name).forward_numpy(x) for name in {NAMES!r}}}
        np.savez({str(tmp_path / 'out.npz')!r}, **outs)
        print("torch loaded:", sys.modules.get("torch") is not None)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(pycrcnn.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch loaded: False" in run.stdout
    with np.load(tmp_path / "out.npz") as outs:
        for name in NAMES:
            net = load_torch_model(shipped_model_path(name)).double()
            with torch.no_grad():
                want = net(torch.from_numpy(x)).numpy()
            assert outs[name].shape == want.shape == (8, 10)
            assert np.max(np.abs(outs[name] - want)) <= 1e-9, name
            assert (outs[name].argmax(1) == want.argmax(1)).all()
