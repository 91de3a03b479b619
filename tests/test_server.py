"""The server and the client: real MNIST digits through a real server process,
bad requests, concurrency, rencryption round trips, and that no secret key
ever reaches (or is made by) the server."""
from __future__ import annotations

import ast
import http.client
import json
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import requests

import pycrcnn
from pycrcnn import CipherTensor, Context, FormatError, SecretKeyRequired, datasets, protocol
from pycrcnn.client import Client, ServerError, request_parameters

import torch

from pycrcnn.models import load_torch_model, shipped_model_path  # noqa: E402

SERVER_PY = Path(pycrcnn.__file__).with_name("server.py")

#: three 25-bit primes ≡ 1 mod 8192: LeNet-1 with one square in one batch pass at m=4096
LENET_PRIMES = [33538049, 33349633, 33292289]


# ---------------------------------------------------------------------------
# helpers


def digits(n):
    """The first n MNIST test digits (shared folder), else the bundled sample (the same digits)."""
    try:
        return datasets.load_mnist(split="test", limit=n)
    except FileNotFoundError:
        return datasets.sample_digits(n)


def torch_logits(name_or_path, images):
    path = name_or_path if isinstance(name_or_path, Path) else shipped_model_path(name_or_path)
    net = load_torch_model(path)
    with torch.no_grad():
        return net(torch.tensor(datasets.normalize(images))).double().numpy()


@pytest.fixture(scope="module")
def mlp_ctx():
    """Small batch context for tiny_mlp (no ciphertext products): fast requests."""
    ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
    ctx.keygen()
    return ctx


@pytest.fixture(scope="module")
def mlp_data(mlp_ctx):
    images, labels = digits(4)
    return images, mlp_ctx.encrypt(datasets.normalize(images))


def post(url, body, content_type=protocol.JSON_CONTENT_TYPE, **kw):
    return requests.post(url + "/compute", data=body, headers={"Content-Type": content_type}, timeout=120, **kw)


def json_request(ctx, tensor, net="tiny_mlp", layers=None, **overrides):
    body = {
        "encryption_parameters": [request_parameters(ctx)],
        "net": net,
        "layers": layers,
        "public_context": protocol.b64encode(ctx.public_context()),
        "data": protocol.b64encode(tensor.to_bytes()),
    }
    body.update(overrides)
    return body


def assert_error(resp, status, *words):
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["Content-Type"].startswith("application/json")
    payload = resp.json()
    assert isinstance(payload.get("error"), str) and payload["error"]
    for w in words:
        assert w.lower() in payload["error"].lower(), (w, payload["error"])
    return payload


# ---------------------------------------------------------------------------
# endpoints


def test_index_and_models(server, server_models_dir):
    info = requests.get(server + "/", timeout=10).json()
    assert info["status"] == "Server Works!"
    assert info["version"] == pycrcnn.__version__
    models = {m["name"]: m for m in Client(server).models()}
    for name in ("tiny_cnn", "tiny_mlp", "lenet1_square", "tiny_cnn_rencrypt"):
        assert name in models and "error" not in models[name], models.get(name)
    cnn = models["tiny_cnn"]
    assert cnn["input_shape"] == [1, 28, 28]
    assert [(l["index"], l["type"]) for l in cnn["layers"]] == [(0, "Conv2d"), (1, "Square"), (2, "Flatten"),
                                                                 (3, "Linear")]
    assert cnn["layers"][0]["params"]["stride"] == [3, 3]
    assert cnn["supported"] == [[0, 4]]
    assert models["tiny_cnn_rencrypt"]["format"] == "npz"
    assert models["tiny_cnn_rencrypt"]["rencrypt_positions"] == [1, 2]
    if (server_models_dir / "mnist.pt").exists():
        mnist = models["mnist"]
        assert "error" not in mnist
        bad = {u["index"] for u in mnist["unsupported"]}
        assert bad, mnist
        for start, stop in mnist["supported"]:
            assert not any(start <= i < stop for i in bad)
    if (server_models_dir / "LeNet1_Approx_single_square.pt").exists():
        seed = models["LeNet1_Approx_single_square"]
        assert seed["supported"] == [[0, seed["n_modules"]]]
    one = requests.get(server + "/models/tiny_mlp", timeout=10).json()
    assert one["name"] == "tiny_mlp"


# ---------------------------------------------------------------------------
# the main flows, through the real process


