"""Encrypted batch jobs on a Ray cluster: :func:`classify_dataset`.

A dataset that outgrows one machine is encrypted on the client in batches
(batch encoding: one ciphertext tensor holds up to ``m`` images) and run on a
Ray cluster, from a laptop's local cluster to many nodes. Ray is an optional
extra (``pip install pycrcnn[ray]``); nothing else in pycrcnn imports it.

What goes where:

* the **public context** (parameters, public and relinearization keys) and the
  **model** (its torch-free ``.npz`` spec, as bytes) go to the object store
  **once** (``ray.put``); a task receives references to them and a worker
  fetches and encodes them on its first task only (the weights are encoded
  once per worker process, then cached);
* each task gets **one** encrypted batch (the tensor's bytes), runs it
  through the engine's model runner (:meth:`pycrcnn.EncodedModel.run`) and
  returns the output tensor's bytes and its compute time;
* the **secret key never leaves the client**: only blobs of the engine's
  frame kinds "public context" and "ciphertext tensor", and the model's
  ``.npz``, are sent; a Context is never pickled (pickling one that holds the
  secret key would carry it), and a public context given as bytes is checked
  by the engine's parser, which refuses a secret-key blob.

Failures: a task that raises or whose worker dies is retried by Ray
(``max_retries``, ``retry_exceptions=True``); an engine error (:class:`HEError`,
e.g. a plaintext overflow) is deterministic, so it is reported at once instead
of retried. A batch that still fails is never dropped:
:class:`BatchesFailed` names every failed batch index with its cause, and
holds the outputs of the batches that succeeded.

Example::

    ctx = Context(m=2048, encoding="batch", scale_bits=6, weight_scale_bits=6); ctx.keygen()
    batches = [ctx.encrypt(x) for x in np.array_split(normalize(images), 4)]
    result = classify_dataset("tiny_mlp.npz", ctx, batches, address="auto")
    logits = np.concatenate([ctx.decrypt(t) for t in result.outputs])

``python -m pycrcnn.distributed --model tiny_mlp --mnist 256 --address ADDR``
does this for MNIST digits and prints accuracy and images/s.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from .._engine import CipherTensor, Context, HEError

__all__ = ["BatchesFailed", "ClassifyResult", "classify_dataset", "model_bytes", "public_context_bytes"]

#: engine errors are deterministic (the same bytes fail the same way): not retried
_DETERMINISTIC = (HEError,)


class BatchesFailed(HEError):
    """Some batches failed on the cluster, after their retries.

    ``failures`` maps each failed batch index to its cause (a message);
    ``outputs`` is the list of output tensors in batch order, ``None`` where the
    batch failed, so the work of the batches that succeeded is not lost.
    """

    def __init__(self, failures: Dict[int, str], outputs: List[Optional[CipherTensor]]):
        self.failures = dict(sorted(failures.items()))
        self.outputs = outputs
        lines = [f"batch {i}: {why}" for i, why in self.failures.items()]
        super().__init__(f"{len(self.failures)} of {len(outputs)} batches failed on the cluster:\n  "
                         + "\n  ".join(lines))


@dataclass
class ClassifyResult:
    """What :func:`classify_dataset` returns.

    ``outputs``: output tensors in batch order (under the caller's context:
    decrypt them with the secret key); ``compute_seconds``: each batch's model
    run as timed on its worker; ``task_seconds``: the same plus parsing the
    batch and serializing the output there; ``wall_seconds``: the whole job, from the first
    ``ray.put`` to the last result (reading the batches included: encryption
    too, where an iterator encrypts them as they are read); ``broadcast_bytes``: public context + model
    sent once; ``batch_bytes`` / ``result_bytes``: ciphertext bytes sent to and
    received from the cluster, per batch.
    """

    outputs: List[CipherTensor]
    compute_seconds: List[float] = field(default_factory=list)
    task_seconds: List[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    broadcast_bytes: int = 0
    batch_bytes: List[int] = field(default_factory=list)
    result_bytes: List[int] = field(default_factory=list)


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("pycrcnn.distributed needs Ray: pip install 'pycrcnn[ray]'") from None
    return ray


# -- what the client sends ----------------------------------------------------------
def public_context_bytes(ctx_or_public_context: Union[Context, bytes]) -> bytes:
    """The public context's bytes: from a Context (with or without the secret
    key), or checked bytes (the engine refuses a secret-key blob here)."""
    if isinstance(ctx_or_public_context, Context):
        return bytes(ctx_or_public_context.public_context())
    if isinstance(ctx_or_public_context, (bytes, bytearray, memoryview)):
        data = bytes(ctx_or_public_context)
        Context.from_public(data)  # raises FormatError on a secret key or anything else
        return data
    raise TypeError(f"expected a pycrcnn Context or public-context bytes, got {type(ctx_or_public_context).__name__}")


def model_bytes(model: Any) -> bytes:
    """The model's torch-free ``.npz`` spec as bytes, from an
    :class:`~pycrcnn.EncodedModel`, a :class:`~pycrcnn.ModelSpec` or a model
    file (``.npz``; ``.pt`` needs torch). The cluster cannot rencrypt (no
    secret key), so a model with rencryption positions is refused."""
    from ..model import EncodedModel
    from ..spec import ModelSpec, export_model, load_model_spec

    if isinstance(model, EncodedModel):
        spec, positions = model.spec, model.rencrypt_positions
    elif isinstance(model, ModelSpec):
        spec, positions = model, model.rencrypt_positions
    elif isinstance(model, (str, os.PathLike)):
        spec = load_model_spec(model)
        positions = spec.rencrypt_positions
    else:
        raise TypeError(f"expected an EncodedModel, a ModelSpec or a model file, got {type(model).__name__}")
    if positions:
        raise HEError(f"{spec.name}: rencryption positions {list(positions)} need the secret key, which never "
                      "enters the cluster; run a model without rencryption (more noise budget: larger m)")
    with tempfile.TemporaryDirectory() as tmp:
        return export_model(spec, Path(tmp) / "model.npz", rencrypt_positions=[]).read_bytes()


# -- what a worker runs ----------------------------------------------------------------
#: per worker process: (context ref, model ref) -> (public Context, EncodedModel)
_WORKER_MODELS: Dict[Tuple[str, str], Tuple[Context, Any]] = {}


def _worker_model(shared: List[Any], threads: int) -> Tuple[Context, Any]:
    """The public context and encoded model of a job, fetched and encoded on a
    worker's first task of that job, then reused."""
    ctx_ref, model_ref = shared
    key = (ctx_ref.hex(), model_ref.hex())
    cached = _WORKER_MODELS.get(key)
    if cached is None:
        ray = _ray()
        from .. import set_num_threads
        from ..model import build_from_spec
        from ..spec import load_model_spec

        set_num_threads(threads)
        ctx_blob, npz = ray.get([ctx_ref, model_ref])
        ctx = Context.from_public(ctx_blob)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.npz"
            path.write_bytes(npz)
            spec = load_model_spec(path)
        _WORKER_MODELS.clear()  # one job at a time per worker: keep memory bounded
        cached = _WORKER_MODELS[key] = (ctx, build_from_spec(ctx, spec, rencrypt_positions=[]))
    return cached


