"""The pycrcnn client: encrypt locally, compute on a server, decrypt locally.

Library::

    from pycrcnn import Context, datasets
    from pycrcnn.client import Client

    ctx = Context(m=4096, encoding="batch", scale_bits=8, weight_scale_bits=8, n_plaintext_moduli=3, p_bits=25)
    ctx.keygen()                                  # the secret key stays here
    client = Client("http://127.0.0.1:5000")
    images, labels = datasets.sample_digits(16)
    logits, report = client.classify(ctx, images, "lenet1_square")
    print(logits.argmax(1), labels, report["server_seconds"])

:meth:`Client.compute` uploads ``ctx.public_context()`` (parameters, public and
relinearization keys -- never the secret key) once per session with ``POST
/contexts`` and then names it by its ``context_id`` (the SHA-256 of its
bytes) in every request, beside one encrypted tensor; it returns the result
tensor parsed with ``ctx``. When the server no longer has the context (a
restart, or evicted from its bounded store) it answers 404 and the client
uploads it again, once, transparently. :meth:`Client.classify`
encrypts, runs the model -- with a **rencryption round trip** at each of the
model's rencryption positions: the server runs the layers up to the position,
the client decrypts and encrypts afresh (``ctx.rencrypt``: a full noise budget
and, in the batch encoding, the input scale again) and sends the result back
for the next layers -- and decrypts the logits.

Command line (the original PyCrCNN's ``parameters.json``)::

    python -m pycrcnn.client --config parameters.json --mnist 16
    python -m pycrcnn.client --config parameters.json --images digits.npy --labels labels.npy

A config runs as it is: without an ``encoding`` key (the original's files have
none) its ``encryption_parameters`` mean the seed's fractional encoding, one
value per ciphertext (``{"m": 2048, "p": 13513511, "sec": 128, "base": 2}``);
``"encoding": "batch"`` (in the config or its parameters) or ``--encoding
batch`` selects the batch encoding, which classifies a whole batch in one pass.

Errors of the server come back as :class:`ServerError` with the HTTP status
and the server's message; a server that cannot be reached, or whose worker
died mid-request, as :class:`ServerUnavailable` (a ``ConnectionError``). Both
say whether trying again may succeed (``retryable``); :meth:`Client.compute`
itself retries busy answers (503) and a broken connection (``retries``): a
request is a pure function of its inputs, so sending it again is safe.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import requests

from . import protocol
from ._engine import CipherTensor, Context

__all__ = ["Client", "ServerError", "ServerUnavailable", "main", "request_parameters", "config_encoding",
           "context_from_config"]

DEFAULT_TIMEOUT = (10.0, 3600.0)


class ServerError(RuntimeError):
    """The server answered with an error: ``status`` (HTTP code), ``message``
    (its explanation) and ``payload`` (the whole JSON answer, if any)."""

    def __init__(self, status: int, message: str, payload: Optional[Dict[str, Any]] = None, url: str = ""):
        super().__init__(f"HTTP {status} from {url or 'the server'}: {message}")
        self.status = status
        self.message = message
        self.payload = payload or {}
        self.url = url

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later: busy (503), a gateway
        error (502, 504), or a public context the server no longer has (404
        with ``context_id``: upload it again)."""
        return self.status in (502, 503, 504) or (self.status == 404 and "context_id" in self.payload)


class ServerUnavailable(ConnectionError):
    """The server could not be reached, or the connection broke before a whole
    answer arrived (e.g. its worker process was killed mid-request). Nothing
    was received, so nothing wrong can have been decrypted; the request can be
    sent again."""

    retryable = True


def request_parameters(ctx: Context) -> Dict[str, Any]:
    """The ``encryption_parameters`` entry describing ``ctx`` (what the server
    compares with the public context)."""
    p = dict(ctx.parameters())
    keep = ["m", "p", "sec", "encoding", "moduli", "base", "int_digits", "frac_digits", "scale_bits",
            "weight_scale_bits"]
    return {k: p[k] for k in keep if k in p}