def test_lenet1_batch_of_16_real_digits(server):
    """16 real MNIST digits in one batch pass through LeNet-1 (one square): the
    encrypted predictions equal torch's on the same digits."""
    images, labels = digits(16)
    ctx = Context(m=4096, p=LENET_PRIMES, encoding="batch", scale_bits=8, weight_scale_bits=8)
    ctx.keygen()
    client = Client(server)
    logits, report = client.classify(ctx, images, "lenet1_square", rencrypt_positions=[])
    ref = torch_logits("lenet1_square", images)
    assert logits.shape == (16, 10)
    np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))
    assert np.abs(logits - ref).max() < 0.5
    assert report["round_trips"] == 1
    req = report["requests"][0]
    assert [t["index"] for t in req["timings"]] == list(range(7))
    print(f"\nlenet1_square, 16 digits, batch m=4096, 3 x 25-bit p: encryption {report['encryption_seconds']:.2f} s, "
          f"upload {report['upload_bytes'] / 1e6:.1f} MB, server {report['server_seconds']:.1f} s "
          f"(request {report['request_seconds']:.1f} s), download {report['download_bytes'] / 1e6:.2f} MB, "
          f"decryption {report['decryption_seconds']:.3f} s, accuracy {np.mean(logits.argmax(1) == labels):.3f}; "
          "per layer: " + ", ".join(f"{t['index']}:{t['type']} {t['seconds']:.1f}s" for t in req["timings"]))


def test_fractional_one_digit_tiny_cnn_json(server):
    """The seed's encoding (one value per ciphertext), JSON + base64 body."""
    images, _ = digits(1)
    ctx = Context(m=4096, encoding="fractional")
    ctx.keygen()
    logits, report = Client(server).classify(ctx, images, "tiny_cnn", binary=False)
    ref = torch_logits("tiny_cnn", images)
    assert logits.argmax(1)[0] == ref.argmax(1)[0]
    assert np.abs(logits - ref).max() < 1e-3
    assert report["requests"][0]["encoding"] == "fractional"


def test_rencryption_round_trips(server):
    """tiny_cnn exported with rencryption positions [1, 2]: three segments, two
    round trips to the client in between. With these parameters (one 35-bit
    plaintext modulus) a single pass overflows; with rencryption (scale reset)
    every segment fits, and the predictions equal the plain model's."""
    images, _ = digits(8)
    ctx = Context(m=4096, encoding="batch", scale_bits=8, weight_scale_bits=8)
    ctx.keygen()
    client = Client(server)
    logits, report = client.classify(ctx, images, "tiny_cnn_rencrypt")  # positions from /models
    assert report["segments"] == [(0, 1), (1, 2), (2, 4)]
    assert report["round_trips"] == 3
    ref = torch_logits("tiny_cnn", images)
    np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))
    assert np.abs(logits - ref).max() < 0.5
    # the same parameters without rencryption: the server says why it cannot
    with pytest.raises(ServerError) as err:
        client.classify(ctx, images, "tiny_cnn_rencrypt", rencrypt_positions=[])
    assert err.value.status == 422
    assert "PlaintextOverflow" in err.value.message


def test_concurrent_clients(server):
    """8 clients at once on 2 workers: busy answers (503) are retried; all end correct."""
    images, _ = digits(8)
    ref = torch_logits("tiny_mlp", images).argmax(1)
    n = 8
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def run(i):
        try:
            ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
            ctx.keygen()
            x = ctx.encrypt(datasets.normalize(images))
            client = Client(server, busy_timeout=120)
            barrier.wait(timeout=60)
            out, rep = client.compute(ctx, x, "tiny_mlp")
            results[i] = (ctx.decrypt(out).argmax(1), rep["busy_retries"])
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for pred, _ in results:
        np.testing.assert_array_equal(pred, ref)
    print(f"\nconcurrent clients: busy retries per client {[r for _, r in results]}")


# ---------------------------------------------------------------------------
# bad requests


