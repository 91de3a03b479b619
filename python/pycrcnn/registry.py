"""The server's models and caches: the model files of a folder, loaded lazily
and described for ``GET /models``, the bounded caches of encoded weights and
parsed public contexts, and the on-disk store of uploaded public contexts that
every worker process reads. Nothing here knows about HTTP (:mod:`pycrcnn.server`).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ._engine import Context
from .model import EncodedModel, build_from_spec
from .spec import ModelSpec, load_model_spec

__all__ = ["MODEL_SUFFIXES", "LRU", "EncodedModelCache", "heap_bytes", "measured", "ContextStore", "ModelEntry", "Registry",
           "describe_model", "supported_ranges", "plain"]

log = logging.getLogger("pycrcnn.server")  # the server's log: these are its models

#: model files served, in order of preference when two share a name
MODEL_SUFFIXES = (".npz", ".pt", ".pth")


# ---------------------------------------------------------------------------
# bounded caches


class LRU:
    """A small thread-safe LRU mapping, bounded in entries and, when
    ``max_bytes`` is given, in the bytes its values hold (each :meth:`put`
    says how many). A value larger than the whole byte bound is kept alone:
    the process holds it while it computes anyway, and the next request of
    the same client (a two-square LeNet-1's packed context parses to ~1.7 GB)
    must not parse it again; so the bound is the larger of ``max_bytes`` and
    the largest single value."""

    def __init__(self, size: int, max_bytes: Optional[int] = None):
        self.size = max(0, int(size))
        self.max_bytes = None if max_bytes is None else max(0, int(max_bytes))
        self._d: "OrderedDict[Any, Tuple[Any, int]]" = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return self._d[key][0]
            self.misses += 1
            return None

    def put(self, key: Any, value: Any, nbytes: int = 0) -> None:
        nbytes = max(0, int(nbytes))
        if self.size == 0:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._d[key] = (value, nbytes)
            self.bytes += nbytes
            while len(self._d) > self.size or (len(self._d) > 1 and self.max_bytes is not None
                                               and self.bytes > self.max_bytes):
                _, (_, n) = self._d.popitem(last=False)
                self.bytes -= n

    def __len__(self) -> int:
        return len(self._d)

    def stats(self) -> Dict[str, Any]:
        return {"entries": len(self._d), "capacity": self.size, "bytes": self.bytes,
                "capacity_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2() -> Optional[Callable[[], Any]]:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> Optional[int]:
    """Bytes this process holds from malloc (glibc's ``mallinfo2``: every
    arena, mmapped blocks included), or None where it is not available. The
    engine allocates with malloc, so the difference around a parse or a build
    is what the parsed context or the encoded model holds (RSS is no measure:
    freed memory is kept by the process and reused, see ``tune_allocator``)."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def measured(make: Callable[[], Any], estimate: int) -> Tuple[Any, int]:
    """``(make(), bytes it holds)``: measured with :func:`heap_bytes` (other
    threads allocating meanwhile count too: an estimate), else ``estimate``."""
    before = heap_bytes()
    value = make()
    after = heap_bytes()
    if before is None or after is None:
        return value, estimate
    return value, max(0, after - before)


class EncodedModelCache(LRU):
    """Encoded models by (model, file version, layer range, parameter fingerprint).

    Encoded weights depend on the parameters, not on the keys: one entry
    serves every client with the same parameters.
    """

    def encoded(self, entry: "ModelEntry", selected: ModelSpec, start: int, stop: int, ctx: Context) -> EncodedModel:
        """The layers ``[start, stop)`` of ``entry`` (``selected``, its spec
        restricted to them) encoded for ``ctx``; HEError if they cannot be."""
        key = (entry.name, entry.version, start, stop, ctx.fingerprint)
        model = self.get(key)
        if model is None:
            # without mallinfo2: the float weights, one 8-byte word per plaintext prime each
            n_weights = sum(int(getattr(layer.weight, "size", 0)) + int(getattr(layer.bias, "size", 0))
                            for layer in selected.layers)
            model, nbytes = measured(lambda: build_from_spec(ctx, selected, rencrypt_positions=[]),
                                     n_weights * 8 * max(1, len(ctx.moduli)))
            self.put(key, model, nbytes)
        return model


# ---------------------------------------------------------------------------
# uploaded public contexts, shared by the worker processes


class ContextStore:
    """Public contexts by the SHA-256 of their bytes, one file each in a
    directory on local disk that every worker process of a server reads.

    Bounded in bytes: after each upload the least recently used files (by
    modification time, which :meth:`get` refreshes) are deleted until the
    total fits. Files are written to a temporary name and renamed, so a reader
    sees a whole blob or none; eviction runs under an ``flock`` so that two
    workers do not evict past each other. A blob is validated (parsed as a
    public context) by the caller before :meth:`put`; here it is bytes.
    """

    #: an id is the lowercase hex SHA-256 of the blob
    ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")
    _SUFFIX = ".ctx"

    def __init__(self, folder: os.PathLike, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the context store needs a positive size, got {max_bytes} bytes")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock_path = self.folder / ".lock"

    @staticmethod
    def default_folder() -> Path:
        """``$PYCRCNN_CONTEXT_DIR``, else ``pycrcnn-contexts-<uid>`` in the
        temporary directory: the same for every worker of a host, so that
        ``gunicorn 'pycrcnn.server:create_app()'`` workers share it."""
        env = os.environ.get("PYCRCNN_CONTEXT_DIR")
        if env:
            return Path(env)
        return Path(tempfile.gettempdir()) / f"pycrcnn-contexts-{os.getuid()}"

    @staticmethod
    def id_of(blob: bytes) -> str:
        return hashlib.sha256(blob).hexdigest()

    def _path(self, context_id: str) -> Path:
        return self.folder / (context_id + self._SUFFIX)

    def put(self, blob: bytes) -> str:
        """Stores ``blob`` (if not there already) and returns its id.
        ValueError when one blob is larger than the whole store."""
        if len(blob) > self.max_bytes:
            raise ValueError(f"a public context of {len(blob)} bytes does not fit the context store of "
                             f"{self.max_bytes} bytes (server option --context-store-mb)")
        context_id = self.id_of(blob)
        path = self._path(context_id)
        if path.exists():
            self._touch(path)
            return context_id
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._evict(keep=path)
        return context_id

    def get(self, context_id: str) -> Optional[bytes]:
        """The blob of ``context_id``, or None when it is unknown (never
        uploaded, evicted, or not an id)."""
        if not isinstance(context_id, str) or not self.ID_PATTERN.match(context_id):
            return None
        path = self._path(context_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        if self.id_of(blob) != context_id:  # a damaged file: drop it, the client uploads again
            self._unlink(path)
            return None
        self._touch(path)
        return blob

    def stats(self) -> Dict[str, int]:
        files = self._files()
        return {"entries": len(files), "bytes": sum(size for _, size, _ in files), "capacity_bytes": self.max_bytes}

    # -- helpers ----------------------------------------------------------------------
    def _files(self) -> List[Tuple[float, int, Path]]:
        out = []
        for path in self.folder.glob("*" + self._SUFFIX):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, path))
        return out

    def _evict(self, keep: Path) -> None:
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            files = sorted(self._files())  # oldest first
            total = sum(size for _, size, _ in files)
            for _, size, path in files:
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                self._unlink(path)
                total -= size
                log.info("context store: evicted %s (%d bytes)", path.stem[:12], size)

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:
            pass

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("context store: cannot delete %s: %s", path, exc)


# ---------------------------------------------------------------------------
# the models


class ModelEntry:
    """One model file, loaded lazily (and again if the file changes)."""

    def __init__(self, name: str, path: Path):
        self.name = name
        self.path = path
        self.lock = threading.Lock()
        self.spec: Any = None
        self.error: Optional[str] = None
        self.version: Optional[Tuple[int, int]] = None

    @property
    def format(self) -> str:
        return "npz" if self.path.suffix == ".npz" else "torch"

    def _stat(self) -> Optional[Tuple[int, int]]:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> Tuple[Any, Optional[str]]:
        """``(spec, None)`` or ``(None, error message)``; never raises."""
        with self.lock:
            stat = self._stat()
            if self.version is not None and stat == self.version:
                return self.spec, self.error
            self.version = stat
            self.spec, self.error = None, None
            try:
                spec = load_model_spec(self.path)
                spec.name = self.name
                self.spec = spec
            except ImportError as exc:
                self.error = f"cannot load {self.path.name}: {exc} (a .pt model needs torch: pip install 'pycrcnn[torch]')"
            except Exception as exc:  # noqa: BLE001 - a bad model file is listed with its error, never a crash
                self.error = f"cannot load {self.path.name}: {type(exc).__name__}: {exc}"
            if self.error:
                log.warning("model %s: %s", self.name, self.error)
            return self.spec, self.error


def supported_ranges(spec: ModelSpec) -> List[List[int]]:
    """Maximal ``[start, stop)`` torch-index ranges without unsupported modules."""
    ranges: List[List[int]] = []
    cur: Optional[List[int]] = None
    for layer in spec.layers:
        if layer.supported:
            if cur is None:
                cur = [layer.index, layer.end_index + 1]
            else:
                cur[1] = layer.end_index + 1
        else:
            if cur is not None:
                ranges.append(cur)
            cur = None
    if cur is not None:
        ranges.append(cur)
    return ranges


def describe_model(entry: ModelEntry) -> Dict[str, Any]:
    """A model as ``GET /models`` lists it (with its load error, if any)."""
    spec, error = entry.load()
    out: Dict[str, Any] = {"name": entry.name, "file": entry.path.name, "format": entry.format}
    if error is not None:
        out["error"] = error
        return out
    n_modules = spec.n_modules if spec.n_modules else (max(spec.indices) + 1 if spec.layers else 0)
    out.update({
        "input_shape": list(spec.input_shape) if spec.input_shape is not None else None,
        "n_modules": n_modules,
        "layers": [{"index": l.index, "type": l.type, "params": plain(l.params)} for l in spec.layers],
        "supported": supported_ranges(spec),
        "unsupported": [
            {"index": l.index, "module": l.params.get("module"), "reason": l.params.get("reason"),
             "alternative": l.params.get("alternative")} for l in spec.unsupported
        ],
        "rencrypt_positions": list(spec.rencrypt_positions),
        "normalization": spec.normalization,
        "accuracy": spec.accuracy,
    })
    desc = (spec.metadata or {}).get("description")
    if desc:
        out["description"] = desc
    from .packed_serving import describe_packed  # it imports this module

    out["packed"] = describe_packed(entry, spec)
    return out


class Registry:
    """The model files of a folder, by name (file stem); rescanned on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()
        self._entries: Dict[str, ModelEntry] = {}
        self._last_scan = 0.0
        self.scan(force=True)

    def scan(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_scan < 1.0:
                return
            self._last_scan = now
            found: Dict[str, Path] = {}
            try:
                files = sorted(self.folder.iterdir())
            except OSError as exc:
                log.error("cannot list the models folder %s: %s", self.folder, exc)
                files = []
            for suffix in MODEL_SUFFIXES:
                for f in files:
                    if f.suffix == suffix and not f.name.startswith(".") and f.is_file():
                        found.setdefault(f.stem, f)
            entries = {}
            for name, path in sorted(found.items()):
                old = self._entries.get(name)
                entries[name] = old if old is not None and old.path == path else ModelEntry(name, path)
            self._entries = entries

    def names(self) -> List[str]:
        self.scan()
        return sorted(self._entries)

    def get(self, name: str) -> Optional[ModelEntry]:
        """The model called ``name``; else the one model whose name matches it
        case-insensitively (the original configs ask for "MNIST" where the file
        is ``mnist.pt``); ``None`` when there is none, or several."""
        entry = self._entries.get(name)
        if entry is None:
            self.scan()
            entry = self._entries.get(name)
        if entry is None:
            folded = [e for n, e in self._entries.items() if n.casefold() == name.casefold()]
            entry = folded[0] if len(folded) == 1 else None
        return entry


# ---------------------------------------------------------------------------
# JSON-plain values (model descriptions, and every answer of the server)


def plain(v: Any) -> Any:
    """``v`` as JSON can hold it: dicts with string keys, lists for tuples,
    sets and arrays, Python numbers for numpy's, None for inf and nan (JSON
    has neither), anything else as its string."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, np.ndarray)):
        return [plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    return str(v)