def _run_batch(shared: List[Any], batch: bytes, threads: int) -> Tuple[str, Any, float, float]:
    """One task: one encrypted batch through the model runner. Returns
    ``("ok", output bytes, compute seconds, task seconds)`` (the task: parsing
    the batch, the run, serializing the output), or ``("error", message, 0,
    0)`` for an engine error (deterministic: retrying would fail the same way)."""
    try:
        ctx, model = _worker_model(shared, threads)
        start = time.perf_counter()
        x = CipherTensor.from_bytes(batch, ctx)
        compute_start = time.perf_counter()
        out, _ = model.run(x, rencrypt=False)
        compute = time.perf_counter() - compute_start
        blob = bytes(out.to_bytes())
        return "ok", blob, compute, time.perf_counter() - start
    except _DETERMINISTIC as exc:
        return "error", f"{type(exc).__name__}: {exc}", 0.0, 0.0


# -- the driver ----------------------------------------------------------------------
def _batch_blob(batch: Any) -> bytes:
    if isinstance(batch, CipherTensor):
        return bytes(batch.to_bytes())
    if isinstance(batch, (bytes, bytearray, memoryview)):
        return bytes(batch)
    raise TypeError(f"a batch must be an encrypted CipherTensor (or its bytes), got {type(batch).__name__}")