def test_bad_requests_then_good(server, mlp_ctx, mlp_data, server_models_dir, shared_dir):
    images, x = mlp_data
    url = server
    good = json_request(mlp_ctx, x)

    # unknown net
    assert_error(post(url, json.dumps(dict(good, net="no_such_model"))), 404, "no_such_model")
    # malformed JSON
    assert_error(post(url, b'{"net": "tiny_mlp", "data": '), 400, "json")
    assert_error(post(url, b"[1, 2, 3]"), 400, "object")
    assert_error(post(url, b""), 400)
    # bad base64
    assert_error(post(url, json.dumps(dict(good, data="not*base64!"))), 400, "base64")
    assert_error(post(url, json.dumps(dict(good, public_context=12))), 400, "base64")
    # missing field
    assert_error(post(url, json.dumps({k: v for k, v in good.items() if k != "data"})), 400, "data")
    # corrupt ciphertext bytes: one bit flipped
    raw = bytearray(x.to_bytes())
    raw[len(raw) // 2] ^= 0x10
    assert_error(post(url, json.dumps(dict(good, data=protocol.b64encode(bytes(raw))))), 400, "corrupt")
    assert_error(post(url, json.dumps(dict(good, data=protocol.b64encode(bytes(raw[:1000]))))), 400)
    # data encrypted under another key (same parameters)
    other = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6)
    other.keygen()
    foreign = other.encrypt(datasets.normalize(images))
    assert_error(post(url, json.dumps(dict(good, data=protocol.b64encode(foreign.to_bytes())))), 400, "key")
    # a public context holding a secret key
    assert_error(post(url, json.dumps(dict(good, public_context=protocol.b64encode(mlp_ctx.secret_key_bytes())))),
                 400, "secret key")
    # encryption_parameters disagreeing with the public context
    bad_params = dict(request_parameters(mlp_ctx), m=4096)
    assert_error(post(url, json.dumps(dict(good, encryption_parameters=[bad_params]))), 400, "m=4096")
    seed_params = {"m": 2048, "p": 13513511, "sec": 128, "base": 2}
    assert_error(post(url, json.dumps(dict(good, encryption_parameters=[seed_params]))), 400, "authoritative")
    assert_error(post(url, json.dumps(dict(good, encryption_parameters=[{"m": "big"}]))), 400)
    assert_error(post(url, json.dumps(dict(good, encryption_parameters="m=2048"))), 400)
    # the original PyCrCNN's jsonpickle requests
    seed_json = shared_dir / "models" / "pycrcnn-original" / "input_image_dim1.json"
    if seed_json.is_file():
        assert_error(post(url, seed_json.read_bytes()), 400, "pycrcnn client")
        payload = {"encryption_parameters": [seed_params], "net": "tiny_mlp", "layers": [0, 1],
                   "data": json.loads(seed_json.read_text())}
        assert_error(post(url, json.dumps(payload)), 400, "pycrcnn client")
    # the seed posted json=jsonpickle.encode(payload): a JSON string
    assert_error(post(url, json.dumps(json.dumps({"net": "MNIST", "data": [[["AAAA"]]]}))), 400, "pycrcnn client")
    assert_error(post(url, json.dumps(dict(good, data=[[["AAAA"]]]))), 400, "pycrcnn client")
    # shapes that do not fit the model
    small = mlp_ctx.encrypt(np.zeros((2, 1, 20, 20)))
    assert_error(post(url, json.dumps(dict(good, data=protocol.b64encode(small.to_bytes())))), 400, "shape")
    flat = mlp_ctx.encrypt(np.zeros((2, 50)))
    assert_error(post(url, json.dumps(dict(good, data=protocol.b64encode(flat.to_bytes()), layers=[2]))), 400)
    # layers out of range / not consecutive / not integers
    assert_error(post(url, json.dumps(dict(good, layers=[0, 7]))), 400, "0..2")
    assert_error(post(url, json.dumps(dict(good, layers=[0, 2]))), 400, "consecutive")
    assert_error(post(url, json.dumps(dict(good, layers=["0"]))), 400)
    assert_error(post(url, json.dumps(dict(good, layers=[]))), 400)
    assert_error(post(url, json.dumps(dict(good, switch_to_last_level="maybe"))), 400)
    # layers that cannot run encrypted (ReLU / MaxPool of the seed's mnist.pt, Tanh of LeNet1.pt)
    models = {m["name"]: m for m in Client(url).models()}
    for seed_name in ("mnist", "LeNet1"):
        if seed_name in models:
            m = models[seed_name]
            bad = m["unsupported"][0]["index"]
            resp = post(url, json.dumps(dict(good, net=seed_name, layers=list(range(0, bad + 1)))))
            payload = assert_error(resp, 422, f"layer {bad}")
            assert payload["supported"] == m["supported"]
    # binary frames: bad magic, truncated, trailing bytes
    body, ctype = Client(url).build_request(mlp_ctx, x, "tiny_mlp")
    assert_error(post(url, b"XXXX" + body[4:], ctype), 400, "magic")
    assert_error(post(url, body[:-10], ctype), 400, "truncated")
    assert_error(post(url, body + b"\0", ctype), 400, "unexpected bytes")
    assert_error(post(url, body[:6], ctype), 400)
    # wrong methods
    assert_error(requests.get(url + "/compute", timeout=10), 405, "GET")
    assert_error(requests.put(url + "/compute", data=b"x", timeout=10), 405)
    assert_error(requests.post(url + "/", data=b"x", timeout=10), 405)
    assert_error(requests.get(url + "/nowhere", timeout=10), 404)
    # a body over the limit: 413 from Content-Length alone, before any byte of it is read
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.putrequest("POST", "/compute")
    conn.putheader("Content-Type", protocol.BINARY_CONTENT_TYPE)
    conn.putheader("Content-Length", str(600 * (1 << 20)))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert "limit" in json.loads(resp.read())["error"]
    conn.close()

    # the server still works
    resp = post(url, json.dumps(good))
    assert resp.status_code == 200, resp.text[:300]
    out = CipherTensor.from_bytes(protocol.b64decode(resp.json()["data"], "data"), mlp_ctx)
    np.testing.assert_array_equal(mlp_ctx.decrypt(out).argmax(1), torch_logits("tiny_mlp", images).argmax(1))
    resp = post(url, body, ctype)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == protocol.BINARY_CONTENT_TYPE
    header, data = protocol.decode_response(resp.content)
    assert header["shape"] == [4, 10] and header["net"] == "tiny_mlp"
    assert [t["type"] for t in header["timings"]] == ["AvgPool2d", "Flatten", "Linear"]


