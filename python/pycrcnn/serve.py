"""Running the pycrcnn server: ``python -m pycrcnn.server`` (``pycrcnn-server``).

On Linux (and every Unix) the app runs under **gunicorn** worker processes by
default; ``--dev`` runs werkzeug's development server in one process instead.

- ``--workers N``: worker processes (default 2). Each one is the Flask app of
  :func:`pycrcnn.server.create_app` with its own bounded caches, computing at
  most ``--max-concurrent`` requests at once (default 1); one more gets 503
  with ``Retry-After`` at once, answered by one of the worker's spare HTTP
  threads (gunicorn's ``gthread`` worker) while the engine computes without
  the GIL.
- ``--threads T``: engine (rayon) threads per worker, set in gunicorn's
  ``post_fork`` hook, i.e. in the worker, never in the master (a thread pool
  does not survive ``fork``). Default: cores / workers, at least 1.
- Graceful restart: ``kill -HUP <master pid>`` starts new workers and lets the
  old ones finish their requests (up to ``--graceful-timeout`` seconds);
  ``SIGTERM`` stops the same way. A worker that dies (killed, out of memory)
  is replaced by the master; its client sees a broken connection, which
  :class:`pycrcnn.client.Client` retries (requests are pure functions of their
  inputs). Workers are also recycled after about ``--max-requests`` requests,
  so that a fragmented heap is returned to the system.
- The listening socket is bound here, before gunicorn starts, and handed to it
  as ``fd://N``: ``--port 0`` picks a free port, and the ``listening on``
  line names it.
- ``--io-timeout S`` (default 30): a connection silent for S seconds in the
  middle of a request (headers or body half sent, a client that stopped or
  died) or not reading its answer is dropped, and its worker thread freed
  (``SO_RCVTIMEO``/``SO_SNDTIMEO`` on the listening socket, inherited by
  every connection). Without it, a few such connections held every thread
  of the workers for good. A slow client still holds a thread for S seconds
  at a time: on untrusted networks, serve behind a buffering proxy (nginx).
- Uploaded public contexts (``POST /contexts``) live in ``--context-dir``,
  shared by the workers and bounded by ``--context-store-mb``.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import __version__

__all__ = ["main", "build_parser", "default_engine_threads"]

log = logging.getLogger("pycrcnn.server")

#: seconds a worker may stay silent before the master kills it (the engine computes
#: without the GIL, so a gthread worker keeps notifying while a request runs)
WORKER_TIMEOUT = 600
#: HTTP threads a worker keeps beyond the requests it computes: they answer 503, /, /models at once
SPARE_HTTP_THREADS = 4


def default_engine_threads(workers: int) -> int:
    """Cores / workers, at least 1: the engine threads of one worker process."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pycrcnn-server",
        description="Serve encrypted CNN inference: POST /compute runs model layers on BFV ciphertexts "
                    "with the client's public context only (gunicorn worker processes; --dev: one werkzeug process).")
    parser.add_argument("--models", default=None,
                        help="folder of .npz / .pt / .pth models (default: the models shipped with pycrcnn). "
                             ".pt files are pickles: only serve files you trust")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000; 0 = any free port)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes (default 2); with --dev, requests computed at once")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads per worker (default: cores / workers; pycrcnn.set_num_threads)")
    parser.add_argument("--max-concurrent", type=int, default=1,
                        help="requests one worker computes at once; one more gets 503 (default 1)")
    parser.add_argument("--max-request-mb", type=float, default=512, help="body limit in MB (default 512)")
    parser.add_argument("--weight-cache-size", type=int, default=8, help="encoded models kept per worker (default 8)")
    parser.add_argument("--context-cache-size", type=int, default=16,
                        help="parsed public contexts kept per worker (default 16)")
    parser.add_argument("--weight-cache-mb", type=float, default=256,
                        help="bound in MB of the encoded models one worker keeps (default 256)")
    parser.add_argument("--context-cache-mb", type=float, default=512,
                        help="bound in MB of the parsed public contexts one worker keeps: one holds ~100x its "
                             "upload, 5 MB at m=2048, 30-60 MB at m=4096 (default 512)")
    parser.add_argument("--max-context-mb", type=float, default=64,
                        help="largest public context accepted, in MB of its bytes (413 beyond): a worker parses "
                             "one into 60-130x its size (default 64)")
    parser.add_argument("--context-dir", default=None,
                        help="directory of uploaded public contexts, shared by the workers "
                             "(default: $PYCRCNN_CONTEXT_DIR, else pycrcnn-contexts-<uid> in the temporary directory)")
    parser.add_argument("--context-store-mb", type=float, default=1024,
                        help="bound of the context directory in MB; least recently used contexts go first "
                             "(default 1024)")
    parser.add_argument("--graceful-timeout", type=float, default=120,
                        help="seconds a stopping worker may finish its requests (default 120)")
    parser.add_argument("--io-timeout", type=float, default=30,
                        help="seconds a connection may stay silent in the middle of a request (or not read its "
                             "answer) before it is dropped; 0 = never (default 30). Slow clients still hold a "
                             "thread that long: on untrusted networks, serve behind a buffering proxy (nginx)")
    parser.add_argument("--max-requests", type=int, default=1000,
                        help="a worker is replaced after about this many requests; 0 = never (default 1000)")
    parser.add_argument("--dev", action="store_true", help="werkzeug's development server in one process")
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    for name, value in (("--workers", args.workers), ("--max-concurrent", args.max_concurrent)):
        if value < 1:
            print(f"pycrcnn-server: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.threads is not None and args.threads < 0:
        print(f"pycrcnn-server: --threads must be >= 0 (0 = all cores), got {args.threads}", file=sys.stderr)
        return 2
    app_kwargs: Dict[str, Any] = {
        "models_dir": args.models, "max_request_mb": args.max_request_mb,
        "weight_cache_size": args.weight_cache_size, "context_cache_size": args.context_cache_size,
        "weight_cache_mb": args.weight_cache_mb, "context_cache_mb": args.context_cache_mb,
        "max_context_mb": args.max_context_mb,
        "context_dir": args.context_dir, "context_store_mb": args.context_store_mb,
    }
    if args.dev:
        return _run_dev(args, app_kwargs)
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        print("pycrcnn-server: gunicorn is not installed (pip install gunicorn), or run the development "
              "server with --dev", file=sys.stderr)
        return 2
    app_kwargs["max_concurrent"] = args.max_concurrent
    # the checks create_app makes, here in the master: a bad option fails at once, not in every worker
    from .server import create_app

    try:
        probe = create_app(**app_kwargs)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"pycrcnn-server: {exc}", file=sys.stderr)
        return 2
    state = probe.extensions["pycrcnn"]
    app_kwargs["models_dir"] = state.models_dir
    app_kwargs["context_dir"] = state.store.folder
    names = ", ".join(state.registry.names()) or "none"
    del probe, state
    try:
        listener = _bind(args.host, args.port, args.io_timeout)
    except OSError as exc:
        print(f"pycrcnn-server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = listener.getsockname()[1]
    threads = args.threads if args.threads is not None else default_engine_threads(args.workers)
    banner = (f"pycrcnn server {__version__} listening on http://{args.host}:{port} "
              f"(gunicorn, {args.workers} worker processes x {threads} engine threads; "
              f"models: {app_kwargs['models_dir']}; {names}; contexts: {app_kwargs['context_dir']})")
    options = {
        "bind": [f"fd://{listener.fileno()}"],
        "workers": args.workers,
        "worker_class": "gthread",
        "threads": args.max_concurrent + SPARE_HTTP_THREADS,
        "timeout": WORKER_TIMEOUT,
        "graceful_timeout": args.graceful_timeout,
        "max_requests": args.max_requests,
        "max_requests_jitter": max(1, args.max_requests // 10) if args.max_requests else 0,
        "limit_request_line": 8190,
        "loglevel": "warning" if args.quiet else "info",
        "accesslog": None if args.quiet else "-",
        "proc_name": "pycrcnn-server",
        # gunicorn >= 25 opens a control socket at one path per user: two servers would share it
        "control_socket_disable": True,
    }
    from ._gunicorn import PycrcnnApplication

    PycrcnnApplication(options, app_kwargs, engine_threads=threads, banner=banner).run()
    return 0


def _bind(host: str, port: int, io_timeout: float = 0) -> socket.socket:
    """The listening socket, bound before gunicorn starts (port 0 = a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if io_timeout > 0:
        # inherited by every accepted connection (Linux): a client silent this long in the middle
        # of a request (or not reading its answer) frees its worker thread instead of holding it forever
        tv = struct.pack("ll", int(io_timeout), int((io_timeout % 1) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run_dev(args: argparse.Namespace, app_kwargs: Dict[str, Any]) -> int:
    from werkzeug.serving import make_server

    from ._engine import set_num_threads
    from .server import create_app

    if args.threads is not None:
        set_num_threads(args.threads)
    try:
        app = create_app(max_concurrent=args.workers, **app_kwargs)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"pycrcnn-server: {exc}", file=sys.stderr)
        return 2
    if args.quiet:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(args.host, args.port, app, threaded=True)
    state = app.extensions["pycrcnn"]
    print(f"pycrcnn server {__version__} listening on http://{args.host}:{server.server_port} "
          f"(development server; models: {state.models_dir}; {', '.join(state.registry.names()) or 'none'}; "
          f"contexts: {state.store.folder})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