def _ensure_ray(address: Optional[str], num_cpus: Optional[int]) -> bool:
    """Connects to ``address`` (or starts a local cluster) unless Ray is
    already initialized; returns whether this call started it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    options: Dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None:
        options["num_cpus"] = num_cpus
    ray.init(address=address, **options)
    return True


def _failure_message(exc: BaseException, retries: int) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''} (after {retries + 1} attempts)"


def classify_dataset(model: Any, ctx_or_public_context: Union[Context, bytes], encrypted_batches: Iterable[Any],
                     *, address: Optional[str] = None, num_cpus: Optional[int] = None, threads_per_task: int = 1,
                     max_retries: int = 3, max_in_flight: Optional[int] = None,
                     progress: bool = True) -> ClassifyResult:
    """Runs ``model`` over many encrypted batches on a Ray cluster.

    ``model``: an :class:`~pycrcnn.EncodedModel`, a
    :class:`~pycrcnn.ModelSpec` or a model file, without rencryption positions.
    ``ctx_or_public_context``: the client's Context (its public part is sent;
    the returned outputs live under it, so it decrypts them) or public-context
    bytes. ``encrypted_batches``: CipherTensors (or their bytes) made under
    that context, e.g. ``ctx.encrypt(images[k:k + m])``; an iterator is read
    as tasks are submitted, so a large dataset is encrypted as it goes.

    ``address``: a Ray cluster (``"auto"``, ``"ray://host:10001"``,
    ``"host:6379"``); ``None`` starts a local cluster with ``num_cpus`` CPUs
    (all when ``None``). If Ray is already initialized, its cluster is used
    and left running; a cluster this call started is shut down at the end.
    ``threads_per_task``: CPUs a task reserves and engine threads it uses.
    ``max_retries``: retries of a failed task (an exception or a dead worker).
    ``max_in_flight``: batches submitted and not yet collected (default: twice
    the cluster's CPUs), which bounds the client's and object store's memory.
    ``progress``: a tqdm bar over batches.

    Returns a :class:`ClassifyResult` (outputs in batch order). Raises
    :class:`BatchesFailed`, after every batch has run, if any batch failed.
    """
    if int(threads_per_task) < 1 or int(max_retries) < 0:
        raise ValueError("threads_per_task must be ≥ 1 and max_retries ≥ 0")
    ctx_blob = public_context_bytes(ctx_or_public_context)
    out_ctx = ctx_or_public_context if isinstance(ctx_or_public_context, Context) else Context.from_public(ctx_blob)
    npz = model_bytes(model)
    ray = _ray()
    started = _ensure_ray(address, num_cpus)
    try:
        return _run_job(ray, npz, ctx_blob, out_ctx, encrypted_batches, int(threads_per_task), int(max_retries),
                        max_in_flight, progress)
    finally:
        if started:
            ray.shutdown()


def _submit(task: Any, shared: List[Any], batch_ref: Any, threads: int) -> Any:
    """Submits one batch (the one place task arguments are made: a list of the
    shared references, the batch's reference and a thread count)."""
    return task.remote(shared, batch_ref, threads)


def _run_job(ray: Any, npz: bytes, ctx_blob: bytes, out_ctx: Context, batches: Iterable[Any], threads: int,
             retries: int, max_in_flight: Optional[int], progress: bool) -> ClassifyResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    # a list of references is passed as it is (not resolved): workers fetch on a cache miss only
    shared = [ray.put(ctx_blob), ray.put(npz)]
    task = ray.remote(_run_batch).options(num_cpus=threads, max_retries=retries, retry_exceptions=True)
    if max_in_flight is None:
        max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)) // threads)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, unit="batch", desc="cluster", disable=not progress)
    pending: Dict[Any, int] = {}
    results: Dict[int, Tuple[str, Any, float, float]] = {}
    sent: List[int] = []

    def collect(refs: List[Any]) -> None:
        for ref in refs:
            index = pending.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayError as exc:  # retries exhausted, or the worker kept dying
                results[index] = ("error", _failure_message(exc, retries), 0.0, 0.0)
            bar.update(1)

    try:
        for index, batch in enumerate(batches):
            blob = _batch_blob(batch)
            sent.append(len(blob))
            pending[_submit(task, shared, ray.put(blob), threads)] = index
            while len(pending) >= max_in_flight:
                done, _ = ray.wait(list(pending), num_returns=1)
                collect(done)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            collect(done)
    finally:
        bar.close()
    outputs: List[Optional[CipherTensor]] = []
    failures: Dict[int, str] = {}
    compute, tasks, received = [], [], []
    for index in range(len(sent)):
        status, payload, seconds, task_seconds = results[index]
        if status == "ok":
            outputs.append(CipherTensor.from_bytes(payload, out_ctx))
            received.append(len(payload))
        else:
            outputs.append(None)
            failures[index] = payload
            received.append(0)
        compute.append(seconds)
        tasks.append(task_seconds)
    if failures:
        raise BatchesFailed(failures, outputs)
    return ClassifyResult(outputs=outputs, compute_seconds=compute, task_seconds=tasks,  # type: ignore[arg-type]
                          wall_seconds=time.perf_counter() - t0, broadcast_bytes=len(ctx_blob) + len(npz),
                          batch_bytes=sent, result_bytes=received)