class Client:
    """A connection to a pycrcnn server.

    Args:
        address: the server's base URL, e.g. ``http://127.0.0.1:5000`` (a
            trailing ``/compute``, as in the original ``parameters.json``, is
            accepted).
        timeout: seconds, or ``(connect, read)`` seconds, per HTTP request.
            Encrypted layers are slow: the default read timeout is an hour.
        busy_timeout: how long :meth:`compute` keeps retrying while the server
            answers 503 (all workers busy), in seconds.
        retries: how many times :meth:`compute` sends a request again after
            the connection broke (a worker that died mid-request is replaced
            by the server's master).
        session: a ``requests.Session`` to use (default: a new one).
    """

    def __init__(self, address: str, timeout: Any = DEFAULT_TIMEOUT, busy_timeout: float = 600.0,
                 retries: int = 1, session: Optional[requests.Session] = None):
        address = address.strip().rstrip("/")
        if address.endswith("/compute"):
            address = address[: -len("/compute")]
        if "://" not in address:
            address = "http://" + address
        self.address = address
        self.timeout = timeout
        self.busy_timeout = float(busy_timeout)
        self.retries = max(0, int(retries))
        self.session = session or requests.Session()
        self._models: Optional[Dict[str, Dict[str, Any]]] = None
        self._info: Optional[Dict[str, Any]] = None
        self._public: "weakref.WeakKeyDictionary[Any, Tuple[bytes, str]]" = weakref.WeakKeyDictionary()
        #: context ids uploaded to this server in this session
        self._uploaded: set = set()

    # -- plumbing -----------------------------------------------------------------
    def _url(self, path: str) -> str:
        return self.address + path

    @staticmethod
    def _raise_for(resp: requests.Response) -> None:
        if resp.status_code < 400:
            return
        payload: Dict[str, Any] = {}
        message = resp.reason or "error"
        try:
            payload = resp.json()
            if isinstance(payload, dict) and "error" in payload:
                message = str(payload["error"])
        except ValueError:
            text = resp.text.strip()
            if text:
                message = text[:500]
        raise ServerError(resp.status_code, message, payload if isinstance(payload, dict) else {}, resp.url)

    def _get(self, path: str) -> Any:
        try:
            resp = self.session.get(self._url(path), timeout=self.timeout)
        except requests.RequestException as exc:
            raise ServerUnavailable(f"cannot reach the pycrcnn server at {self.address}: {exc}") from exc
        self._raise_for(resp)
        return resp.json()

    def _public_context(self, ctx: Context) -> Tuple[bytes, str]:
        """``(ctx.public_context(), its SHA-256)``, made once per context (6 MB take milliseconds to hash)."""
        entry = self._public.get(ctx)
        if entry is None:
            blob = bytes(ctx.public_context())
            entry = (blob, hashlib.sha256(blob).hexdigest())
            try:
                self._public[ctx] = entry
            except TypeError:
                pass
        return entry

    def _check_size(self, n: int, path: str) -> None:
        """413 here, before sending, for what the server would refuse."""
        if self._info is None:
            try:
                self.info()
            except (ConnectionError, ServerError, ValueError):
                self._info = {}
        limit = (self._info or {}).get("max_request_bytes")
        if limit is not None and n > limit:
            raise ServerError(413, f"the request is {n} bytes, the server accepts at most {limit} bytes "
                                   "(server option --max-request-mb); send fewer images per request",
                              url=self._url(path))

    def _post(self, path: str, body: bytes, ctype: str) -> Tuple[requests.Response, int, int, int, float]:
        """POSTs ``body``, retrying busy answers (503, for up to ``busy_timeout``
        seconds) and broken connections (``retries`` times). Returns
        ``(response, bytes sent, busy retries, connection retries, seconds of the last exchange)``;
        raises :class:`ServerUnavailable` when the connection broke on every try."""
        deadline = time.monotonic() + self.busy_timeout
        busy = broken = 0
        sent = 0
        delay = 0.2
        while True:
            t0 = time.perf_counter()
            sent += len(body)
            try:
                # Connection: close -- a kept-alive connection stays with one worker process, so a
                # client retrying a busy answer (503) would ask the busy worker again and again while
                # another idles; a new connection goes to whichever worker accepts it first
                resp = self.session.post(self._url(path), data=body,
                                         headers={"Content-Type": ctype, "Connection": "close"},
                                         timeout=self.timeout)
                resp.content  # the whole answer, or the exception of a connection that broke
            except requests.RequestException as exc:
                if broken < self.retries:
                    broken += 1
                    time.sleep(0.5 * broken)
                    continue
                raise ServerUnavailable(f"POST {self._url(path)} failed ({broken} retries): {exc}") from exc
            elapsed = time.perf_counter() - t0
            if resp.status_code == 503 and time.monotonic() < deadline:
                busy += 1
                try:
                    wait = float(resp.headers.get("Retry-After", delay))
                except ValueError:
                    wait = delay
                time.sleep(min(max(wait * 0.5, delay), 5.0) * (0.75 + 0.5 * np.random.random()))
                delay = min(delay * 1.5, 5.0)
                continue
            return resp, sent, busy, broken, elapsed

    def context_id(self, ctx: Context) -> str:
        """The id the server gives ``ctx.public_context()``: its SHA-256."""
        return self._public_context(ctx)[1]

    # -- endpoints ------------------------------------------------------------------
    def upload_context(self, ctx: Context) -> Tuple[str, int]:
        """``POST /contexts``: uploads ``ctx.public_context()`` (never the
        secret key); returns ``(context_id, bytes sent)``."""
        blob, sha = self._public_context(ctx)
        self._check_size(len(blob), "/contexts")
        resp, sent, _, _, _ = self._post("/contexts", blob, "application/octet-stream")
        self._raise_for(resp)
        if (context_id := resp.json()["context_id"]) != sha:
            raise ServerError(resp.status_code, f"the server named the public context {context_id!r}, "
                                                "not the SHA-256 of its bytes", url=resp.url)
        self._uploaded.add(context_id)
        return context_id, sent

    def info(self) -> Dict[str, Any]:
        """``GET /``: status, version, body limit."""
        self._info = self._get("/")
        return self._info

    def models(self, refresh: bool = False) -> List[Dict[str, Any]]:
        """``GET /models``: one dict per model (name, input_shape, layers,
        supported ranges, rencrypt_positions; or error)."""
        if self._models is None or refresh:
            data = self._get("/models")
            self._models = {m["name"]: m for m in data.get("models", [])}
        return list(self._models.values())

    def model(self, net: str, refresh: bool = False) -> Dict[str, Any]:
        """The ``/models`` entry of ``net`` (KeyError if the server has none).

        Names match exactly, else case-insensitively when that picks one model:
        the original configs name nets as ``"MNIST"`` for ``mnist.pt``. The
        entry's ``name`` is the server's spelling.
        """
        self.models(refresh=refresh)
        assert self._models is not None
        if net in self._models:
            return self._models[net]
        same = [name for name in self._models if name.lower() == str(net).lower()]
        if len(same) == 1:
            return self._models[same[0]]
        if not refresh:
            return self.model(net, refresh=True)
        raise KeyError(f"the server has no model {net!r}; it has: {', '.join(sorted(self._models)) or 'none'}")

    def plan(self, net: str, layout: str = "packed") -> Dict[str, Any]:
        """The plan the server publishes for ``net`` (``GET /models/<name>``;
        parameters, scales, shapes, rotation steps, no weights): make the
        client's context with ``Context.from_plan(plan)`` and ``keygen()``.
        :class:`ServerError` (422) with the server's reason when the model has
        no plan for ``layout``."""
        if layout != "packed":
            raise ValueError(f"servers publish packed plans only (layout='packed'), got layout={layout!r}")
        info = self.model(net)
        packed = info.get("packed") or {}
        if not packed.get("available"):
            raise ServerError(422, f"model {info.get('name', net)!r} has no packed plan on the server: "
                                   f"{packed.get('reason', 'the server publishes none')}", url=self._url("/models"))
        return packed["plan"]

    def build_request(self, ctx: Context, tensor: CipherTensor, net: str, layers: Optional[Sequence[int]] = None,
                      binary: bool = True, switch_to_last_level: Any = "auto",
                      context_id: Optional[str] = None, layout: Optional[str] = None) -> Tuple[bytes, str]:
        """``(body, content_type)`` of a ``/compute`` request. With
        ``context_id`` (what :meth:`compute` sends) the public context is named
        by its id (the binary frame's public-context blob is empty); without,
        the body holds ``ctx.public_context()`` whole. Never the secret key.
        ``layout="packed"``: ``tensor`` is one image's packed ciphertexts."""
        header: Dict[str, Any] = {
            "encryption_parameters": [request_parameters(ctx)],
            "net": net,
            "layers": None if layers is None else [int(i) for i in layers],
            "switch_to_last_level": switch_to_last_level,
        }
        pub = b"" if context_id is not None else self._public_context(ctx)[0]
        if context_id is not None:
            header["context_id"] = context_id
        if layout is not None:
            header["layout"] = layout
        data = tensor.to_bytes()
        if binary:
            return protocol.encode_request(header, pub, data), protocol.BINARY_CONTENT_TYPE
        if pub:
            header["public_context"] = protocol.b64encode(pub)
        header["data"] = protocol.b64encode(data)
        return json.dumps(header).encode("utf-8"), protocol.JSON_CONTENT_TYPE

    def compute(self, ctx: Context, tensor: CipherTensor, net: str, layers: Optional[Sequence[int]] = None,
                binary: bool = True, switch_to_last_level: Any = "auto",
                layout: Optional[str] = None) -> Tuple[CipherTensor, Dict[str, Any]]:
        """Runs the layers ``layers`` (torch module indices; None = all) of
        ``net`` on ``tensor`` on the server (``layout="packed"``: the whole
        model on one image's packed ciphertexts).

        Returns ``(result, report)``: the result parsed with ``ctx`` and a dict
        with ``upload_bytes`` (every byte this call sent: the request, any
        public-context upload, any retries), ``context_upload_bytes`` (the
        part that uploaded the public context: 0 once the server has it),
        ``download_bytes``, ``request_seconds`` (wall time of the HTTP
        exchange), ``server_seconds`` (the server's compute time), ``timings``
        (per layer), ``busy_retries``, ``connection_retries`` and the
        response's other fields (shape, level, switched_to_last_level,
        parameters, ...). Raises :class:`ServerError` for an error answer and
        :class:`ServerUnavailable` when the connection broke ``retries + 1``
        times; 503 (busy) answers are retried for up to ``busy_timeout`` seconds.
        """
        context_id = self.context_id(ctx)
        t0 = time.perf_counter()
        body, ctype = self.build_request(ctx, tensor, net, layers, binary, switch_to_last_level, context_id, layout)
        serialize_seconds = time.perf_counter() - t0
        self._check_size(len(body), "/compute")
        context_bytes = 0
        if context_id not in self._uploaded:
            context_bytes += self.upload_context(ctx)[1]
        resp, sent, busy, broken, elapsed = self._post("/compute", body, ctype)
        if resp.status_code == 404 and _names_context(resp, context_id):
            # the server lost the context (restart, eviction): upload it again, once
            self._uploaded.discard(context_id)
            context_bytes += self.upload_context(ctx)[1]
            resp, sent2, busy2, broken2, elapsed = self._post("/compute", body, ctype)
            sent, busy, broken = sent + sent2, busy + busy2, broken + broken2
        self._raise_for(resp)
        content = resp.content
        if resp.headers.get("Content-Type", "").split(";")[0].strip() == protocol.BINARY_CONTENT_TYPE:
            try:
                header, data = protocol.decode_response(content)
            except protocol.ProtocolError as exc:
                raise ServerError(resp.status_code, f"malformed binary response: {exc}", url=resp.url) from None
        else:
            header = resp.json()
            data = protocol.b64decode(header.pop("data", None), "data")
        result = CipherTensor.from_bytes(data, ctx)
        report = dict(header)
        report.update({
            "serialize_seconds_client": serialize_seconds,
            "upload_bytes": sent + context_bytes,
            "context_upload_bytes": context_bytes,
            "download_bytes": len(content),
            "request_seconds": elapsed,
            "busy_retries": busy,
            "connection_retries": broken,
        })
        return result, report

    def classify(self, ctx: Context, images: Any, net: str, layers: Optional[Sequence[int]] = None,
                 rencrypt_positions: Optional[Sequence[int]] = None, binary: bool = True) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Encrypts ``images``, runs ``net`` on the server with rencryption round
        trips, and decrypts the outputs.

        A context made from a packed plan (``Context.from_plan(client.plan(net))``)
        classifies one image per request in the packed layout: the whole model
        on the image's packed ciphertexts (see :meth:`classify_packed`).

        Args:
            ctx: a context holding the secret key.
            images: model inputs ``[N, *input_shape]`` (float), or raw pixels
                (uint8 ``[N, H, W]`` / ``[N, 1, H, W]``), which are normalised
                as the shipped models expect (``pycrcnn.datasets.normalize``:
                pixels / 255).
            net: a model name from :meth:`models`.
            layers: torch module indices to run (None = the whole model).
            rencrypt_positions: torch indices before which the client
                rencrypts (default: the model's own, from ``/models``); ``[]``
                for a single pass.

        Returns:
            ``(outputs, report)``: the decrypted outputs (float64 ``[N, ...]``)
            and ``encryption_seconds``, ``rencryption_seconds``,
            ``upload_bytes``, ``context_upload_bytes``, ``server_seconds``, ``request_seconds``,
            ``download_bytes``, ``decryption_seconds``, ``round_trips``,
            ``segments`` and ``requests`` (each request's report).
        """
        x = _as_inputs(images)
        info = self.model(net)
        net = info.get("name", net)  # the server's spelling of the name
        if "error" in info:
            raise ServerError(500, f"model {net!r} is not available on the server: {info['error']}")
        if ctx.packed_model is not None:
            if layers is not None or rencrypt_positions:
                raise ValueError("the packed layout runs the whole model in one request: no layers or rencryptions")
            return self.classify_packed(ctx, x, net, binary=binary)
        n_modules = int(info.get("n_modules") or 0)
        if layers is None:
            start, stop = 0, n_modules
        else:
            idx = sorted({int(i) for i in layers})
            start, stop = idx[0], idx[-1] + 1
        if rencrypt_positions is None:
            rencrypt_positions = info.get("rencrypt_positions") or []
        cuts = sorted({int(p) for p in rencrypt_positions if start < int(p) < stop})
        bounds = [start, *cuts, stop]
        segments = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

        report: Dict[str, Any] = {
            "net": net, "images": int(x.shape[0]), "encoding": ctx.encoding, "segments": segments,
            "encryption_seconds": 0.0, "rencryption_seconds": 0.0, "decryption_seconds": 0.0,
            "upload_bytes": 0, "context_upload_bytes": 0, "download_bytes": 0, "server_seconds": 0.0, "request_seconds": 0.0,
            "round_trips": 0, "requests": [],
        }
        # the batch encoding holds up to m images per ciphertext: larger inputs go in chunks
        chunk = ctx.m if ctx.encoding == "batch" else max(1, x.shape[0])
        outputs = []
        for lo in range(0, x.shape[0], chunk):
            t0 = time.perf_counter()
            t = ctx.encrypt(x[lo:lo + chunk])
            report["encryption_seconds"] += time.perf_counter() - t0
            for k, (a, b) in enumerate(segments):
                t, r = self.compute(ctx, t, net, list(range(a, b)), binary=binary)
                report["round_trips"] += 1
                report["upload_bytes"] += r["upload_bytes"]
                report["context_upload_bytes"] += r["context_upload_bytes"]
                report["download_bytes"] += r["download_bytes"]
                report["server_seconds"] += r.get("server_seconds", 0.0)
                report["request_seconds"] += r["request_seconds"]
                report["requests"].append(r)
                if k < len(segments) - 1:
                    t0 = time.perf_counter()
                    t = ctx.rencrypt(t)
                    report["rencryption_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            outputs.append(np.asarray(ctx.decrypt(t)))
            report["decryption_seconds"] += time.perf_counter() - t0
        return np.concatenate(outputs, axis=0), report

    def classify_packed(self, ctx: Context, images: Any, net: str,
                        binary: bool = True) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Classifies ``images`` one at a time in the packed layout: encrypts
        each into packed ciphertexts (``ctx`` made from :meth:`plan`), sends
        them (the public context once per session) and decrypts the logits.
        Returns ``(outputs [N, classes], report)``: :meth:`classify`'s totals
        and ``per_image``: ``seconds`` (encrypt + request + decrypt),
        ``encryption_seconds``, ``request_seconds``, ``server_seconds``,
        ``upload_bytes`` (without the public context), ``download_bytes``, ``decryption_seconds``."""
        if ctx.packed_model is None:
            raise ValueError("classify_packed needs a context made from a packed plan: "
                             "Context.from_plan(client.plan(net)), then keygen()")
        x = _as_inputs(images)
        report: Dict[str, Any] = {
            "net": net, "images": int(x.shape[0]), "encoding": ctx.encoding, "layout": "packed",
            "encryption_seconds": 0.0, "rencryption_seconds": 0.0, "decryption_seconds": 0.0,
            "upload_bytes": 0, "context_upload_bytes": 0, "download_bytes": 0, "server_seconds": 0.0,
            "request_seconds": 0.0, "round_trips": 0, "requests": [], "per_image": [],
        }
        outputs = []
        for i in range(x.shape[0]):
            t0 = time.perf_counter()
            t = ctx.encrypt(x[i:i + 1])
            t1 = time.perf_counter()
            out, r = self.compute(ctx, t, net, binary=binary, layout="packed")
            t2 = time.perf_counter()
            outputs.append(np.asarray(ctx.decrypt(out)))
            t3 = time.perf_counter()
            image = {"seconds": t3 - t0, "encryption_seconds": t1 - t0, "request_seconds": t2 - t1,
                     "server_seconds": r.get("server_seconds", 0.0),
                     "upload_bytes": r["upload_bytes"] - r["context_upload_bytes"],
                     "download_bytes": r["download_bytes"], "decryption_seconds": t3 - t2}
            report["per_image"].append(image)
            report["requests"].append(r)
            report["round_trips"] += 1
            report["context_upload_bytes"] += r["context_upload_bytes"]
            for key in ("encryption_seconds", "request_seconds", "server_seconds", "download_bytes",
                        "decryption_seconds"):
                report[key] += image[key]
            report["upload_bytes"] += r["upload_bytes"]
        return np.concatenate(outputs, axis=0), report


def _names_context(resp: requests.Response, context_id: str) -> bool:
    """True for the server's "unknown context_id" answer (not an unknown net)."""
    try:
        payload = resp.json()
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("context_id") == context_id


def _as_inputs(images: Any) -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype == object:
        raise TypeError("images must be a numeric array (plaintext inputs); encrypt with compute() otherwise")
    if arr.dtype == np.uint8:
        from .datasets import normalize

        return normalize(arr).astype(np.float64)
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[:, None]
    return arr


# ---------------------------------------------------------------------------
# command line


#: the encoding of a config that names none: the seed's (its parameters.json files have no "encoding")
DEFAULT_CONFIG_ENCODING = "fractional"


def _config_parameters(config: Dict[str, Any]) -> Dict[str, Any]:
    from .planner.auto import is_auto

    if is_auto(config.get("encryption_parameters")):
        return {"encoding": "batch"}
    params_list = config.get("encryption_parameters") or [{}]
    params = params_list[0] if isinstance(params_list, list) else params_list
    if not isinstance(params, dict):
        raise ValueError(f"'encryption_parameters' must be a list of objects (or one object), got {params_list!r}")
    return params


def config_encoding(config: Dict[str, Any], override: Optional[str] = None) -> str:
    """The encoding a client config asks for: ``override`` (``--encoding``), else
    ``encryption_parameters[0]["encoding"]``, else the config's ``encoding``,
    else ``"fractional"`` -- the seed's, which the original configs (no
    ``encoding`` key) were written for."""
    encoding = override or _config_parameters(config).get("encoding") or config.get("encoding") \
        or DEFAULT_CONFIG_ENCODING
    if encoding not in ("fractional", "batch"):
        raise ValueError(f"unknown encoding {encoding!r}: 'fractional' (the seed's) or 'batch'")
    return encoding


def context_from_config(config: Dict[str, Any], encoding: Optional[str] = None) -> Context:
    """The (keyless) :class:`Context` a client config describes: the original
    ``parameters.json`` (``encryption_parameters: [{m, p, sec, base}]``) gives
    the seed's fractional encoding; ``"encryption_parameters": "auto"`` the
    plan for the config's model (``model_path``, or a shipped model named by
    ``net``); call ``keygen()`` on the result."""
    from .planner.auto import is_auto, plan_from_config

    if is_auto(config.get("encryption_parameters")):
        # "auto": the plan for the model (see pycrcnn.planner.auto)
        return plan_from_config(config).new_context()
    return _context_from_config(_config_parameters(config), config_encoding(config, encoding))


def _context_from_config(params: Dict[str, Any], encoding: str) -> Context:
    kw: Dict[str, Any] = {"m": int(params.get("m", 4096)), "sec": int(params.get("sec", 128)), "encoding": encoding}
    if params.get("p") is not None:
        kw["p"] = params["p"]
    if encoding == "fractional":
        for src, dst in (("base", "base"), ("int_digits", "int_digits"), ("intDigits", "int_digits"),
                         ("frac_digits", "frac_digits"), ("fracDigits", "frac_digits")):
            if src in params:
                kw[dst] = int(params[src])
    else:
        for k in ("scale_bits", "weight_scale_bits", "n_plaintext_moduli"):
            if k in params:
                # weight_scale_bits may be a list: one per Conv/Linear layer
                kw[k] = [int(b) for b in params[k]] if isinstance(params[k], list) else int(params[k])
    if "moduli_sizes" in params:
        kw["moduli_sizes"] = [int(s) for s in params["moduli_sizes"]]
    return Context(**kw)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pycrcnn.client`` (:mod:`pycrcnn.client_cli`)."""
    from .client_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
