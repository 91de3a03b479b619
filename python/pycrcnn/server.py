"""The pycrcnn inference server: encrypted CNN layers as a service.

Run it with ``python -m pycrcnn.server --models DIR`` (or ``pycrcnn-server``):
gunicorn worker processes (:mod:`pycrcnn.serve`); or under any WSGI server,
e.g. ``gunicorn -k gthread --threads 4 'pycrcnn.server:create_app()'``.

Endpoints (the full description, with the wire format, is ``docs/openapi.yaml``):

- ``GET /`` -- liveness: ``{"status": "Server Works!", "version": ...}`` plus
  the body limit, so that clients can check a request's size before sending.
- ``GET /models`` (and ``GET /models/<name>``) -- every model in DIR: its
  layers (torch module indices, types, parameters), input shape, which index
  ranges can run encrypted, and its rencryption positions. ``.npz`` files
  written by :func:`pycrcnn.spec.export_model` need no torch; ``.pt`` /
  ``.pth`` pickles need torch and are **trusted code**: only put model files
  you trust in DIR.
- ``POST /contexts`` -- stores a *public* context (the raw bytes of
  ``Context.public_context()``; the server never receives or makes a secret
  key: a blob holding one is refused) and answers its ``context_id``, the
  SHA-256 of the bytes. Contexts live in a directory every worker reads,
  bounded in bytes, least recently used evicted first.
- ``POST /compute`` -- runs a range of a model's layers on an encrypted
  tensor, or with ``"layout": "packed"`` a whole model on one image's packed
  ciphertexts (:mod:`pycrcnn.packed_serving`; ``GET /models/<name>`` publishes
  the plan). The request names the client's public context by ``context_id``
  (or carries it whole) and carries the tensor, as JSON with base64 fields or
  as a binary frame (:mod:`pycrcnn.protocol`). An unknown or evicted
  ``context_id`` is a 404 whose answer holds ``context_id``: upload it again.
  Request data is never unpickled.

Status codes: 400 malformed request / data / parameters / shapes, 404 unknown
model or ``context_id``, 405 wrong method, 413 body over the limit (judged
from ``Content-Length`` before reading), 422 the layers cannot run encrypted
or the parameters are too small for them (plaintext overflow, noise budget),
503 this process is busy (retry after ``Retry-After`` seconds), 500 a bug.
Every error is a JSON object ``{"error": "...", "status": N}``.

Each process bounds its memory: encoded weights (per model, layer range and
parameter fingerprint) and parsed public contexts (by SHA-256) are kept in
LRU caches bounded in entries and in bytes (``--weight-cache-mb``,
``--context-cache-mb``: a parsed context holds ~100x its upload), and at most ``max_concurrent`` requests compute at
once; one more gets 503 at once instead of queueing (the engine releases the
GIL while it computes, so the process still answers).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from . import __version__
from . import protocol
from ._engine import (
    CipherTensor,
    Context,
    FormatError,
    HEError,
    NoiseBudgetExhausted,
    ParameterError,
    PlaintextOverflow,
    SecretKeyRequired,
)
from .compute_request import ApiError, check_parameters as _check_parameters, parse_layers as _parse_layers
from .packed_serving import PackedRequestError, PackedRunners, run_packed
from .registry import (MODEL_SUFFIXES, LRU, ContextStore, EncodedModelCache, Registry, describe_model, measured,
                       plain, supported_ranges)
from .spec import UnsupportedLayerError

__all__ = ["create_app", "main", "ApiError", "MODEL_SUFFIXES"]

log = logging.getLogger("pycrcnn.server")

#: header fields of a request (anything else is ignored and reported back)
_REQUEST_FIELDS = ("encryption_parameters", "net", "layers", "public_context", "context_id", "data",
                   "switch_to_last_level", "address", "max_threads", "layout")

#: the endpoints, as a 404 lists them
_ENDPOINTS = ["GET /", "GET /models", "GET /models/<name>", "GET /stats", "POST /contexts", "POST /compute"]


def _json_response(payload: Dict[str, Any], status: int = 200, headers: Optional[Dict[str, str]] = None) -> Response:
    body = json.dumps(plain(payload), separators=(",", ":"), allow_nan=False)
    resp = Response(body, status=status, mimetype=protocol.JSON_CONTENT_TYPE)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None, **extra: Any) -> Response:
    payload = {"error": message, "status": status}
    payload.update(extra)
    return _json_response(payload, status, headers)


# ---------------------------------------------------------------------------
# the app


class _State:
    def __init__(self, models_dir: Path, max_request_bytes: int, max_concurrent: int, weight_cache_size: int,
                 context_cache_size: int, store: ContextStore, weight_cache_bytes: int, context_cache_bytes: int,
                 max_context_bytes: int):
        self.models_dir = models_dir
        self.max_context_bytes = max_context_bytes
        self.registry = Registry(models_dir)
        self.max_request_bytes = max_request_bytes
        self.max_concurrent = max_concurrent
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.weights = EncodedModelCache(weight_cache_size, weight_cache_bytes)
        self.contexts = LRU(context_cache_size, context_cache_bytes)
        self.context_bytes: Dict[str, int] = {}  # per parameter fingerprint: what a parsed context holds
        self.store = store
        self.packed = PackedRunners()
        self.busy_rejections = 0
        self.requests_served = 0
        self.computing = 0  # requests holding a slot now (read by /stats)
        self.counter_lock = threading.Lock()


def create_app(models_dir: Optional[os.PathLike] = None, max_request_mb: float = 512, max_concurrent: int = 1,
               weight_cache_size: int = 8, context_cache_size: int = 16, context_dir: Optional[os.PathLike] = None,
               context_store_mb: float = 1024, weight_cache_mb: float = 256, context_cache_mb: float = 512,
               max_context_mb: float = 64) -> Flask:
    """The Flask application of one process (usable under any WSGI server).

    Args:
        models_dir: folder of ``.npz`` / ``.pt`` / ``.pth`` models (default:
            ``$PYCRCNN_MODELS``, else the models shipped with pycrcnn).
        max_request_mb: body limit in MB (2^20 bytes); larger bodies get 413.
        max_concurrent: requests this process computes at the same time; one
            more gets 503 at once.
        weight_cache_size: encoded models kept (per model, layer range and parameters).
        context_cache_size: parsed public contexts kept in this process (by SHA-256 of their bytes).
        context_dir: the directory of uploaded public contexts, shared by the
            processes of a server (default: :meth:`ContextStore.default_folder`).
        context_store_mb: its bound in MB; least recently used contexts are evicted.
        weight_cache_mb, context_cache_mb: bounds of the two caches in the bytes their entries hold
            (malloc's statistics): a parsed public context holds ~100x its blob, 5 MB at m=2048.
        max_context_mb: the largest public context accepted, in MB of its bytes (413 beyond): a
            worker parses one into 60-130x its size, so this bounds what one upload can make a worker
            hold (the two-square packed plan's context, with its rotation keys, is 28 MB).
    """
    if models_dir is None:
        models_dir = os.environ.get("PYCRCNN_MODELS") or _shipped_models_dir()
    folder = Path(models_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"models folder not found: {folder}")
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
    if not max_request_mb or max_request_mb <= 0:
        raise ValueError(f"max_request_mb must be > 0, got {max_request_mb}")
    if not context_store_mb or context_store_mb <= 0:
        raise ValueError(f"context_store_mb must be > 0, got {context_store_mb}")
    max_bytes = int(max_request_mb * (1 << 20))
    store = ContextStore(context_dir if context_dir is not None else ContextStore.default_folder(),
                         int(context_store_mb * (1 << 20)))
    if not max_context_mb or max_context_mb <= 0:
        raise ValueError(f"max_context_mb must be > 0, got {max_context_mb}")
    for name, value in (("weight_cache_mb", weight_cache_mb), ("context_cache_mb", context_cache_mb)):
        if value is None or value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    state = _State(folder, max_bytes, int(max_concurrent), int(weight_cache_size), int(context_cache_size), store,
                   int(weight_cache_mb * (1 << 20)), int(context_cache_mb * (1 << 20)), int(max_context_mb * (1 << 20)))

    app = Flask("pycrcnn.server")
    app.config["MAX_CONTENT_LENGTH"] = max_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["pycrcnn"] = state

    # -- errors: always JSON ---------------------------------------------------
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return _error(exc.status, exc.message, **exc.extra)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            return _error(413, f"request body larger than the limit of {state.max_request_bytes} bytes "
                               f"({state.max_request_bytes / (1 << 20):g} MB; server option --max-request-mb)")
        if exc.code == 404:
            return _error(404, f"no such endpoint: {request.method} {request.path}; endpoints: "
                               + ", ".join(_ENDPOINTS))
        if exc.code == 405:
            allowed = exc.valid_methods if hasattr(exc, "valid_methods") and exc.valid_methods else None
            headers = {"Allow": ", ".join(allowed)} if allowed else None
            return _error(405, f"method {request.method} is not allowed on {request.path}"
                               + (f" (allowed: {', '.join(allowed)})" if allowed else ""), headers)
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}")

    # -- endpoints ---------------------------------------------------------------
    @app.get("/")
    def index():
        return _json_response({
            "status": "Server Works!",
            "version": __version__,
            "max_request_bytes": state.max_request_bytes,
            "max_context_bytes": state.max_context_bytes,
            "max_concurrent": state.max_concurrent,
            "pid": os.getpid(),
            "endpoints": _ENDPOINTS,
            "content_types": [protocol.JSON_CONTENT_TYPE, protocol.BINARY_CONTENT_TYPE],
        })

    @app.get("/models")
    def models():
        return _json_response({"models": [describe_model(state.registry.get(n)) for n in state.registry.names()
                                          if state.registry.get(n) is not None]})

    @app.get("/models/<name>")
    def model(name: str):
        entry = state.registry.get(name)
        if entry is None:
            raise ApiError(404, f"unknown model {name!r}; available: {', '.join(state.registry.names()) or 'none'}")
        return _json_response(describe_model(entry))

    @app.get("/stats")
    def stats():
        return _json_response({
            "requests_served": state.requests_served,
            "busy_rejections": state.busy_rejections,
            "computing": state.computing,
            "weight_cache": state.weights.stats(),
            "context_cache": state.contexts.stats(),
            "packed_runners": state.packed.stats(),
            "context_store": state.store.stats(),
            "pid": os.getpid(),
        })

    @app.post("/contexts")
    def upload_context():
        length = request.content_length
        if length is not None and length > state.max_request_bytes:
            return _too_large(state, length)
        if length is not None and length > state.max_context_bytes:
            _drain(request)
            raise _context_too_large(state, length)
        blob = _read_body()
        context_id = ContextStore.id_of(blob)
        if state.contexts.get(context_id) is None:
            _parse_public_context(state, blob, context_id)  # 400 unless a valid public context
        try:
            state.store.put(blob)
        except ValueError as exc:
            raise ApiError(413, str(exc)) from None
        return _json_response({"context_id": context_id, "bytes": len(blob)}, 201)

    @app.post("/compute")
    def compute():
        length = request.content_length
        if length is not None and length > state.max_request_bytes:
            return _too_large(state, length)  # judged from the header: nothing is read
        if not state.slots.acquire(blocking=False):
            state.busy_rejections += 1
            _drain(request)
            return _error(503, f"this server process computes {state.max_concurrent} request(s) at a time and "
                               "is busy; retry later", {"Retry-After": "1"})
        with state.counter_lock:
            state.computing += 1
        try:
            resp = _compute(state)
            state.requests_served += 1
            return resp
        finally:
            with state.counter_lock:
                state.computing -= 1
            state.slots.release()

    return app


def _shipped_models_dir() -> Path:
    from .models import MODELS_DIR

    return MODELS_DIR


def _too_large(state: _State, length: int) -> Response:
    return _error(413, f"request body of {length} bytes is larger than the limit of "
                       f"{state.max_request_bytes} bytes ({state.max_request_bytes / (1 << 20):g} MB; "
                       f"server option --max-request-mb)")


def _drain(req: Any) -> None:
    """Reads and discards the body (bounded by the limit) so that the client,
    still sending, receives the answer instead of a reset connection."""
    try:
        stream = req.stream
        while stream.read(1 << 20):
            pass
    except Exception:  # noqa: BLE001 - best effort
        pass


def _read_body() -> bytes:
    """The body; 400 when it cannot be read: that fails only on the client's bytes or connection, with
    the WSGI server's own exceptions (gunicorn: InvalidChunkSize, NoMoreData, a timeout; werkzeug's keep theirs)."""
    try:
        return request.get_data(cache=False)
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        raise ApiError(400, f"the request body could not be read: {type(exc).__name__}: {exc}") from None


def _read_request(state: _State) -> Tuple[Dict[str, Any], bytes, bytes, bool]:
    """``(header, public_context, data, binary)``; ApiError(400) if malformed."""
    mimetype = (request.mimetype or "").lower()
    body = _read_body()
    if mimetype == protocol.BINARY_CONTENT_TYPE or body[:4] == protocol.REQUEST_MAGIC:
        try:
            header, pub, data = protocol.decode_request(body)
        except protocol.ProtocolError as exc:
            raise ApiError(400, f"malformed binary request: {exc}") from None
        binary = True
    else:
        if not body:
            raise ApiError(400, "empty request body: send a JSON object or a binary frame "
                                f"({protocol.BINARY_CONTENT_TYPE}); see docs/openapi.yaml")
        try:
            header = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
            raise ApiError(400, f"malformed JSON body: {exc}") from None
        del body
        if isinstance(header, str) or protocol.looks_like_jsonpickle(header):
            # the original PyCrCNN posted json=jsonpickle.encode(payload): a JSON string
            raise ApiError(400, protocol.SEED_REQUEST_HINT)
        if not isinstance(header, dict):
            raise ApiError(400, f"the JSON body must be an object, got {type(header).__name__}")
        if isinstance(header.get("data"), (list, dict)):
            raise ApiError(400, protocol.SEED_REQUEST_HINT)
        if "data" not in header:
            raise ApiError(400, "missing field 'data' (base64 of CipherTensor.to_bytes())")
        try:
            pub = protocol.b64decode(header.pop("public_context", ""), "public_context")
            data = protocol.b64decode(header.pop("data"), "data")
        except protocol.ProtocolError as exc:
            raise ApiError(400, str(exc)) from None
        binary = False
    if protocol.looks_like_jsonpickle(header):
        raise ApiError(400, protocol.SEED_REQUEST_HINT)
    return header, pub, data, binary


def _public_context(state: _State, header: Dict[str, Any], pub: bytes) -> Tuple[Context, str]:
    """The request's public context and its id: sent whole (``pub``), or
    named by ``context_id`` (this process's cache, else the shared store: 404
    if the store has none)."""
    context_id = header.get("context_id")
    if pub and context_id is not None:
        raise ApiError(400, "send either public_context or context_id, not both")
    if not pub:
        if context_id is None:
            raise ApiError(400, "missing public context: upload ctx.public_context() with POST /contexts and send "
                                "its context_id, or send it whole as public_context")
        if not isinstance(context_id, str) or not ContextStore.ID_PATTERN.match(context_id):
            raise ApiError(400, f"context_id must be the 64 hex digits POST /contexts answered, got {context_id!r}")
        ctx = state.contexts.get(context_id)
        if ctx is not None:
            return ctx, context_id
        blob = state.store.get(context_id)
        if blob is None:
            raise ApiError(404, f"unknown context_id {context_id}: this server has no such public context (never "
                                "uploaded, or evicted from its bounded store); upload it with POST /contexts and retry",
                           context_id=context_id)
        return _parse_public_context(state, blob, context_id), context_id
    digest = hashlib.sha256(pub).hexdigest()
    return state.contexts.get(digest) or _parse_public_context(state, pub, digest), digest


def _parse_public_context(state: _State, pub: bytes, digest: str) -> Context:
    """Parses (and caches) a public context; 400 unless it is one."""
    if not pub:
        raise ApiError(400, "the public context is empty: send ctx.public_context()")
    if len(pub) > state.max_context_bytes:
        raise _context_too_large(state, len(pub))
    try:
        # without malloc statistics: the largest ratio measured (m=2048)
        ctx, nbytes = measured(lambda: Context.from_public(pub), 128 * len(pub))
    except FormatError as exc:
        raise ApiError(400, f"public_context rejected: {exc}") from None
    except HEError as exc:
        raise ApiError(400, f"public_context rejected: {type(exc).__name__}: {exc}") from None
    if ctx.has_secret_key:  # Context.from_public refuses these; belt and braces
        raise ApiError(400, "public_context holds a secret key; send ctx.public_context(), never the secret key")
    # other threads allocating meanwhile inflate a measurement: the smallest for these parameters is closest
    nbytes = min(nbytes, state.context_bytes.setdefault(ctx.fingerprint, nbytes))
    state.context_bytes[ctx.fingerprint] = nbytes
    state.contexts.put(digest, ctx, nbytes)
    return ctx


def _context_too_large(state: _State, size: int) -> ApiError:
    return ApiError(413, f"public context of {size} bytes is larger than this server accepts "
                         f"({state.max_context_bytes} bytes = {state.max_context_bytes / (1 << 20):g} MB; server option "
                         "--max-context-mb): a worker parses a context into 60-130x its size. Fewer rotation keys, "
                         "fewer plaintext primes or a smaller m make it smaller")


def _compute(state: _State) -> Response:
    t_start = time.perf_counter()
    header, pub, data, binary = _read_request(state)

    # -- which model and which layers (cheap checks first) ----------------------
    net = header.get("net")
    if not isinstance(net, str) or not net:
        raise ApiError(400, f"missing or invalid 'net' (a model name from GET /models), got {net!r}")
    entry = state.registry.get(net)
    if entry is None:
        raise ApiError(404, f"unknown net {net!r}; available: {', '.join(state.registry.names()) or 'none'}")
    spec, load_error = entry.load()
    if load_error is not None:
        raise ApiError(500, f"model {net!r} could not be loaded: {load_error}")
    start, stop = _parse_layers(header.get("layers"), spec, net)
    layout = header.get("layout", "batch")
    if layout not in ("batch", "packed"):
        raise ApiError(400, f'layout must be "batch" (the default) or "packed", got {layout!r}')
    try:
        selected = spec.select(range(start, stop))
        selected.check_supported()
    except HEError as exc:
        if isinstance(exc, UnsupportedLayerError):
            raise ApiError(422, f"layers {start}..{stop - 1} of {net!r} cannot run on encrypted data: {exc}",
                           supported=supported_ranges(spec)) from None
        raise ApiError(400, f"layers {start}..{stop - 1} of {net!r}: {exc}") from None
    switch = header.get("switch_to_last_level", "auto")
    if switch not in (True, False, "auto"):
        raise ApiError(400, f"switch_to_last_level must be true, false or \"auto\", got {switch!r}")

    # -- keys, parameters, data ---------------------------------------------------
    ctx, context_id = _public_context(state, header, pub)
    ignored = _check_parameters(header.get("encryption_parameters"), ctx)
    if layout == "packed":  # one image's packed ciphertexts through the model's saved plan
        try:
            result, out = run_packed(state.packed, entry, spec, (start, stop), context_id, ctx, data, t_start)
        except PackedRequestError as exc:
            raise ApiError(exc.status, exc.message) from None
        return _answer(header, result, out, binary, ignored)
    del pub
    try:
        x = CipherTensor.from_bytes(data, ctx)
    except HEError as exc:
        raise ApiError(400, f"data rejected: {exc}") from None
    del data
    shape = list(x.shape)
    if len(shape) < 2:
        raise ApiError(400, f"data has shape {shape}; expected [N, ...] with the image axes after the batch axis")
    if start == 0 and selected.input_shape is not None and tuple(shape[1:]) != tuple(selected.input_shape):
        raise ApiError(400, f"data has shape {shape}, model {net!r} expects [N, "
                            f"{', '.join(str(s) for s in selected.input_shape)}]"
                            + ("; packed ciphertexts go with \"layout\": \"packed\"" if ctx.rotation_steps else ""))
    try:
        out_shape = selected.output_shape(shape[1:])
    except HEError as exc:
        raise ApiError(400, f"data of shape {shape} does not fit layers {start}..{stop - 1} of {net!r}: {exc}") from None
    parse_seconds = time.perf_counter() - t_start

    # -- the encoded layers (cached) -------------------------------------------------
    try:
        model = state.weights.encoded(entry, selected, start, stop, ctx)
    except HEError as exc:
        raise ApiError(422, f"layers {start}..{stop - 1} of {net!r} cannot be encoded for these parameters: "
                            f"{exc}") from None

    # -- run: the engine's runner, rencryptions left to the client -------------------
    switch_result = {True: "always", False: "never", "auto": "auto"}[switch]
    t_run = time.perf_counter()
    try:
        x, reports = model.run(x, start, stop, rencrypt=False, switch_result=switch_result)
    except (PlaintextOverflow, NoiseBudgetExhausted, ParameterError) as exc:
        raise ApiError(422, f"{type(exc).__name__}: {exc}", layer=getattr(exc, "layer", None)) from None
    except SecretKeyRequired as exc:
        raise ApiError(422, f"the model needs the secret key: {exc}", layer=getattr(exc, "layer", None)) from None
    except HEError as exc:
        raise ApiError(400, str(exc), layer=getattr(exc, "layer", None)) from None
    compute_seconds = time.perf_counter() - t_run
    timings = [{"index": r["index"], "type": r["name"], "seconds": r["seconds"], "shape": r["shape"]} for r in reports]
    params = ctx.parameters()
    switched = switch is True or (switch == "auto" and ctx.switch_is_safe)
    t_ser = time.perf_counter()
    out = x.to_bytes()
    try:
        growth = plain(dict(x.growth_report()))
    except Exception:  # noqa: BLE001 - informative only
        growth = None
    result: Dict[str, Any] = {
        "net": net,
        "layers": [start, stop - 1],
        "shape": list(x.shape),
        "expected_shape": [shape[0], *out_shape],
        "encoding": ctx.encoding,
        "parameters": {k: v for k, v in params.items()},
        "level": x.level,
        "switched_to_last_level": switched,
        "timings": timings,
        "server_seconds": compute_seconds,
        "parse_seconds": parse_seconds,
        "serialize_seconds": time.perf_counter() - t_ser,
        "growth": growth,
        "rencrypt_positions": [p for p in spec.rencrypt_positions if start < p < stop],
        "worker_pid": os.getpid(),
    }
    return _answer(header, result, out, binary, ignored)


def _answer(header: Dict[str, Any], result: Dict[str, Any], out: bytes, binary: bool, ignored: List[str]) -> Response:
    """The answer of ``/compute`` in the request's form."""
    if ignored:
        result["ignored_parameters"] = ignored
    unknown = [k for k in header if k not in _REQUEST_FIELDS]
    if unknown:
        result["ignored_fields"] = unknown
    if binary:
        body = protocol.encode_response(result, out)
        return Response(body, status=200, mimetype=protocol.BINARY_CONTENT_TYPE)
    result["data"] = protocol.b64encode(out)
    return _json_response(result)


# ---------------------------------------------------------------------------
# command line: pycrcnn.serve (gunicorn worker processes, or --dev)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pycrcnn.server``: see :func:`pycrcnn.serve.main`."""
    from .serve import main as serve_main

    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