# ---------------------------------------------------------------------------
# keys: nothing secret is sent, nothing secret is made


def test_request_holds_no_secret_key(mlp_ctx, mlp_data):
    _, x = mlp_data
    client = Client("http://127.0.0.1:9")  # never contacted
    for binary in (True, False):
        body, ctype = client.build_request(mlp_ctx, x, "tiny_mlp", binary=binary)
        if binary:
            header, pub, data = protocol.decode_request(body)
        else:
            header = json.loads(body)
            pub = protocol.b64decode(header.pop("public_context"), "public_context")
            data = protocol.b64decode(header.pop("data"), "data")
        assert set(header) == {"encryption_parameters", "net", "layers", "switch_to_last_level"}
        server_ctx = Context.from_public(pub)
        assert not server_ctx.has_secret_key
        assert server_ctx.key_id == mlp_ctx.key_id and server_ctx.fingerprint == mlp_ctx.fingerprint
        t = CipherTensor.from_bytes(data, server_ctx)
        with pytest.raises(SecretKeyRequired):
            server_ctx.decrypt(t)
        try:  # read as a secret-key blob it holds no secret key either
            assert not Context.from_secret_bytes(pub).has_secret_key
        except FormatError:
            pass
        assert mlp_ctx.secret_key_bytes() not in body
    with pytest.raises(FormatError):  # and a secret-key blob is not a public context
        Context.from_public(mlp_ctx.secret_key_bytes())


_SECRET_OPS = {"keygen", "secret_key_bytes", "from_secret_bytes", "load_secret_key", "save_secret_key",
               "decrypt", "encrypt", "rencrypt", "noise_budget"}


def test_server_code_never_touches_secret_keys():
    """Static: server.py names no key-making / secret-key / decrypting operation,
    and imports nothing that unpickles."""
    tree = ast.parse(SERVER_PY.read_text())
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not (attrs | names) & _SECRET_OPS, (attrs | names) & _SECRET_OPS
    for source in (SERVER_PY, Path(protocol.__file__)):
        imported = set()
        for n in ast.walk(ast.parse(source.read_text())):
            if isinstance(n, ast.Import):
                imported |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                imported.add((n.module or "").split(".")[0])
        assert not imported & {"pickle", "jsonpickle", "dill", "cloudpickle", "marshal", "shelve", "torch"}, source


