"""gunicorn's custom application for :mod:`pycrcnn.serve` (imported only when
gunicorn serves, so that ``--dev`` and the library do not need it)."""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict

from gunicorn.app.base import BaseApplication

log = logging.getLogger("pycrcnn.server")


class PycrcnnApplication(BaseApplication):
    """The pycrcnn app under gunicorn: ``options`` are gunicorn settings, each
    worker builds its own app from ``app_kwargs`` (:func:`create_app`) after
    the fork, with ``engine_threads`` engine threads."""

    def __init__(self, options: Dict[str, Any], app_kwargs: Dict[str, Any], engine_threads: int, banner: str):
        self.options = dict(options)
        self.app_kwargs = dict(app_kwargs)
        self.engine_threads = int(engine_threads)
        self.banner = banner
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings newer than the installed gunicorn are skipped
                self.cfg.set(key, value)
        self.cfg.set("when_ready", self._when_ready)
        self.cfg.set("post_fork", self._post_fork)
        self.cfg.set("worker_abort", _worker_abort)
        self.cfg.set("child_exit", _child_exit)

    def load(self) -> Any:
        # runs in the worker (no preload): caches, locks and the engine's pool are the worker's own
        from .server import create_app

        return create_app(**self.app_kwargs)

    def _when_ready(self, server: Any) -> None:
        print(self.banner, flush=True)

    def _post_fork(self, server: Any, worker: Any) -> None:
        # the engine's thread pool is made here, in the worker: threads do not survive fork
        from ._engine import set_num_threads

        set_num_threads(self.engine_threads)
        server.log.info("worker %s: %d engine threads", worker.pid, self.engine_threads)


def _worker_abort(worker: Any) -> None:
    # SIGABRT from the master: the worker missed its heartbeat for `timeout` seconds
    worker.log.error("worker %s aborted after %s s without a heartbeat (its requests get a broken connection; "
                     "clients retry)", worker.pid, worker.cfg.timeout)
    sys.stderr.flush()


def _child_exit(server: Any, worker: Any) -> None:
    # unless the server is stopping, the master starts a replacement
    server.log.info("worker %s exited", worker.pid)
