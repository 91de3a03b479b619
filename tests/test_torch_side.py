"""Tests of the torch side: pycrcnn.nn, pycrcnn.datasets, pycrcnn.models.

The real MNIST files and the original PyCrCNN models come from the shared
folder (``PYCRCNN_SHARED``, default ``<repo>/../shared``).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch
from torch import nn  # noqa: E402

from pycrcnn import datasets  # noqa: E402
from pycrcnn import models as pmodels  # noqa: E402
from pycrcnn.nn import Polynomial, Square  # noqa: E402

torch.set_num_threads(2)

SEED_MODELS = [
    "LeNet1.pt",
    "LeNet1_Approx_single_square.pt",
    "SimpleModel.pt",
    "SimpleModelApprox_Minimal.pt",
    "mnist.pt",
    "model.pt",
]
SHIPPED = ["lenet1_square", "lenet1_two_square", "tiny_cnn", "tiny_mlp"]


@pytest.fixture(scope="module")
def shared() -> Path:
    d = datasets.shared_dir()
    assert (d / "data" / "mnist").is_dir(), (
        f"shared folder {d} has no data/mnist; set PYCRCNN_SHARED"
    )
    return d


@pytest.fixture(scope="module")
def seed_dir(shared) -> Path:
    d = shared / "models" / "pycrcnn-original"
    assert d.is_dir(), f"{d} missing"
    return d


@pytest.fixture(scope="module")
def mnist_test(shared):
    return datasets.load_mnist(shared / "data" / "mnist", split="test")


# --------------------------------------------------------------------------
# helpers writing IDX files


def idx_images(imgs: np.ndarray, magic: int = 2051) -> bytes:
    n, r, c = imgs.shape
    head = b"".join(int(v).to_bytes(4, "big") for v in (magic, n, r, c))
    return head + imgs.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    head = magic.to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    return head + labels.astype(np.uint8).tobytes()


def write_split(d: Path, images: bytes, labels: bytes, gz: bool = True, split="test"):
    d.mkdir(parents=True, exist_ok=True)
    stem_i, stem_l = datasets.MNIST_FILES[split]
    for stem, data in ((stem_i, images), (stem_l, labels)):
        if gz:
            (d / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / stem).write_bytes(data)


@pytest.fixture
def small_set():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    return imgs, labels


# --------------------------------------------------------------------------
# datasets


def test_load_mnist_real_test_set(mnist_test):
    x, y = mnist_test
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert list(y[:5]) == [7, 2, 1, 0, 4]
    assert round(float(x.mean()), 2) == 33.79
    assert set(np.unique(y)) == set(range(10))
    assert x.flags.writeable


def test_load_mnist_default_path_and_limit(shared, monkeypatch):
    monkeypatch.delenv("PYCRCNN_DATA", raising=False)
    monkeypatch.setenv("PYCRCNN_SHARED", str(shared))
    x, y = datasets.load_mnist(limit=10)
    assert x.shape == (10, 28, 28) and list(y[:5]) == [7, 2, 1, 0, 4]
    x0, y0 = datasets.load_mnist(limit=0)
    assert x0.shape == (0, 28, 28) and y0.shape == (0,)


def test_load_mnist_train_split(shared):
    x, y = datasets.load_mnist(shared / "data" / "mnist", split="train", limit=100)
    assert x.shape == (100, 28, 28)
    assert list(y[:5]) == [5, 0, 4, 1, 9]  # the well-known first train labels


def test_load_mnist_env_vars(tmp_path, monkeypatch, small_set):
    imgs, labels = small_set
    write_split(tmp_path / "plain", idx_images(imgs), idx_labels(labels), gz=False)
    monkeypatch.setenv("PYCRCNN_DATA", str(tmp_path / "plain"))
    x, y = datasets.load_mnist()
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labels)
    # PYCRCNN_SHARED/data/mnist when PYCRCNN_DATA is not set
    write_split(tmp_path / "sh" / "data" / "mnist", idx_images(imgs[:2]), idx_labels(labels[:2]))
    monkeypatch.delenv("PYCRCNN_DATA")
    monkeypatch.setenv("PYCRCNN_SHARED", str(tmp_path / "sh"))
    assert datasets.shared_dir() == (tmp_path / "sh").resolve()
    x, y = datasets.load_mnist()
    np.testing.assert_array_equal(x, imgs[:2])
    # a directory with a mnist/ sub-folder works too
    x, y = datasets.load_mnist(tmp_path / "sh" / "data")
    assert len(x) == 2


def test_load_mnist_missing_directory(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        datasets.load_mnist(tmp_path / "does-not-exist")
    assert "PYCRCNN_DATA" in str(e.value) and "PYCRCNN_SHARED" in str(e.value)
    monkeypatch.setenv("PYCRCNN_DATA", str(tmp_path))  # exists, but empty
    with pytest.raises(FileNotFoundError, match="PYCRCNN_DATA"):
        datasets.load_mnist()
    monkeypatch.delenv("PYCRCNN_DATA")
    monkeypatch.setenv("PYCRCNN_SHARED", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="PYCRCNN_SHARED"):
        datasets.load_mnist()


def test_load_mnist_bad_arguments(shared):
    with pytest.raises(ValueError, match="split"):
        datasets.load_mnist(shared / "data" / "mnist", split="validation")
    with pytest.raises(ValueError, match="limit"):
        datasets.load_mnist(shared / "data" / "mnist", limit=-1)


@pytest.mark.parametrize(
    "case",
    [
        "images_magic",
        "labels_magic",
        "little_endian_magic",
        "images_truncated",
        "labels_truncated",
        "images_trailing",
        "header_only_partial",
        "count_mismatch",
        "label_out_of_range",
        "gzip_truncated",
        "gzip_corrupt",
        "empty_file",
    ],
)
def test_load_mnist_corrupt_files(tmp_path, small_set, case):
    imgs, labels = small_set
    ib, lb = idx_images(imgs), idx_labels(labels)
    gz = True
    if case == "images_magic":
        ib = idx_images(imgs, magic=2049)
    elif case == "labels_magic":
        lb = idx_labels(labels, magic=2051)
    elif case == "little_endian_magic":
        ib = (2051).to_bytes(4, "little") + ib[4:]
    elif case == "images_truncated":
        ib = ib[:-100]
    elif case == "labels_truncated":
        lb = lb[:-1]
    elif case == "images_trailing":
        ib = ib + b"\x00" * 7
    elif case == "header_only_partial":
        ib = ib[:10]
    elif case == "count_mismatch":
        lb = idx_labels(labels[:4])
    elif case == "label_out_of_range":
        lb = idx_labels(np.array([3, 1, 4, 1, 50]))
    elif case == "empty_file":
        ib = b""
        gz = False
    write_split(tmp_path, ib, lb, gz=gz)
    stem_i = datasets.MNIST_FILES["test"][0]
    if case in ("gzip_truncated", "gzip_corrupt"):
        f = tmp_path / (stem_i + ".gz")
        raw = bytearray(f.read_bytes())
        if case == "gzip_truncated":
            raw = raw[: len(raw) // 2]
        else:
            raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    with pytest.raises(ValueError):
        datasets.load_mnist(tmp_path)


def _seed_input_image(seed_dir: Path) -> np.ndarray:
    """Decode the seed client's jsonpickled float32 array without jsonpickle."""
    doc = json.loads((seed_dir / "input_image_dim1.json").read_text())
    blobs = []

    def walk(o):
        if isinstance(o, dict):
            if "py/b64" in o:
                blobs.append(o["py/b64"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(doc)
    data = max((base64.b64decode(b) for b in blobs), key=len)
    return np.frombuffer(data, dtype="<f4").reshape(1, 1, 28, 28)


def test_normalize_matches_seed_client(seed_dir, mnist_test):
    seed_img = _seed_input_image(seed_dir)
    # the seed sent pixels / 255: values in [0, 1], multiples of 1/255
    assert seed_img.min() == 0.0 and seed_img.max() == 1.0
    pixels = np.round(seed_img[0, 0] * 255).astype(np.uint8)
    np.testing.assert_allclose(pixels / 255.0, seed_img[0, 0], atol=1e-6)
    out = datasets.normalize(pixels[None])
    assert out.dtype == np.float32 and out.shape == (1, 1, 28, 28)
    np.testing.assert_array_equal(out, seed_img)

    x, _ = mnist_test
    xn = datasets.normalize(x[:3])
    assert xn.shape == (3, 1, 28, 28) and xn.dtype == np.float32
    np.testing.assert_allclose(xn[:, 0], x[:3] / 255.0, rtol=1e-6)
    assert datasets.normalize(x[0]).shape == (1, 1, 28, 28)
    assert datasets.normalize(x[:2, None]).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError):
        datasets.normalize(np.zeros((2, 3, 28, 28), np.uint8))


def test_sample_digits_are_first_test_images(mnist_test):
    x, y = mnist_test
    sx, sy = datasets.sample_digits()
    assert sx.dtype == np.uint8 and sy.dtype == np.int64
    assert sx.shape == (64, 28, 28) and sy.shape == (64,)
    np.testing.assert_array_equal(sx, x[:64])
    np.testing.assert_array_equal(sy, y[:64])
    assert datasets.SAMPLE_PATH.stat().st_size < 50_000
    sx3, sy3 = datasets.sample_digits(3)
    assert list(sy3) == [7, 2, 1] and sx3.shape == (3, 28, 28)


def test_no_torch_at_import_time():
    pkg_parent = Path(datasets.__file__).parent.parent  # as imported (no resolve)
    code = (
        "import sys; import pycrcnn.datasets, pycrcnn.models; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "print(pycrcnn.models.list_shipped_models())"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pkg_parent) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "lenet1_square" in res.stdout


# --------------------------------------------------------------------------
# pycrcnn.nn


def test_square_forward():
    x = torch.tensor([[-3.0, -0.5, 0.0, 2.0]])
    torch.testing.assert_close(Square()(x), torch.tensor([[9.0, 0.25, 0.0, 4.0]]))
    assert list(Square().parameters()) == []


def test_polynomial_forward_and_storage():
    p = Polynomial([1.0, -2.0, 0.5])  # 1 - 2x + 0.5x^2
    x = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    torch.testing.assert_close(p(x), 1 - 2 * x + 0.5 * x**2)
    assert p.degree == 2
    assert list(p.parameters()) == []
    assert "coefficients" in p.state_dict()
    # matches Square for [0, 0, 1]
    torch.testing.assert_close(Polynomial([0, 0, 1])(x), Square()(x))
    # constant polynomial keeps the input's shape
    assert Polynomial([2.5])(torch.zeros(2, 3)).shape == (2, 3)
    # tensors accepted; coefficients are copied
    c = torch.tensor([0.0, 1.0])
    q = Polynomial(c)
    c[1] = 5.0
    torch.testing.assert_close(q(x), x)


def test_polynomial_trainable():
    p = Polynomial([0.0, 1.0, 0.0], trainable=True)
    assert isinstance(p.coefficients, nn.Parameter)
    x = torch.tensor([1.0, 2.0])
    p(x).sum().backward()
    torch.testing.assert_close(p.coefficients.grad, torch.tensor([2.0, 3.0, 5.0]))
    with pytest.raises(ValueError):
        Polynomial([])


# --------------------------------------------------------------------------
# pycrcnn.models: the seed's pickles


def _module_names(model):
    return [type(m).__name__ for m in model]


@pytest.mark.parametrize("name", SEED_MODELS)
def test_load_seed_models(seed_dir, name):
    import __main__

    main_before = dict(vars(__main__))
    main_obj = sys.modules["__main__"]
    model = pmodels.load_torch_model(seed_dir / name)
    assert isinstance(model, nn.Sequential)
    assert not model.training
    assert all(not m.training for m in model.modules())
    for m in model.modules():
        if type(m).__name__ == "Square":
            assert type(m) is Square  # resolved to pycrcnn.nn.Square
    # __main__ untouched
    assert sys.modules["__main__"] is main_obj
    assert dict(vars(__main__)) == main_before
    assert not hasattr(__main__, "Square")
    # it runs
    shape = (2, 3, 32, 32) if name.startswith("SimpleModel") else (2, 1, 28, 28)
    with torch.no_grad():
        out = model(torch.rand(shape))
    assert out.shape == (2, 10)


def test_seed_model_structures(seed_dir):
    lenet = pmodels.load_torch_model(seed_dir / "LeNet1_Approx_single_square.pt")
    assert _module_names(lenet) == [
        "Conv2d", "Square", "AvgPool2d", "Conv2d", "AvgPool2d", "Flatten", "Linear",
    ]
    assert tuple(lenet[0].weight.shape) == (4, 1, 5, 5)
    assert tuple(lenet[3].weight.shape) == (12, 4, 5, 5)
    assert tuple(lenet[6].weight.shape) == (10, 192)
    assert _module_names(pmodels.load_torch_model(seed_dir / "LeNet1.pt")).count("Tanh") == 2
    mnist = pmodels.load_torch_model(seed_dir / "mnist.pt")  # legacy format
    assert "MaxPool2d" in _module_names(mnist) and "ReLU" in _module_names(mnist)


def test_seed_lenet_accuracy_with_normalize(seed_dir, mnist_test):
    """The seed model works with pycrcnn.datasets.normalize (pixels / 255)."""
    x, y = mnist_test
    model = pmodels.load_torch_model(seed_dir / "LeNet1_Approx_single_square.pt")
    with torch.no_grad():
        pred = model(torch.from_numpy(datasets.normalize(x[:1000]))).argmax(1).numpy()
    assert (pred == y[:1000]).mean() >= 0.97


def test_load_torch_model_errors(tmp_path, monkeypatch):
    import __main__

    with pytest.raises(FileNotFoundError):
        pmodels.load_torch_model(tmp_path / "nope.pt")

    sd = tmp_path / "state_dict.pt"
    torch.save(nn.Linear(2, 2).state_dict(), sd)
    with pytest.raises(TypeError, match="state_dict"):
        pmodels.load_torch_model(sd)

    class Cube(nn.Module):
        def forward(self, x):
            return x**3

    Cube.__module__ = "__main__"
    Cube.__qualname__ = "Cube"
    monkeypatch.setattr(__main__, "Cube", Cube, raising=False)
    f = tmp_path / "cube.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2), Cube()), f)
    # while __main__ defines it, plain pickle resolution applies
    assert type(pmodels.load_torch_model(f)[1]) is Cube
    monkeypatch.delattr(__main__, "Cube")
    with pytest.raises(pickle.UnpicklingError, match="__main__.Cube"):
        pmodels.load_torch_model(f)

    class MyCube(nn.Module):
        def forward(self, x):
            return x**3

    m = pmodels.load_torch_model(f, classes={"Cube": MyCube})
    assert type(m[1]) is MyCube and not m.training
    assert not hasattr(__main__, "Cube")


# --------------------------------------------------------------------------
# pycrcnn.models: the shipped models

ALLOWED = (nn.Conv2d, nn.AvgPool2d, nn.Flatten, nn.Linear, Square)


def test_shipped_models_listed():
    assert sorted(pmodels.list_shipped_models()) == sorted(SHIPPED)
    for name in SHIPPED:
        info = pmodels.INFO[name]
        assert info["input_shape"] == [1, 28, 28]
        assert 0.0 < info["test_accuracy"] <= 1.0
        assert info["description"]
        path = pmodels.shipped_model_path(name)
        assert path.name == info["file"] and path.stat().st_size < 200_000
    with pytest.raises(KeyError, match="lenet1_square"):
        pmodels.shipped_model_path("no-such-model")
    assert pmodels.INFO["lenet1_square"]["test_accuracy"] >= 0.97
    assert pmodels.INFO["lenet1_two_square"]["test_accuracy"] >= 0.97


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_accuracy(name, mnist_test):
    x, y = mnist_test
    model = pmodels.load_shipped_model(name)
    assert isinstance(model, nn.Sequential) and not model.training
    assert all(isinstance(m, ALLOWED) for m in model), _module_names(model)
    info = pmodels.INFO[name]
    squares = sum(isinstance(m, Square) for m in model)
    assert squares == info["squares"]
    with torch.no_grad():
        pred = model(torch.from_numpy(datasets.normalize(x[:1000]))).argmax(1).numpy()
    acc = float((pred == y[:1000]).mean())
    assert acc >= info["test_accuracy_first_1000"] - 0.02, (acc, info)
    assert abs(acc - info["test_accuracy"]) <= 0.03, (acc, info)


def test_shipped_lenet_architectures():
    one = pmodels.load_shipped_model("lenet1_square")
    assert _module_names(one) == [
        "Conv2d", "Square", "AvgPool2d", "Conv2d", "AvgPool2d", "Flatten", "Linear",
    ]
    two = pmodels.load_shipped_model("lenet1_two_square")
    assert _module_names(two) == [
        "Conv2d", "Square", "AvgPool2d", "Conv2d", "Square", "AvgPool2d", "Flatten", "Linear",
    ]
    for m in (one, two):
        assert tuple(m[0].weight.shape) == (4, 1, 5, 5)
        assert tuple(m[-1].weight.shape) == (10, 192)