def test_server_never_calls_keygen_at_runtime(server_models_dir, mlp_ctx, mlp_data):
    """Dynamic: a whole request through the app (in process) with a profiler
    recording every call into the engine: no keygen, no secret-key operation.
    (Context is an immutable native type, so it cannot be monkeypatched.)"""
    from pycrcnn.server import create_app

    images, x = mlp_data
    app = create_app(server_models_dir)
    body, ctype = Client("http://unused").build_request(mlp_ctx, x, "tiny_mlp")
    calls = []

    def profiler(frame, event, arg):
        if event == "c_call":
            qualname = getattr(arg, "__qualname__", "")
            if qualname.split(".")[0] in ("Context", "CipherTensor", "PyCtxt", "Layer"):
                calls.append(qualname.split(".")[-1])

    with app.test_client() as tc:
        sys.setprofile(profiler)
        try:
            resp = tc.post("/compute", data=body, content_type=ctype)
        finally:
            sys.setprofile(None)
    assert resp.status_code == 200, resp.data[:300]
    assert "from_public" in calls and "from_bytes" in calls  # the profiler sees engine calls
    assert not set(calls) & _SECRET_OPS, set(calls) & _SECRET_OPS
    header, data = protocol.decode_response(resp.data)
    out = CipherTensor.from_bytes(data, mlp_ctx)
    np.testing.assert_array_equal(mlp_ctx.decrypt(out).argmax(1), torch_logits("tiny_mlp", images).argmax(1))


# ---------------------------------------------------------------------------
# unit level (flask test client)


def test_body_limit_413(server_models_dir, mlp_ctx, mlp_data):
    from pycrcnn.server import create_app

    app = create_app(server_models_dir, max_request_mb=1)
    with app.test_client() as tc:
        resp = tc.post("/compute", data=b"\0" * (2 << 20), content_type=protocol.BINARY_CONTENT_TYPE)
        assert resp.status_code == 413 and "limit" in resp.get_json()["error"]
        assert tc.get("/").get_json()["max_request_bytes"] == 1 << 20
    # the client refuses locally what the server would refuse
    client = Client("http://unused")
    client._info = {"max_request_bytes": 1 << 20}
    with pytest.raises(ServerError) as err:
        client.compute(mlp_ctx, mlp_data[1], "tiny_mlp")
    assert err.value.status == 413


def test_public_context_limit_413(server_models_dir, mlp_ctx, mlp_data):
    """A public context over --max-context-mb is refused before it is parsed
    (uploaded or inline), and one under it is served."""
    from pycrcnn.server import create_app

    pub = mlp_ctx.public_context()
    tight = create_app(server_models_dir, max_context_mb=(len(pub) - 1) / (1 << 20))
    body, ctype = Client("http://unused").build_request(mlp_ctx, mlp_data[1], "tiny_mlp")
    with tight.test_client() as tc:
        for resp in (tc.post("/contexts", data=pub, content_type="application/octet-stream"),
                     tc.post("/compute", data=body, content_type=ctype)):
            assert resp.status_code == 413, resp.data[:300]
            assert "--max-context-mb" in resp.get_json()["error"]
        assert tight.extensions["pycrcnn"].contexts.stats()["entries"] == 0  # nothing was parsed
    roomy = create_app(server_models_dir, max_context_mb=len(pub) / (1 << 20))
    with roomy.test_client() as tc:
        assert tc.post("/contexts", data=pub, content_type="application/octet-stream").status_code == 201
        assert tc.post("/compute", data=body, content_type=ctype).status_code == 200
    with pytest.raises(ValueError, match="max_context_mb"):
        create_app(server_models_dir, max_context_mb=0)


def test_busy_503_then_ok(server_models_dir, mlp_ctx, mlp_data):
    from pycrcnn.server import create_app

    app = create_app(server_models_dir, max_concurrent=1)
    state = app.extensions["pycrcnn"]
    body, ctype = Client("http://unused").build_request(mlp_ctx, mlp_data[1], "tiny_mlp")
    with app.test_client() as tc:
        assert state.slots.acquire(blocking=False)  # the only worker is busy
        try:
            resp = tc.post("/compute", data=body, content_type=ctype)
            assert resp.status_code == 503 and resp.headers["Retry-After"]
            assert "busy" in resp.get_json()["error"]
        finally:
            state.slots.release()
        assert tc.post("/compute", data=body, content_type=ctype).status_code == 200


def test_caches_and_broken_models(tmp_path, mlp_ctx, mlp_data):
    from pycrcnn.net_builder import export_model, load_model_spec
    from pycrcnn.server import create_app

    export_model(load_model_spec(shipped_model_path("tiny_mlp")), tmp_path / "mlp.npz")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    (tmp_path / "broken2.npz").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "notes.txt").write_text("ignored")
    app = create_app(tmp_path, weight_cache_size=2)
    body, ctype = Client("http://unused").build_request(mlp_ctx, mlp_data[1], "mlp")
    with app.test_client() as tc:
        models = {m["name"]: m for m in tc.get("/models").get_json()["models"]}
        assert set(models) == {"mlp", "broken", "broken2"}
        assert "error" in models["broken"] and "error" in models["broken2"]
        assert models["mlp"]["format"] == "npz" and models["mlp"]["supported"] == [[0, 3]]
        broken, _ = Client("http://unused").build_request(mlp_ctx, mlp_data[1], "broken")
        assert_flask_error(tc.post("/compute", data=broken, content_type=ctype), 500)
        for _ in range(2):
            resp = tc.post("/compute", data=body, content_type=ctype)
            assert resp.status_code == 200, resp.data[:300]
        stats = tc.get("/stats").get_json()
        assert stats["weight_cache"]["hits"] >= 1 and stats["weight_cache"]["entries"] == 1
        assert stats["context_cache"]["hits"] >= 1
        assert tc.get("/models/nothing").status_code == 404


def assert_flask_error(resp, status):
    assert resp.status_code == status, resp.data[:300]
    assert resp.get_json()["error"]


def test_switch_to_last_level_only_when_safe(server_models_dir):
    """Default moduli leave no room at the last level (the result would not
    decrypt): the server keeps the level. With a large first prime it switches
    and the (smaller) result still decrypts."""
    from pycrcnn.server import create_app

    assert not Context(m=4096).switch_is_safe
    assert not Context(m=2048, scale_bits=6, weight_scale_bits=6).switch_is_safe
    ctx = Context(m=4096, p=8257537, moduli_sizes=[54, 30, 25], encoding="batch", scale_bits=5, weight_scale_bits=5)
    ctx.keygen()
    assert ctx.switch_is_safe
    images, _ = digits(4)
    x = ctx.encrypt(datasets.normalize(images))
    app = create_app(server_models_dir)
    client = Client("http://unused")
    with app.test_client() as tc:
        sizes = {}
        for switch in ("auto", False):
            body, ctype = client.build_request(ctx, x, "tiny_mlp", switch_to_last_level=switch)
            resp = tc.post("/compute", data=body, content_type=ctype)
            assert resp.status_code == 200, resp.data[:300]
            header, data = protocol.decode_response(resp.data)
            assert header["switched_to_last_level"] is (switch == "auto")
            sizes[switch] = len(data)
            out = CipherTensor.from_bytes(data, ctx)
            np.testing.assert_array_equal(ctx.decrypt(out).argmax(1), torch_logits("tiny_mlp", images).argmax(1))
        assert sizes["auto"] < 0.6 * sizes[False]


def test_client_errors(server):
    client = Client(server + "/compute")  # the seed's address form
    assert client.address == server
    with pytest.raises(KeyError):
        client.model("no_such_model")
    with pytest.raises(ConnectionError):
        Client("http://127.0.0.1:9", timeout=2).models()


def test_client_cli(server, tmp_path):
    """``python -m pycrcnn.client`` with a parameters.json in the seed's layout."""
    import subprocess

    config = {"address": server + "/compute",
              "encryption_parameters": [{"m": 2048, "sec": 128, "scale_bits": 6, "weight_scale_bits": 6}],
              "net": "tiny_mlp", "layers": None, "max_threads": 1}
    cfg = tmp_path / "parameters.json"
    cfg.write_text(json.dumps(config))
    run = subprocess.run([sys.executable, "-m", "pycrcnn.client", "--config", str(cfg), "--mnist", "8",
                          "--encoding", "batch"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.count("predicted") == 8 and "accuracy:" in out and "upload:" in out and "server:" in out
    # a server error is reported with its status and message
    cfg.write_text(json.dumps(dict(config, net="no_such_model")))
    run = subprocess.run([sys.executable, "-m", "pycrcnn.client", "--config", str(cfg), "--mnist", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "no_such_model" in run.stderr


def test_openapi_matches_the_app(server_models_dir):
    from pycrcnn.server import create_app

    doc = (Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml").read_text()
    app = create_app(server_models_dir)
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        assert f"\n  {path}:\n" in doc, path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert f"\n    {method.lower()}:\n" in doc
    for token in (protocol.REQUEST_MAGIC.decode(), protocol.RESPONSE_MAGIC.decode(), protocol.BINARY_CONTENT_TYPE,
                  "u32", "u64", "big-endian", "Retry-After", "context_id", "application/octet-stream", "layout",
                  "packed", "rotation_steps"):
        assert token in doc, token
